use which::which;

/// Rebuild the kernel object when bpf-linker changes (a new LLVM can change the output).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker is not on PATH: run `cargo xtask setup` (or any `cargo xtask` command) first",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
