//! A real kube-apiserver (+ etcd, + kube-controller-manager) for the
//! Kubernetes tests, and the harness playing kubelet: it gives each pod a
//! network namespace with a real HTTP server and reports podIP and Ready
//! through the status subresource.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
};

use anyhow::Context as _;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};

pub use crate::k8s;
use crate::topology::Topology;

/// The ServiceAccount the agent runs as (deploy/serviceaccount.yaml).
pub const AGENT_SA: &str = "system:serviceaccount:kube-system:serviceless-agent";
/// The ServiceAccount the VIP allocator runs as.
pub const ALLOCATOR_SA: &str = "system:serviceaccount:kube-system:serviceless-allocator";
/// How long the test allocator waits before releasing a gone app's VIP.
pub const RELEASE_AFTER: &str = "3s";

pub struct KubeEnv {
    pub cluster: k8s::Cluster,
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    /// Kubeconfig that impersonates the agent's ServiceAccount, so the agent
    /// runs with exactly the permissions of deploy/rbac.yaml.
    pub agent_kubeconfig: PathBuf,
    /// The same for the allocator's ServiceAccount.
    pub allocator_kubeconfig: PathBuf,
    /// The VIP allocator started with the control plane (deploy/allocator.yaml's
    /// role); take it to stop or replace it.
    pub allocator: Option<crate::netns::Proc>,
    dir: PathBuf,
    /// Pods the fake kubelet started: name -> pod number in the topology.
    started: HashMap<(String, String), u8>,
    next_pod: u8,
}

impl KubeEnv {
    pub fn start(topo: &Topology) -> anyhow::Result<Self> {
        Self::start_for(&topo.work_dir, &[&topo.node])
    }

    /// A control plane whose API server agents in each of `nodes` (network
    /// namespaces) reach on their own loopback.
    pub fn start_for(work_dir: &Path, nodes: &[&crate::netns::Netns]) -> anyhow::Result<Self> {
        let bins = k8s::ensure_binaries()?;
        let dir = work_dir.join("k8s");
        std::fs::create_dir_all(&dir)?;
        let cluster = k8s::Cluster::start(&bins, &dir)?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = cluster
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(root.join("deploy/serviceaccount.yaml"))
            .arg("-f")
            .arg(root.join("deploy/rbac.yaml"))
            .arg("-f")
            .arg(root.join("deploy/crd.yaml"))
            .output()?;
        anyhow::ensure!(out.status.success(), "applying RBAC and the CRD: {}", String::from_utf8_lossy(&out.stderr));
        let out = cluster
            .kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=30s", "crd/appaddresses.serviceless.io"])
            .output()?;
        anyhow::ensure!(out.status.success(), "the AppAddress CRD: {}", String::from_utf8_lossy(&out.stderr));

        // The agent runs in the node namespace, whose loopback is not the
        // API server's: carry its connections across.
        for node in nodes {
            proxy_into(node, cluster.apiserver_port())?;
        }
        let agent_kubeconfig = dir.join("agent.kubeconfig");
        std::fs::write(&agent_kubeconfig, kubeconfig(&cluster, Some(AGENT_SA)))?;
        let allocator_kubeconfig = dir.join("allocator.kubeconfig");
        std::fs::write(&allocator_kubeconfig, kubeconfig(&cluster, Some(ALLOCATOR_SA)))?;
        let admin = dir.join("admin.kubeconfig");
        std::fs::write(&admin, kubeconfig(&cluster, None))?;

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(&admin)?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            anyhow::Ok(Client::try_from(config)?)
        })?;
        let mut env = Self {
            cluster,
            rt,
            client,
            agent_kubeconfig,
            allocator_kubeconfig,
            allocator: None,
            dir,
            started: HashMap::new(),
            next_pod: 1,
        };
        env.allocator = Some(env.start_allocator("allocator-1", &[])?);
        Ok(env)
    }

    /// Starts a VIP allocator replica (`serviceless allocate`) as its
    /// ServiceAccount, logging to `k8s/<name>.log`; `extra` adds flags.
    pub fn start_allocator(&self, name: &str, extra: &[&str]) -> anyhow::Result<crate::netns::Proc> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let port = 19096 + name.bytes().map(u16::from).sum::<u16>() % 100;
        let listen = format!("127.0.0.1:{port}");
        let defaults = ["allocate", "--vip-range", crate::topology::VIP_RANGE, "--identity", name, "--release-after", RELEASE_AFTER];
        let defaults: Vec<&str> = defaults.into_iter().chain(["--listen", &listen, "--namespace", "kube-system", "--api-qps", "500"]).collect();
        let args = crate::command_line(&defaults, extra);
        let child = std::process::Command::new(crate::topology::agent_binary()?)
            .args(&args)
            .env("KUBECONFIG", &self.allocator_kubeconfig)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the allocator")?;
        Ok(crate::netns::Proc::from_child(child))
    }

    /// The API server's audit log so far: one JSON object per request.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.cluster.audit_log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Creates `deployments` in `default`, 16 at a time (as a busy
    /// cluster's clients would).
    pub fn create_deployments(&self, deployments: Vec<Deployment>) -> anyhow::Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), "default");
        self.rt.block_on(
            futures::stream::iter(deployments)
                .map(|d| {
                    let api = api.clone();
                    async move { api.create(&Default::default(), &d).await }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>(),
        )?;
        Ok(())
    }

    /// An allocator replica's log.
    pub fn allocator_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every AppAddress record: VIP -> (hostname, namespace).
    pub fn records(&self) -> std::collections::BTreeMap<String, (String, String)> {
        let out = self.kubectl(&["get", "appaddresses", "-o", "json"]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                let s = |k: &str| i["spec"][k].as_str().unwrap_or_default().to_string();
                (s("address"), (s("hostname"), s("namespace")))
            })
            .collect()
    }

    /// Starts the agent with the Kubernetes source, as the ServiceAccount.
    pub fn start_agent(&self, topo: &Topology, log: &str) -> anyhow::Result<crate::netns::Proc> {
        let kubeconfig = self.agent_kubeconfig.display().to_string();
        topo.start_agent_with("kubernetes", log, &["--node-name", "node-1"], &[("KUBECONFIG", kubeconfig.as_str())])
    }

    /// `kubectl <args>` against the cluster (admin); fails with stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cluster.kubectl().args(args).output()?;
        anyhow::ensure!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply` of a YAML document.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let mut child = self
            .cluster
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Plays kubelet once: every serviceless pod without an IP gets a
    /// namespace, an HTTP server, a podIP and Ready=True.
    pub fn kubelet_sync(&mut self, topo: &mut Topology) -> anyhow::Result<usize> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = self.rt.block_on(pods.list(&ListParams::default().labels("serviceless.io/enabled=true")))?;
        let mut started = 0;
        for pod in list.items {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let has_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some();
            if has_ip || pod.metadata.deletion_timestamp.is_some() || self.started.contains_key(&(ns.clone(), name.clone())) {
                continue;
            }
            let n = self.next_pod;
            self.next_pod += 1;
            let ip = topo.add_pod(n, &name)?;
            self.started.insert((ns.clone(), name.clone()), n);
            self.set_status(&ns, &name, Some(&ip), true)?;
            started += 1;
        }
        Ok(started)
    }

    /// Reports a pod's IP and readiness through the status subresource.
    pub fn set_status(&self, ns: &str, name: &str, ip: Option<&str>, ready: bool) -> anyhow::Result<()> {
        self.set_status_on(ns, name, ip, ready, NODE_IP)
    }

    /// `set_status` from a kubelet on the node at `host_ip`.
    pub fn set_status_on(&self, ns: &str, name: &str, ip: Option<&str>, ready: bool, host_ip: &str) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut patch = status_patch(ip, ready);
        patch["status"]["hostIP"] = serde_json::json!(host_ip);
        patch["status"]["hostIPs"] = serde_json::json!([{ "ip": host_ip }]);
        self.rt.block_on(pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)))?;
        Ok(())
    }
}

/// A Deployment that sleeps: the label and the app's annotations on the
/// Deployment itself (so the app exists at zero replicas) and on its pods
/// (TCP 80 -> 8080).
pub fn sleeping_deployment(name: &str, ns: &str, host: &str, vip: &str, idle_after: &str) -> String {
    let annotations = |indent: &str| {
        [
            format!("serviceless.io/hostname: {host}"),
            format!("serviceless.io/vip: \"{vip}\""),
            "serviceless.io/port: \"80\"".into(),
            "serviceless.io/target-port: \"8080\"".into(),
            format!("serviceless.io/idle-after: \"{idle_after}\""),
        ]
        .join(&format!("\n{indent}"))
    };
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
  labels: {{ serviceless.io/enabled: "true" }}
  annotations:
    {}
spec:
  replicas: 0
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata:
      labels: {{ app: {name}, serviceless.io/enabled: "true" }}
      annotations:
        {}
    spec:
      containers: [{{ name: app, image: example/app }}]
"#,
        annotations("    "),
        annotations("        ")
    )
}

/// A labelled Deployment at zero replicas whose `annotations` (on it and
/// on its pod template) declare an app: one that exists while it sleeps.
pub fn app_deployment(name: &str, annotations: serde_json::Value) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"serviceless.io/enabled": "true"}, "annotations": annotations},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "serviceless.io/enabled": "true"}, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "example/app"}]}}}
    }))
    .expect("a valid Deployment")
}

/// Requests to `deployments/scale`, by "VERB code", from the API server's
/// own metrics.
pub fn scale_calls(kube: &KubeEnv) -> std::collections::BTreeMap<String, u64> {
    let text = kube.kubectl(&["get", "--raw", "/metrics"]).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        if !(line.contains("resource=\"deployments\"") && line.contains("subresource=\"scale\"")) {
            continue;
        }
        let label = |name: &str| line.split(&format!("{name}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
        let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        *out.entry(format!("{} {}", label("verb"), label("code"))).or_default() += n;
    }
    out
}

/// `spec.replicas` and `metadata.generation` of a Deployment in `default`.
pub fn replicas_and_generation(kube: &KubeEnv, name: &str) -> (u64, u64) {
    let out = kube.kubectl(&["get", "deployment", name, "-o", "json"]).unwrap_or_default();
    let d: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    (d["spec"]["replicas"].as_u64().unwrap_or(99), d["metadata"]["generation"].as_u64().unwrap_or(0))
}

/// The test node's address (its uplink), as a kubelet there reports it.
pub const NODE_IP: &str = "10.0.0.1";

/// The status merge patch a kubelet sends: Running, podIP, and the Ready
/// condition with its transition time (the agent's NPL origin).
pub fn status_patch(ip: Option<&str>, ready: bool) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut status = serde_json::json!({
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": now }],
    });
    if let Some(ip) = ip {
        status["podIP"] = serde_json::json!(ip);
        status["podIPs"] = serde_json::json!([{ "ip": ip }]);
    }
    serde_json::json!({ "status": status })
}

/// A kubeconfig for the cluster, optionally impersonating `as_user`.
fn kubeconfig(cluster: &k8s::Cluster, as_user: Option<&str>) -> String {
    let impersonate = as_user.map(|u| format!("    as: {u}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {}\n{impersonate}contexts:\n- name: test\n  context: {{ cluster: test, user: test }}\ncurrent-context: test\n",
        cluster.server_url(),
        cluster.ca_path().display(),
        cluster.token(),
    )
}

/// Listens on 127.0.0.1:`port` inside `ns` and forwards each connection to
/// 127.0.0.1:`port` in this namespace. Runs until the process ends.
fn proxy_into(ns: &crate::netns::Netns, port: u16) -> anyhow::Result<()> {
    let listener = ns.run(move || TcpListener::bind(("127.0.0.1", port)))??;
    thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            // This thread is in the root namespace, so this connects there.
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) else { continue };
            pipe(inbound, outbound);
        }
    });
    Ok(())
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    copy(a, b2);
    copy(b, a2);
}
