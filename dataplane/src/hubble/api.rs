//! The generated code of Hubble's API (dataplane/proto, built by build.rs): prost messages,
//! tonic clients and servers, and pbjson's protobuf-JSON mapping of every message (strict:
//! an unknown field or enum value is an error).

#![allow(
    clippy::all,
    missing_docs,
    reason = "generated code, as prost, tonic and pbjson write it"
)]

pub mod flow {
    include!(concat!(env!("OUT_DIR"), "/flow.rs"));
    include!(concat!(env!("OUT_DIR"), "/flow.serde.rs"));
}

pub mod relay {
    include!(concat!(env!("OUT_DIR"), "/relay.rs"));
    include!(concat!(env!("OUT_DIR"), "/relay.serde.rs"));
}

pub mod observer {
    include!(concat!(env!("OUT_DIR"), "/observer.rs"));
    include!(concat!(env!("OUT_DIR"), "/observer.serde.rs"));
}

pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/peer.rs"));
    include!(concat!(env!("OUT_DIR"), "/peer.serde.rs"));
}
