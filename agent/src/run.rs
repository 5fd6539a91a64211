//! `serviceless run`: load, attach, adopt, then reconcile until stopped.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::RingBuf;
use serviceless_common::{
    CONFIG_F_ACTIVATOR4, CONFIG_F_ACTIVATOR6, CONFIG_F_UPGRADING, CONFIG_F_VIP4, CONFIG_F_VIP6, Config, map_names,
};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{info, warn};

use crate::{
    activator::{self, Activator, ActivatorOptions, HeldCounts},
    cli::{RunArgs, SocketLb, SourceSpec},
    conntrack::{self, HashKeySource},
    dataplane::{self, Pins, Sizes},
    socket_lb,
    directory::Directory,
    fabric,
    health::Health,
    http,
    maps::DataplaneMaps,
    metrics::Metrics,
    model::{AppSpec, VipRanges, to_addr},
    peers::Peers,
    reconcile::Reconciler,
    scale::Scaler,
    source::{
        Store, file,
        kubernetes::{self, KubeOptions},
    },
    upgrade,
    wake::{self, WakeOptions, Waker},
};

/// How long a failed app waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let ranges = VipRanges::from_list(&args.vip_ranges).map_err(anyhow::Error::msg).context("--vip-range")?;
    let node_fabric = fabric::configure(&args)?;
    let node_ip = (node_fabric.config.node4 != [0; 4]).then(|| IpAddr::from(node_fabric.config.node4));
    // The agent's own activator, unless an external one is named.
    let own_activator = match (args.activator, node_ip) {
        (Some(_), _) => None,
        (None, Some(ip)) => Some(SocketAddr::new(ip, args.activator_port)),
        (None, None) => {
            warn!("no node address (--node-address, or an IPv4 address on --iface): this agent runs no activator");
            None
        }
    };
    let mut config = kernel_config(&args, &ranges, args.activator.or(own_activator))?;
    let pins = Pins::new(&args.pin_dir);
    let metrics = Metrics::new();
    let health = Health::default();

    let sizes = Sizes {
        services: args.max_services,
        apps: args.max_apps,
        backends: args.max_backends,
        connections: args.max_connections,
        new_connections: args.max_new_connections,
        nodes: args.max_nodes,
        remote_flows: args.max_remote_flows,
        socket_translations: args.max_socket_translations,
    };
    if node_fabric.config.flags & serviceless_common::FABRIC_F_ENCAP != 0 && args.flow_hash_key_file.is_none() {
        warn!("no --flow-hash-key-file: this node's key differs from other nodes', so a connection whose packets reach several nodes can break; give every node the same key");
    }
    let mut loaded = dataplane::load(&pins, sizes)?;
    match aya_log::EbpfLogger::init(&mut loaded.ebpf) {
        Ok(logger) => drop(tokio::spawn(forward_ebpf_logs(logger))),
        Err(e) => warn!(error = %e, "eBPF log forwarding unavailable"),
    }
    // Everything the new programs read is in place before they go live:
    // the config, and what an upgrade carries over from the previous layout.
    // The flow hash key must not change across restarts (nor, given a key
    // file, differ between nodes): new connections would pick other pods.
    let pinned_key = loaded.maps.config().map(|c| c.hash_key).filter(|k| *k != [0, 0]);
    let key_source = match &args.flow_hash_key_file {
        Some(path) => HashKeySource::File(path.clone()),
        None => HashKeySource::NodeLocal,
    };
    config.hash_key = conntrack::hash_key(&key_source, pinned_key)?;
    let upgrading = upgrade::pending(&pins);
    if upgrading {
        config.flags |= CONFIG_F_UPGRADING;
    }
    loaded.maps.set_config(&config).context("writing the dataplane config map")?;
    loaded.maps.set_fabric(&node_fabric.config).context("writing the fabric map")?;
    let previous = upgrade::migrate(&pins, &mut loaded.maps)?;
    dataplane::attach(&mut loaded, &pins, &args.iface, args.xdp_mode)?;
    attach_socket_hooks(&args, &mut loaded, &pins)?;
    if let Some(previous) = previous {
        upgrade::finish(&pins, &mut loaded.maps, previous)?;
    }
    dataplane::unpin_retired(&pins);
    if upgrading {
        // Every connection is carried over: segments without state get RSTs again.
        config.flags &= !CONFIG_F_UPGRADING;
        loaded.maps.set_config(&config).context("writing the dataplane config map")?;
    }
    health.set_attached();
    metrics.register_dataplane(pins.dir.clone());

    let wake_ring = loaded.ebpf.take_map(map_names::WAKES).context("the wake ring buffer is missing from the eBPF object")?;
    let wake_ring = RingBuf::try_from(wake_ring).context("the wake ring buffer")?;
    // A second handle on the maps, for reading (the reconciler writes).
    let reader = Arc::new(DataplaneMaps::open_pinned(&pins.dir).context("opening the pinned maps for reading")?);
    let dataplane::Loaded { ebpf, maps } = loaded;
    let reconciler = Reconciler::adopt(maps, metrics.clone(), node_fabric.own);
    let (nodes_tx, nodes_rx) = tokio::sync::watch::channel(reconciler.remote_nodes());
    tokio::spawn(fabric::keep_neighbours_resolved(nodes_rx));
    info!(apps = reconciler.app_count(), "adopted map state; reconciling against the source");
    let _gc = conntrack::spawn_gc(ebpf, args.ct_gc_interval, metrics.clone())?;

    let store = Store::default();
    let directory = Directory::default();
    let (source, kube_client) = match args.source.clone() {
        SourceSpec::File(path) => {
            let record = file::VipRecord::open(args.state_file.with_extension("vips.json"));
            (tokio::spawn(file::watch(path, ranges, record, store.clone(), health.clone(), metrics.clone())), None)
        }
        SourceSpec::Kubernetes => {
            let user_agent = format!("serviceless-agent/{} (node {})", env!("CARGO_PKG_VERSION"), args.node_name);
            let client = kubernetes::client(args.api_qps, &user_agent).await?;
            let opts = KubeOptions { ranges, instance: args.node_name.clone() };
            let watch = tokio::spawn(kubernetes::watch(client.clone(), opts, store.clone(), health.clone(), metrics.clone()));
            (watch, Some(client))
        }
    };

    // Scale to zero: wake on the first packet, hold, hand over; sleep when idle.
    let scaler = Scaler::new(kube_client.clone(), args.scale_exec_timeout);
    let wake_options = WakeOptions {
        node_per_minute: args.wakes_per_minute,
        namespace_per_minute: args.namespace_wakes_per_minute,
        retry_for: args.wake_retry_for,
        journal: Some(args.state_file.with_extension("wakes.json")),
        resume_window: args.scale_exec_timeout.max(Duration::from_secs(10)),
    };
    let waker = Waker::spawn(directory.clone(), scaler.clone(), wake_options, metrics.clone());
    tokio::spawn(wake::read_signals(wake_ring, directory.clone(), waker.clone(), metrics.clone()));
    tokio::spawn(wake::resume_held(reader.clone(), directory.clone(), waker.clone()));
    let held = HeldCounts::default();
    let activator = match own_activator {
        Some(listen) => {
            let opts = ActivatorOptions {
                listen,
                hold_timeout: args.hold_timeout,
                max_held_per_app: args.max_held_per_app,
                max_held: args.max_held,
                retry_after: 5,
            };
            tokio::spawn(activator::serve(Activator {
                opts,
                maps: reader.clone(),
                directory: directory.clone(),
                waker: waker.clone(),
                held: held.clone(),
                metrics: metrics.clone(),
            }))
        }
        None => tokio::spawn(std::future::pending()),
    };
    tokio::spawn(wake::publish_status(wake::status_path(&args.state_file), directory.clone(), waker.clone(), held.clone()));
    let peers = match (&kube_client, args.peers.is_empty()) {
        (Some(client), true) => {
            let peers = Peers::discovered(node_ip);
            tokio::spawn(crate::peers::discover(
                client.clone(),
                args.namespace.clone(),
                args.peer_selector.clone(),
                args.listen.port(),
                peers.clone(),
            ));
            peers
        }
        _ => Peers::new(args.peers.clone(), node_ip),
    };
    tokio::spawn(wake::run_sleeper(reader.clone(), directory.clone(), waker.clone(), scaler, peers, held.clone(), metrics.clone()));

    let dns = match args.dns_listen {
        Some(listen) => {
            let opts = crate::dns::DnsOptions {
                listen,
                zones: args.dns_zones.clone(),
                ttl: args.dns_ttl,
                qps_per_source: args.dns_qps_per_source,
            };
            tokio::spawn(crate::dns::serve(opts, directory.clone(), waker.clone(), metrics.clone()))
        }
        None => tokio::spawn(std::future::pending()),
    };
    let status = http::Status { metrics: metrics.clone(), health: health.clone(), maps: reader.clone(), directory: directory.clone() };
    let server = tokio::spawn(http::serve(args.listen, status));
    let reconcile = tokio::spawn(reconcile_loop(reconciler, store, directory, health.clone(), args.state_file.clone(), nodes_tx));

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = tokio::signal::ctrl_c() => { info!("interrupted"); Ok(()) }
        _ = term.recv() => { info!("terminated"); Ok(()) }
        r = source => r.context("source task").and_then(|r| r.context("desired-state source failed")),
        r = server => r.context("http task").and_then(|r| r),
        r = activator => r.context("activator task").and_then(|r| r),
        r = dns => r.context("DNS task").and_then(|r| r),
        r = reconcile => r.context("reconcile task"),
    };
    if args.detach_on_exit {
        dataplane::detach(&pins, &args.iface)?;
        info!("detached and unpinned (--detach-on-exit)");
    } else {
        info!("exiting; programs stay attached and maps pinned, traffic keeps flowing");
    }
    outcome
}

/// The single `svl_config_v1` entry.
/// `activator4`: the external activator, or the agent's own.
/// Connect-time load balancing (`--socket-lb`): what the hooks skip is
/// written before they go live.
fn attach_socket_hooks(args: &RunArgs, loaded: &mut dataplane::Loaded, pins: &Pins) -> anyhow::Result<()> {
    if args.socket_lb == SocketLb::Off {
        socket_lb::detach(pins);
        info!("socket hooks off (--socket-lb=off): clients on this node reach VIPs only through the per-packet path");
        return Ok(());
    }
    let Some(root) = socket_lb::find_root(args.cgroup_root.as_deref())? else {
        warn!("no cgroup v2 hierarchy is mounted on this node: socket hooks not attached, so pods and processes on this node cannot reach apps by VIP; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup-root");
        return Ok(());
    };
    let (config, skip) = socket_lb::kernel_config(args.socket_lb_host_netns_only, &args.socket_lb_skip_cgroups)?;
    loaded.maps.set_socket_lb(&config, &skip).context("writing the socket hooks' config")?;
    socket_lb::attach(loaded, pins, &root)
}

fn kernel_config(args: &RunArgs, ranges: &VipRanges, activator4: Option<SocketAddr>) -> anyhow::Result<Config> {
    let mut c = Config::default();
    if let Some(a) = activator4 {
        anyhow::ensure!(a.is_ipv4(), "--activator {a} must be IPv4 (use --activator6 for IPv6)");
        c.activator4 = to_addr(a.ip());
        c.activator4_port = a.port().to_be();
        c.flags |= CONFIG_F_ACTIVATOR4;
    }
    if let Some(a) = args.activator6 {
        anyhow::ensure!(a.is_ipv6(), "--activator6 {a} must be IPv6");
        c.activator6 = to_addr(a.ip());
        c.activator6_port = a.port().to_be();
        c.flags |= CONFIG_F_ACTIVATOR6;
    }
    if c.flags & (CONFIG_F_ACTIVATOR4 | CONFIG_F_ACTIVATOR6) == 0 {
        warn!("no activator (neither --activator nor a node address for the agent's own): traffic for apps without ready pods will be dropped");
    }
    conntrack::Timeouts {
        syn: args.ct_syn_timeout,
        established: args.ct_established_timeout,
        close: args.ct_close_timeout,
        udp: args.ct_udp_timeout,
        new_per_cpu_per_sec: args.ct_new_per_cpu,
    }
    .apply(&mut c);
    if let Some(r) = ranges.v4 {
        (c.vip4_net, c.vip4_mask) = r.to_net_mask();
        c.flags |= CONFIG_F_VIP4;
    }
    if let Some(r) = ranges.v6 {
        (c.vip6_net, c.vip6_mask) = r.to_net_mask();
        c.flags |= CONFIG_F_VIP6;
    }
    for activator in [activator4, args.activator6].into_iter().flatten() {
        let ip: IpAddr = activator.ip();
        if ranges.for_ip(ip).is_some_and(|r| r.contains(ip)) {
            anyhow::bail!("activator {ip} lies inside the VIP range; its traffic would loop");
        }
    }
    Ok(c)
}

async fn reconcile_loop(
    mut reconciler: Reconciler,
    store: Store,
    directory: Directory,
    health: Health,
    state_file: PathBuf,
    nodes: tokio::sync::watch::Sender<Vec<IpAddr>>,
) {
    // Pod names per app go to a file for `inspect`, at most every 2 s.
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut sources_dirty = false;
    loop {
        tokio::select! {
            () = store.changed() => {}
            _ = tick.tick() => {
                if sources_dirty {
                    write_sources(&state_file, &reconciler);
                    sources_dirty = false;
                }
                continue;
            }
        }
        let batch = store.take();
        if batch.is_empty() {
            continue;
        }
        let full = batch.full.is_some();
        let changed = batch.changed.len();
        let specs: Vec<(String, Option<AppSpec>)> = batch.changed.iter().map(|(h, a, _)| (h.clone(), a.clone())).collect();
        let started = std::time::Instant::now();
        let outcome = reconciler.apply(batch);
        // Apps whose write failed are retried; the activator sees them as
        // the reconciler left them (a removed app stays gone).
        directory.update(
            specs.into_iter().map(|(h, a)| {
                let id = reconciler.app_id(&h);
                (h, a.filter(|_| id.is_some()), id)
            }),
            full,
        );
        nodes.send_if_modified(|known| {
            let now = reconciler.remote_nodes();
            let changed = *known != now;
            *known = now;
            changed
        });
        let log = if full || !outcome.failed.is_empty() { tracing::Level::INFO } else { tracing::Level::DEBUG };
        if log == tracing::Level::INFO {
            info!(
                full, changed, programmed = outcome.programmed, failed = outcome.failed.len(),
                apps = reconciler.app_count(), took_ms = started.elapsed().as_secs_f64() * 1e3,
                "reconciled"
            );
        } else {
            tracing::debug!(changed, programmed = outcome.programmed, took_us = started.elapsed().as_micros() as u64, "reconciled");
        }
        if full {
            health.set_reconciled();
            write_sources(&state_file, &reconciler);
        } else {
            sources_dirty = true;
        }
        if !outcome.failed.is_empty() {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RETRY_AFTER).await;
                store.retry(outcome.failed);
            });
        }
    }
}

/// Best effort: `inspect` works without it, just without pod names.
fn write_sources(path: &Path, reconciler: &Reconciler) {
    let write = || -> anyhow::Result<()> {
        crate::files::write_json(path, &reconciler.all_sources())?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::debug!(error = %e, path = %path.display(), "pod names for inspect not written");
    }
}

/// Forwards aya-log records (through the `log` bridge into tracing).
async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // The logger owns its ring buffer fd for as long as the AsyncFd lives.
    #[expect(deprecated, reason = "the replacement API is not in this tokio release yet")]
    let Ok(mut fd) = AsyncFd::new(logger) else {
        warn!("eBPF log forwarding unavailable");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
