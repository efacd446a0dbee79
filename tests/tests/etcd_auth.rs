//! etcd secured as a cloud runs it: TLS with client certificates and etcd's authentication on,
//! with the README's roles. Agents and the CLI work with their credentials; without them, or
//! with an agent's credentials changing a definition, nothing is applied and the error says
//! why.

use std::time::Duration;

use tests::cluster::Cluster;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn agents_and_the_cli_work_with_their_credentials_and_nothing_else_does() {
    let mut c = tests::in_setup(|| {
        let mut c = Cluster::new_secure(1);
        c.start_agent(0);
        c
    });
    let sec = c.secure.as_ref().unwrap();
    let (cli, agent, dir) = (sec.creds("cli"), sec.creds("agent"), sec.dir.clone());
    // The CLI with its credentials defines the router; the agent applies it.
    c.define_router(false);
    c.wait_converged(Duration::from_secs(20));
    c.wait_ping(Duration::from_secs(10));
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
            stderr(&out).contains("permission denied") && stderr(&out).contains("user agent"),
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
            &format!("get --keys-only /router-xdp/v1/agents/{name}"),
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
