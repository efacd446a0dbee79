//! The command line's own code (the binary's, not the library's): the arguments (here), and
//! what each command prints: `show` (the local routers' live views), `remote` (the views of
//! etcd), `verbs` (the openstack-style verbs and `route batch`), `json` (the JSON shapes they
//! share). `main.rs` parses and dispatches.

pub mod json;
pub mod remote;
pub mod show;
pub mod verbs;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Neutron-style virtual routers with an XDP fast path.
#[derive(Parser)]
#[command(name = "router-ctl", version)]
pub struct Cli {
    /// Print JSON instead of tables (like `ip -j`).
    #[arg(short = 'j', long = "json", global = true)]
    pub json: bool,
    /// More logging (repeat for more); RUST_LOG overrides it.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// etcd endpoints (URL[,URL…]): the verbs write the desired state there, `router list/show`
    /// and `agent list` read it, `run` becomes an agent.
    #[arg(long, global = true, env = "ROUTER_XDP_ETCD", value_name = "URLS")]
    pub etcd: Option<String>,
    /// With --etcd: the CA certificate (PEM) of etcd's server certificates; TLS, verified
    /// (https:// endpoints).
    #[arg(
        long,
        global = true,
        env = "ROUTER_XDP_ETCD_CACERT",
        value_name = "FILE"
    )]
    pub etcd_cacert: Option<PathBuf>,
    /// With --etcd: this host's client certificate (PEM), for an etcd that asks for one.
    #[arg(long, global = true, env = "ROUTER_XDP_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// With --etcd: the client certificate's key (PEM).
    #[arg(long, global = true, env = "ROUTER_XDP_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// With --etcd: the etcd user (etcd's authentication); its password comes from
    /// --etcd-password-file or ROUTER_XDP_ETCD_PASSWORD, never from the command line.
    #[arg(long, global = true, env = "ROUTER_XDP_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// With --etcd-user: a file holding the user's password (one line).
    #[arg(
        long,
        global = true,
        env = "ROUTER_XDP_ETCD_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
    /// An agent's own state and pin directories, API socket and namespace prefix
    /// (`qrouter-NAME-<id>`), for several agents on one machine.
    #[arg(long, global = true, value_name = "NAME")]
    pub instance: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

impl Cli {
    /// How to reach etcd, when --etcd is given.
    pub fn etcd_access(&self) -> anyhow::Result<Option<router_ctl::agent::access::Access>> {
        let Some(urls) = &self.etcd else {
            if self.etcd_cacert.is_some() || self.etcd_cert.is_some() || self.etcd_user.is_some() {
                anyhow::bail!("--etcd-cacert, --etcd-cert and --etcd-user need --etcd URLS");
            }
            return Ok(None);
        };
        router_ctl::agent::access::Access::new(
            urls,
            self.etcd_cacert.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
            self.etcd_user.clone(),
            self.etcd_password_file.clone(),
        )
        .map(Some)
    }
}

#[derive(Subcommand)]
pub enum Cmd {
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
        /// Members of GROUP (a name or a gid) may change routers through this daemon's socket,
        /// as root may (the socket and its directory become the group's to reach).
        #[arg(long, value_name = "GROUP")]
        api_group: Option<String>,
        /// Serve Prometheus metrics at /metrics: on PORT of 127.0.0.1, or on ADDRESS:PORT
        /// (e.g. 10.0.0.11:9417 for a scraper elsewhere).
        #[arg(long, value_name = "[ADDRESS:]PORT")]
        metrics: Option<String>,
        /// Router definitions to own: applied at start and again (difference only) on SIGHUP or
        /// when the file changes; routers that leave the file are destroyed. Implies --stay.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Started by apply: gives way to a daemon started any other way.
        #[arg(long, hide = true)]
        auto: bool,
        /// Follow the routers other control planes build (Neutron's L3 agent): every
        /// namespace matching a PATTERN (`*` for any characters; default qrouter-*) is a router
        /// read from the kernel, with nothing written into it but the programs. Implies --stay.
        #[arg(long, value_name = "PATTERN", num_args = 0.., default_missing_value = "qrouter-*")]
        follow: Option<Vec<String>>,
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
        /// With --etcd: routers this host applies at most; those beyond get an error status.
        #[arg(long, default_value_t = 2000)]
        max_routers: usize,
        /// With --etcd: the routes of room (each router's max_routes, 4096 without it) this
        /// host gives its routers in all, about 120 bytes of maps each; routers beyond get an
        /// error status.
        #[arg(long, default_value_t = 16 << 20)]
        max_routes: u64,
        /// With --etcd: receive HA routers' connection state at ADDRESS:PORT (this host's
        /// management address), and send it, while active, to the other hosts' (see
        /// `--sync-key`). Without it, a failover loses the connections through the router.
        #[arg(long, value_name = "ADDRESS:PORT", requires = "sync_key")]
        sync_listen: Option<std::net::SocketAddr>,
        /// With --sync-listen: the key every host shares (32 bytes or more, mode 0600) that
        /// authenticates the connection-state streams.
        #[arg(long, value_name = "FILE", requires = "sync_listen")]
        sync_key: Option<PathBuf>,
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
pub enum RouteCmd {
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
pub enum AgentCmd {
    List {
        #[arg(short = 'f', long = "format", default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
pub enum RouterCmd {
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
pub enum FloatingCmd {
    /// Floating IPs: create|set|unset|delete|list|show.
    Ip {
        #[command(subcommand)]
        cmd: FipCmd,
    },
}

#[derive(Subcommand)]
pub enum FipCmd {
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
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum AddCmd {
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
        /// IPv6: how the router advertises the subnet (slaac, dhcpv6-stateful,
        /// dhcpv6-stateless), as Neutron's subnet option.
        #[arg(long, value_name = "MODE")]
        ipv6_ra_mode: Option<String>,
        /// IPv6: how instances get addresses (Neutron's subnet option; equal to
        /// --ipv6-ra-mode when both are given).
        #[arg(long, value_name = "MODE")]
        ipv6_address_mode: Option<String>,
    },
    /// Add an extra route: --route destination=CIDR,gateway=IP.
    Route {
        router: String,
        #[arg(long)]
        route: String,
    },
}

#[derive(Subcommand)]
pub enum RemoveCmd {
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
