//! router-ctl: the controller of the XDP router. It turns router definitions into namespaces,
//! devices, addresses, attached XDP programs and filled BPF maps, and keeps the neighbour maps in
//! sync with the kernel.
pub mod agent;
pub mod api;
pub mod apply;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod fib;
pub mod guard;
pub mod kernel;
pub mod live;
pub mod metrics;
pub mod nat;
pub mod ra;
pub mod routes;
pub mod state;
pub mod table;
pub mod verbs;
