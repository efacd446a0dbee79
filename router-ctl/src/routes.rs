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
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, BufWriter, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::{
    apply,
    config::IpNet,
    datapath,
    kernel::{netns, rtnl::Rtnl},
    state::{self, Lock, RouterState},
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
    let path = journal_path(router_id);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let what = path.display().to_string();
    let mut routes = HashMap::new();
    let mut lines = 0usize;
    for op in parse(BufReader::new(f), &what)? {
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

fn append(router_id: &str, ops: &[Op]) -> Result<()> {
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
            .filter_map(|f| f.subnet.parse::<IpNet>().ok())
            .any(|s| s.contains(nh) && IpNet::host(nh) != s)
            .then_some(i.ifindex)
    })
}

/// Lines carried to the kernel and the fast path at a time. A batch that fails in the kernel
/// after its checks (out of memory, a device gone meanwhile) keeps its earlier chunks, in the
/// kernel, the fast path and the journal alike.
const CHUNK: usize = 16384;

/// What a batch did.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub router: String,
    pub set: usize,
    pub deleted: usize,
    /// Prefixes in the fast path's table afterwards (all of the router's routes).
    pub prefixes: usize,
}

/// Applies the batch in `file` to router `router` (name or id).
pub fn batch(router: &str, file: &Path) -> Result<Summary> {
    let what = file.display().to_string();
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {what}"))?;
    let ops = parse(BufReader::new(f), &what)?;
    let (total, deletes) = (
        ops.len(),
        ops.iter().filter(|o| matches!(o, Op::Del(_))).count(),
    );
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    let st = RouterState::find(router)?;
    // The router's own routes (subnets, extra routes, the gateway's default) are its
    // definition's; a dynamic route may not shadow one of them.
    let mut own: HashSet<IpNet> = HashSet::new();
    for i in &st.interfaces {
        for f in &i.fixed_ips {
            own.extend(f.subnet.parse::<IpNet>().ok());
        }
    }
    own.extend(
        st.routes
            .iter()
            .filter_map(|r| r.destination.parse::<IpNet>().ok()),
    );
    let ifaces = st.iface_entries()?;
    // Every line checked first; each set's device found once.
    let mut devs: Vec<u32> = Vec::with_capacity(ops.len());
    for op in &ops {
        let net = op.net();
        if own.contains(&net) {
            bail!(
                "router {}: {net} is one of its own routes (a subnet or an extra route); \
                 change those with `router-ctl router add|remove route|subnet`",
                st.name
            );
        }
        if let Op::Set(net, nh) = *op {
            let Some(dev) = device_for(&st, nh) else {
                bail!(
                    "router {}: nexthop {nh} of {net} is in none of its subnets",
                    st.name
                );
            };
            devs.push(dev);
        }
    }
    let mut ebpf = datapath::open_maps(&st.id)?;
    let prefixes = datapath::with_router_table(&st.id, &mut ebpf, |t| {
        if t.live().is_none() {
            t.set(&apply::tables_of(&st)?.routes)?;
        }
        // A prefix deleted must be there when its turn comes (only deleted prefixes are
        // followed through the batch, so a bulk load costs no memory for this).
        let live = t.live().expect("set above");
        // Nor one of its addresses, broadcasts or on-link hosts (local and connected entries).
        for op in &ops {
            let net = op.net();
            if live.routes_of(net).is_some_and(|rs| {
                rs.iter()
                    .any(|r| r.kind != router_common::route_kind::GATEWAY)
            }) {
                bail!(
                    "router {}: {net} is one of its own addresses or connected routes",
                    st.name
                );
            }
        }
        let deleted: HashSet<IpNet> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Del(n) => Some(*n),
                Op::Set(..) => None,
            })
            .collect();
        let mut present: HashMap<IpNet, bool> = HashMap::new();
        for op in ops.iter().filter(|o| deleted.contains(&o.net())) {
            let net = op.net();
            let here = *present
                .entry(net)
                .or_insert_with(|| live.routes_of(net).is_some());
            if matches!(op, Op::Del(_)) && !here {
                bail!("router {}: no dynamic route to {net} to delete", st.name);
            }
            present.insert(net, matches!(op, Op::Set(..)));
        }
        // In chunks, so that a million lines never exist three times over: the kernel first
        // (a frame the fast path hands over finds the route there already), then the fast path.
        // Each chunk's lines are dropped once applied: the table grows as the batch shrinks.
        let mut devs = devs.iter();
        if let Some(l) = t.live_mut() {
            l.reserve(total - deletes);
        }
        let mut chunks: Vec<Vec<Op>> = ops.chunks(CHUNK).map(<[Op]>::to_vec).collect();
        drop(ops);
        chunks.reverse();
        while let Some(chunk) = chunks.pop() {
            let chunk = chunk.as_slice();
            let mut kernel = Vec::with_capacity(chunk.len());
            let mut fast = Vec::with_capacity(chunk.len());
            for op in chunk {
                match *op {
                    Op::Set(net, nh) => {
                        let dev = *devs.next().expect("a device per set");
                        let r = datapath::route_entries(&ifaces, &[], &[(net, dev, nh)], &[]);
                        kernel.push((net, Some((nh, dev))));
                        fast.push((net, Some(vec![r[0].1])));
                    }
                    Op::Del(net) => {
                        kernel.push((net, None));
                        fast.push((net, None));
                    }
                }
            }
            netns::run_in(&st.namespace, move || Rtnl::new()?.routes_change(&kernel))
                .with_context(|| format!("router {}: the kernel refused a route", st.name))?;
            t.change(&fast)?;
            append(&st.id, chunk)?;
        }
        Ok(t.live().map(|l| l.len()).unwrap_or(0))
    })?;
    Ok(Summary {
        router: st.name.clone(),
        set: total - deletes,
        deleted: deletes,
        prefixes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
