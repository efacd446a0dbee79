//! Builds the eBPF programs (`router-ebpf`) for the BPF target into OUT_DIR, so that `router-ctl`
//! embeds them and ships as one self-contained binary. Needs the nightly's rust-src and
//! bpf-linker: `cargo xtask setup` installs both.
//!
//! The sub-build is quiet: its output is shown only when it fails.
//!
//! `ROUTER_XDP_MUTANT=<name>` builds one deliberate fault into the program or the controller
//! (see `xtask/src/mutants.rs`). It is honoured only under the `mutants` profile, whose output
//! lives apart (`target/mutants/`); any other build that sees it stops with an error.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Faults in the XDP program (router-ebpf).
const EBPF_MUTANTS: &[&str] = &[
    "pass_all",
    "no_ttl_decrement",
    "checksum_byte_order",
    "src_mac_unchanged",
    "ecmp_ignores_ports",
    "wrong_pass_reason",
    "no_padding_trim",
    "gso_whole_length",
    "l4_unverified",
    "nat_ignored",
    "nat_untranslated_out",
    "nat_udp_zero_updated",
    "nat_icmp_errors_to_kernel",
    "nat_no_retire",
    "nat_stale_used",
    "guard_ignored",
    "kernel_policy_ignored",
    "nat_learn_off",
    "nat_learn_unproven",
    "nat_learned_unchecked",
];
/// Faults in the controller (router-ctl).
const CTL_MUTANTS: &[&str] = &[
    "guard_off",
    "kernel_routes_ignored",
    "kernel_policy_events_ignored",
    "ha_role_always_active",
    "unscheduled_candidates_count",
    "no_legacy_mirror",
    "elections_without_fencer",
    "renewed_without_fence_room",
    "log_failure_kills",
    "ra_solicitations_ignored",
    "ra_no_final",
    "ra_stateful_autonomous",
    "ra_standby_advertises",
    "api_group_ignored",
    "signals_after_pid_file",
    "follow_route_events_ignored",
    "guard_strict_tcp_copied",
    "guard_no_evidence",
    "guard_keeps_copies",
    "empty_maps_on_restart",
    "down_keeps_tx_slot",
    "break_before_make",
    "block_in_place",
    "long_always_lpm",
    "neigh_change_ignored",
    "auto_picks_xdp_on_veth",
    "ndo_xmit_ignored",
    "late_xmit_removal",
    "keeps_deleted_namespace",
    "nat_conf_off",
    "nat_no_refresh",
    "nat_learned_survive_purge",
    "ha_no_track",
    "fence_never",
    "standby_keeps_addresses",
    "replica_not_sent",
    "replica_unauthenticated",
    "replica_untranslated",
    "replica_uncounted",
    "replica_clash_kept",
    "replica_skip_ignores_ids",
    "replica_table_frozen",
    "wrong_level_order",
    "no_quarantine",
    "stale_table_kept",
    "no_map_renewal",
    "write_over_break_before_make",
    "no_backoff",
    "adopted_devices_stay",
    "fence_write_ignored",
    "fencer_unsupervised",
    "device_mac_change_ignored",
    "address_events_ignored",
    "v6_route_removal_kept",
    "rollback_deletes_previous_namespace",
    "fence_never_lifted",
    "etcd_client_cert_dropped",
    "interrupted_apply_forgotten",
    "home_addresses_lost",
    "renewals_share_the_session_thread",
    "host_limits_ignored",
];

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=ROUTER_XDP_MUTANT");
    println!("cargo:rerun-if-changed=../router-common/src");
    println!("cargo:rerun-if-changed=../router-ebpf/src");
    println!("cargo:rerun-if-changed=../router-ebpf/Cargo.toml");
    let all: Vec<String> = EBPF_MUTANTS
        .iter()
        .chain(CTL_MUTANTS)
        .map(|m| format!("\"{m}\""))
        .collect();
    println!(
        "cargo::rustc-check-cfg=cfg(mutant, values({}))",
        all.join(", ")
    );

    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let mutant = env::var("ROUTER_XDP_MUTANT").ok().filter(|m| !m.is_empty());
    if let Some(m) = &mutant {
        if !EBPF_MUTANTS.contains(&m.as_str()) && !CTL_MUTANTS.contains(&m.as_str()) {
            bail!("ROUTER_XDP_MUTANT={m} is not a known mutant");
        }
        if !in_mutants_profile(&out_dir) {
            bail!(
                "ROUTER_XDP_MUTANT={m} is set, but this is not the `mutants` profile: deliberate faults are built only by `cargo xtask mutants`; unset ROUTER_XDP_MUTANT"
            );
        }
        println!("cargo:rustc-cfg=mutant=\"{m}\"");
    }
    let ebpf_mutant = mutant.filter(|m| EBPF_MUTANTS.contains(&m.as_str()));

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("router-ctl has no parent directory")?
        .join("router-ebpf");
    build_ebpf(&ebpf_dir, &out_dir, ebpf_mutant.as_deref()).context(
        "building the eBPF programs of router-ebpf (run `cargo xtask setup` if bpf-linker or rust-src is missing)",
    )
}

/// True when OUT_DIR lies under `target/mutants/` (cargo names a custom profile's directory
/// after the profile).
fn in_mutants_profile(out_dir: &Path) -> bool {
    let parts: Vec<_> = out_dir.components().map(|c| c.as_os_str()).collect();
    parts
        .windows(2)
        .any(|w| w[0] == "mutants" && w[1] == "build")
}

/// `cargo build` of router-ebpf's binaries for bpfel with the nightly toolchain and
/// bpf-linker; each program is copied to OUT_DIR under its binary's name.
fn build_ebpf(ebpf_dir: &Path, out_dir: &Path, mutant: Option<&str>) -> Result<()> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN")?;
    let target = if endian == "big" {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    // Flags for the BPF target only: BTF for the loader, the host's arch for aya-ebpf.
    let mut flags = vec![
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ];
    if let Some(m) = mutant {
        flags.push(format!("--cfg=mutant=\"{m}\""));
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "router-ebpf",
    ])
    .args([
        "--bins",
        "--release",
        "--message-format=json",
        "--target",
        target,
    ])
    .args(["-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(out_dir.join("ebpf-target"))
    .current_dir(ebpf_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    // The outer build's compiler settings are for the host, not for the BPF target.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut built = Vec::new();
    let mut messages = Vec::new();
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            messages.push(line.to_string());
            continue;
        };
        match v["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(exe), Some(name)) =
                    (v["executable"].as_str(), v["target"]["name"].as_str())
                {
                    built.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            Some("compiler-message") => {
                if let Some(r) = v["message"]["rendered"].as_str() {
                    messages.push(r.to_string());
                }
            }
            _ => {}
        }
    }
    if !out.status.success() {
        for line in messages
            .iter()
            .flat_map(|m| m.lines())
            .chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            println!("cargo:warning={line}");
        }
        bail!(
            "the eBPF build failed ({}); its output is above",
            out.status
        );
    }
    for (name, exe) in built {
        let dst = out_dir.join(&name);
        std::fs::copy(&exe, &dst)
            .with_context(|| format!("cannot copy {} to {}", exe.display(), dst.display()))?;
    }
    Ok(())
}
