//! Hubble's gRPC API served by the agent.

pub mod api;
