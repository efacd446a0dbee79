//! Developer tasks: `cargo xtask setup | build-and-load | test`.
//!
//! Everything a fresh machine lacks is installed by `setup`, which the other commands run first;
//! it is idempotent and takes a few seconds when all is present.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod mutants;
mod package;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build router-ctl, apply the routers (the seed topology by default), ping across, print stats.
    BuildAndLoad {
        /// Router definitions to apply instead of the built-in seed example.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the benchmark suite and write BENCHMARKS.md and bench-plot.svg (about 5 minutes).
    Bench {
        /// Extra arguments for the benchmark (e.g. `--runs 7`, `--no-e2e`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, packet (BPF_PROG_TEST_RUN) and namespace integration tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (binary, service unit, default definitions file, man page,
    /// README) into DIR (default target/package); prints the .deb's path.
    Package {
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Build the project with one deliberate fault at a time and run the tests that must catch
    /// it; the last line says `mutants: N killed, M survived`.
    Mutants {
        /// Run every listed test of a mutant, not only up to the first that kills it.
        #[arg(long)]
        all_tests: bool,
        /// Only these mutants (default: all).
        names: Vec<String>,
    },
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("ethtool", "ethtool"),
    ("tcpdump", "tcpdump"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    // The etcd agent: protoc builds its client (etcd-client's gRPC code), the tests start
    // their own etcd server and read it with etcdctl.
    ("protoc", "protobuf-compiler"),
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
    ("nsenter", "util-linux"),
    // The secured etcd of the tests: a CA and certificates made at each start.
    ("openssl", "openssl"),
    // Neutron's OVS agent plugs router ports as Open vSwitch internal ports: the tests run a
    // private ovs-vswitchd (userspace datapath).
    ("ovs-vswitchd", "openvswitch-switch"),
    // Neutron's L3 agent writes its rules with iptables (iptables-nft): the tests write
    // theirs the same way.
    ("iptables", "iptables"),
    // Neutron's HA routers: keepalived in each host's router namespace.
    ("keepalived", "keepalived"),
];

/// What `cargo xtask bench` uses besides: bulk TCP through the router.
const BENCH_PACKAGES: &[(&str, &str)] = &[("iperf3", "iperf3")];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::BuildAndLoad { config } => {
            setup()?;
            build_and_load(&root, config)
        }
        Cmd::Test { args } => {
            setup()?;
            test(&root, &args)
        }
        Cmd::Package { out } => {
            setup()?;
            let ctl = build_release(&root)?;
            let out = out.unwrap_or_else(|| root.join("target/package"));
            std::fs::create_dir_all(&out)?;
            let deb = package::build(&root, &ctl, &out)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Mutants { all_tests, names } => {
            setup()?;
            if !mutants::run(&root, &names, all_tests)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Bench { args } => {
            setup()?;
            install_missing(BENCH_PACKAGES)?;
            let ctl = build_release(&root)?;
            run(Command::new("cargo")
                .args(["run", "--release", "-p", "router-bench", "--"])
                .args(&args)
                .env("ROUTER_CTL", &ctl))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Installs the Debian packages of `pkgs` whose command is missing (idempotent).
fn install_missing(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn setup() -> Result<()> {
    if !nix_is_root() {
        bail!("the router needs root (BPF, namespaces, XDP): run as root, e.g. `sudo -E cargo xtask ...`");
    }
    // 1. Debian packages the controller, the demo and the tests use.
    install_missing(APT_PACKAGES)?;
    // 2. The nightly toolchain and its rust-src (build-std for the BPF target).
    let sysroot = match output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])) {
        Some(s) => PathBuf::from(s),
        None => {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            PathBuf::from(
                output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
                    .context("nightly sysroot")?,
            )
        }
    };
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // 3. bpf-linker built against the nightly's own LLVM.
    let llvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("the nightly toolchain ships no libLLVM.so.*")?;
    let llvm_major = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read LLVM's version from its file name")?
        .to_string();
    let prefix = home().join(".local/share/router-xdp/llvm");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    for name in [
        "libLLVM.so".to_string(),
        llvm.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = libdir.join(name);
        if std::fs::read_link(&link).ok().as_deref() != Some(llvm.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm, &link)?;
        }
    }
    let linker_ok =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
            .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm_major} (about 2 minutes)");
        run(Command::new("cargo")
            .args(["+stable", "install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix))?;
    }
    // 4. bpffs for the pinned maps and links; tracefs for debugging drops.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    // 5. Neutron's own L3 agent code, which builds the router namespaces of the follow-mode
    // tests and benchmark (tests/neutron/l3_agent.py), in a virtualenv of its own.
    neutron_venv()?;
    eprintln!("setup: ready (nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, iproute2/ping/ethtool, bpffs, neutron {NEUTRON_VERSION})");
    Ok(())
}

/// The Neutron release whose L3 agent builds the tests' routers, and where it is installed
/// (tests/src/neutron.rs names the same place).
const NEUTRON_VERSION: &str = "29.0.0";
const NEUTRON_VENV: &str = "/opt/router-xdp/neutron-29";

/// Installs Neutron `NEUTRON_VERSION` from the Python registry into `NEUTRON_VENV`, unless it
/// is there already.
fn neutron_venv() -> Result<()> {
    let python = Path::new(NEUTRON_VENV).join("bin/python");
    let installed = output(Command::new(&python).args([
        "-c",
        "import importlib.metadata as m, neutron.agent.l3.agent; print(m.version('neutron'))",
    ]));
    if installed.as_deref() == Some(NEUTRON_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing neutron {NEUTRON_VERSION} into {NEUTRON_VENV} (about a minute)");
    let interpreter = ["python3", "python"]
        .into_iter()
        .find(|p| have(p))
        .context("no python3 to make Neutron's virtualenv with")?;
    run(Command::new(interpreter).args(["-m", "venv", NEUTRON_VENV]))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("neutron=={NEUTRON_VERSION}"),
    ]))
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).as_deref() == Some("0")
}

fn build_release(root: &Path) -> Result<PathBuf> {
    run(Command::new("cargo").args(["build", "--release", "-p", "router-ctl"]))?;
    Ok(root.join("target/release/router-ctl"))
}

/// The demo instances of the seed topology: (namespace, port id of the router port, address, gateway).
const DEMO_VMS: &[(&str, &str, &str, &str)] = &[
    (
        "vm1",
        "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e",
        "172.16.100.3/24",
        "172.16.100.1",
    ),
    (
        "vm3",
        "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e",
        "172.16.101.3/24",
        "172.16.101.1",
    ),
];

/// Five pings from demo instance `vm` to `dst`; fails if any is lost.
fn ping(vm: &str, dst: &str) -> Result<()> {
    run(Command::new("ip").args([
        "netns", "exec", vm, "ping", "-c", "5", "-i", "0.2", "-W", "1", dst,
    ]))
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn build_and_load(root: &Path, config: Option<PathBuf>) -> Result<()> {
    let ctl = build_release(root)?;
    let config = config.unwrap_or_else(|| root.join("config/seed.toml"));
    run(Command::new(&ctl).arg("apply").arg("-f").arg(&config))?;
    // The demo instances go with the seed router (config/seed.toml, config/dual-stack.toml).
    let text = std::fs::read_to_string(&config).unwrap_or_default();
    let dual = text.contains("2001:db8:100::1");
    if text.contains("a81cc110-16f4-4d6c-89d2-8af91cec9714") {
        // Plug the demo instances: apply left each new router port's veth peer (tap...) in this
        // namespace; move it into the instance's namespace and configure the instance.
        for (vm, port, addr, gw) in DEMO_VMS {
            let tap = format!("tap{}", &port[..11]);
            if !Path::new(&format!("/run/netns/{vm}")).exists() {
                ip(&["netns", "add", vm])?;
            }
            let in_vm = Command::new("ip")
                .args(["-n", vm, "link", "show", &tap])
                .output()?
                .status
                .success();
            if !in_vm {
                ip(&["link", "set", &tap, "netns", vm])?;
            }
            ip(&["-n", vm, "link", "set", "lo", "up"])?;
            ip(&["-n", vm, "link", "set", &tap, "up"])?;
            let _ = Command::new("ip")
                .args(["-n", vm, "addr", "replace", addr, "dev", &tap])
                .status();
            ip(&["-n", vm, "route", "replace", "default", "via", gw])?;
            if dual {
                let (addr6, gw6) = if *vm == "vm1" {
                    ("2001:db8:100::3/64", "2001:db8:100::1")
                } else {
                    ("2001:db8:101::3/64", "2001:db8:101::1")
                };
                let _ = Command::new("ip")
                    .args(["-n", vm, "addr", "replace", addr6, "dev", &tap, "nodad"])
                    .status();
                ip(&["-n", vm, "-6", "route", "replace", "default", "via", gw6])?;
            }
        }
        sleep(Duration::from_millis(300));
        ping("vm1", "172.16.101.3")?;
        ping("vm3", "172.16.100.3")?;
        if dual {
            ping("vm1", "2001:db8:101::3")?;
        }
        // config/nat.toml: the external network is namespace `public`, the upstream router
        // (192.168.1.1, with an outside address 203.0.113.5 on its loopback).
        let gw_port = "e1a2b3c4-5d6e-4f70-8a9b-0c1d2e3f4a5b";
        if text.contains(gw_port) {
            let tap = format!("tap{}", &gw_port[..11]);
            if !Path::new("/run/netns/public").exists() {
                ip(&["netns", "add", "public"])?;
            }
            let in_ns = Command::new("ip")
                .args(["-n", "public", "link", "show", &tap])
                .output()?
                .status
                .success();
            if !in_ns {
                ip(&["link", "set", &tap, "netns", "public"])?;
            }
            ip(&["-n", "public", "link", "set", "lo", "up"])?;
            ip(&["-n", "public", "link", "set", &tap, "up"])?;
            for (a, dev) in [("192.168.1.1/24", tap.as_str()), ("203.0.113.5/32", "lo")] {
                let _ = Command::new("ip")
                    .args(["-n", "public", "addr", "replace", a, "dev", dev])
                    .status();
            }
            sleep(Duration::from_millis(300));
            ping("vm1", "203.0.113.5")?;
            ping("public", "192.168.1.20")?;
        }
    }
    for what in ["show", "neigh", "stats", "nat"] {
        println!("\n$ router-ctl {what}");
        run(Command::new(&ctl).arg(what))?;
    }
    println!(
        "\nThe router stays loaded and keeps forwarding; its neighbour daemon (`router-ctl run`) logs to /run/router-xdp/daemon.log.\n\
         Try: ip netns exec vm1 ping 172.16.101.3   |   {} stats   |   {} destroy router_100_101\n\
         With --config config/nat.toml: ip netns exec vm1 ping 203.0.113.5 (SNAT)   |   ip netns exec public ping 192.168.1.20 (vm3's floating IP)   |   router-ctl nat",
        ctl.display(),
        ctl.display()
    );
    Ok(())
}

/// Runs every test binary and closes with one line adding up all of them: router-ctl's own
/// unit tests in the `checked` profile (release code with debug assertions and overflow checks),
/// everything else in release against target/release/router-ctl.
fn test(root: &Path, args: &[String]) -> Result<()> {
    let ctl = build_release(root)?;
    // The package the tests check (`safety::the_package_…`), from this build.
    let out = root.join("target/package");
    std::fs::create_dir_all(&out)?;
    let deb = package::build(root, &ctl, &out)?;
    let mut checked = Command::new("cargo");
    checked
        .args([
            "test",
            "--profile",
            "checked",
            "-p",
            "router-ctl",
            "--no-fail-fast",
            "--",
        ])
        .args(args);
    let mut rest = Command::new("cargo");
    rest.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "router-ebpf",
        "--exclude",
        "router-ctl",
        "--no-fail-fast",
        "--",
    ])
    .args(args);
    let (mut passed, mut failed, mut ok) = (0u64, 0u64, true);
    for mut cmd in [checked, rest] {
        cmd.env("ROUTER_CTL", &ctl).env("ROUTER_XDP_DEB", &deb);
        let (p, f, status_ok) = run_tests(cmd)?;
        passed += p;
        failed += f;
        ok &= status_ok;
    }
    println!("tests: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Runs one `cargo test`, echoing its output: (passed, failed, exit status success).
fn run_tests(mut cmd: Command) -> Result<(u64, u64, bool)> {
    use std::io::{BufRead as _, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        // "test result: ok. 9 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}
