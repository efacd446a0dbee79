//! `cargo xtask package`: a Debian package of the controller — the binary, its service unit,
//! a default (empty) definitions file kept as a configuration file, a man page made from the
//! binary's own help, and the README — built with `dpkg-deb` from a staging tree.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// Where the package installs the binary (the unit in `packaging/` names /usr/local/sbin, for
/// a hand install).
const BIN: &str = "/usr/sbin/router-ctl";
const UNIT_BIN: &str = "/usr/local/sbin/router-ctl";
const CONFIG: &str = "etc/router-xdp/routers.toml";

/// Builds the package from the release binary `ctl` into `out`; returns the `.deb`'s path.
pub fn build(root: &Path, ctl: &Path, out: &Path) -> Result<PathBuf> {
    let version = version(ctl)?;
    let name = format!("router-xdp_{version}_amd64");
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let p = stage.join(rel);
        std::fs::create_dir_all(p.parent().expect("a parent"))?;
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put(
        BIN.trim_start_matches('/'),
        &std::fs::read(ctl).with_context(|| format!("cannot read {}", ctl.display()))?,
        0o755,
    )?;
    let unit = std::fs::read_to_string(root.join("packaging/router-ctl.service"))?;
    if !unit.contains(UNIT_BIN) {
        bail!(
            "packaging/router-ctl.service no longer names {UNIT_BIN}: update xtask/src/package.rs"
        );
    }
    put(
        "lib/systemd/system/router-ctl.service",
        unit.replace(UNIT_BIN, BIN).as_bytes(),
        0o644,
    )?;
    put(
        CONFIG,
        b"# router-xdp: the routers `router-ctl run -f` (the service) applies and keeps applied.\n\
          # One [[router]] table per router; see /usr/share/doc/router-xdp/README.md for the fields\n\
          # and `router-ctl validate -f FILE` to check a change before `systemctl reload router-ctl`.\n",
        0o644,
    )?;
    put(
        "usr/share/man/man8/router-ctl.8.gz",
        &gzip(man_page(ctl, &version)?.as_bytes())?,
        0o644,
    )?;
    put(
        "usr/share/doc/router-xdp/README.md",
        &std::fs::read(root.join("README.md"))?,
        0o644,
    )?;
    let size_kib = dir_size(&stage)? / 1024;
    put(
        "DEBIAN/control",
        format!(
            "Package: router-xdp\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: router-xdp developers <router-xdp@localhost>\n\
             Installed-Size: {size_kib}\n\
             Depends: iproute2, nftables\n\
             Recommends: conntrack\n\
             Section: net\n\
             Priority: optional\n\
             Description: L3 router with an XDP/tc fast path for Neutron-style routers\n \
             router-ctl applies router definitions (a file, openstack-style verbs or etcd across\n \
             many hosts with HA failover) as network namespaces whose forwarding runs in XDP and\n \
             tc programs, with the kernel as the slow path; or follows the routers Neutron's L3\n \
             agent builds.\n"
        )
        .as_bytes(),
        0o644,
    )?;
    put("DEBIAN/conffiles", format!("/{CONFIG}\n").as_bytes(), 0o644)?;
    let deb = out.join(format!("{name}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb)
        .status()
        .context("cannot run dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb failed ({status})");
    }
    Ok(deb)
}

/// The binary's version (`router-ctl --version` prints `router-ctl X.Y.Z`).
fn version(ctl: &Path) -> Result<String> {
    let out = Command::new(ctl)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().nth(1) {
        Some(v) if out.status.success() => Ok(v.to_string()),
        _ => bail!("{} --version printed {text:?}", ctl.display()),
    }
}

/// A man page made from the binary's help: the top level, then each command's.
fn man_page(ctl: &Path, version: &str) -> Result<String> {
    let help = |args: &[&str]| -> Result<String> {
        let out = Command::new(ctl).args(args).arg("--help").output()?;
        if !out.status.success() {
            bail!("{} {args:?} --help failed", ctl.display());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let top = help(&[])?;
    let mut page = format!(
        ".TH ROUTER-CTL 8 \"\" \"router-xdp {version}\" \"System Administration\"\n\
         .SH NAME\nrouter-ctl \\- Neutron-style virtual routers with an XDP fast path\n\
         .SH SYNOPSIS\n.B router-ctl\n[\\fIOPTIONS\\fR] \\fICOMMAND\\fR\n\
         .SH DESCRIPTION\n.nf\n{}.fi\n.SH COMMANDS\n",
        roff(&top)
    );
    for cmd in commands(&top) {
        page += &format!(".SS router-ctl {cmd}\n.nf\n{}.fi\n", roff(&help(&[&cmd])?));
    }
    page += ".SH FILES\n.TP\n/etc/router-xdp/routers.toml\nthe definitions the service applies\n\
             .TP\n/run/router-xdp\nstate, journals, the API socket, the fence\n\
             .TP\n/sys/fs/bpf/router-xdp\npinned programs, links and maps\n\
             .SH SEE ALSO\n/usr/share/doc/router-xdp/README.md, \\fBip\\fR(8), \\fBnft\\fR(8)\n";
    Ok(page)
}

/// The command names of a clap help's `Commands:` list (`help` aside).
pub fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Text as roff shows it verbatim in a no-fill block.
fn roff(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    child.stdin.take().expect("piped").write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_of_a_help_are_read_and_roff_text_is_escaped() {
        let help = "Usage: x\n\nCommands:\n  apply     Create\n  show      List\n  help      Print\n\nOptions:\n  -j\n";
        assert_eq!(commands(help), vec!["apply", "show"]);
        assert_eq!(roff(".x\n'y\na\\b\n"), "\\&.x\n\\&'y\na\\eb\n");
    }
}
