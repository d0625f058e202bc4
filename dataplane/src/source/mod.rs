//! Sources of the desired state: each turns what it follows into the one [`crate::model::Model`]
//! and hands it to the agent. Sources never touch the kernel; the reconciler applies what they
//! produce.

pub mod docker;
pub mod state_file;
