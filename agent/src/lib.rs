//! Serviceless node agent: loads the XDP/TC dataplane, keeps its BPF maps in
//! step with desired state (a local file or Kubernetes Pod watches), and
//! reports through `inspect`, metrics and health endpoints.

pub mod activator;
pub mod allocator;
pub mod app_address;
pub mod cli;
pub mod conntrack;
pub mod dataplane;
pub mod directory;
pub mod dns;
pub mod fabric;
pub mod files;
pub mod health;
pub mod http;
pub mod inspect;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod nodes;
pub mod peers;
pub mod reconcile;
pub mod run;
pub mod scale;
pub mod socket_lb;
pub mod source;
pub mod upgrade;
pub mod vip_pool;
pub mod wake;
