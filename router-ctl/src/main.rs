//! `router-ctl`: the command line of the XDP router.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use router_ctl::{
    apply, config,
    config::fmt_mac,
    daemon, live,
    state::{self, Lock, RouterState},
    table::Table,
};

/// Neutron-style virtual routers with an XDP fast path.
#[derive(Parser)]
#[command(name = "router-ctl", version)]
struct Cli {
    /// Print JSON instead of tables (like `ip -j`).
    #[arg(short = 'j', long = "json", global = true)]
    json: bool,
    /// More logging (repeat for more); RUST_LOG overrides it.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// etcd endpoints (URL[,URL…]): the verbs write the desired state there, `router list/show`
    /// and `agent list` read it, `run` becomes an agent.
    #[arg(long, global = true, env = "ROUTER_XDP_ETCD", value_name = "URLS")]
    etcd: Option<String>,
    /// An agent's own state and pin directories, API socket and namespace prefix
    /// (`qrouter-NAME-<id>`), for several agents on one machine.
    #[arg(long, global = true, value_name = "NAME")]
    instance: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update the routers defined in FILE (idempotent).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Do not start the neighbour daemon (`router-ctl run`) in the background.
        #[arg(long)]
        no_daemon: bool,
        /// Load the programs again and swap them in (atomically), even where the attached ones
        /// are this build's.
        #[arg(long)]
        reload: bool,
    },
    /// Check FILE without changing anything.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List the applied routers with their devices and routes.
    Show { router: Option<String> },
    /// Per-device counters: forwarded, passed to the kernel (per reason), dropped.
    Stats { router: Option<String> },
    /// The neighbours the fast path knows.
    Neigh { router: Option<String> },
    /// The NAT flows the fast path translates (copied from the kernel's conntrack).
    Nat { router: Option<String> },
    /// Detach the programs, remove the pins, and remove what apply created (of each ROUTER).
    Destroy {
        #[arg(required = true)]
        routers: Vec<String>,
    },
    /// openstack-style verbs: `router create|delete|list|show`, `router add|remove subnet|route`,
    /// `router set|unset --external-gateway`.
    Router {
        #[command(subcommand)]
        cmd: RouterCmd,
    },
    /// openstack-style verbs: `floating ip create|set|unset|delete|list|show`.
    Floating {
        #[command(subcommand)]
        cmd: FloatingCmd,
    },
    /// Keep the neighbour maps in sync with the kernel (foreground; apply starts it if needed).
    Run {
        /// Keep running when no router is applied.
        #[arg(long)]
        stay: bool,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9417), at /metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Router definitions to own: applied at start and again (difference only) on SIGHUP or
        /// when the file changes; routers that leave the file are destroyed. Implies --stay.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Started by apply: gives way to a daemon started any other way.
        #[arg(long, hide = true)]
        auto: bool,
        /// With --etcd: this host's name among the agents (default: the hostname).
        #[arg(long)]
        host: Option<String>,
        /// With --etcd: the host lease's time to live, seconds (a dead host's HA roles move
        /// after at most this long).
        #[arg(long, default_value_t = 2)]
        lease_ttl: u64,
        /// With --etcd: how long a host may be down before its routers are scheduled
        /// elsewhere, seconds (Neutron's agent_down_time).
        #[arg(long, default_value_t = 20)]
        agent_down_time: u64,
    },
    /// The agents registered in etcd (`--etcd`): liveness and routers per host.
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// The fencer of an agent (started by `run --etcd`).
    #[command(hide = true)]
    Fence,
    /// Dynamic routes (from a routing daemon or a route server), beside the definition's.
    Route {
        #[command(subcommand)]
        cmd: RouteCmd,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Apply a batch of route changes to a router, as `ip -batch` reads them: one
    /// `add|replace DEST via NEXTHOP` or `del DEST` per line, `#` comments. The whole batch is
    /// checked first; the kernel, then the fast path change only the routes named.
    Batch {
        router: String,
        /// The batch file, `-` for standard input.
        file: PathBuf,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    List {
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum RouterCmd {
    /// Create a router (its namespace) with no interface yet.
    Create {
        name: String,
        /// The router's UUID (default: a new one).
        #[arg(long)]
        id: Option<String>,
        /// L3 HA: an active host and a standby (with --etcd).
        #[arg(long)]
        ha: bool,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Delete a router (as `router-ctl destroy`).
    Delete { router: String },
    /// List the routers.
    List {
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Show one router.
    Show {
        router: String,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Add an interface on a subnet, or an extra route.
    Add {
        #[command(subcommand)]
        what: AddCmd,
    },
    /// Remove an interface, or an extra route.
    Remove {
        #[command(subcommand)]
        what: RemoveCmd,
    },
    /// Set the external gateway (`--external-gateway NET`), creating or changing it.
    Set {
        router: String,
        /// The external network's name or id.
        #[arg(long = "external-gateway", value_name = "NETWORK")]
        external_gateway: String,
        /// The gateway port's id (default: the current one, or a new UUID): device qg-<id[:11]>.
        #[arg(long)]
        port_id: Option<String>,
        /// subnet=CIDR,ip-address=IP[,gateway=IP] (repeatable): the router's address on an
        /// external subnet, and that subnet's gateway (the default route).
        #[arg(long = "fixed-ip")]
        fixed_ip: Vec<String>,
        #[arg(long, conflicts_with = "disable_snat")]
        enable_snat: bool,
        #[arg(long)]
        disable_snat: bool,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Remove the external gateway (`--external-gateway`).
    Unset {
        router: String,
        #[arg(long = "external-gateway", required = true)]
        external_gateway: bool,
    },
}

#[derive(Subcommand)]
enum FloatingCmd {
    /// Floating IPs: create|set|unset|delete|list|show.
    Ip {
        #[command(subcommand)]
        cmd: FipCmd,
    },
}

#[derive(Subcommand)]
enum FipCmd {
    /// Allocate a floating IP on a router's external network, associated with an instance's
    /// fixed address when --fixed-ip-address is given.
    Create {
        #[arg(long)]
        router: String,
        #[arg(long)]
        floating_ip_address: String,
        #[arg(long)]
        fixed_ip_address: Option<String>,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Associate a floating IP with a fixed address (or move it to another).
    Set {
        floating_ip: String,
        /// The router holding it (when routers of several external networks use the address).
        #[arg(long)]
        router: Option<String>,
        #[arg(long)]
        fixed_ip_address: String,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Disassociate a floating IP (it stays allocated to its router).
    Unset {
        floating_ip: String,
        /// The router holding it (when routers of several external networks use the address).
        #[arg(long)]
        router: Option<String>,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    /// Delete a floating IP.
    Delete {
        floating_ip: String,
        #[arg(long)]
        router: Option<String>,
    },
    List {
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
    Show {
        floating_ip: String,
        /// The router holding it (when routers of several external networks use the address).
        #[arg(long)]
        router: Option<String>,
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum AddCmd {
    /// Add an interface on SUBNET (IPv4 or IPv6) with the gateway address (device
    /// qr-<port id[:11]>); with the id of a port the router has, that port gets one more subnet
    /// (dual-stack).
    Subnet {
        router: String,
        #[arg(long)]
        subnet: String,
        #[arg(long)]
        gateway: String,
        /// The Neutron port id (default: a new UUID).
        #[arg(long)]
        port_id: Option<String>,
    },
    /// Add an extra route: --route destination=CIDR,gateway=IP.
    Route {
        router: String,
        #[arg(long)]
        route: String,
    },
}

#[derive(Subcommand)]
enum RemoveCmd {
    /// Remove SUBNET from the router; its port goes when no subnet is left on it.
    Subnet {
        router: String,
        #[arg(long)]
        subnet: String,
    },
    /// Remove an extra route: --route destination=CIDR,gateway=IP.
    Route {
        router: String,
        #[arg(long)]
        route: String,
    },
}

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
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("router-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn selected(router: &Option<String>) -> Result<Vec<RouterState>> {
    match router {
        Some(k) => Ok(vec![RouterState::find(k)?]),
        None => RouterState::all(),
    }
}

/// As `selected`, for readers of a router's maps: a lost router has none (an error when it
/// was asked for by name, left out of a listing).
fn selected_live(router: &Option<String>) -> Result<Vec<RouterState>> {
    let all = selected(router)?;
    if let (Some(k), [r]) = (router, &all[..]) {
        if let Some(why) = &r.lost {
            anyhow::bail!("router {k} has no fast path: {why}");
        }
    }
    Ok(all.into_iter().filter(|r| r.lost.is_none()).collect())
}

fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
}

fn run(cli: Cli) -> Result<()> {
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
            let applied = apply::apply_with(&routers, reload);
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
            metrics,
            file,
            auto,
            host,
            lease_ttl,
            agent_down_time,
        } => {
            let agent = match &cli.etcd {
                None => None,
                Some(urls) => {
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
                        endpoints: urls.split(',').map(|u| u.trim().to_string()).collect(),
                        host,
                        ttl: std::time::Duration::from_secs(lease_ttl),
                        down_time: std::time::Duration::from_secs(agent_down_time),
                    })
                }
            };
            daemon::run(stay, file, metrics, auto, agent)?
        }
        Cmd::Fence => router_ctl::agent::fence::run_fencer()?,
        Cmd::Agent {
            cmd: AgentCmd::List { format },
        } => agent_list(
            cli.etcd.as_deref(),
            cli.json || matches!(format, Format::Json),
        )?,
        Cmd::Route {
            cmd:
                RouteCmd::Batch {
                    router,
                    file,
                    format,
                },
        } => route_batch(router, &file, cli.json || matches!(format, Format::Json))?,
        Cmd::Router { cmd } => {
            if let Some(urls) = &cli.etcd {
                router_ctl::agent::store::connect(urls)?;
            }
            router_verb(cmd, cli.json)?
        }
        Cmd::Floating {
            cmd: FloatingCmd::Ip { cmd },
        } => {
            if let Some(urls) = &cli.etcd {
                router_ctl::agent::store::connect(urls)?;
            }
            floating_verb(cmd, cli.json)?
        }
    }
    Ok(())
}

/// `route batch`: through the daemon when one runs (it keeps large tables in memory), else here.
fn route_batch(router: String, file: &std::path::Path, json: bool) -> Result<()> {
    use router_ctl::api::{self, Request};
    // Standard input is copied to a file the daemon can read.
    let stdin_copy = state::run_dir().join(format!("batch-{}", std::process::id()));
    let path = if file == std::path::Path::new("-") {
        std::fs::create_dir_all(state::run_dir())?;
        let mut f = std::fs::File::create(&stdin_copy)
            .with_context(|| format!("cannot write {}", stdin_copy.display()))?;
        std::io::copy(&mut std::io::stdin().lock(), &mut f)?;
        stdin_copy.clone()
    } else {
        std::fs::canonicalize(file).with_context(|| format!("cannot open {}", file.display()))?
    };
    let req = Request::RouteBatch {
        router,
        file: path.display().to_string(),
    };
    let out = api::dispatch(req);
    let _ = std::fs::remove_file(&stdin_copy);
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    if json {
        println!("{v}");
    } else {
        let mut t = Table::new(&["Field", "Value"]);
        for k in ["router", "set", "deleted", "prefixes"] {
            t.row(vec![
                k.to_string(),
                v[k].to_string().trim_matches('"').to_string(),
            ]);
        }
        print!("{}", t.render());
    }
    Ok(())
}

/// Through the daemon when one runs, else here; then the daemon is made sure of.
fn change_applied(req: router_ctl::api::Request) -> Result<String> {
    use router_ctl::api;
    let id = api::dispatch(req)?;
    if router_ctl::agent::store::remote().is_some() {
        return Ok(id);
    }
    let _lock = Lock::acquire(state::STATE_LOCK)?;
    daemon::ensure_running()?;
    Ok(id)
}

fn floating_verb(cmd: FipCmd, json_flag: bool) -> Result<()> {
    use router_ctl::api::Request;
    let json_of = |f: Format| json_flag || matches!(f, Format::Json);
    let show_one = |fip: &str, router: Option<&str>, f: Format| -> Result<()> {
        let (st, _) = router_ctl::verbs::find_floating_ip(fip, router)?;
        let fip = fip
            .parse::<std::net::IpAddr>()
            .map(|a| a.to_string())
            .unwrap_or(fip.to_string());
        let v = floating_ips_json(&st)
            .into_iter()
            .find(|v| v["floating_ip_address"] == fip.as_str())
            .expect("found above");
        if json_of(f) {
            print_json(v);
        } else {
            let mut t = Table::new(&["Field", "Value"]);
            for k in [
                "floating_ip_address",
                "fixed_ip_address",
                "router_id",
                "router",
                "status",
            ] {
                t.row(vec![k.into(), v[k].as_str().unwrap_or("None").to_string()]);
            }
            print!("{}", t.render());
        }
        Ok(())
    };
    match cmd {
        FipCmd::Create {
            router,
            floating_ip_address,
            fixed_ip_address,
            format,
        } => {
            let id = change_applied(Request::CreateFloatingIp {
                router,
                floating_ip_address: floating_ip_address.clone(),
                fixed_ip_address,
            })?;
            show_one(&floating_ip_address, Some(&id), format)
        }
        FipCmd::Set {
            floating_ip,
            router,
            fixed_ip_address,
            format,
        } => {
            let id = change_applied(Request::SetFloatingIp {
                floating_ip_address: floating_ip.clone(),
                router,
                fixed_ip_address: Some(fixed_ip_address),
            })?;
            show_one(&floating_ip, Some(&id), format)
        }
        FipCmd::Unset {
            floating_ip,
            router,
            format,
        } => {
            let id = change_applied(Request::SetFloatingIp {
                floating_ip_address: floating_ip.clone(),
                router,
                fixed_ip_address: None,
            })?;
            show_one(&floating_ip, Some(&id), format)
        }
        FipCmd::Delete {
            floating_ip,
            router,
        } => {
            change_applied(Request::DeleteFloatingIp {
                floating_ip_address: floating_ip.clone(),
                router,
            })?;
            if json_flag {
                print_json(json!({"floating_ip_address": floating_ip, "deleted": true}));
            } else {
                println!("floating IP {floating_ip} deleted");
            }
            Ok(())
        }
        FipCmd::Show {
            floating_ip,
            router,
            format,
        } => show_one(&floating_ip, router.as_deref(), format),
        FipCmd::List { format } => {
            let all: Vec<serde_json::Value> = router_ctl::verbs::all()?
                .iter()
                .flat_map(floating_ips_json)
                .collect();
            if json_of(format) {
                print_json(json!(all));
            } else {
                let mut t = Table::new(&[
                    "Floating IP Address",
                    "Fixed IP Address",
                    "Router",
                    "Status",
                ]);
                for v in &all {
                    t.row(vec![
                        v["floating_ip_address"].as_str().unwrap_or("").into(),
                        v["fixed_ip_address"].as_str().unwrap_or("None").into(),
                        v["router"].as_str().unwrap_or("").into(),
                        v["status"].as_str().unwrap_or("").into(),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(())
        }
    }
}

/// The verbs serialise with apply and destroy through the state lock; each one ends by making
/// sure the neighbour daemon runs.
fn router_verb(cmd: RouterCmd, json_flag: bool) -> Result<()> {
    use router_ctl::verbs;
    let json_of = |f: Format| json_flag || matches!(f, Format::Json);
    use router_ctl::api::{self, Request};
    let remote = router_ctl::agent::store::remote();
    let change = api::dispatch;
    let after = |id: String, f: Format| -> Result<()> {
        if let Some(s) = remote {
            return remote_router_table(s, &id, json_of(f));
        }
        {
            let _lock = Lock::acquire(state::STATE_LOCK)?;
            daemon::ensure_running()?;
        }
        router_table(&RouterState::find(&id)?, json_of(f))
    };
    match cmd {
        RouterCmd::Create {
            name,
            id,
            ha,
            format,
        } => {
            if ha && remote.is_none() {
                anyhow::bail!("router create --ha: HA routers are scheduled by the etcd agents; give --etcd URLS");
            }
            let id = if ha {
                verbs::create_ha(&name, id, true)?.id
            } else {
                change(Request::Create { name, id })?
            };
            after(id, format)
        }
        RouterCmd::List { format } if remote.is_some() => {
            remote_router_list(remote.expect("remote"), json_of(format))
        }
        RouterCmd::Show { router, format } if remote.is_some() => {
            remote_router_table(remote.expect("remote"), &router, json_of(format))
        }
        RouterCmd::Delete { router } => {
            let id = change(Request::Delete {
                router: router.clone(),
            })?;
            println!("router {router} ({id}) deleted");
            Ok(())
        }
        RouterCmd::List { format } => {
            let all = RouterState::all()?;
            if json_of(format) {
                print_json(json!(all.iter().map(|r| json!({"id": r.id, "name": r.name, "status": health(r).0, "interfaces": r.interfaces.len(), "routes": r.routes.len()})).collect::<Vec<_>>()));
            } else {
                let mut t = Table::new(&["ID", "Name", "Status", "Interfaces", "Routes"]);
                for r in &all {
                    t.row(vec![
                        r.id.clone(),
                        r.name.clone(),
                        health(r).0.into(),
                        r.interfaces.len().to_string(),
                        r.routes.len().to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
            Ok(())
        }
        RouterCmd::Show { router, format } => {
            router_table(&RouterState::find(&router)?, json_of(format))
        }
        RouterCmd::Add {
            what:
                AddCmd::Subnet {
                    router,
                    subnet,
                    gateway,
                    port_id,
                },
        } => after(
            change(Request::AddSubnet {
                router,
                subnet,
                gateway,
                port_id,
            })?,
            Format::Table,
        ),
        RouterCmd::Add {
            what: AddCmd::Route { router, route },
        } => {
            verbs::parse_route(&route)?;
            after(change(Request::AddRoute { router, route })?, Format::Table)
        }
        RouterCmd::Remove {
            what: RemoveCmd::Subnet { router, subnet },
        } => after(
            change(Request::RemoveSubnet { router, subnet })?,
            Format::Table,
        ),
        RouterCmd::Set {
            router,
            external_gateway,
            port_id,
            fixed_ip,
            enable_snat,
            disable_snat,
            format,
        } => {
            for f in &fixed_ip {
                verbs::parse_fixed_ip(f)?;
            }
            let snat = match (enable_snat, disable_snat) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            after(
                change(Request::SetGateway {
                    router,
                    network: external_gateway,
                    port_id,
                    fixed_ips: fixed_ip,
                    enable_snat: snat,
                })?,
                format,
            )
        }
        RouterCmd::Unset { router, .. } => {
            after(change(Request::UnsetGateway { router })?, Format::Table)
        }
        RouterCmd::Remove {
            what: RemoveCmd::Route { router, route },
        } => {
            verbs::parse_route(&route)?;
            after(
                change(Request::RemoveRoute { router, route })?,
                Format::Table,
            )
        }
    }
}

fn gateway_json(r: &RouterState) -> serde_json::Value {
    match &r.gateway {
        None => serde_json::Value::Null,
        Some(g) => {
            let qg = r.interfaces.iter().find(|i| i.external);
            json!({
                "network_id": g.network_id, "port_id": g.port_id, "device": g.device,
                "enable_snat": g.enable_snat, "upstreams": g.upstreams,
                "external_fixed_ips": qg.map(|i| i.fixed_ips.iter().map(|f| json!({"subnet": f.subnet, "ip_address": f.gateway_ip})).collect::<Vec<_>>()),
            })
        }
    }
}

fn floating_ips_json(r: &RouterState) -> Vec<serde_json::Value> {
    r.gateway
        .iter()
        .flat_map(|g| g.floating_ips.iter())
        .map(|f| json!({
            "floating_ip_address": f.floating_ip_address, "fixed_ip_address": f.fixed_ip_address,
            "router_id": r.id, "router": r.name,
            "status": if f.fixed_ip_address.is_some() { "ACTIVE" } else { "DOWN" },
        }))
        .collect()
}

/// `openstack router show` style: a Field | Value table.
fn router_table(r: &RouterState, json_out: bool) -> Result<()> {
    let interfaces: Vec<String> = r
        .interfaces
        .iter()
        .flat_map(|i| {
            i.fixed_ips
                .iter()
                .map(|f| format!("{} {} {} {}", i.port_id, i.device, f.subnet, f.gateway_ip))
        })
        .collect();
    let routes: Vec<String> = r
        .routes
        .iter()
        .map(|x| format!("destination='{}', gateway='{}'", x.destination, x.nexthop))
        .collect();
    if json_out {
        print_json(json!({
            "id": r.id, "name": r.name, "status": health(r).0, "problems": health(r).1, "namespace": r.namespace,
            "interfaces_info": r.interfaces.iter().flat_map(|i| i.fixed_ips.iter().map(|f| json!({"port_id": i.port_id, "device": i.device, "subnet": f.subnet, "ip_address": f.gateway_ip}))).collect::<Vec<_>>(),
            "routes": r.routes.iter().filter(|x| !x.gateway).map(|x| json!({"destination": x.destination, "nexthop": x.nexthop})).collect::<Vec<_>>(),
            "external_gateway_info": gateway_json(r),
            "floating_ips": floating_ips_json(r),
        }));
        return Ok(());
    }
    let mut t = Table::new(&["Field", "Value"]);
    t.row(vec!["id".into(), r.id.clone()]);
    t.row(vec!["name".into(), r.name.clone()]);
    let (status, problems) = health(r);
    t.row(vec!["status".into(), status.into()]);
    if !problems.is_empty() {
        t.row(vec!["problems".into(), problems.join("; ")]);
    }
    t.row(vec!["namespace".into(), r.namespace.clone()]);
    t.row(vec!["interfaces_info".into(), interfaces.join("; ")]);
    t.row(vec!["routes".into(), routes.join("; ")]);
    if let Some(g) = &r.gateway {
        let ips: Vec<String> = r
            .interfaces
            .iter()
            .filter(|i| i.external)
            .flat_map(|i| {
                i.fixed_ips
                    .iter()
                    .map(|f| format!("subnet='{}', ip_address='{}'", f.subnet, f.gateway_ip))
            })
            .collect();
        t.row(vec![
            "external_gateway_info".into(),
            format!(
                "network_id='{}', port_id='{}', enable_snat='{}', external_fixed_ips=[{}]",
                g.network_id.as_deref().unwrap_or(""),
                g.port_id,
                g.enable_snat,
                ips.join("; ")
            ),
        ]);
        let f: Vec<String> = g
            .floating_ips
            .iter()
            .map(|f| {
                format!(
                    "{} → {}",
                    f.floating_ip_address,
                    f.fixed_ip_address.as_deref().unwrap_or("-")
                )
            })
            .collect();
        t.row(vec!["floating_ips".into(), f.join("; ")]);
    }
    print!("{}", t.render());
    Ok(())
}

/// ACTIVE, DEGRADED or LOST (see `live::health`), and why.
fn health(r: &RouterState) -> (&'static str, Vec<String>) {
    let (h, why) = live::health(r);
    (h.as_str(), why)
}

fn show(routers: &[RouterState], json_out: bool) -> Result<()> {
    let views: Vec<live::Router> = routers.iter().map(live::router).collect::<Result<_>>()?;
    if json_out {
        let v: Vec<_> = views
            .iter()
            .map(|v| {
                let r = &v.state;
                json!({
                    "id": r.id, "name": r.name, "namespace": r.namespace,
                    "status": v.health.as_str(), "problems": v.problems,
                    "interfaces": v.devices.iter().map(|d| {
                        let i = &d.iface;
                        json!({
                            "port_id": i.port_id, "device": i.device, "ifindex": i.ifindex, "mac": i.mac,
                            "mtu": i.mtu, "kind": i.kind,
                            "hook": d.hook, "hook_wanted": i.hook, "hook_reason": i.hook_reason,
                            "prog_id": d.prog_id,
                            "redirect": {"tc": d.redirect_tc, "xdp": d.redirect_xdp},
                            "fixed_ips": i.fixed_ips.iter().map(|f| json!({"subnet": f.subnet, "ip_address": f.gateway_ip})).collect::<Vec<_>>(),
                            "created": i.created_device, "peer": i.peer,
                        })
                    }).collect::<Vec<_>>(),
                    "routes": r.routes.iter().map(|rt| json!({
                        "destination": rt.destination, "nexthop": rt.nexthop, "device": rt.device,
                        "external_gateway": rt.gateway,
                    })).collect::<Vec<_>>(),
                    "external_gateway": gateway_json(r),
                    "floating_ips": floating_ips_json(r),
                })
            })
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    if routers.is_empty() {
        println!("no routers applied");
    }
    for v in &views {
        let r = &v.state;
        println!(
            "router {} ({})  namespace {}  {}",
            r.id,
            r.name,
            r.namespace,
            v.health.as_str()
        );
        for p in &v.problems {
            println!("  problem: {p}");
        }
        let mut t = Table::new(&[
            "DEVICE", "IFINDEX", "MAC", "MTU", "ADDRESS", "SUBNET", "HOOK", "REDIRECT", "PEER",
        ]);
        for d in &v.devices {
            let i = &d.iface;
            let all = |f: fn(&state::AddrState) -> String| {
                i.fixed_ips.iter().map(f).collect::<Vec<_>>().join(",")
            };
            t.row(vec![
                i.device.clone(),
                i.ifindex.to_string(),
                i.mac.clone(),
                i.mtu.to_string(),
                all(|f| f.cidr()),
                all(|f| f.subnet.clone()),
                d.hook.into(),
                match (d.redirect_tc, d.redirect_xdp) {
                    (true, true) => "tc,xdp",
                    (true, false) => "tc",
                    (false, true) => "xdp",
                    (false, false) => "none",
                }
                .into(),
                i.peer.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        print!("{}", t.render());
        for i in &r.interfaces {
            println!("  {}: {}", i.device, i.hook_reason);
        }
        if let Some(g) = &r.gateway {
            println!(
                "  external gateway: port {} ({}) network {} snat {}  upstream {}",
                g.port_id,
                g.device,
                g.network_id.as_deref().unwrap_or("-"),
                if g.enable_snat { "on" } else { "off" },
                if g.upstreams.is_empty() {
                    "-".to_string()
                } else {
                    g.upstreams.join(",")
                }
            );
            for f in &g.floating_ips {
                println!(
                    "  floating IP {} → {}",
                    f.floating_ip_address,
                    f.fixed_ip_address.as_deref().unwrap_or("(not associated)")
                );
            }
        }
        if !r.routes.is_empty() {
            let mut t = Table::new(&["DESTINATION", "NEXTHOP", "DEVICE"]);
            for rt in &r.routes {
                t.row(vec![
                    rt.destination.clone(),
                    rt.nexthop.clone(),
                    rt.device.clone(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}

fn nat_flows(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for f in live::nat_flows(r)? {
            rows.push((r, f));
        }
    }
    if json_out {
        print_json(json!(rows
            .iter()
            .map(|(r, f)| json!({"router": r.name, "router_id": r.id, "proto": f.proto, "from": f.from, "to": f.to, "translated": f.translated, "idle_s": f.idle_s}))
            .collect::<Vec<_>>()));
        return Ok(());
    }
    let mut t = Table::new(&["ROUTER", "PROTO", "FROM", "TO", "TRANSLATED", "IDLE"]);
    for (r, f) in &rows {
        t.row(vec![
            r.name.clone(),
            f.proto.into(),
            f.from.clone(),
            f.to.clone(),
            f.translated.into(),
            f.idle_s
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn stats(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for c in live::counters(r)? {
            rows.push((r, c));
        }
    }
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, c)| {
                let s = &c.stats;
                let reasons: serde_json::Map<String, serde_json::Value> =
                    c.reasons().map(|(n, p)| (n.to_string(), json!(p))).collect();
                let (p4, b4) = c.ipv4();
                json!({
                    "router": r.name, "router_id": r.id, "device": c.device, "ifindex": c.ifindex,
                    "forwarded": {
                        "packets": s.fwd_packets, "bytes": s.fwd_bytes,
                        "ipv4": {"packets": p4, "bytes": b4},
                        "ipv6": {"packets": s.fwd6_packets, "bytes": s.fwd6_bytes},
                    },
                    "passed": {"packets": s.pass_packets(), "bytes": s.pass_bytes, "reasons": reasons},
                    "dropped": {"packets": s.drop_packets},
                    "nat": {"source_translated": s.nat_src_packets, "destination_translated": s.nat_dst_packets},
                })
            })
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    let mut t = Table::new(&[
        "ROUTER",
        "DEVICE",
        "FWD_PKTS",
        "FWD4_PKTS",
        "FWD6_PKTS",
        "FWD_BYTES",
        "PASS_PKTS",
        "PASS_BYTES",
        "DROPPED",
        "SNAT_PKTS",
        "DNAT_PKTS",
        "PASS_REASONS",
    ]);
    for (r, c) in &rows {
        let s = &c.stats;
        let reasons: Vec<String> = c
            .reasons()
            .filter(|(_, n)| *n > 0)
            .map(|(n, p)| format!("{n}={p}"))
            .collect();
        t.row(vec![
            r.name.clone(),
            c.device.clone(),
            s.fwd_packets.to_string(),
            c.ipv4().0.to_string(),
            s.fwd6_packets.to_string(),
            s.fwd_bytes.to_string(),
            s.pass_packets().to_string(),
            s.pass_bytes.to_string(),
            s.drop_packets.to_string(),
            s.nat_src_packets.to_string(),
            s.nat_dst_packets.to_string(),
            if reasons.is_empty() {
                "-".into()
            } else {
                reasons.join(",")
            },
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn neigh(routers: &[RouterState], json_out: bool) -> Result<()> {
    let mut rows = Vec::new();
    for r in routers {
        for (dev, addr, mac) in live::neighbours(r)? {
            rows.push((r.name.clone(), r.id.clone(), dev, addr, fmt_mac(&mac)));
        }
    }
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, id, d, a, m)| json!({"router": n, "router_id": id, "device": d, "dst": a.to_string(), "lladdr": m}))
            .collect();
        print_json(json!(v));
        return Ok(());
    }
    let mut t = Table::new(&["ROUTER", "DEVICE", "ADDRESS", "LLADDR"]);
    for (n, _, d, a, m) in rows {
        t.row(vec![n, d, a.to_string(), m]);
    }
    print!("{}", t.render());
    Ok(())
}

/// Per host of a router in etcd: (host, alive, role, generation applied, error).
fn placements(
    o: &router_ctl::agent::store::Overview,
    id: &str,
) -> Vec<(String, bool, String, i64, Option<String>)> {
    let hosts = o
        .schedule
        .get(id)
        .map(|s| s.hosts.clone())
        .unwrap_or_default();
    hosts
        .into_iter()
        .map(|h| {
            let st = o.status.get(&(id.to_string(), h.clone()));
            let alive = o.agents.contains_key(&h);
            let role = match st {
                Some(s) => s.role.to_string(),
                None if alive => "pending".into(),
                None => "down".into(),
            };
            (
                h,
                alive,
                role,
                st.map(|s| s.generation).unwrap_or(0),
                st.and_then(|s| s.error.clone()),
            )
        })
        .collect()
}

/// A router's overall status from etcd: ACTIVE when every host applied the current
/// definition (and an HA router has an active host), BUILD while one has not yet, ERROR when a
/// host could not, DOWN when none runs it.
fn remote_status(
    o: &router_ctl::agent::store::Overview,
    id: &str,
    rev: i64,
    ha: bool,
) -> &'static str {
    let p = placements(o, id);
    if p.iter().any(|x| x.2 == "error") {
        "ERROR"
    } else if p.iter().all(|x| !x.1) {
        "DOWN"
    } else if p.iter().filter(|x| x.1).any(|x| x.3 != rev) || (ha && !o.active.contains_key(id)) {
        "BUILD"
    } else {
        "ACTIVE"
    }
}

fn remote_router_list(s: &router_ctl::agent::store::Store, json_out: bool) -> Result<()> {
    let o = s.overview()?;
    if json_out {
        let mut v: Vec<serde_json::Value> = o.routers.iter().map(|(r, rev)| json!({
            "id": r.id, "name": r.name, "ha": r.ha, "generation": rev,
            "status": remote_status(&o, &r.id, *rev, r.ha),
            "hosts": placements(&o, &r.id).iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
        })).collect();
        v.extend(o.invalid.iter().map(|(id, rev, why)| json!({
            "id": id, "generation": rev, "status": "ERROR", "error": format!("the definition does not validate: {why}"),
            "hosts": placements(&o, id).iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
        })));
        print_json(json!(v));
        return Ok(());
    }
    for (id, rev, why) in &o.invalid {
        eprintln!("router {id}: the definition at revision {rev} does not validate ({why}); its hosts keep the last good one; write a valid one (e.g. with etcdctl) to fix it");
    }
    let mut t = Table::new(&["ID", "Name", "Status", "HA", "Hosts"]);
    for (r, rev) in &o.routers {
        let hosts: Vec<String> = placements(&o, &r.id)
            .iter()
            .map(|(h, _, role, _, _)| format!("{h} ({role})"))
            .collect();
        t.row(vec![
            r.id.clone(),
            r.name.clone(),
            remote_status(&o, &r.id, *rev, r.ha).into(),
            if r.ha { "True" } else { "False" }.into(),
            hosts.join(", "),
        ]);
    }
    for (id, _, _) in &o.invalid {
        let hosts: Vec<String> = placements(&o, id)
            .iter()
            .map(|(h, _, role, _, _)| format!("{h} ({role})"))
            .collect();
        t.row(vec![
            id.clone(),
            "?".into(),
            "ERROR".into(),
            "?".into(),
            hosts.join(", "),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

fn remote_router_table(
    s: &router_ctl::agent::store::Store,
    key: &str,
    json_out: bool,
) -> Result<()> {
    let st = s.find(key)?;
    let o = s.overview()?;
    let rev = o
        .routers
        .iter()
        .find(|(r, _)| r.id == st.id)
        .map(|x| x.1)
        .unwrap_or(0);
    let p = placements(&o, &st.id);
    if json_out {
        print_json(json!({
            "id": st.id, "name": st.name, "ha": st.ha, "generation": rev,
            "status": remote_status(&o, &st.id, rev, st.ha),
            "active_host": o.active.get(&st.id),
            "hosts": p.iter().map(|(h, alive, role, g, e)| json!({"host": h, "alive": alive, "role": role, "generation": g, "error": e})).collect::<Vec<_>>(),
            "interfaces_info": st.interfaces.iter().flat_map(|i| i.fixed_ips.iter().map(|f| json!({"port_id": i.port_id, "device": i.device, "subnet": f.subnet, "ip_address": f.gateway_ip}))).collect::<Vec<_>>(),
            "routes": st.routes.iter().map(|x| json!({"destination": x.destination, "nexthop": x.nexthop})).collect::<Vec<_>>(),
            "external_gateway_info": gateway_json(&st),
            "floating_ips": floating_ips_json(&st),
        }));
        return Ok(());
    }
    let mut t = Table::new(&["Field", "Value"]);
    t.row(vec!["id".into(), st.id.clone()]);
    t.row(vec!["name".into(), st.name.clone()]);
    t.row(vec![
        "status".into(),
        remote_status(&o, &st.id, rev, st.ha).into(),
    ]);
    t.row(vec![
        "ha".into(),
        if st.ha { "True" } else { "False" }.into(),
    ]);
    t.row(vec!["generation".into(), rev.to_string()]);
    let hosts: Vec<String> = p
        .iter()
        .map(|(h, alive, role, g, e)| {
            format!(
                "{h}: {role}{}, generation {g}{}",
                if *alive { "" } else { " (agent down)" },
                e.as_ref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    t.row(vec!["hosts".into(), hosts.join("; ")]);
    let interfaces: Vec<String> = st
        .interfaces
        .iter()
        .flat_map(|i| {
            i.fixed_ips
                .iter()
                .map(|f| format!("{} {} {} {}", i.port_id, i.device, f.subnet, f.gateway_ip))
        })
        .collect();
    t.row(vec!["interfaces_info".into(), interfaces.join("; ")]);
    let routes: Vec<String> = st
        .routes
        .iter()
        .map(|x| format!("destination='{}', gateway='{}'", x.destination, x.nexthop))
        .collect();
    t.row(vec!["routes".into(), routes.join("; ")]);
    print!("{}", t.render());
    Ok(())
}

/// `agent list`: like `openstack network agent list` (host, alive, routers).
fn agent_list(etcd: Option<&str>, json_out: bool) -> Result<()> {
    let urls = etcd.context("agent list reads etcd: give --etcd URLS (or set ROUTER_XDP_ETCD)")?;
    router_ctl::agent::store::connect(urls)?;
    let s = router_ctl::agent::store::remote().expect("connected");
    let o = s.overview()?;
    let mut hosts = o.hosts.clone();
    hosts.extend(o.agents.keys().cloned());
    let rows: Vec<(String, bool, usize, usize, Option<u32>)> = hosts
        .iter()
        .map(|h| {
            let n = o.schedule.values().filter(|s| s.hosts.contains(h)).count();
            let active = o.active.values().filter(|a| *a == h).count();
            (
                h.clone(),
                o.agents.contains_key(h),
                n,
                active,
                o.agents.get(h).map(|a| a.pid),
            )
        })
        .collect();
    if json_out {
        print_json(json!(rows.iter().map(|(h, alive, n, a, pid)| json!({"host": h, "agent_type": "L3 agent", "alive": alive, "routers": n, "ha_active": a, "pid": pid})).collect::<Vec<_>>()));
        return Ok(());
    }
    let mut t = Table::new(&[
        "Agent Type",
        "Host",
        "Alive",
        "State",
        "Routers",
        "HA Active",
    ]);
    for (h, alive, n, a, _) in &rows {
        t.row(vec![
            "L3 agent".into(),
            h.clone(),
            if *alive { ":-)" } else { "XXX" }.into(),
            "UP".into(),
            n.to_string(),
            a.to_string(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
