//! Builds the kernel programs (`agent-ebpf`) with the nightly toolchain and
//! bpf-linker, and places the object in `OUT_DIR` for `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let workspace = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?;
    // The kernel object also depends on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("agent-common").display()
    );
    let root = workspace.join("agent-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "loopgate-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
