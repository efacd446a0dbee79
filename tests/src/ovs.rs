//! A private Open vSwitch for the tests, as a network node runs it for Neutron (its userspace
//! datapath here: this kernel has no OVS module, so internal ports are tap devices that
//! `ovs-vswitchd` holds open). Its database, sockets and logs live in a directory of its own,
//! so it never meets a system OVS; dropping it stops both daemons and removes its devices.

use std::path::PathBuf;

use crate::{sh, sh_out};

pub struct Ovs {
    pub dir: PathBuf,
    pub bridge: String,
    ports: std::sync::Mutex<Vec<String>>,
}

impl Ovs {
    /// ovsdb-server and ovs-vswitchd started, with bridge `bridge` (userspace datapath).
    pub fn start(tag: &str, bridge: &str) -> Ovs {
        let dir = std::env::temp_dir().join(format!("router-ovs-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        sh(&format!(
            "ovsdb-tool create {d}/conf.db /usr/share/openvswitch/vswitch.ovsschema && \
             ovsdb-server {d}/conf.db --remote=punix:{d}/db.sock --pidfile={d}/ovsdb.pid --unixctl={d}/ovsdb.ctl --detach --log-file={d}/ovsdb.log && \
             ovs-vsctl --db=unix:{d}/db.sock --no-wait init && \
             OVS_RUNDIR={d} ovs-vswitchd unix:{d}/db.sock --pidfile={d}/vswitchd.pid --unixctl={d}/vswitchd.ctl --detach --log-file={d}/vswitchd.log"
        ));
        let o = Ovs {
            dir,
            bridge: bridge.to_string(),
            ports: Default::default(),
        };
        o.vsctl(&format!(
            "add-br {bridge} -- set bridge {bridge} datapath_type=netdev"
        ));
        o
    }

    /// `ovs-vsctl ARGS` against this OVS.
    pub fn vsctl(&self, args: &str) -> String {
        sh(&format!(
            "ovs-vsctl --timeout=10 --db=unix:{}/db.sock {args}",
            self.dir.display()
        ))
    }

    /// An internal port on the bridge, as Neutron's OVS agent plugs a router's `qr-` port.
    pub fn add_internal_port(&self, name: &str) {
        self.vsctl(&format!(
            "add-port {b} {name} -- set interface {name} type=internal",
            b = self.bridge
        ));
        self.ports.lock().unwrap().push(name.to_string());
        // The tap appears once ovs-vswitchd has made it.
        let t = std::time::Instant::now();
        while !sh_out(&format!("ip link show {name}")).status.success() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(5),
                "OVS made no device {name}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The port's OpenFlow port number as OVS sees it (negative: OVS lost the device).
    pub fn ofport(&self, name: &str) -> i64 {
        self.vsctl(&format!("get interface {name} ofport"))
            .trim()
            .parse()
            .unwrap_or(-1)
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        let d = self.dir.display();
        for p in ["vswitchd", "ovsdb"] {
            let _ = sh_out(&format!("kill $(cat {d}/{p}.pid) 2>/dev/null"));
        }
        // Internal ports are persistent taps: they outlive ovs-vswitchd.
        for name in self.ports.lock().unwrap().iter().chain([&self.bridge]) {
            let _ = sh_out(&format!("ip link del {name}"));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
