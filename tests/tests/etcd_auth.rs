//! etcd secured as a cloud runs it: TLS with client certificates and etcd's authentication on,
//! with the README's roles. Agents and the CLI work with their credentials; without them, or
//! with an agent's credentials changing a definition, nothing is applied and the error says
//! why. Each host's credentials write that host's keys only, and no host takes a role by
//! writing its own keys for a router it does not run.

use std::time::Duration;

use tests::cluster::{Cluster, ROUTER_ID};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn agents_and_the_cli_work_with_their_credentials_and_nothing_else_does() {
    let mut c = tests::in_setup(|| {
        let mut c = Cluster::new_secure(2);
        c.start_agent(0);
        c.start_agent(1);
        c
    });
    let sec = c.secure.as_ref().unwrap();
    let u1 = c.agent_user(1);
    let (h0, h1) = (c.hosts[0].name.clone(), c.hosts[1].name.clone());
    let (cli, agent, dir) = (sec.creds("cli"), sec.creds(&u1), sec.dir.clone());
    let p = "/router-xdp/v1/";
    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A host the router will not be scheduled on stands for it before anyone else, with its
    // own credentials in its own keys: it must lead nothing.
    let ghost = "agent-ghost";
    let pw = sec.password(ghost);
    for args in [
        format!("user add {ghost}:{pw}"),
        format!("role add {ghost}"),
        format!("role grant-permission {ghost} --prefix=true readwrite {p}hosts/ghost/"),
        format!("user grant-role {ghost} {ghost}"),
    ] {
        ok(c.etcdctl("root", &args), &args);
    }
    let granted = ok(c.etcdctl(ghost, "lease grant 600"), "lease grant");
    let lease = granted
        .split_whitespace()
        .nth(1)
        .expect("a lease id")
        .to_string();
    ok(
        c.etcdctl(
            ghost,
            &format!("put --lease={lease} {p}hosts/ghost/candidate/{ROUTER_ID} ghost"),
        ),
        "the ghost's candidacy",
    );
    // The CLI with its credentials defines an HA router; the agents apply it, one leads.
    c.define_router(true);
    let active = c.wait_converged(Duration::from_secs(20));
    c.wait_ping(Duration::from_secs(10));
    eprintln!("active: {}", c.hosts[active].name);
    // Each host's credentials write its own keys and nothing else: not another host's
    // liveness or candidacy, not the schedule, not the old layout's shared keys.
    for key in [
        format!("{p}hosts/{h0}/alive"),
        format!("{p}hosts/{h0}/candidate/{ROUTER_ID}"),
        format!("{p}hosts/{h0}/status/{ROUTER_ID}"),
        format!("{p}schedule/{ROUTER_ID}"),
        format!("{p}scheduler/{h1}"),
        format!("{p}active/{ROUTER_ID}"),
        format!("{p}agents/{h0}"),
        format!("{p}routers/{ROUTER_ID}"),
    ] {
        let out = c.etcdctl(&u1, &format!("put {key} x"));
        assert!(
            !out.status.success() && stderr(&out).contains("permission denied"),
            "{u1} could write {key}: {}",
            stderr(&out)
        );
    }
    ok(
        c.etcdctl(&u1, &format!("put {p}hosts/{h1}/probe x")),
        "own key",
    );
    ok(
        c.etcdctl(&u1, &format!("del {p}hosts/{h1}/probe")),
        "own key",
    );
    // Only the host whose user may schedule stands for it; the old layout's keys stay
    // unwritten (the agents found they may not, and went on without).
    let keys = |prefix: &str| {
        let out = ok(
            c.etcdctl("root", &format!("get --prefix --keys-only {p}{prefix}")),
            prefix,
        );
        out.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys("scheduler"), vec![format!("{p}scheduler/{h0}")]);
    assert_eq!(keys("agents/"), Vec::<String>::new());
    assert_eq!(keys("active/"), Vec::<String>::new());
    let mut candidates = keys("hosts/");
    candidates.retain(|k| k.contains("/candidate/"));
    candidates.sort();
    assert_eq!(
        candidates,
        vec![
            format!("{p}hosts/ghost/candidate/{ROUTER_ID}"),
            format!("{p}hosts/{h0}/candidate/{ROUTER_ID}"),
            format!("{p}hosts/{h1}/candidate/{ROUTER_ID}"),
        ]
    );
    let defined = c.etcdctl("root", "get --prefix /router-xdp/v1/routers/ -w json");
    assert!(defined.status.success(), "{}", stderr(&defined));
    let routers = || {
        c.etcdctl("root", "get --prefix --keys-only /router-xdp/v1/routers/")
            .stdout
    };
    let before = routers();

    // No TLS options: refused, and said so.
    let plain = c.ctl_as(&[], &["router", "list"]);
    assert!(!plain.status.success());
    assert!(
        stderr(&plain).contains("--etcd-cacert"),
        "an https endpoint without a CA: {}",
        stderr(&plain)
    );
    // TLS without a client certificate: etcd refuses the connection.
    let no_cert = c.ctl_as(&cli[..2], &["router", "list"]);
    assert!(
        !no_cert.status.success(),
        "no client certificate was accepted"
    );
    eprintln!("without a client certificate: {}", stderr(&no_cert));
    // The agent's credentials cannot define or change routers.
    for args in [
        &["router", "create", "intruder"][..],
        &["router", "delete", "r1"][..],
        &[
            "router",
            "add",
            "route",
            "r1",
            "--route",
            "destination=10.10.0.0/16,gateway=172.16.101.254",
        ][..],
    ] {
        let out = c.ctl_as(&agent, args);
        assert!(
            !out.status.success(),
            "the agent's credentials could {args:?}"
        );
        assert!(
            stderr(&out).contains("permission denied")
                && stderr(&out).contains(&format!("user {u1}")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert_eq!(routers(), before, "a refused write changed the definitions");
    // A wrong password.
    let bad_pw = dir.join("wrong.pw");
    std::fs::write(&bad_pw, "not-it\n").unwrap();
    let mut wrong = cli.clone();
    let n = wrong.len();
    wrong[n - 1] = bad_pw.display().to_string();
    let out = c.ctl_as(&wrong, &["router", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("authentication failed"),
        "{}",
        stderr(&out)
    );
    // The password is never taken from the command line.
    let out = c.ctl_as(
        &[cli.clone(), vec!["--etcd-password".into(), "x".into()]].concat(),
        &["router", "list"],
    );
    assert!(!out.status.success());

    // An agent started without a client certificate or user applies nothing and joins
    // nothing, and its log says why (it keeps trying, as it does while etcd is away).
    let (hns, instance, name) = (
        c.hosts[0].ns.clone(),
        c.hosts[0].instance.clone(),
        c.hosts[0].name.clone(),
    );
    c.stop_agent(0);
    let registered = |c: &Cluster| {
        let out = c.etcdctl(
            "root",
            &format!("get --keys-only /router-xdp/v1/hosts/{name}/alive"),
        );
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).contains(&name)
    };
    assert!(!registered(&c), "a resigned agent stays registered");
    let log = dir.join("agent-without.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{hns}"))
        .arg(tests::router_ctl())
        .args([
            "--instance",
            &instance,
            "run",
            "--etcd",
            &c.endpoint,
            "--host",
            &name,
        ])
        .args(&cli[..2])
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let alone = registered(&c);
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!alone, "an agent without credentials joined");
    assert!(
        text.contains("over TLS") && text.contains("--etcd-cert"),
        "the agent's log does not say why: {text}"
    );
    assert!(
        text.matches("etcd session ended").count() <= 2,
        "a repeated failure is logged at every retry: {text}"
    );
    // With them again: it joins, and the router is held and forwards.
    c.start_agent(0);
    let t = std::time::Instant::now();
    while !registered(&c) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent did not join again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_ping(Duration::from_secs(20));
}
