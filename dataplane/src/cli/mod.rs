//! Command-line front ends that talk to a running agent over its control socket.

pub mod observe;
pub mod status;
