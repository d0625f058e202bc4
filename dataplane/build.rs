//! Builds the kernel programs (`dataplane-ebpf`) for the BPF target with aya-build and leaves
//! the object in OUT_DIR, from where `src/ebpf.rs` embeds it; and generates the Rust code of
//! Hubble's API (proto/) with prost and tonic, plus protobuf-JSON (de)serialisers with pbjson.
//! The .proto files are parsed by protox (pure Rust), so no `protoc` is needed.

use std::path::Path;

use anyhow::Context as _;
use prost::Message as _;

/// The API's files, below proto/.
const PROTOS: [&str; 4] = [
    "flow/flow.proto",
    "relay/relay.proto",
    "observer/observer.proto",
    "peer/peer.proto",
];

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    hubble_api(Path::new(&manifest_dir))?;
    let ebpf_dir = Path::new(&manifest_dir).join("../dataplane-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("kernel crate not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dataplane-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs failed; `cargo xtask setup` installs what they need")
}

fn hubble_api(manifest_dir: &Path) -> anyhow::Result<()> {
    let proto_dir = manifest_dir.join("proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    for file in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_dir.join(file).display());
    }
    let fds = protox::compile(PROTOS, [&proto_dir]).context("parsing proto/")?;
    let descriptors = out_dir.join("hubble_descriptors.bin");
    std::fs::write(&descriptors, fds.encode_to_vec()).context("writing the descriptors")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Well-known types with serde support, so that pbjson's code can use them.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)
        .context("generating the API's code")?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        // Hubble's JSON (`hubble observe -o json`) keeps the .proto field names.
        .preserve_proto_field_names()
        .build(&[".flow", ".relay", ".observer", ".peer"])
        .context("generating the API's JSON code")?;
    Ok(())
}
