//! Builds the kernel programs (`dataplane-ebpf`) for the BPF target with aya-build and leaves
//! the object in OUT_DIR, from where `src/ebpf.rs` embeds it.

use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
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
