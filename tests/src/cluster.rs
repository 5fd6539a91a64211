//! A cluster-shaped test network: several nodes and a client on one flat
//! L2 segment (a bridge), each node with its own pods behind it and host
//! routes to the other nodes' pod subnets (as a host-gateway CNI sets up),
//! each running its own agent on its uplink, all reading one desired state
//! (as they would read one API server).
//!
//! ```text
//!                 ┌────────────── segment 10.0.0.0/24 (bridge) ───────────────┐
//!  client 10.0.0.2          node1 10.0.0.11           node2 10.0.0.12          ...
//!                           └ pods 10.244.1.0/24      └ pods 10.244.2.0/24
//! ```
//!
//! The client reaches the VIP range through a route to one node (the
//! "load balancer"), which tests move between nodes, or spread over them.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    netns::{Netns, Proc, run},
    topology::{Conn, Response, agent_binary, http_get, if_index, link, wait_http},
    xdp_pass::Floor,
};

pub const CLIENT_IP: &str = "10.0.0.2";
pub const VIP_RANGE: &str = "10.96.0.0/16";
/// Every agent gets the same flow hash key, so every node picks the same pod.
const FLOW_HASH_KEY: &str = "000102030405060708090a0b0c0d0e0f";

pub struct Pod {
    pub name: String,
    pub ip: String,
    pub ns: Netns,
    pub server: Proc,
}

pub struct Node {
    /// 1-based.
    pub index: u8,
    pub ns: Netns,
    /// Its uplink address, 10.0.0.1<index>.
    pub addr: String,
    pub pods: Vec<Pod>,
    pub agent: Option<Proc>,
    bpf_dir: PathBuf,
    /// The cgroup this node's agent hooks: the node's "processes" (clients
    /// the test runs with `sock_client`) are put there.
    pub cgroup: Option<crate::TestCgroup>,
}

impl Node {
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_dir.join("serviceless")
    }
}

pub struct Cluster {
    pub tag: String,
    pub segment: Netns,
    pub client: Netns,
    pub nodes: Vec<Node>,
    pub work_dir: PathBuf,
    /// The desired state every agent reads.
    pub desired: PathBuf,
    server_bin: PathBuf,
    _xdp: Vec<OwnedFd>,
}

impl Cluster {
    /// `nodes` nodes (1..=9) on one segment with the client. `tag` keeps
    /// names unique (interface names stay under 16 bytes).
    pub fn new(tag: &str, nodes: u8, server_bin: &Path) -> anyhow::Result<Self> {
        let work_dir = PathBuf::from(format!("/run/serviceless-test/{tag}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir)?;
        std::fs::write(work_dir.join("flow-hash.key"), FLOW_HASH_KEY)?;
        let segment = Netns::new(&format!("{tag}-seg"))?;
        segment.ip("link add br0 type bridge")?;
        segment.ip("link set br0 up")?;
        let client = Netns::new(&format!("{tag}-cli"))?;
        let mut xdp = Vec::new();
        let mut port = |n: &str, ns: &Netns, ifname: &str| -> anyhow::Result<()> {
            link(&format!("{tag}{n}a"), &segment, &format!("p{n}"), &format!("{tag}{n}b"), ns, ifname)?;
            segment.ip(&format!("link set p{n} master br0"))?;
            segment.ip(&format!("link set p{n} up"))?;
            // Frames a node's XDP program sends back out of its uplink
            // (XDP_TX: encapsulated packets, RSTs) reach a veth peer only if
            // the peer runs XDP itself; a NIC needs nothing of the kind.
            let name = format!("p{n}");
            xdp.push(segment.run(move || -> anyhow::Result<OwnedFd> {
                Floor::load()?.attach(if_index(&name).context("segment port")?)
            })??);
            Ok(())
        };
        port("c", &client, "eth0")?;
        client.ip(&format!("addr add {CLIENT_IP}/24 dev eth0"))?;
        client.ip("link set eth0 up")?;
        // Like a real wire, deliver full checksums to the nodes' XDP programs.
        let _ = client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        let mut all = Vec::new();
        for i in 1..=nodes {
            let ns = Netns::new(&format!("{tag}-n{i}"))?;
            port(&i.to_string(), &ns, "up0")?;
            let addr = format!("10.0.0.1{i}");
            ns.ip(&format!("addr add {addr}/24 dev up0"))?;
            ns.ip("link set up0 up")?;
            ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            let bpf_dir = work_dir.join(format!("bpf{i}"));
            std::fs::create_dir_all(&bpf_dir)?;
            run("mount", &["-t", "bpf", "bpf", bpf_dir.to_str().context("path")?])?;
            let cgroup = crate::TestCgroup::new(&format!("{tag}-n{i}"));
            all.push(Node { index: i, ns, addr, pods: Vec::new(), agent: None, bpf_dir, cgroup });
        }
        // Host routes to every other node's pod subnet (host-gateway CNI).
        for n in &all {
            for other in all.iter().filter(|o| o.index != n.index) {
                n.ns.ip(&format!("route add 10.244.{}.0/24 via {}", other.index, other.addr))?;
            }
        }
        let c = Self {
            tag: tag.into(),
            segment,
            client,
            nodes: all,
            desired: work_dir.join("desired.yaml"),
            work_dir,
            server_bin: server_bin.into(),
            _xdp: xdp,
        };
        c.route_vips_via(&[1])?;
        Ok(c)
    }

    /// Adds a pod with an HTTP server on 8080 to node `node` (1-based);
    /// returns its IP (10.244.<node>.<4k+2>).
    pub fn add_pod(&mut self, node: u8, name: &str) -> anyhow::Result<String> {
        let tag = self.tag.clone();
        let server_bin = self.server_bin.clone();
        let work_dir = self.work_dir.clone();
        let n = self.node_mut(node);
        let k = n.pods.len() as u8;
        let ns = Netns::new(&format!("{tag}-n{node}p{k}"))?;
        link(&format!("{tag}{node}q{k}"), &ns, "eth0", &format!("{tag}{node}r{k}"), &n.ns, &format!("pod{k}"))?;
        let (gw, ip) = (format!("10.244.{node}.{}", 4 * k + 1), format!("10.244.{node}.{}", 4 * k + 2));
        ns.ip(&format!("addr add {ip}/30 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("route add default via {gw}"))?;
        // Like a NIC on a real wire, deliver full checksums: a reply another
        // node's XDP program translates (SNAT) is no longer an skb whose
        // checksum the kernel completes later.
        let _ = ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        n.ns.ip(&format!("addr add {gw}/30 dev pod{k}"))?;
        n.ns.ip(&format!("link set pod{k} up"))?;
        let listen = format!("{ip}:8080");
        let server = ns.spawn(
            server_bin.to_str().context("path")?,
            &["--listen", &listen, "--name", name],
            Some(&work_dir.join(format!("{name}.log"))),
        )?;
        wait_http(&n.ns, &listen)?;
        n.pods.push(Pod { name: name.into(), ip: ip.clone(), ns, server });
        Ok(ip)
    }

    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[index as usize - 1]
    }

    fn node_mut(&mut self, index: u8) -> &mut Node {
        &mut self.nodes[index as usize - 1]
    }

    /// Writes the desired state: one app per (hostname, VIP) with every pod
    /// of `pods` (names), each with its node's address.
    pub fn write_apps(&self, apps: &[(&str, &str, &[&str])]) -> anyhow::Result<()> {
        self.write_apps_with_ports(apps, "[{port: 80, targetPort: 8080}]")
    }

    /// `write_apps` with every app on `ports` (YAML flow list).
    pub fn write_apps_with_ports(&self, apps: &[(&str, &str, &[&str])], ports: &str) -> anyhow::Result<()> {
        let mut yaml = String::from("apps:\n");
        for (host, vip, pods) in apps {
            let none = if pods.is_empty() { " []" } else { "" };
            yaml.push_str(&format!("  - hostname: {host}\n    vip: {vip}\n    ports: {ports}\n    pods:{none}\n"));
            for name in *pods {
                let (node, pod) = self
                    .nodes
                    .iter()
                    .find_map(|n| n.pods.iter().find(|p| p.name == *name).map(|p| (n, p)))
                    .with_context(|| format!("no pod {name}"))?;
                yaml.push_str(&format!("      - {{name: {name}, ip: {}, node: {}}}\n", pod.ip, node.addr));
            }
        }
        let tmp = self.desired.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.desired)?;
        Ok(())
    }

    /// Starts (or restarts) node `index`'s agent with `extra` flags.
    pub fn start_agent(&mut self, index: u8, extra: &[&str]) -> anyhow::Result<()> {
        let source = format!("file:{}", self.desired.display());
        self.start_agent_with(index, &source, extra, &[])
    }

    /// `start_agent` with any source and extra environment.
    pub fn start_agent_with(&mut self, index: u8, source: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
        let bin = agent_binary()?;
        let work_dir = self.work_dir.clone();
        let n = self.node_mut(index);
        n.agent = None;
        let pin_dir = n.pin_dir();
        let pin_dir = pin_dir.display().to_string();
        let state_file = work_dir.join(format!("sources{index}.json")).display().to_string();
        let key_file = work_dir.join("flow-hash.key").display().to_string();
        let socket_lb = crate::TestCgroup::agent_flags(n.cgroup.as_ref());
        let defaults = [
            "run",
            socket_lb[0].as_str(),
            socket_lb[1].as_str(),
            "--iface",
            "up0",
            "--source",
            source,
            "--vip-range",
            VIP_RANGE,
            "--pin-dir",
            &pin_dir,
            "--state-file",
            &state_file,
            "--flow-hash-key-file",
            &key_file,
            "--listen",
            "127.0.0.1:9095",
            "--max-apps",
            "64",
            "--max-services",
            "256",
            "--max-backends",
            "512",
            "--max-connections",
            "65536",
        ];
        let args = crate::command_line(&defaults, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = work_dir.join(format!("agent{index}.log"));
        n.agent = Some(n.ns.spawn_env(bin.to_str().context("path")?, &args, Some(&log), env)?);
        Ok(())
    }

    /// Waits until every node's agent answers /readyz and has resolved the
    /// link-layer address of every other node (its own job, not the test's).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for n in &self.nodes {
            loop {
                let ready = n.ns.run(|| http_get("127.0.0.1:9095", "/readyz").map(|r| r.status == 200).unwrap_or(false))?;
                let neighbours = n.ns.ip("neigh show dev up0").unwrap_or_default();
                let resolved = self
                    .nodes
                    .iter()
                    .filter(|o| o.index != n.index && !o.pods.is_empty())
                    .all(|o| neighbours.lines().any(|l| l.starts_with(&format!("{} ", o.addr)) && l.contains("lladdr")));
                if ready && resolved {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} not ready (agent ready: {ready}, neighbours: {neighbours:?}) after {timeout:?}; see {}",
                        n.index,
                        self.work_dir.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The client reaches the VIP range through these nodes (several: a
    /// multipath route hashing each connection's ports, as an ECMP load
    /// balancer does).
    pub fn route_vips_via(&self, nodes: &[u8]) -> anyhow::Result<()> {
        let hops: Vec<String> = nodes.iter().map(|i| format!("nexthop via {}", self.node(*i).addr)).collect();
        let _ = self.client.exec("sysctl", &["-qw", "net.ipv4.fib_multipath_hash_policy=1"]);
        if nodes.len() == 1 {
            self.client.ip(&format!("route replace {VIP_RANGE} via {}", self.node(nodes[0]).addr))?;
        } else {
            self.client.ip(&format!("route replace {VIP_RANGE} {}", hops.join(" ")))?;
        }
        // Connected sockets cache their route; new packets must take the new one.
        let _ = self.client.ip("route flush cache");
        Ok(())
    }

    /// One request from the client on a fresh connection.
    pub fn request(&self, target: &str, path: &str) -> anyhow::Result<Response> {
        let (target, path) = (target.to_string(), path.to_string());
        self.client.run(move || http_get(&target, &path))?
    }

    /// A keep-alive connection from the client.
    pub fn connect(&self, target: &str) -> anyhow::Result<Conn> {
        let target: std::net::SocketAddr = target.parse()?;
        self.client.run(move || Conn::open(target))?
    }

    /// A verdict counter of node `index`, read with `inspect --json`.
    pub fn verdict(&self, index: u8, name: &str) -> anyhow::Result<u64> {
        let out = self.inspect(index)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["counters"][name].as_u64().unwrap_or(0))
    }

    /// `serviceless inspect --json` of node `index`.
    pub fn inspect(&self, index: u8) -> anyhow::Result<String> {
        let bin = agent_binary()?;
        let pin_dir = self.node(index).pin_dir().display().to_string();
        let state = self.work_dir.join(format!("sources{index}.json")).display().to_string();
        self.node(index).ns.exec(
            bin.to_str().context("path")?,
            &["inspect", "--json", "--pin-dir", &pin_dir, "--state-file", &state],
        )
    }

    /// Runs `svl-sock-client <args>` in namespace `ns`, inside node
    /// `node`'s hooked cgroup, and returns its output lines.
    pub fn sock_client(&self, node: u8, ns: &Netns, args: &[&str]) -> anyhow::Result<Vec<String>> {
        let out = crate::netns::output(sock_client_command(ns, self.node_cgroup(node)?, args)?)?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// `sock_client` on a thread of its own, for a client that must run
    /// while the test changes something.
    pub fn sock_client_background(&self, node: u8, ns: &Netns, args: &[&str]) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Vec<String>>>> {
        let cmd = sock_client_command(ns, self.node_cgroup(node)?, args)?;
        Ok(std::thread::spawn(move || Ok(crate::netns::output(cmd)?.lines().map(str::to_string).collect())))
    }

    /// The cgroup node `node`'s agent hooks.
    pub fn node_cgroup(&self, node: u8) -> anyhow::Result<&Path> {
        Ok(&self.node(node).cgroup.as_ref().context("no cgroup v2 hierarchy on this machine")?.path)
    }

    pub fn agent_log(&self, index: u8) -> String {
        std::fs::read_to_string(self.work_dir.join(format!("agent{index}.log"))).unwrap_or_default()
    }
}

/// `svl-sock-client <args>` in namespace `ns`, joining `cgroup` first.
pub fn sock_client_command(ns: &Netns, cgroup: &Path, args: &[&str]) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(sock_client_binary()?).args(args).arg("--cgroup").arg(cgroup);
    Ok(cmd)
}

/// The socket-hook test client, next to the test binaries.
pub fn sock_client_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("svl-sock-client"))
        .find(|bin| bin.is_file())
        .with_context(|| format!("svl-sock-client not found next to {}: build it with `cargo build -p serviceless-tests --bins`", exe.display()))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.agent = None;
            n.pods.clear();
            let _ = run("umount", &[n.bpf_dir.to_str().unwrap_or_default()]);
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
