#![no_std]
// The kernel programs are the `dataplane` binary of this crate (src/main.rs); this empty library
// exists so that `dataplane/build.rs` can declare a build-dependency on the crate, which makes
// cargo rebuild the agent when the kernel code changes.
