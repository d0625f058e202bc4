//! Tests of the kernel programs through BPF_PROG_TEST_RUN (need root).

mod balancing;
mod flows;
mod hairpin;
mod hostile;
mod hostile6;
mod ipv6;
mod masquerade;
mod nat64;
mod packet;
mod policy;
mod programs;
mod translation;
mod untracked;
