//! Builds the XDP program (`router-ebpf`) with aya-build into OUT_DIR, so that `router-ctl` embeds
//! it and ships as one self-contained binary. Needs the nightly's rust-src and bpf-linker:
//! `cargo xtask setup` installs both.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("router-ctl has no parent directory"))?
        .join("router-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    println!("cargo:rerun-if-changed=../router-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "router-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the XDP program router-ebpf (run `cargo xtask setup` if bpf-linker or rust-src is missing)")
}
