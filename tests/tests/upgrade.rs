//! Upgrades: a build whose map layout differs from the one that set a router up.

use std::time::Duration;

use tests::{
    ctl, require_root, sh, sh_out,
    topo::{ping_summary, write_config, Seed},
};

/// A router set up by an earlier build whose counters had fewer pass reasons (their values
/// 232 bytes: 8 counters and 21 reasons, the layout before the counters got room to grow):
/// `apply` replaces the counters' map and the programs, and not one packet of a steady ping
/// is lost or left to the kernel's forwarding meanwhile; the new counters count.
#[test]
fn an_upgrade_that_changes_the_counters_layout_keeps_forwarding() {
    require_root();
    let mut s = Seed::up("");
    // The counters restart with their new map: the kernel's receive counters and the fast
    // path's no longer add up at teardown, by design of this upgrade.
    s.check_counters = false;
    s.prime_neighbours();
    let a = s.ids.dev_a();
    let path = write_config(&format!("{}-upgrade", s.ids.tag), &s.ids.config(""));
    // The earlier build's pinned map, with its layout; the attached program keeps the map it
    // was loaded with, as it would have after that build's apply.
    let pin = format!("/sys/fs/bpf/router-xdp/v1/{}/STATS", s.ids.router_id);
    std::fs::remove_file(&pin).unwrap();
    sh(&format!(
        "bpftool map create {pin} type percpu_array key 4 value 232 entries 65 name STATS"
    ));
    let value_size = || {
        let out = sh_out(&format!("bpftool -j map show pinned {pin}"));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["bytes_value"].as_u64().unwrap()
    };
    assert_eq!(value_size(), 232);
    // Apply sets ip_forward=1, so the kernel could carry what a missing program dropped.
    let forw = s.forw_datagrams();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ip netns exec {} ping -q -i 0.001 -W 2 -c 2000 172.16.101.3",
            s.vm1
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = ctl(&["apply", "-f", &path]);
    assert!(
        out.status.success(),
        "apply refused the earlier build's router: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the ping ended before the upgrade did"
    );
    let text = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).to_string();
    assert_eq!(
        ping_summary(&text),
        (2000, 2000),
        "packets lost while the router was upgraded: {text}"
    );
    assert_eq!(
        s.forw_datagrams(),
        forw,
        "the kernel forwarded packets: the fast path was missing during the upgrade"
    );
    assert_eq!(value_size(), 512, "the counters' map was not replaced");
    let before = s.forwarded(&a);
    assert!(
        Seed::ping(&s.vm1, "172.16.101.3", 5),
        "no answer after the upgrade"
    );
    assert!(
        s.forwarded(&a) >= before + 5,
        "the new program does not count in the new map"
    );
    let _ = std::fs::remove_file(&path);
}

/// The one table of maps (`router_common::maps::ALL`) is the built object's: every map the
/// object declares is in it with the same type, key and value size, flags and entries, and
/// nothing else is.
#[test]
fn the_maps_table_is_the_built_objects() {
    require_root();
    let mut ebpf = router_ctl::datapath::load_unpinned().unwrap();
    let mut seen = Vec::new();
    for (name, map) in ebpf.maps_mut() {
        let spec = router_common::maps::spec_of(name)
            .unwrap_or_else(|| panic!("map {name} of the object is not in maps::ALL"));
        let fd = match map {
            aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LpmTrie(d)
            | aya::maps::Map::DevMap(d)
            | aya::maps::Map::RingBuf(d) => d,
            other => panic!("map {name}: a kind the table does not know: {other:?}"),
        };
        let info = fd.info().unwrap();
        let ty = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        assert_eq!(ty, spec.kind as u32, "map {name}: type");
        assert_eq!(info.key_size(), spec.key_size, "map {name}: key size");
        assert_eq!(info.value_size(), spec.value_size, "map {name}: value size");
        let flags =
            info.map_flags() & (router_common::maps::NO_PREALLOC | router_common::maps::MMAPABLE);
        assert_eq!(flags, spec.flags, "map {name}: flags");
        assert_eq!(
            info.max_entries(),
            spec.capacity.entries(),
            "map {name}: entries"
        );
        seen.push(name.to_string());
    }
    for m in router_common::maps::ALL {
        assert!(
            seen.iter().any(|n| n == m.name),
            "map {} of maps::ALL is not in the object",
            m.name
        );
    }
}
