//! `router-ctl`: the command line of the XDP router. This file parses the arguments and
//! dispatches (`run`); the arguments' types and what the views and verbs print are in `cli/`.

mod cli;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use serde_json::json;

use router_ctl::{
    agent::store::Store,
    apply, config, daemon,
    state::{self, Lock},
    verbs::Target,
};

use cli::{
    json::print_json,
    remote::agent_list,
    show::{nat_flows, neigh, selected, selected_live, show, stats},
    verbs::{floating_verb, route_batch, router_verb},
    AgentCmd, Cli, Cmd, FloatingCmd, Format, RouteCmd,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(i) = &cli.instance {
        if let Err(e) = router_ctl::agent::use_instance(i) {
            eprintln!("router-ctl: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    // Before any thread enters a router's namespace (see kernel::init_io_runtime).
    let _ = router_ctl::kernel::init_io_runtime();
    if !matches!(
        cli.cmd,
        Cmd::Run { .. } | Cmd::Router { .. } | Cmd::Floating { .. }
    ) {
        // Like iproute2: a closed pipe (`router-ctl show | head`) ends the command quietly.
        // Not for the daemon, nor for verbs that write to its socket (a daemon going away
        // must give them an error, not a signal).
        // SAFETY: restores the default disposition before any output.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        match cli.verbose {
            0 => "warn,router_ctl=info",
            1 => "info,router_ctl=debug",
            _ => "debug",
        }
        .to_string()
    });
    // netlink-packet-route warns on every link dump that this kernel's IPv6 device
    // configuration has more fields than it knows: noise, unless asked for by name.
    if !filter.contains("netlink_packet_route") {
        filter.push_str(",netlink_packet_route=error");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,router_ctl=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log that cannot be written (a full /run under the fencer's or the daemon's log)
        // loses the line: reporting that on stderr, the same file, would panic and end the
        // process — the fencer with it.
        .log_internal_errors(cfg!(mutant = "log_failure_kills"))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("router-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // How to reach etcd: checked where a command uses it.
    let etcd = cli.etcd_access();
    match cli.cmd {
        Cmd::Validate { file } => {
            let routers = config::load_file(&file)?;
            if cli.json {
                print_json(serde_json::to_value(&routers)?);
            } else {
                println!("{}: {} router(s), valid", file.display(), routers.len());
            }
        }
        Cmd::Apply {
            file,
            no_daemon,
            reload,
        } => {
            let routers = config::load_file(&file)?;
            let applied = apply::apply_with(
                &routers,
                &apply::Options {
                    reload,
                    ..Default::default()
                },
            );
            let reports = if !no_daemon {
                // Also when some routers failed: the others were applied and need the daemon.
                let _lock = Lock::acquire(state::STATE_LOCK)?;
                let running = daemon::ensure_running();
                let reports = applied?;
                running?;
                reports
            } else {
                applied?
            };
            if cli.json {
                print_json(serde_json::to_value(&reports)?);
            } else {
                for r in &reports {
                    println!(
                        "router {} ({}) applied in namespace {}",
                        r.id, r.name, r.namespace
                    );
                    for c in &r.created {
                        println!("  created {c}");
                    }
                }
            }
        }
        Cmd::Show { router } => show(&selected(&router)?, cli.json)?,
        Cmd::Stats { router } => stats(&selected_live(&router)?, cli.json)?,
        Cmd::Neigh { router } => neigh(&selected_live(&router)?, cli.json)?,
        Cmd::Nat { router } => nat_flows(&selected_live(&router)?, cli.json)?,
        Cmd::Destroy { routers } => {
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for r in apply::destroy_many(&routers)? {
                match r {
                    Ok(st) => {
                        if !cli.json {
                            println!("router {} ({}) destroyed", st.id, st.name);
                        }
                        done.push(json!({"id": st.id, "name": st.name, "destroyed": true}));
                    }
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            if cli.json {
                print_json(json!(done));
            }
            if !failed.is_empty() {
                anyhow::bail!("{}", failed.join("\n"));
            }
        }
        Cmd::Run {
            stay,
            api_group,
            metrics,
            file,
            auto,
            follow,
            host,
            lease_ttl,
            agent_down_time,
            max_routers,
            max_routes,
            sync_listen,
            sync_key,
        } => {
            let agent = match etcd? {
                None => None,
                Some(access) => {
                    if file.is_some() {
                        anyhow::bail!("run: give either -f FILE or --etcd URLS (the definitions come from one place)");
                    }
                    if !(2..=60).contains(&lease_ttl) {
                        anyhow::bail!("--lease-ttl {lease_ttl}: use 2 to 60 seconds (etcd's shortest lease is about 1.5 s)");
                    }
                    let host = match host {
                        Some(h) => h,
                        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .context("cannot read the hostname; give --host NAME")?
                            .trim()
                            .to_string(),
                    };
                    if host.is_empty() || host.contains('/') {
                        anyhow::bail!("--host '{host}': a host name must be non-empty without '/'");
                    }
                    Some(router_ctl::agent::run::Options {
                        access,
                        limits: router_ctl::agent::applier::Limits {
                            max_routers,
                            max_routes,
                        },
                        host,
                        ttl: std::time::Duration::from_secs(lease_ttl),
                        down_time: std::time::Duration::from_secs(agent_down_time),
                        sync: match (sync_listen, sync_key) {
                            (Some(listen), Some(key)) => Some(router_ctl::agent::replica::Config {
                                listen,
                                key: std::sync::Arc::new(router_ctl::agent::replica::load_key(
                                    &key,
                                )?),
                                counters: Default::default(),
                            }),
                            _ => None,
                        },
                    })
                }
            };
            if let Some(m) = &metrics {
                router_ctl::metrics::listen_addr(m)?;
            }
            let follow = follow.unwrap_or_default();
            if let Some(bad) = follow.iter().find(|p| p.is_empty() || p.contains('/')) {
                anyhow::bail!("--follow {bad:?}: a pattern names namespaces under /run/netns ('*' for any characters, no '/')");
            }
            let api_group = api_group
                .as_deref()
                .map(router_ctl::api::group_id)
                .transpose()?;
            daemon::run(stay, file, metrics, auto, agent, follow, api_group)?
        }
        Cmd::Fence => router_ctl::agent::fence::run_fencer()?,
        Cmd::Agent {
            cmd: AgentCmd::List { format },
        } => agent_list(etcd?.as_ref(), cli.json || matches!(format, Format::Json))?,
        Cmd::Route {
            cmd:
                RouteCmd::Batch {
                    router,
                    file,
                    format,
                },
        } => route_batch(router, &file, cli.json || matches!(format, Format::Json))?,
        Cmd::Router { cmd } => {
            let store = etcd?.map(|a| Store::connect(&a)).transpose()?;
            router_verb(target(store.as_ref()), cmd, cli.json)?
        }
        Cmd::Floating {
            cmd: FloatingCmd::Ip { cmd },
        } => {
            let store = etcd?.map(|a| Store::connect(&a)).transpose()?;
            floating_verb(target(store.as_ref()), cmd, cli.json)?
        }
    }
    Ok(())
}

/// Where the verbs act: on etcd's definitions when the CLI was given `--etcd`, else here.
fn target(store: Option<&Store>) -> Target<'_> {
    store.map_or(Target::Here, Target::Etcd)
}
