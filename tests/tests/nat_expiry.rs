//! A NAT flow whose kernel entry expires while nothing refreshes it: the fast path's copy
//! carries the time before which the kernel's entry cannot have expired, and the program stops
//! using it then, by itself. So a tuple that comes back after the kernel dropped its entry
//! (and conntrack picks a new mapping) never leaves with the old one, even with no daemon to
//! delete the copy. (A binary of its own: it stops the daemon every router shares.)

use std::time::{Duration, Instant};

use tests::{
    ctl_json, require_root, sh,
    topo::{in_ns, Seed},
};

/// `n` datagrams from vm1's port 40500 to the outside host, numbered from `first`.
fn datagrams(vm1: &str, first: u32, n: u32) {
    in_ns(vm1, move || {
        let u = std::net::UdpSocket::bind("0.0.0.0:40500").unwrap();
        for i in first..first + n {
            u.send_to(&i.to_be_bytes(), "203.0.113.5:5006").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_copy_is_not_used_after_the_kernel_may_have_dropped_its_entry() {
    require_root();
    let s = Seed::up_nat(|ids| ids.config_nat("", ""));
    let (ns, out, id) = (s.ns(), s.out(), s.ids.router_id.clone());
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.netfilter.nf_conntrack_udp_timeout=3 net.netfilter.nf_conntrack_udp_timeout_stream=3"
    ));
    s.prime_neighbours();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_ns(&out, move || {
        let u = std::net::UdpSocket::bind("203.0.113.5:5006").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tx.send(()).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        while seen.len() < 40 {
            let Ok((4, peer)) = u.recv_from(&mut buf) else {
                break;
            };
            seen.push((
                u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                peer.port(),
            ));
        }
        seen
    });
    rx.recv().unwrap();
    // The flow is copied into the fast path.
    datagrams(&s.vm1, 0, 20);
    let flows = ctl_json(&["nat", &id]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["from"] == "172.16.100.3:40500 → 203.0.113.5:5006"),
        "the fast path has the flow: {flows}"
    );
    // No daemon: nothing refreshes the kernel's entry, nothing deletes the copy.
    let pids = tests::topo::daemon_pids();
    assert!(!pids.is_empty(), "no daemon runs");
    for pid in &pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    while pids.iter().any(|p| tests::topo::process_alive(*p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the daemon survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Past the kernel's timeout: its entry is gone. The same tuple again.
    std::thread::sleep(Duration::from_secs(5));
    datagrams(&s.vm1, 20, 20);
    let seen = server.join().unwrap();
    let held = tests::topo::conntrack_flows(&ns)
        .into_iter()
        .find(|f| f.orig.proto == 17 && f.orig.sport == 40500);
    tests::topo::restart_daemon(
        &[],
        &std::env::temp_dir().join(format!("router-test-{}-expiry-daemon.log", s.ids.tag)),
    );
    assert_eq!(seen.len(), 40, "datagrams lost: {seen:?}");
    let held = held.unwrap_or_else(|| {
        panic!("the kernel holds no entry for the flow: its second half left through the fast path with a mapping the kernel had dropped ({seen:?})")
    });
    let port = held.reply.dport;
    for (i, p) in &seen[20..] {
        assert_eq!(
            *p, port,
            "datagram {i} left from gateway port {p}, but conntrack holds {port} for the flow"
        );
    }
}
