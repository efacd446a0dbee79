//! Prometheus metrics (`router-ctl run --metrics ADDR`): the fast path's per-router, per-device
//! counters, read from the maps at each scrape, and an HA agent's connection-state stream
//! (`--sync-listen`), served as OpenMetrics text on GET /metrics.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{live, state::RouterState};

type Labels = Vec<(String, String)>;

/// The agent's connection-state stream, when it runs one.
pub type Replica = Option<Arc<crate::agent::replica::Counters>>;

/// The metrics text for every applied router, as of now, and for the stream.
pub fn render(replica: &Replica) -> Result<String> {
    let fwd_pkts = Family::<Labels, Counter>::default();
    let fwd_bytes = Family::<Labels, Counter>::default();
    let pass_pkts = Family::<Labels, Counter>::default();
    let pass_bytes = Family::<Labels, Counter>::default();
    let drops = Family::<Labels, Counter>::default();
    let nat = Family::<Labels, Counter>::default();
    let routers = Family::<Labels, Gauge>::default();
    let ra_sent = Family::<Labels, Counter>::default();
    let ra_solicited = Family::<Labels, Counter>::default();
    for r in RouterState::all()?.into_iter().filter(|r| r.lost.is_none()) {
        for (device, c) in crate::ra::counters(&r.id) {
            let l: Labels = vec![
                ("router".into(), r.name.clone()),
                ("router_id".into(), r.id.clone()),
                ("device".into(), device),
            ];
            ra_sent.get_or_create(&l).inc_by(c.sent);
            ra_solicited.get_or_create(&l).inc_by(c.solicited);
        }
        routers
            .get_or_create(&vec![
                ("router".into(), r.name.clone()),
                ("router_id".into(), r.id.clone()),
                ("namespace".into(), r.namespace.clone()),
                (
                    "origin".into(),
                    if r.followed { "followed" } else { "defined" }.into(),
                ),
            ])
            .set(1);
        // A router whose maps cannot be read now (being destroyed) is left out of this scrape.
        let Ok(counters) = live::counters(&r) else {
            continue;
        };
        for c in &counters {
            let s = &c.stats;
            let l: Labels = vec![
                ("router".into(), r.name.clone()),
                ("router_id".into(), r.id.clone()),
                ("device".into(), c.device.clone()),
            ];
            let (p4, b4) = c.ipv4();
            for (family, p, b) in [("ipv4", p4, b4), ("ipv6", s.fwd6_packets, s.fwd6_bytes)] {
                let mut lf = l.clone();
                lf.push(("family".into(), family.into()));
                fwd_pkts.get_or_create(&lf).inc_by(p);
                fwd_bytes.get_or_create(&lf).inc_by(b);
            }
            pass_bytes.get_or_create(&l).inc_by(s.pass_bytes);
            drops.get_or_create(&l).inc_by(s.drop_packets);
            for (dir, n) in [
                ("source", s.nat_src_packets),
                ("destination", s.nat_dst_packets),
            ] {
                let mut ld = l.clone();
                ld.push(("translated".into(), dir.into()));
                nat.get_or_create(&ld).inc_by(n);
            }
            for (name, n) in c.reasons() {
                let mut lr = l.clone();
                lr.push(("reason".into(), name.to_string()));
                pass_pkts.get_or_create(&lr).inc_by(n);
            }
        }
    }
    let mut reg = Registry::with_prefix("router_xdp");
    reg.register(
        "router",
        "A router with a fast path here: defined (apply, etcd) or followed (run --follow)",
        routers,
    );
    reg.register(
        "forwarded_packets",
        "Frames forwarded by the XDP fast path, by ingress device and IP family",
        fwd_pkts,
    );
    reg.register(
        "forwarded_bytes",
        "Bytes forwarded by the XDP fast path, by ingress device and IP family",
        fwd_bytes,
    );
    reg.register(
        "passed_packets",
        "Frames handed to the kernel, by ingress device and reason",
        pass_pkts,
    );
    reg.register(
        "passed_bytes",
        "Bytes handed to the kernel, by ingress device",
        pass_bytes,
    );
    reg.register("dropped_packets", "Frames dropped by the fast path", drops);
    reg.register(
        "router_advertisements",
        "IPv6 router advertisements sent on the port (periodic, solicited and final)",
        ra_sent,
    );
    reg.register(
        "router_solicitations_answered",
        "IPv6 router solicitations answered with an advertisement on the port",
        ra_solicited,
    );
    reg.register(
        "nat_packets",
        "Packets the fast path forwarded with their source (SNAT) or destination (DNAT) translated, by ingress device",
        nat,
    );
    if let Some(c) = replica {
        register_replica(&mut reg, c);
    }
    let mut out = String::new();
    encode(&mut out, &reg).context("encoding metrics")?;
    Ok(out)
}

/// The stream's counters (`agent::replica::Counters`), as of now.
fn register_replica(reg: &mut Registry, c: &crate::agent::replica::Counters) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let entries = Family::<Labels, Counter>::default();
    for (event, n) in [
        ("sent", get(&c.sent)),
        ("installed", get(&c.installed)),
        ("updated", get(&c.updated)),
        ("deleted", get(&c.deleted)),
        ("failed", get(&c.failed)),
    ] {
        entries
            .get_or_create(&vec![("event".into(), event.into())])
            .inc_by(n);
    }
    reg.register(
        "replica_entries",
        "Connection-state entries sent to standbys, and installed, updated, deleted or refused by the kernel here for HA routers held as standby",
        entries,
    );
    for (name, help, n) in [
        (
            "replica_batches_ignored",
            "Connection-state batches for a router not held here as a standby (left alone)",
            get(&c.ignored),
        ),
        (
            "replica_streams_ended",
            "Incoming connection-state streams ended by an error (failed handshakes and frame checks among them)",
            get(&c.ended),
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(n);
        reg.register(name, help, counter);
    }
}

/// Where `--metrics` serves: a bare port is loopback's (counters and device names are for
/// the host's own scraper unless the operator says otherwise); an address with its port is
/// taken as given. Host names are refused (no resolution from a service's option).
pub fn listen_addr(arg: &str) -> Result<std::net::SocketAddr> {
    let arg = arg.trim();
    if let Ok(port) = arg.parse::<u16>() {
        return Ok((std::net::Ipv4Addr::LOCALHOST, port).into());
    }
    arg.parse::<std::net::SocketAddr>().map_err(|_| {
        anyhow::anyhow!(
            "--metrics {arg:?}: give a port (served on 127.0.0.1) or ADDRESS:PORT ([IPv6]:PORT)"
        )
    })
}

/// Serves /metrics on `addr` (see `listen_addr`) from a thread of its own; `replica`: the
/// agent's connection-state stream, if it runs one.
pub fn serve(addr: &str, replica: Replica) -> Result<()> {
    let addr = listen_addr(addr)?;
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for metrics"))?;
    if addr.ip().is_loopback() {
        tracing::info!(%addr, "serving metrics on /metrics");
    } else {
        tracing::warn!(%addr, "serving metrics on /metrics beyond this host (as --metrics asks)");
    }
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            // A few scrapes at once, each on a thread of its own with timeouts both ways: a
            // client that sends nothing, or reads nothing, ties up one of them for 5 s at most.
            static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            for conn in listener.incoming().flatten() {
                let replica = replica.clone();
                if BUSY.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_CLIENTS {
                    BUSY.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::debug!("too many metrics clients at once; one refused");
                    continue;
                }
                let spawned = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        // A panic ends this answer, never the endpoint.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            answer(conn, &replica)
                        }));
                        match r {
                            Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                            Err(_) => tracing::error!("metrics answer panicked"),
                            Ok(Ok(())) => {}
                        }
                        BUSY.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    BUSY.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

/// Scrapes answered at once.
const MAX_CLIENTS: usize = 4;
/// Longest request line read (a GET line is far shorter).
const MAX_LINE: u64 = 4096;

fn answer(mut conn: TcpStream, replica: &Replica) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let whole = line.ends_with('\n');
    let words: Vec<&str> = if whole {
        line.split_whitespace().take(2).collect()
    } else {
        Vec::new()
    };
    let (status, ctype, body) = match words[..] {
        ["GET", "/metrics"] => match render(replica) {
            Ok(b) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                b,
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("{e:#}\n"),
            ),
        },
        _ if !whole => (
            "400 Bad Request",
            "text/plain",
            format!("a request line of at most {MAX_LINE} bytes\n"),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try GET /metrics\n".to_string(),
        ),
    };
    write!(conn, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    if !whole {
        // What the client still sends, a bounded amount, before closing: a close with unread
        // bytes would reset the connection and lose the answer.
        let _ = conn.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut (&conn).take(64 * 1024), &mut std::io::sink());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::listen_addr;

    #[test]
    fn the_connection_state_streams_counters_are_served() {
        use std::sync::atomic::Ordering::Relaxed;
        let c = std::sync::Arc::new(crate::agent::replica::Counters::default());
        c.sent.store(7, Relaxed);
        c.installed.store(5, Relaxed);
        c.updated.store(3, Relaxed);
        c.deleted.store(2, Relaxed);
        c.failed.store(1, Relaxed);
        c.ignored.store(11, Relaxed);
        c.ended.store(13, Relaxed);
        let mut reg = prometheus_client::registry::Registry::with_prefix("router_xdp");
        super::register_replica(&mut reg, &c);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in [
            "router_xdp_replica_entries_total{event=\"sent\"} 7",
            "router_xdp_replica_entries_total{event=\"installed\"} 5",
            "router_xdp_replica_entries_total{event=\"updated\"} 3",
            "router_xdp_replica_entries_total{event=\"deleted\"} 2",
            "router_xdp_replica_entries_total{event=\"failed\"} 1",
            "router_xdp_replica_batches_ignored_total 11",
            "router_xdp_replica_streams_ended_total 13",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line} missing from:\n{out}"
            );
        }
    }

    #[test]
    fn a_bare_port_is_loopback_and_host_names_are_refused() {
        assert_eq!(listen_addr("9417").unwrap().to_string(), "127.0.0.1:9417");
        assert_eq!(
            listen_addr("0.0.0.0:9417").unwrap().to_string(),
            "0.0.0.0:9417"
        );
        assert_eq!(listen_addr("[::1]:9417").unwrap().to_string(), "[::1]:9417");
        for bad in ["localhost:9417", "", "99999", "1.2.3.4", "x"] {
            let e = format!("{:#}", listen_addr(bad).unwrap_err());
            assert!(e.contains("--metrics"), "{bad}: {e}");
        }
    }
}
