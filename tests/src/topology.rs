//! The test (and demo) network: a client, a node running the agent on its
//! uplink, pods with real HTTP servers, and an activator stand-in, each in
//! its own network namespace.
//!
//! ```text
//!  client 10.0.0.2 ──veth── 10.0.0.1 up0 [node: XDP+TC, agent] ─┬─ pod1 10.244.1.2:8080
//!                                                                ├─ pod2 10.244.2.2:8080
//!                                                                └─ activator 10.245.0.2:8080
//! ```

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::fd::OwnedFd,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    netns::{Netns, Proc, ip, run},
    xdp_pass::Floor,
};

pub const CLIENT_IP: &str = "10.0.0.2";
pub const UPLINK: &str = "up0";
pub const ACTIVATOR: &str = "10.245.0.2:8080";
pub const VIP_RANGE: &str = "10.96.0.0/16";

/// The agent binary, built next to the test binaries (`cargo xtask test`
/// builds it first). `SERVICELESS_BIN` overrides.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SERVICELESS_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("serviceless");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("agent binary not found next to {}; run `cargo build -p serviceless-agent` (cargo xtask test does)", exe.display())
}

pub struct Pod {
    pub name: String,
    pub ip: String,
    pub ns: Netns,
    pub server: Proc,
}

pub struct Topology {
    pub tag: String,
    pub client: Netns,
    pub node: Netns,
    pub activator: Netns,
    pub activator_server: Proc,
    pub pods: Vec<Pod>,
    /// bpffs for the agent's pins (outside /sys: `ip netns exec` remounts /sys).
    pub bpf_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Map capacity (apps) the agent is started with.
    pub max_apps: u32,
    /// Conntrack capacity (connections) the agent is started with.
    pub max_connections: u32,
    /// Start agents with `--activator` naming the stand-in (the default);
    /// false: the agent's own activator serves (on 10.0.0.1:8012).
    pub external_activator: bool,
    /// The cgroup the agent's socket hooks are attached to (see `TestCgroup`).
    pub cgroup: Option<crate::TestCgroup>,
    /// The XDP_PASS program on the client's interface (see `new`).
    _client_xdp: OwnedFd,
    server_bin: PathBuf,
}

impl Topology {
    /// `tag` keeps names unique (interface names must stay under 16 bytes).
    pub fn new(tag: &str, server_bin: &Path) -> anyhow::Result<Self> {
        let work_dir = PathBuf::from(format!("/run/serviceless-test/{tag}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir)?;
        let bpf_dir = work_dir.join("bpf");
        std::fs::create_dir_all(&bpf_dir)?;
        run("mount", &["-t", "bpf", "bpf", bpf_dir.to_str().context("path")?])?;

        let client = Netns::new(&format!("{tag}-cli"))?;
        let node = Netns::new(&format!("{tag}-node"))?;
        let activator = Netns::new(&format!("{tag}-act"))?;
        link(&format!("{tag}c"), &client, "eth0", &format!("{tag}u"), &node, UPLINK)?;
        client.ip("addr add 10.0.0.2/24 dev eth0")?;
        client.ip("link set eth0 up")?;
        client.ip("route add default via 10.0.0.1")?;
        // Like a real wire, deliver full checksums to the node's XDP program
        // (veth would otherwise pass partial checksums from local sockets).
        if client.exec("ethtool", &["-K", "eth0", "tx", "off"]).is_err() {
            eprintln!("note: ethtool missing; client keeps checksum offload");
        }
        // Frames the node's XDP program sends back (XDP_TX: RSTs for dead
        // connections) reach a veth peer only if it runs XDP itself (veth
        // flushes its XDP ring only then); a NIC needs nothing of the kind.
        let client_xdp = client.run(|| -> anyhow::Result<OwnedFd> {
            let index = if_index("eth0").context("client eth0")?;
            Floor::load()?.attach(index)
        })??;
        node.ip("addr add 10.0.0.1/24 dev up0")?;
        node.ip(&format!("link set {UPLINK} up"))?;
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;

        link(&format!("{tag}a"), &activator, "eth0", &format!("{tag}b"), &node, "act0")?;
        activator.ip("addr add 10.245.0.2/24 dev eth0")?;
        activator.ip("link set eth0 up")?;
        activator.ip("route add default via 10.245.0.1")?;
        node.ip("addr add 10.245.0.1/24 dev act0")?;
        node.ip("link set act0 up")?;
        let activator_server = activator.spawn(
            server_bin.to_str().context("path")?,
            &["--listen", ACTIVATOR, "--name", "activator"],
            Some(&work_dir.join("activator.log")),
        )?;

        let topo = Self {
            tag: tag.into(),
            client,
            node,
            activator,
            activator_server,
            pods: Vec::new(),
            bpf_dir,
            work_dir,
            max_apps: 1024,
            max_connections: 65536,
            external_activator: true,
            cgroup: crate::TestCgroup::new(tag),
            _client_xdp: client_xdp,
            server_bin: server_bin.into(),
        };
        wait_http(&topo.node, ACTIVATOR)?;
        Ok(topo)
    }

    /// Adds pod number `n` (1..=250) at 10.244.n.2 with an HTTP server on 8080.
    pub fn add_pod(&mut self, n: u8, name: &str) -> anyhow::Result<String> {
        let tag = &self.tag;
        let ns = Netns::new(&format!("{tag}-p{n}"))?;
        link(&format!("{tag}p{n}"), &ns, "eth0", &format!("{tag}q{n}"), &self.node, &format!("pod{n}"))?;
        let pod_ip = format!("10.244.{n}.2");
        ns.ip(&format!("addr add {pod_ip}/24 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("route add default via 10.244.{n}.1"))?;
        self.node.ip(&format!("addr add 10.244.{n}.1/24 dev pod{n}"))?;
        self.node.ip(&format!("link set pod{n} up"))?;
        let listen = format!("{pod_ip}:8080");
        let server = ns.spawn(
            self.server_bin.to_str().context("path")?,
            &["--listen", &listen, "--name", name],
            Some(&self.work_dir.join(format!("{name}.log"))),
        )?;
        wait_http(&self.node, &listen)?;
        self.pods.push(Pod { name: name.into(), ip: pod_ip.clone(), ns, server });
        Ok(pod_ip)
    }

    /// Starts the agent in the node namespace on the file source.
    pub fn start_agent(&self, desired_file: &Path, log_name: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        self.start_agent_with(&format!("file:{}", desired_file.display()), log_name, extra, &[])
    }

    /// Starts the agent with any source and extra environment.
    pub fn start_agent_with(&self, source: &str, log_name: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let mut args = vec!["--max-connections".to_string(), self.max_connections.to_string()];
        // Hooks in the test's own cgroup, never on the machine's root.
        args.extend(crate::TestCgroup::agent_flags(self.cgroup.as_ref()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_agent(&agent_binary()?, source, log_name, &args, env)
    }

    /// Starts an agent of the previous release (`bin`), with the flags it
    /// knew, on the file source: the starting point of an upgrade.
    pub fn start_previous_agent(&self, bin: &Path, desired_file: &Path, log_name: &str) -> anyhow::Result<Proc> {
        let source = format!("file:{}", desired_file.display());
        self.spawn_agent(bin, &source, log_name, &["--max-flows", "65536"], &[])
    }

    fn spawn_agent(&self, bin: &Path, source: &str, log_name: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        let pin_dir = self.bpf_dir.join("serviceless");
        let state_file = self.work_dir.join("sources.json");
        let mut args = vec![
            "run".to_string(),
            "--iface".into(),
            UPLINK.into(),
            "--state-file".into(),
            state_file.display().to_string(),
            "--source".into(),
            source.into(),
            "--vip-range".into(),
            VIP_RANGE.into(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--listen".into(),
            "127.0.0.1:9095".into(),
            "--max-apps".into(),
            self.max_apps.to_string(),
            "--max-services".into(),
            (self.max_apps * 4).to_string(),
            "--max-backends".into(),
            (self.max_apps * 8).to_string(),
        ];
        if self.external_activator {
            args.extend(["--activator".to_string(), ACTIVATOR.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = self.node.spawn_env(bin.to_str().context("path")?, &args, Some(&self.work_dir.join(log_name)), env)?;
        Ok(proc)
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_dir.join("serviceless")
    }

    /// Waits until the agent's /readyz answers 200 (inside the node namespace).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .node
                .run(|| http_get("127.0.0.1:9095", "/readyz").map(|r| r.status == 200).unwrap_or(false))?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent not ready after {timeout:?}; see {}", self.work_dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One HTTP request from the client on a fresh connection.
    pub fn request(&self, target: &str) -> anyhow::Result<Response> {
        let target = target.to_string();
        self.client.run(move || http_get(&target, "/"))?
    }

    /// A keep-alive connection from the client.
    pub fn connect(&self, target: &str) -> anyhow::Result<Conn> {
        let target: SocketAddr = target.parse()?;
        self.client.run(move || Conn::open(target))?
    }

    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.work_dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.pods.clear();
        let _ = run("umount", &[self.bpf_dir.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// A veth pair between two namespaces, with final names.
pub fn link(tmp_a: &str, ns_a: &Netns, name_a: &str, tmp_b: &str, ns_b: &Netns, name_b: &str) -> anyhow::Result<()> {
    ip(&format!("link add {tmp_a} type veth peer name {tmp_b}"))?;
    ip(&format!("link set {tmp_a} netns {}", ns_a.name))?;
    ip(&format!("link set {tmp_b} netns {}", ns_b.name))?;
    ns_a.ip(&format!("link set {tmp_a} name {name_a}"))?;
    ns_b.ip(&format!("link set {tmp_b} name {name_b}"))?;
    Ok(())
}

pub fn wait_http(ns: &Netns, target: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = target.to_string();
        if ns.run(move || http_get(&t, "/").is_ok())? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no HTTP server at {target}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// The address the client saw as its peer.
    pub peer: SocketAddr,
}

impl Response {
    /// Which server answered (`pod-1`, `activator`, ...).
    pub fn server(&self) -> &str {
        self.body.split_whitespace().next().unwrap_or("")
    }
}

pub fn http_get(target: &str, path: &str) -> anyhow::Result<Response> {
    let addr: SocketAddr = target.parse()?;
    let mut conn = Conn::open(addr)?;
    conn.get_path(path, false)
}

/// A client connection that can send several requests (keep-alive).
pub struct Conn {
    stream: BufReader<TcpStream>,
    peer: SocketAddr,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        Self::from_stream(stream)
    }

    /// A connection made elsewhere (for example from a chosen client port).
    pub fn from_stream(stream: TcpStream) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let peer = stream.peer_addr()?;
        Ok(Self { stream: BufReader::new(stream), peer })
    }

    pub fn get(&mut self) -> anyhow::Result<Response> {
        self.get_path("/", true)
    }

    /// The socket, for socket options.
    pub fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self.stream.get_ref())
    }

    /// The client's own address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.get_ref().local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn get_path(&mut self, path: &str, keep_alive: bool) -> anyhow::Result<Response> {
        let conn = if keep_alive { "keep-alive" } else { "close" };
        write!(self.stream.get_mut(), "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\n\r\n")?;
        self.response()
    }

    /// POSTs `len` bytes (an upload) on this connection.
    pub fn post(&mut self, path: &str, len: usize) -> anyhow::Result<Response> {
        write!(self.stream.get_mut(), "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n")?;
        let chunk = vec![b'u'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            self.stream.get_mut().write_all(&chunk[..n])?;
            left -= n;
        }
        self.response()
    }

    fn response(&mut self) -> anyhow::Result<Response> {
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let status: u16 = status_line.split_whitespace().nth(1).context("no status")?.parse()?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok(Response { status, body: String::from_utf8_lossy(&body).into_owned(), peer: self.peer })
    }
}
