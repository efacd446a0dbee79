//! Dynamic routes: the part of a router's table that is not in its definition, fed in bulk or a
//! route at a time by a routing daemon or a route server through `router-ctl route batch`
//! (Neutron's extra routes stay in the definition, changed by `router add|remove route`).
//!
//! A batch is a file of lines as `ip -batch` takes them: `add|replace DEST via NEXTHOP`,
//! `del DEST`, `#` comments. It is parsed and checked whole before anything changes; then the
//! kernel's table in the router's namespace (the slow path), the fast path's table (only the
//! entries the changed prefixes cover, see `fib::Live`), and last the router's journal, from
//! which apply, resync and a restarted daemon know the dynamic routes.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, BufWriter, Write as _},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    config::IpNet,
    state::{self, RouterState},
};

/// One line of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Adds the route, or replaces the nexthop of the route already there.
    Set(IpNet, IpAddr),
    Del(IpNet),
}

impl Op {
    pub fn net(&self) -> IpNet {
        match self {
            Op::Set(n, _) | Op::Del(n) => *n,
        }
    }
}

/// The operations of a batch read from `r` (`what` names it in errors: a file, stdin).
pub fn parse(r: impl BufRead, what: &str) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {what}"))?;
        let at = || format!("{what}, line {}", i + 1);
        let words: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        // The parser refuses host bits, as iproute2 does.
        let prefix = |s: &str| -> Result<IpNet> {
            s.parse().map_err(|e| anyhow::anyhow!("{}: {s}: {e}", at()))
        };
        match words.as_slice() {
            [] => {}
            ["add" | "replace", dest, "via", nh] => {
                let dest = prefix(dest)?;
                let nh: IpAddr = nh
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{}: nexthop {nh}: {e}", at()))?;
                if nh.is_ipv6() != dest.is_ipv6() {
                    bail!("{}: {dest} and nexthop {nh} are of two families", at());
                }
                ops.push(Op::Set(dest, nh));
            }
            ["del" | "delete", dest] => ops.push(Op::Del(prefix(dest)?)),
            _ => bail!(
                "{}: expected `add|replace DEST via NEXTHOP` or `del DEST`, got `{}`",
                at(),
                line.trim()
            ),
        }
    }
    Ok(ops)
}

/// Where a router's dynamic routes are kept: every applied batch's lines, appended.
pub fn journal_path(router_id: &str) -> PathBuf {
    state::run_dir().join("routes").join(router_id)
}

/// A router's dynamic routes (replaying its journal; a journal much longer than the table is
/// rewritten as the table).
pub fn load(router_id: &str) -> Result<HashMap<IpNet, IpAddr>> {
    load_path(&journal_path(router_id))
}

/// `load` of the journal at `path`.
fn load_path(path: &std::path::Path) -> Result<HashMap<IpNet, IpAddr>> {
    let mut bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    // A write cut short (the process killed, the disk full) leaves a last line without its
    // newline: that line's batch never said it succeeded, so the line goes (logged), and the
    // journal is cut back to its last whole line so that later lines start clean.
    if bytes.last().is_some_and(|b| *b != b'\n') {
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        tracing::warn!(
            journal = %path.display(),
            dropped = %String::from_utf8_lossy(&bytes[keep..]),
            "the dynamic route journal ends in a torn line (a batch cut short); dropping it: run that batch again"
        );
        bytes.truncate(keep);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot repair {}", path.display()))?;
        f.set_len(keep as u64)
            .with_context(|| format!("cannot repair {}", path.display()))?;
    }
    let what = path.display().to_string();
    let path = path.to_path_buf();
    let mut routes = HashMap::new();
    let mut lines = 0usize;
    for op in parse(BufReader::new(&bytes[..]), &what)? {
        lines += 1;
        match op {
            Op::Set(n, nh) => {
                routes.insert(n, nh);
            }
            Op::Del(n) => {
                routes.remove(&n);
            }
        }
    }
    if lines > 2 * routes.len() + 1024 {
        let tmp = path.with_extension("new");
        let mut w = BufWriter::new(
            std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?,
        );
        for (n, nh) in &routes {
            writeln!(w, "add {n} via {nh}")?;
        }
        w.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
    }
    Ok(routes)
}

pub(crate) fn append(router_id: &str, ops: &[Op]) -> Result<()> {
    let path = journal_path(router_id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut w = BufWriter::new(f);
    for op in ops {
        match op {
            Op::Set(n, nh) => writeln!(w, "add {n} via {nh}")?,
            Op::Del(n) => writeln!(w, "del {n}")?,
        }
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Forgets a router's dynamic routes (the router is destroyed or lost its namespace).
pub fn forget(router_id: &str) {
    let _ = std::fs::remove_file(journal_path(router_id));
}

/// The device index of the router's interface whose subnet holds `nh`.
pub fn device_for(st: &RouterState, nh: IpAddr) -> Option<u32> {
    st.interfaces.iter().find_map(|i| {
        i.fixed_ips
            .iter()
            .map(|f| f.subnet)
            .any(|s| s.contains(nh) && IpNet::host(nh) != s)
            .then_some(i.ifindex)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal whose last write was cut short loads without that line, and is cut back to
    /// its whole lines (a later line starts clean); a bad line inside is still an error.
    #[test]
    fn a_torn_last_line_of_the_journal_is_dropped_and_cut_off() {
        let dir = std::env::temp_dir().join(format!("router-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("j");
        std::fs::write(
            &p,
            "add 10.1.0.0/16 via 10.0.0.1\nadd 10.2.0.0/16 via 10.0.0.1\nadd 10.3.0",
        )
        .unwrap();
        let r = load_path(&p).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "add 10.1.0.0/16 via 10.0.0.1\nadd 10.2.0.0/16 via 10.0.0.1\n"
        );
        std::fs::write(
            &p,
            "add 10.1.0.0/16 via 10.0.0.1\nadd 10.3.0\nadd 10.2.0.0/16 via 10.0.0.1\n",
        )
        .unwrap();
        assert!(
            load_path(&p).is_err(),
            "a bad line inside the journal is not a torn write"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn batches_parse_like_ip_batch_and_name_the_bad_line() {
        let ops = parse(
            "# a comment\nadd 10.1.0.0/16 via 10.0.0.1\n\nreplace 2001:db8::/32 via 2001:db8:1::1  # x\ndel 10.1.0.0/16\n"
                .as_bytes(),
            "t",
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Set("10.1.0.0/16".parse().unwrap(), "10.0.0.1".parse().unwrap()),
                Op::Set(
                    "2001:db8::/32".parse().unwrap(),
                    "2001:db8:1::1".parse().unwrap()
                ),
                Op::Del("10.1.0.0/16".parse().unwrap()),
            ]
        );
        let err = |s: &str| parse(s.as_bytes(), "f").unwrap_err().to_string();
        assert!(
            err("add 10.1.0.0/16 via 10.0.0.1\nadd 10.1.0.1/16 via 10.0.0.1")
                .contains("f, line 2: 10.1.0.1/16: '10.1.0.1/16' has host bits set")
        );
        assert!(err("add 10.1.0.0/16 10.0.0.1").contains("line 1: expected"));
        assert!(err("add 10.1.0.0/16 via 2001:db8::1").contains("two families"));
        assert!(err("del 10.1.0.0/33").contains("line 1: 10.1.0.0/33"));
    }
}
