//! `dataplane`: an eBPF dataplane for Docker hosts, as a library that the `dataplane` binary,
//! the tests and the bench share.
//!
//! The folders are the architecture (docs/DESIGN.md):
//!
//! ```text
//!  source ──> model ──> reconcile ──> kernel (maps, links) <── programs (dataplane-ebpf)
//!  (state file,  (one      (desired state,   (the only user of aya;          │ ring buffer
//!   docker)       model)    diff, apply)      conntrack GC)                  v
//!                                                          flows ──> control / cli, metrics
//! ```
//!
//! - [`source`]: the state file and the Docker engine, each producing a [`model::Model`] on
//!   tasks of their own (the agent's loop never reads or parses a file);
//! - [`model`]: the desired state and its validation;
//! - [`reconcile`]: what the kernel should hold for a model (policy and Maglev compilation
//!   included), diffed against what it holds and applied; it owns the [`kernel::Datapath`];
//! - [`kernel`]: loading the embedded programs with pinned maps, links, typed map access, and
//!   conntrack garbage collection (the one other writer of a map, see [`kernel::conntrack`]);
//! - [`flows`]: kernel events turned into Hubble flow records, their history, export and
//!   metrics;
//! - [`control`]: the local socket the agent answers on, and the [`control::status::Status`] it
//!   reports;
//! - [`agent`]: the main loop that ties the above together;
//! - [`cli`]: `status` and `observe`, the clients of a running agent;
//! - [`sandbox`]: a host with networks, containers and an outside client built from network
//!   namespaces (`dataplane sandbox`), what the test bed (tests/testbed) stands on; it uses the
//!   model's state-file types and nothing of the agent.

pub mod agent;
pub mod cli;
pub mod control;
pub mod flows;
pub mod hubble;
pub mod kernel;
pub mod model;
pub mod reconcile;
pub mod sandbox;
pub mod source;
