//! Several hosts on one machine, for the etcd agent's tests: each host a network namespace
//! with its own agent (`router-ctl --instance`), joined to etcd by a management bridge and to
//! the tenant networks by provider bridges, as network nodes are.
//!
//! ```text
//!   fabric namespace f<tag>: etcd (10.254.0.1, and 127.0.0.1), bridges brm, brt1, brt2, brx
//!   host namespaces h<i><tag>: mgmt (10.254.0.1<i>) on brm; qr- devices plugged into brt1/brt2,
//!     the qg- device (`DEV_GW`) into brx
//!   vm1 (172.16.100.3, on brt1), vm3 (172.16.101.3, on brt2), probe (172.16.100.4, on brt1)
//!   public pb<tag>: the upstream router, 192.168.1.254/24 on brx, and 203.0.113.5 (on lo)
//! ```
//!
//! The external network (brx, 192.168.1.0/24) is used once `define_gateway` gives the router
//! its gateway (192.168.1.10, SNAT) and vm3 its floating IP (192.168.1.20): the public
//! namespace has no route to the tenant subnets, so all it sees are those addresses.
//!
//! The qr- devices are created in each host namespace beforehand (the L2 agent's plugging);
//! apply adopts them into the host's router namespace. Each host's devices have their own MACs,
//! so the MAC that answers for the gateway address tells which host holds it.

use std::{
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{router_ctl, sh, sh_out, topo::unique_tag};

pub const ROUTER_ID: &str = "a81cc110-16f4-4d6c-89d2-8af91cec9714";
pub const PORT_1: &str = "d295b258-4586-4e8a-9c3e-1f2a3b4c5d6e";
pub const PORT_2: &str = "2ffdb861-731c-4b1a-8d2e-6f7a8b9c0d1e";
pub const DEV_1: &str = "qr-d295b258-45";
pub const DEV_2: &str = "qr-2ffdb861-73";
/// The external gateway's port (`define_gateway`), and its device (qg-<id[:11]>).
pub const GW_PORT: &str = "7c1e0f4a-2b3d-4e5f-8a9b-0c1d2e3f4a5b";
pub const DEV_GW: &str = "qg-7c1e0f4a-2b";
/// The router's address on the external network, vm3's floating IP there, and the address
/// behind the upstream router (in the public namespace).
pub const GW_IP: &str = "192.168.1.10";
pub const FIP_VM3: &str = "192.168.1.20";
pub const OUTSIDE: &str = "203.0.113.5";
pub const ETCD: &str = "http://10.254.0.1:2379";
/// Where syncing agents serve their metrics, on each host namespace's loopback.
pub const AGENT_METRICS_PORT: u16 = 9470;

pub struct Cluster {
    pub tag: String,
    pub fabric: String,
    pub vm1: String,
    pub vm3: String,
    pub probe: String,
    /// The upstream router on the external network (192.168.1.254 on brx, 203.0.113.5).
    pub public: String,
    pub hosts: Vec<Host>,
    etcd: Option<Child>,
    data: std::path::PathBuf,
    /// The endpoint agents and the CLI are given (`ETCD`, or its https:// form).
    pub endpoint: String,
    /// TLS and users (`Cluster::new_secure`).
    pub secure: Option<Secure>,
}

/// A secured etcd: TLS with client certificates (`--client-cert-auth`), and etcd's
/// authentication on, with the roles the README documents: `cli` (definitions and all), one
/// `agent-<host>` per host (reads everything, writes its own host's keys), and `scheduler`
/// (writes the schedule), which the first host's user has too.
pub struct Secure {
    pub dir: std::path::PathBuf,
}

impl Secure {
    /// Options for `who` ("cli", "root" or a host's `agent-<host>`): its certificate and key,
    /// its user and the file holding its password.
    pub fn creds(&self, who: &str) -> Vec<String> {
        let cert = |ext: &str| {
            self.dir
                .join(format!("{}.{ext}", cert_of(who)))
                .display()
                .to_string()
        };
        let f = |ext: &str| self.dir.join(format!("{who}.{ext}")).display().to_string();
        vec![
            "--etcd-cacert".into(),
            self.dir.join("ca.crt").display().to_string(),
            "--etcd-cert".into(),
            cert("crt"),
            "--etcd-key".into(),
            cert("key"),
            "--etcd-user".into(),
            who.into(),
            "--etcd-password-file".into(),
            f("pw"),
        ]
    }

    /// A CA, a server certificate for etcd's addresses and a client certificate (and a
    /// password) for each of root, cli and agent, in `dir`.
    fn make(dir: &std::path::Path) -> Secure {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!(
            "cd {d} && openssl req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=router-test-ca 2>/dev/null"
        ));
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:10.254.0.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (who, ext) in [
            ("server", "server.ext"),
            ("root", "client.ext"),
            ("cli", "client.ext"),
            ("agent", "client.ext"),
        ] {
            sh(&format!(
                "cd {d} && openssl req {key} -keyout {who}.key -out {who}.csr -subj /CN={who} 2>/dev/null && openssl x509 -req -in {who}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {who}.crt -days 2 -extfile {ext} 2>/dev/null"
            ));
            std::fs::write(
                dir.join(format!("{who}.pw")),
                format!("pw-{who}-{}\n", std::process::id()),
            )
            .unwrap();
        }
        Secure {
            dir: dir.to_path_buf(),
        }
    }

    /// etcdctl's TLS options for `who`.
    fn etcdctl(&self, who: &str) -> String {
        let d = self.dir.display();
        let c = cert_of(who);
        format!("--cacert {d}/ca.crt --cert {d}/{c}.crt --key {d}/{c}.key")
    }

    /// Gives etcd user `who` a password (in `who.pw`).
    pub fn password(&self, who: &str) -> String {
        let pw = format!("pw-{who}-{}", std::process::id());
        std::fs::write(self.dir.join(format!("{who}.pw")), format!("{pw}\n")).unwrap();
        pw
    }
}

/// The client certificate `who` presents: the hosts' users share the `agent` one (etcd takes
/// the user from the password login).
fn cert_of(who: &str) -> &str {
    if who.starts_with("agent-") {
        "agent"
    } else {
        who
    }
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub instance: String,
    /// The MAC of this host's device on 172.16.100.0/24.
    pub mac1: String,
    agent: Option<Child>,
}

impl Host {
    /// This host's namespace for router `id`.
    pub fn router_ns(&self, id: &str) -> String {
        format!("qrouter-{}-{id}", self.instance)
    }
    pub fn run_dir(&self) -> String {
        format!("/run/router-xdp/instances/{}", self.instance)
    }
}

fn mac_of(ns: &str, dev: &str) -> String {
    let out = sh(&format!("ip -n {ns} -br link show {dev}"));
    out.split_whitespace().nth(2).unwrap_or("").to_string()
}

impl Cluster {
    /// `n` hosts, etcd running, no agent yet.
    pub fn new(n: usize) -> Cluster {
        Cluster::new_with(n, false)
    }

    /// As `new`, with etcd secured (`Secure`): the agents are started with the `agent`
    /// credentials, `ctl` uses the `cli` ones.
    pub fn new_secure(n: usize) -> Cluster {
        Cluster::new_with(n, true)
    }

    fn new_with(n: usize, secure: bool) -> Cluster {
        crate::require_root();
        let tag = unique_tag();
        let fabric = format!("f{tag}");
        let mut c = Cluster {
            vm1: format!("v1{tag}"),
            vm3: format!("v3{tag}"),
            probe: format!("p{tag}"),
            public: format!("pb{tag}"),
            fabric: fabric.clone(),
            hosts: Vec::new(),
            etcd: None,
            data: std::env::temp_dir().join(format!("router-etcd-{tag}")),
            endpoint: if secure {
                ETCD.replace("http://", "https://")
            } else {
                ETCD.to_string()
            },
            secure: secure.then(|| {
                Secure::make(&std::env::temp_dir().join(format!("router-etcd-pki-{tag}")))
            }),
            tag: tag.clone(),
        };
        sh(&format!(
            "ip netns add {fabric} && ip -n {fabric} link set lo up"
        ));
        for b in ["brm", "brt1", "brt2", "brx"] {
            sh(&format!(
                "ip -n {fabric} link add {b} type bridge && ip -n {fabric} link set {b} up"
            ));
        }
        sh(&format!("ip -n {fabric} addr add 10.254.0.1/24 dev brm"));
        for (ns, br, addr, gw) in [
            (&c.vm1, "brt1", "172.16.100.3/24", Some("172.16.100.1")),
            (&c.vm3, "brt2", "172.16.101.3/24", Some("172.16.101.1")),
            (&c.probe, "brt1", "172.16.100.4/24", None),
        ] {
            sh(&format!(
                "ip netns add {ns} && ip -n {ns} link set lo up && ip -n {ns} link add eth0 type veth peer name y{ns} netns {fabric} && ip -n {fabric} link set y{ns} master {br} up && ip -n {ns} link set eth0 up && ip -n {ns} addr add {addr} dev eth0"
            ));
            if let Some(gw) = gw {
                sh(&format!("ip -n {ns} route add default via {gw}"));
            }
        }
        let public = &c.public;
        sh(&format!(
            "ip netns add {public} && ip -n {public} link set lo up && ip -n {public} addr add {OUTSIDE}/32 dev lo && ip -n {public} link add eth0 type veth peer name y{public} netns {fabric} && ip -n {fabric} link set y{public} master brx up && ip -n {public} link set eth0 up && ip -n {public} addr add 192.168.1.254/24 dev eth0"
        ));
        for i in 0..n {
            let name = format!("host-{}", (b'a' + i as u8) as char);
            let ns = format!("h{i}{tag}");
            sh(&format!(
                "ip netns add {ns} && ip -n {ns} link set lo up && ip -n {ns} link add mgmt type veth peer name xm{i} netns {fabric} && ip -n {fabric} link set xm{i} master brm up && ip -n {ns} addr add 10.254.0.{}/24 dev mgmt && ip -n {ns} link set mgmt up",
                11 + i
            ));
            for (dev, br, peer) in [
                (DEV_1, "brt1", format!("xa{i}")),
                (DEV_2, "brt2", format!("xb{i}")),
                (DEV_GW, "brx", format!("xg{i}")),
            ] {
                sh(&format!(
                    "ip -n {ns} link add {dev} type veth peer name {peer} netns {fabric} && ip -n {fabric} link set {peer} master {br} up"
                ));
            }
            c.hosts.push(Host {
                mac1: mac_of(&ns, DEV_1),
                name,
                ns,
                instance: format!("{tag}{i}"),
                agent: None,
            });
        }
        c.start_etcd();
        c
    }

    pub fn start_etcd(&mut self) {
        let scheme = if self.secure.is_some() {
            "https"
        } else {
            "http"
        };
        let mut tls = Vec::new();
        if let Some(sec) = &self.secure {
            let f = |n: &str| sec.dir.join(n).display().to_string();
            tls = vec![
                "--cert-file".to_string(),
                f("server.crt"),
                "--key-file".into(),
                f("server.key"),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                f("ca.crt"),
            ];
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.fabric, "etcd", "--data-dir"])
            .arg(&self.data)
            .args(&tls)
            .args([
                "--listen-client-urls",
                &format!("{scheme}://10.254.0.1:2379,{scheme}://127.0.0.1:2379"),
                "--advertise-client-urls",
                &self.endpoint,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (cargo xtask setup installs it)");
        let t = Instant::now();
        while !self.etcd_healthy() {
            assert!(t.elapsed() < Duration::from_secs(10), "etcd did not start");
            if let Ok(Some(s)) = child.try_wait() {
                panic!("etcd exited: {s}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.etcd = Some(child);
        if self.secure.is_some() && !self.data.join(".auth-on").exists() {
            self.enable_auth();
            std::fs::write(self.data.join(".auth-on"), "").unwrap();
        }
    }

    /// etcdctl against this cluster's etcd, as `who` (TLS and user when secured).
    pub fn etcdctl(&self, who: &str, args: &str) -> std::process::Output {
        let auth = match &self.secure {
            Some(sec) => {
                let pw = std::fs::read_to_string(sec.dir.join(format!("{who}.pw"))).unwrap();
                format!("{} --user {who}:{}", sec.etcdctl(who), pw.trim())
            }
            None => String::new(),
        };
        sh_out(&format!(
            "ip netns exec {} etcdctl --endpoints {} {auth} {args}",
            self.fabric, self.endpoint
        ))
    }

    /// The README's users and roles, then authentication on.
    fn enable_auth(&self) {
        let sec = self.secure.as_ref().unwrap();
        let pw = |who: &str| {
            std::fs::read_to_string(sec.dir.join(format!("{who}.pw")))
                .unwrap()
                .trim()
                .to_string()
        };
        let run = |args: String| {
            let out = sh_out(&format!(
                "ip netns exec {} etcdctl --endpoints {} {} {args}",
                self.fabric,
                self.endpoint,
                sec.etcdctl("root")
            ));
            assert!(
                out.status.success(),
                "etcdctl {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let p = "/router-xdp/v1/";
        for who in ["root", "cli"] {
            run(format!("user add {who}:{}", pw(who)));
        }
        run("role add cli".into());
        run(format!(
            "role grant-permission cli --prefix=true readwrite {p}"
        ));
        run("role add scheduler".into());
        for sub in ["schedule/", "scheduler/"] {
            run(format!(
                "role grant-permission scheduler --prefix=true readwrite {p}{sub}"
            ));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            let user = format!("agent-{}", h.name);
            run(format!("user add {user}:{}", sec.password(&user)));
            run(format!("role add {user}"));
            run(format!(
                "role grant-permission {user} --prefix=true read {p}"
            ));
            run(format!(
                "role grant-permission {user} --prefix=true readwrite {p}hosts/{}/",
                h.name
            ));
            run(format!("user grant-role {user} {user}"));
            if i == 0 {
                run(format!("user grant-role {user} scheduler"));
            }
        }
        run("user grant-role root root".into());
        run("user grant-role cli cli".into());
        run("auth enable".into());
    }

    pub fn etcd_healthy(&self) -> bool {
        let tls = self
            .secure
            .as_ref()
            .map(|s| s.etcdctl("root"))
            .unwrap_or_default();
        sh_out(&format!(
            "ip netns exec {} etcdctl --endpoints {} {tls} --command-timeout=500ms endpoint health",
            self.fabric, self.endpoint
        ))
        .status
        .success()
    }

    /// Kills etcd with SIGKILL (its data stays).
    pub fn kill_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            // `ip netns exec` execs etcd: the child is etcd itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Host i's etcd user (a secured cluster).
    pub fn agent_user(&self, i: usize) -> String {
        format!("agent-{}", self.hosts[i].name)
    }

    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_with(i, &[]);
    }

    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) {
        let creds = self
            .secure
            .as_ref()
            .map(|s| s.creds(&self.agent_user(i)))
            .unwrap_or_default();
        let h = &mut self.hosts[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::env::temp_dir().join(format!("router-agent-{}.log", h.instance)))
            .expect("log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .arg(router_ctl())
            .args([
                "--instance",
                &h.instance,
                "run",
                "--etcd",
                &self.endpoint,
                "--host",
                &h.name,
            ])
            .args(creds)
            .args(extra)
            .env("RUST_LOG", "info")
            // The agents stall their session this long when the test writes `test/stall`.
            .env("ROUTER_XDP_TEST_SESSION_STALL_MS", "3000")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("router-ctl run");
        h.agent = Some(child);
    }

    /// The key the agents' connection-state streams share (`--sync-key`), written on first use.
    pub fn sync_key(&self) -> std::path::PathBuf {
        let key = std::env::temp_dir().join(format!("router-sync-key-{}", self.tag));
        if !key.exists() {
            let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
            std::fs::write(&key, bytes).expect("sync key");
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("sync key mode");
        }
        key
    }

    /// Starts host i's agent replicating HA routers' connection state: `--sync-listen` on its
    /// management address, port 7480, and the cluster's `sync_key`.
    pub fn start_syncing_agent(&mut self, i: usize) {
        let (listen, key) = (format!("10.254.0.{}:7480", 11 + i), self.sync_key());
        self.start_agent_with(
            i,
            &[
                "--sync-listen",
                &listen,
                "--sync-key",
                key.to_str().unwrap(),
                "--metrics",
                &AGENT_METRICS_PORT.to_string(),
            ],
        );
    }

    /// The value of metric `series` (name and labels, as served) that the syncing agent of host
    /// `i` serves on its namespace's loopback; None if it does not serve it.
    pub fn agent_metric(&self, i: usize, series: &str) -> Option<u64> {
        let series = format!("{series} ");
        let text = crate::topo::in_ns(&self.hosts[i].ns, || {
            crate::http_get(&format!("127.0.0.1:{AGENT_METRICS_PORT}"), "/metrics")
        })
        .join()
        .ok()??;
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Two hosts with their agents (replicating connection state when `sync`), the seed
    /// router defined HA with its external gateway and vm3's floating IP (`define_gateway`):
    /// scheduled on both, converged, vm1 reaching vm3. Returns the cluster and the active host.
    pub fn ha_pair_with_gateway(sync: bool) -> (Cluster, usize) {
        let mut c = Cluster::new(2);
        for i in 0..2 {
            if sync {
                c.start_syncing_agent(i);
            } else {
                c.start_agent(i);
            }
        }
        c.define_router(true);
        c.define_gateway();
        c.wait_scheduled(2, Duration::from_secs(20));
        let active = c.wait_converged(Duration::from_secs(20));
        c.wait_ping(Duration::from_secs(10));
        (c, active)
    }

    /// kill -9 of host i's agent (its fencer lives on, as it would on a real host).
    /// The process id of host `i`'s agent, while it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].agent.as_ref().map(|c| c.id())
    }

    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: a graceful stop, which resigns.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].agent.take() {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// `router-ctl --etcd … ARGS` from the fabric namespace (the operator's place).
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let creds = self
            .secure
            .as_ref()
            .map(|s| s.creds("cli"))
            .unwrap_or_default();
        self.ctl_as(&creds, args)
    }

    /// `router-ctl --etcd … CREDS ARGS` from the fabric namespace, with the etcd options
    /// `creds` (none: plain).
    pub fn ctl_as(&self, creds: &[String], args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.fabric))
            .arg(router_ctl())
            .args(["--etcd", &self.endpoint])
            .args(creds)
            .args(args)
            .output()
            .expect("router-ctl")
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "router-ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("-j");
        serde_json::from_str(&self.ctl_ok(&a)).expect("JSON")
    }

    /// Defines the seed router (two subnets, gateways .1) through the CLI against etcd.
    pub fn define_router(&self, ha: bool) {
        let mut create = vec!["router", "create", "r1", "--id", ROUTER_ID];
        if ha {
            create.push("--ha");
        }
        self.ctl_ok(&create);
        for (subnet, gw, port) in [
            ("172.16.100.0/24", "172.16.100.1", PORT_1),
            ("172.16.101.0/24", "172.16.101.1", PORT_2),
        ] {
            self.add_subnet(subnet, gw, port, &[]);
        }
    }

    /// Gives r1 its external gateway and vm3 a floating IP, through the CLI against etcd:
    /// `router set r1 --external-gateway public --port-id GW_PORT --fixed-ip
    /// subnet=192.168.1.0/24,ip-address=192.168.1.10,gateway=192.168.1.254` (SNAT on, the
    /// default), then `floating ip create --router r1 --floating-ip-address 192.168.1.20
    /// --fixed-ip-address 172.16.101.3`.
    pub fn define_gateway(&self) {
        let fixed = format!("subnet=192.168.1.0/24,ip-address={GW_IP},gateway=192.168.1.254");
        self.ctl_ok(&[
            "router",
            "set",
            "r1",
            "--external-gateway",
            "public",
            "--port-id",
            GW_PORT,
            "--fixed-ip",
            &fixed,
        ]);
        self.ctl_ok(&[
            "floating",
            "ip",
            "create",
            "--router",
            "r1",
            "--floating-ip-address",
            FIP_VM3,
            "--fixed-ip-address",
            "172.16.101.3",
        ]);
    }

    /// `router add subnet r1 --subnet SUBNET --gateway GW --port-id PORT`.
    /// `router add subnet` of r1, with `more` options.
    fn add_subnet(&self, subnet: &str, gw: &str, port: &str, more: &[&str]) {
        let args = [
            &[
                "router",
                "add",
                "subnet",
                "r1",
                "--subnet",
                subnet,
                "--gateway",
                gw,
                "--port-id",
                port,
            ][..],
            more,
        ]
        .concat();
        self.ctl_ok(&args);
    }

    /// Waits until the router is scheduled on `n` hosts.
    pub fn wait_scheduled(&self, n: usize, within: Duration) {
        let t = Instant::now();
        while self.show()["hosts"].as_array().map_or(0, |h| h.len()) < n {
            assert!(
                t.elapsed() < within,
                "not scheduled on {n} hosts: {}",
                self.show()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the router dual-stack through the CLI: 2001:db8:100::/64 on port 1 and
    /// 2001:db8:100::/64 on port 1 (advertised: `slaac`) and 2001:db8:101::/64 on port 2
    /// (gateways ::1), vm1 2001:db8:100::3 and vm3 2001:db8:101::3 with their gateways as
    /// default routes.
    pub fn add_ipv6(&self) {
        let slaac = ["--ipv6-ra-mode", "slaac", "--ipv6-address-mode", "slaac"];
        self.add_subnet("2001:db8:100::/64", "2001:db8:100::1", PORT_1, &slaac);
        self.add_subnet("2001:db8:101::/64", "2001:db8:101::1", PORT_2, &[]);
        for (ns, addr, gw) in [
            (&self.vm1, "2001:db8:100::3/64", "2001:db8:100::1"),
            (&self.vm3, "2001:db8:101::3/64", "2001:db8:101::1"),
        ] {
            sh(&format!(
                "ip -n {ns} addr add {addr} dev eth0 nodad && ip -n {ns} -6 route add default via {gw}"
            ));
        }
    }

    /// vm1 reaches vm3 over IPv6 through the router.
    pub fn ping6_once(&self) -> bool {
        sh_out(&format!(
            "ip netns exec {} ping -6 -c 1 -W 1 2001:db8:101::3",
            self.vm1
        ))
        .status
        .success()
    }

    /// `router show r1 -j`.
    pub fn show(&self) -> serde_json::Value {
        self.ctl_json(&["router", "show", "r1"])
    }

    /// Waits until the router is ACTIVE with every scheduled host at the current generation;
    /// returns the active host's index (HA) or the host's (single).
    pub fn wait_converged(&self, within: Duration) -> usize {
        let t = Instant::now();
        loop {
            let v = self.show();
            let host = v["active_host"]
                .as_str()
                .or_else(|| v["hosts"][0]["host"].as_str())
                .map(str::to_string);
            if v["status"] == "ACTIVE" {
                if let Some(h) = host {
                    return self.index(&h);
                }
            }
            assert!(t.elapsed() < within, "router did not converge: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .unwrap_or_else(|| panic!("no host {host}"))
    }

    /// The role etcd records for host i (None: no status).
    pub fn role(&self, i: usize) -> Option<String> {
        let v = self.show();
        v["hosts"]
            .as_array()?
            .iter()
            .find(|h| h["host"] == self.hosts[i].name.as_str())
            .and_then(|h| h["role"].as_str().map(str::to_string))
    }

    /// The router's addresses in host i's router namespace; panics when `ip` cannot tell (no
    /// such namespace): "no address" must mean the namespace is there and holds none.
    pub fn addresses(&self, i: usize) -> String {
        let ns = self.hosts[i].router_ns(ROUTER_ID);
        let out = sh_out(&format!("ip -n {ns} -4 -br addr"));
        assert!(
            out.status.success(),
            "cannot read the addresses in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `agent list` says host i's agent is alive.
    pub fn agent_alive(&self, i: usize) -> bool {
        let v = self.ctl_json(&["agent", "list"]);
        v.as_array()
            .expect("agent list")
            .iter()
            .find(|a| a["host"] == self.hosts[i].name.as_str())
            .unwrap_or_else(|| panic!("{} not in agent list: {v}", self.hosts[i].name))["alive"]
            .as_bool()
            .expect("alive")
    }

    /// vm1 reaches vm3 through the router (and the router learnt both).
    pub fn ping_once(&self) -> bool {
        sh_out(&format!(
            "ip netns exec {} ping -c 1 -W 1 172.16.101.3",
            self.vm1
        ))
        .status
        .success()
    }

    pub fn wait_ping(&self, within: Duration) {
        let t = Instant::now();
        while !self.ping_once() {
            assert!(
                t.elapsed() < within,
                "vm1 cannot reach vm3 through the router"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.stop_agent(i);
            let pid = std::fs::read_to_string(format!("{}/fencer.pid", self.hosts[i].run_dir()));
            if let Ok(p) = pid.map(|p| p.trim().parse::<i32>().unwrap_or(0)) {
                if p > 0 {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        self.kill_etcd();
        for h in &self.hosts {
            let _ = sh_out(&format!("ip netns del {}", h.router_ns(ROUTER_ID)));
            let _ = sh_out(&format!("ip netns del {}", h.ns));
            let _ = std::fs::remove_dir_all(h.run_dir());
            let _ =
                std::fs::remove_dir_all(format!("/sys/fs/bpf/router-xdp/instances/{}", h.instance));
        }
        for ns in [
            &self.vm1,
            &self.vm3,
            &self.probe,
            &self.public,
            &self.fabric,
        ] {
            let _ = sh_out(&format!("ip netns del {ns}"));
        }
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("router-sync-key-{}", self.tag)),
        );
        if let Some(sec) = &self.secure {
            let _ = std::fs::remove_dir_all(&sec.dir);
        }
        // The agents' logs stay for a failed test to read.
        if !std::thread::panicking() {
            for h in &self.hosts {
                let _ = std::fs::remove_file(
                    std::env::temp_dir().join(format!("router-agent-{}.log", h.instance)),
                );
            }
        }
    }
}

/// A ping from vm1 to vm3 every 10 ms while it runs.
pub struct Pinger(Child);

impl Pinger {
    pub fn start(c: &Cluster) -> Pinger {
        Pinger(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &c.vm1,
                    "ping",
                    "-n",
                    "-i",
                    "0.01",
                    "-W",
                    "1",
                    "172.16.101.3",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("ping"),
        )
    }

    /// Stops it: (sent, received).
    pub fn stop(mut self) -> (u64, u64) {
        // SAFETY: plain kill(2); ping prints its summary on SIGINT.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("true"))
            .wait_with_output()
            .expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary: {text}"));
        let n: Vec<u64> = line
            .split(',')
            .filter_map(|p| p.split_whitespace().next()?.parse().ok())
            .collect();
        (n[0], n[1])
    }
}

/// Asks who has 172.16.100.1 every 10 ms from the probe namespace and records which MACs
/// answer each question: two in one round would be two hosts answering for one address.
pub struct ArpWatch {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Rounds>>,
}

/// Each round of the ARP watch: when it asked, and the MACs that answered.
pub type Rounds = Vec<(Instant, Vec<[u8; 6]>)>;

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl ArpWatch {
    pub fn start(c: &Cluster) -> ArpWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = c.probe.clone();
        let handle = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let name = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: plain syscalls on our own socket and buffers.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr());
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0x0806u16.to_be() as i32);
                assert!(fd >= 0);
                let mut sa: libc::sockaddr_ll = std::mem::zeroed();
                sa.sll_family = libc::AF_PACKET as u16;
                sa.sll_protocol = 0x0806u16.to_be();
                sa.sll_ifindex = ifindex as i32;
                libc::bind(
                    fd,
                    &sa as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 2000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                // Our MAC: read from sysfs is not possible here (another netns's /sys); ask.
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (i, b) in b"eth0".iter().enumerate() {
                    ifr.ifr_name[i] = *b as libc::c_char;
                }
                libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr);
                let mut me = [0u8; 6];
                for (i, m) in me.iter_mut().enumerate() {
                    *m = ifr.ifr_ifru.ifru_hwaddr.sa_data[i] as u8;
                }
                let mut req = vec![0xffu8; 6];
                req.extend_from_slice(&me);
                req.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
                req.extend_from_slice(&me);
                req.extend_from_slice(&[172, 16, 100, 4]);
                req.extend_from_slice(&[0; 6]);
                req.extend_from_slice(&[172, 16, 100, 1]);
                let mut to = sa;
                to.sll_halen = 6;
                to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                let mut rounds: Rounds = Vec::new();
                while !s.load(Ordering::SeqCst) {
                    let asked = Instant::now();
                    libc::sendto(
                        fd,
                        req.as_ptr() as *const libc::c_void,
                        req.len(),
                        0,
                        &to as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    let mut seen: Vec<[u8; 6]> = Vec::new();
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_millis(10) {
                        let mut buf = [0u8; 128];
                        let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                        if n >= 42 && buf[20..22] == [0, 2] && buf[28..32] == [172, 16, 100, 1] {
                            let mut m = [0u8; 6];
                            m.copy_from_slice(&buf[22..28]);
                            if !seen.contains(&m) {
                                seen.push(m);
                            }
                        }
                    }
                    rounds.push((asked, seen));
                }
                libc::close(fd);
                rounds
            }
        });
        ArpWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops it: the MACs that answered, per round.
    pub fn stop(mut self) -> Rounds {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("ARP watch")
    }
}

/// Checks the rounds: never two MACs in one round; returns the MACs in the order they
/// answered (each once per run of rounds).
pub fn answering(rounds: &Rounds) -> Vec<String> {
    for (i, (_, r)) in rounds.iter().enumerate() {
        assert!(
            r.len() <= 1,
            "split brain: {} MACs answered for 172.16.100.1 in round {i}: {:?}",
            r.len(),
            r.iter().map(fmt_mac).collect::<Vec<_>>()
        );
    }
    let mut seq: Vec<String> = Vec::new();
    for r in rounds.iter().flat_map(|(_, r)| r.iter()) {
        let m = fmt_mac(r);
        if seq.last() != Some(&m) {
            seq.push(m);
        }
    }
    seq
}

/// When `mac` first answered after `since`.
pub fn first_answer(rounds: &Rounds, mac: &str, since: Instant) -> Option<Duration> {
    rounds
        .iter()
        .find(|(t, r)| *t >= since && r.iter().any(|m| fmt_mac(m) == mac))
        .map(|(t, _)| *t - since)
}

/// The longest run of rounds in which nobody answered.
pub fn longest_silence(rounds: &Rounds) -> Duration {
    let mut best = Duration::ZERO;
    let mut last_answer: Option<Instant> = rounds.first().map(|r| r.0);
    for (t, r) in rounds {
        if !r.is_empty() {
            if let Some(l) = last_answer {
                best = best.max(*t - l);
            }
            last_answer = Some(*t);
        }
    }
    best
}
