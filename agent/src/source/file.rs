//! Desired state from a YAML or JSON file, reloaded when it changes.
//!
//! A file that does not parse is reported with its line and column and the
//! last good state stays in force. An app with a bad value (hostname, IP,
//! port, ...) is rejected with its position in the file; the others apply.
//!
//! Bad input never wipes the state: an empty file, or one without an
//! `apps:` key (a truncated write), is refused (removing every app takes
//! an explicit `apps: []`). A change is applied only once it is complete:
//! when the writer closes the file, or when a new file is renamed into
//! place (how editors, orchestrators and ConfigMap mounts replace it), never
//! while a slow writer is half-way through.
//!
//! An app without a `vip` gets one allocated from `--vip-range`, unique
//! among the file's apps; explicit VIPs are granted when free. The VIPs
//! handed out are recorded next to the state file (`<state>.vips.json`),
//! so an app keeps its VIP across reloads and agent restarts.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{Observed, Store};
use crate::{
    files::{read_json, write_json},
    health::Health,
    metrics::Metrics,
    model::{AppSpec, BackendSpec, Lifecycle, PortSpec, Protocol, ScaleTarget, VipRanges},
    vip_pool::{Want, assign_all},
};

/// The file format. Example:
///
/// ```yaml
/// apps:
///   - hostname: hello.apps.example.com
///     vip: 10.96.0.10     # optional: allocated from --vip-range if omitted
///     ports: [{ port: 80, targetPort: 8080 }]
///     pods:
///       - { name: hello-1, ip: 10.244.1.2, ready: true }
///     # Optional scale to zero: the command (the platform's orchestrator)
///     # is run with the replica count appended; it starts or stops the
///     # app and writes its pods into this file.
///     scale: { exec: ["/usr/local/bin/orchestrate", "hello"] }
///     idleAfter: 15m
///     holdTimeout: 60s
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDoc {
    /// Required, so a truncated document cannot read as "no apps".
    pub apps: Vec<FileApp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApp {
    pub hostname: String,
    /// Optional: allocated if omitted.
    #[serde(default)]
    pub vip: Option<String>,
    pub ports: Vec<FilePort>,
    #[serde(default)]
    pub pods: Vec<FilePod>,
    /// How to wake and sleep the app.
    #[serde(default)]
    pub scale: Option<FileScale>,
    /// Put to sleep after this long without traffic (`15m`, `4s`; `0`: never).
    #[serde(default, rename = "idleAfter")]
    pub idle_after: Option<String>,
    /// How long connections wait for a pod while it wakes (default: `--hold-timeout`).
    #[serde(default, rename = "holdTimeout")]
    pub hold_timeout: Option<String>,
    /// Held connections reach the pod with a PROXY protocol v2 header.
    #[serde(default, rename = "proxyProtocol")]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileScale {
    /// Program and arguments; the replica count is appended.
    pub exec: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilePort {
    pub port: u32,
    /// Defaults to `port`.
    pub target_port: Option<u32>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePod {
    pub name: Option<String>,
    pub ip: String,
    #[serde(default = "yes")]
    pub ready: bool,
    /// A terminating pod keeps its flows but takes no new ones.
    #[serde(default)]
    pub terminating: bool,
    /// The address of the node the pod runs on (as a Pod's
    /// `status.hostIP`); omitted: this node, or reached by routing.
    #[serde(default)]
    pub node: Option<String>,
}

fn yes() -> bool {
    true
}

/// Why the file as a whole was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is empty (a truncated write?); keeping the last good state (`apps: []` removes every app)")]
    Empty { path: PathBuf },
    #[error("{path}{location}: {message}")]
    Parse { path: PathBuf, location: String, message: String },
}

/// One rejected app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `apps[3] (hostname)`.
    pub at: String,
    pub reason: String,
}

/// The VIPs the file source handed out or granted, by hostname.
pub type VipTable = BTreeMap<String, IpAddr>;

/// A parsed document.
#[derive(Debug)]
pub struct Parsed {
    pub apps: Vec<AppSpec>,
    pub rejected: Vec<Rejected>,
    /// Every valid app's VIP: the table to record for the next load.
    pub vips: VipTable,
}

/// Parses a document and gives every app its VIP (keeping the ones in
/// `prior`); returns the valid apps and the rejected ones.
pub fn parse(path: &Path, text: &str, ranges: &VipRanges, prior: &VipTable) -> Result<Parsed, FileError> {
    if text.trim().is_empty() {
        return Err(FileError::Empty { path: path.to_path_buf() });
    }
    // YAML is a superset of JSON, but serde_json is far faster on the large
    // files big fleets generate, so .json files get it.
    let doc: FileDoc = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| FileError::Parse {
            path: path.to_path_buf(),
            location: format!(":{}:{}", e.line(), e.column()),
            message: e.to_string(),
        })?
    } else {
        serde_yaml::from_str(text).map_err(|e| FileError::Parse {
            path: path.to_path_buf(),
            location: e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default(),
            message: e.to_string(),
        })?
    };
    let mut drafts: Vec<(String, AppSpec, Option<IpAddr>)> = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in doc.apps.into_iter().enumerate() {
        let at = format!("apps[{i}] ({})", raw.hostname);
        let result = convert(raw, ranges).and_then(|(app, requested)| {
            app.validate(ranges).map_err(|e| e.to_string())?;
            if !seen.insert(app.hostname.clone()) {
                return Err(format!("hostname '{}' is already used by an earlier app", app.hostname));
            }
            Ok((app, requested))
        });
        match result {
            Ok((app, requested)) => drafts.push((at, app, requested)),
            Err(reason) => rejected.push(Rejected { at, reason }),
        }
    }
    let wants: Vec<Want> = drafts
        .iter()
        .map(|(_, app, requested)| Want { hostname: &app.hostname, requested: *requested, ipv6: app.vip.is_ipv6() })
        .collect();
    let assigned = assign_all(ranges, prior, &wants);
    let mut apps = Vec::with_capacity(drafts.len());
    let mut vips = VipTable::new();
    for ((at, mut app, _), vip) in drafts.into_iter().zip(assigned) {
        match vip {
            Ok(vip) => {
                app.vip = vip;
                vips.insert(app.hostname.clone(), vip);
                apps.push(app);
            }
            Err(reason) => rejected.push(Rejected { at, reason }),
        }
    }
    Ok(Parsed { apps, rejected, vips })
}

/// The app, with its requested VIP; without one its `vip` is a stand-in
/// from the range of its pods' family, replaced once allocated.
fn convert(raw: FileApp, ranges: &VipRanges) -> Result<(AppSpec, Option<IpAddr>), String> {
    let requested = match raw.vip.as_deref() {
        None => None,
        Some(v) => Some(v.trim().parse::<IpAddr>().map_err(|_| format!("vip '{v}' is not an IP address"))?),
    };
    let mut ports = Vec::with_capacity(raw.ports.len());
    for p in raw.ports {
        let target = p.target_port.unwrap_or(p.port);
        for n in [p.port, target] {
            if !(1..=65535).contains(&n) {
                return Err(format!("port {n} is not in 1..=65535"));
            }
        }
        ports.push(PortSpec { port: p.port as u16, target_port: target as u16, protocol: p.protocol });
    }
    let mut backends = Vec::with_capacity(raw.pods.len());
    for pod in raw.pods {
        let ip: IpAddr = pod.ip.parse().map_err(|_| {
            format!("pod {} ip '{}' is not an IP address", pod.name.as_deref().unwrap_or("?"), pod.ip)
        })?;
        let node = match pod.node.as_deref() {
            None => None,
            Some(n) => Some(n.parse::<IpAddr>().map_err(|_| {
                format!("pod {} node '{n}' is not an IP address", pod.name.as_deref().unwrap_or("?"))
            })?),
        };
        backends.push(BackendSpec { ip, ready: pod.ready && !pod.terminating, source: pod.name, node });
    }
    let duration = |what: &str, text: Option<&str>| -> Result<Option<Duration>, String> {
        text.map(|t| humantime::parse_duration(t.trim()).map_err(|e| format!("{what} '{t}': {e} (e.g. 15m, 4s)"))).transpose()
    };
    let scaler = match raw.scale {
        None => None,
        Some(FileScale { exec }) if exec.is_empty() || exec[0].is_empty() => {
            return Err("scale.exec needs at least a program".into());
        }
        Some(FileScale { exec }) => Some(ScaleTarget::Exec(exec)),
    };
    let lifecycle = Lifecycle {
        scaler,
        idle_after: duration("idleAfter", raw.idle_after.as_deref())?.filter(|d| !d.is_zero()),
        hold_timeout: duration("holdTimeout", raw.hold_timeout.as_deref())?,
        proxy_protocol: raw.proxy_protocol,
    };
    let vip = match requested {
        Some(ip) => ip,
        None => {
            let ipv6 = backends.first().is_some_and(|b| b.ip.is_ipv6());
            let range = if ipv6 { ranges.v6 } else { ranges.v4.or(ranges.v6) };
            range.map(|r| r.nth(1)).ok_or("no vip given and no VIP range of the pods' family to allocate from (--vip-range)")?
        }
    };
    Ok((AppSpec { hostname: raw.hostname, vip, ports, backends, lifecycle }, requested))
}

/// The record of the VIPs the file source handed out (`<state>.vips.json`).
pub struct VipRecord {
    path: PathBuf,
    table: VipTable,
}

impl VipRecord {
    /// Reads the record; a missing one is empty, an unreadable one is
    /// reported and treated as empty (explicit VIPs are unaffected).
    pub fn open(path: PathBuf) -> Self {
        let table = read_json(&path).unwrap_or_else(|e| {
            error!(file = %path.display(), error = %e, "cannot read the VIP record; allocated VIPs may change");
            None
        });
        let table = table.unwrap_or_default();
        Self { path, table }
    }

    pub fn table(&self) -> &VipTable {
        &self.table
    }

    /// Records a new table (before it is applied, so a crash after the maps
    /// are written cannot forget a VIP in use).
    fn record(&mut self, table: VipTable) -> std::io::Result<()> {
        if table != self.table {
            write_json(&self.path, &table)?;
            self.table = table;
        }
        Ok(())
    }
}

/// Loads the file into the store: on a parse error the store keeps what it had.
pub fn load(path: &Path, ranges: &VipRanges, record: &mut VipRecord, store: &Store, metrics: &Metrics) -> Result<usize, FileError> {
    let observed = Observed::now();
    let text = std::fs::read_to_string(path)
        .map_err(|source| FileError::Read { path: path.to_path_buf(), source })?;
    let Parsed { apps, rejected, vips } = parse(path, &text, ranges, record.table())?;
    for r in &rejected {
        warn!(at = %r.at, reason = %r.reason, file = %path.display(), "app rejected; the others are applied");
    }
    metrics.invalid_apps.set(rejected.len() as i64);
    if let Err(e) = record.record(vips) {
        // Still unique; only a restart might move allocated VIPs.
        metrics.source_errors.inc();
        error!(file = %record.path.display(), error = %e, "cannot record the VIPs handed out");
    }
    let count = apps.len();
    store.replace_all(apps, observed);
    Ok(count)
}

/// Loads the file, then reloads it whenever it changes, until cancelled.
pub async fn watch(
    path: PathBuf,
    ranges: VipRanges,
    mut record: VipRecord,
    store: Store,
    health: Health,
    metrics: Metrics,
) -> anyhow::Result<()> {
    // Parsing a large file takes a while: keep the runtime's other tasks
    // (signals, /healthz) answering meanwhile.
    let mut reload = |why: &str| match tokio::task::block_in_place(|| load(&path, &ranges, &mut record, &store, &metrics)) {
        Ok(n) => {
            info!(file = %path.display(), apps = n, why, "desired state loaded");
            health.set_source_ok();
        }
        Err(e) => {
            metrics.source_errors.inc();
            error!(error = %e, "desired-state file not applied; keeping the last good state");
            health.set_source_error(e.to_string());
        }
    };
    reload("start");

    // Watch the directory: editors and ConfigMap mounts replace the file
    // (rename), which a watch on the file itself would miss. A small bounded
    // channel is enough: one pending event already means "reload".
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| completes_a_write(&e.kind)) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut last = file_stamp(&path);
    while rx.recv().await.is_some() {
        // One burst of events, one reload.
        while rx.try_recv().is_ok() {}
        let stamp = file_stamp(&path);
        if stamp != last {
            last = stamp;
            reload("file changed");
        }
    }
    Ok(())
}

/// Whether an event in the file's directory means a complete new version
/// may be in place: a writer closed a file, or a file was renamed in
/// (`mv`, editors, a ConfigMap's `..data` swap). Writes still in progress
/// (create, modify) are not.
fn completes_a_write(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both | RenameMode::Any))
            | EventKind::Remove(_)
    )
}

/// What identifies a version of the file (size, mtime, inode).
fn file_stamp(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> VipRanges {
        VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap()
    }

    #[test]
    fn valid_apps_apply_and_bad_ones_are_named() {
        let text = r#"
apps:
  - hostname: good.example.com
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080 }]
    pods:
      - { name: p1, ip: 10.244.1.2 }
      - { name: p2, ip: 10.244.1.3, ready: false }
  - hostname: Bad_Host
    vip: 10.96.0.11
    ports: [{ port: 80 }]
  - hostname: badip.example.com
    vip: 10.96.0.300
    ports: [{ port: 80 }]
  - hostname: badport.example.com
    vip: 10.96.0.12
    ports: [{ port: 70000 }]
  - hostname: outside.example.com
    vip: 192.168.0.1
    ports: [{ port: 80 }]
  - hostname: good.example.com
    vip: 10.96.0.13
    ports: [{ port: 80 }]
"#;
        let Parsed { apps, rejected, .. } = parse(Path::new("apps.yaml"), text, &ranges(), &VipTable::new()).unwrap();
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].backends.len(), 2);
        assert!(!apps[0].backends[1].ready);
        let at: Vec<_> = rejected.iter().map(|r| r.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "apps[1] (Bad_Host)",
                "apps[2] (badip.example.com)",
                "apps[3] (badport.example.com)",
                "apps[4] (outside.example.com)",
                "apps[5] (good.example.com)"
            ]
        );
        assert!(rejected[2].reason.contains("70000"), "{:?}", rejected[2]);
        assert!(rejected[3].reason.contains("outside the configured VIP range"), "{:?}", rejected[3]);
    }

    #[test]
    fn scale_hooks_and_idle_windows_are_read_and_bad_ones_rejected() {
        let text = r#"
apps:
  - hostname: sleepy.example.com
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080 }]
    scale: { exec: ["/bin/orchestrate", "sleepy"] }
    idleAfter: 4s
    holdTimeout: 1m
  - hostname: never.example.com
    vip: 10.96.0.11
    ports: [{ port: 80 }]
    idleAfter: "0"
  - hostname: badidle.example.com
    vip: 10.96.0.12
    ports: [{ port: 80 }]
    idleAfter: soon
  - hostname: noprog.example.com
    vip: 10.96.0.13
    ports: [{ port: 80 }]
    scale: { exec: [] }
"#;
        let Parsed { apps, rejected, .. } = parse(Path::new("apps.yaml"), text, &ranges(), &VipTable::new()).unwrap();
        assert_eq!(apps.len(), 2);
        let l = &apps[0].lifecycle;
        assert_eq!(l.scaler, Some(ScaleTarget::Exec(vec!["/bin/orchestrate".into(), "sleepy".into()])));
        assert_eq!((l.idle_after, l.hold_timeout), (Some(Duration::from_secs(4)), Some(Duration::from_secs(60))));
        assert_eq!(apps[1].lifecycle.idle_after, None, "0 disables sleeping");
        assert!(rejected[0].reason.contains("idleAfter 'soon'"), "{:?}", rejected[0]);
        assert!(rejected[1].reason.contains("scale.exec"), "{:?}", rejected[1]);
    }

    #[test]
    fn empty_and_truncated_documents_never_read_as_no_apps() {
        for text in ["", "\n  \n", "# only a comment\n"] {
            let err = parse(Path::new("apps.yaml"), text, &ranges(), &VipTable::new()).unwrap_err().to_string();
            assert!(err.contains("empty") || err.contains("missing field `apps`"), "{text:?}: {err}");
        }
        let err = parse(Path::new("apps.yaml"), "unrelated: 1\n", &ranges(), &VipTable::new()).unwrap_err().to_string();
        assert!(err.contains("unknown field") || err.contains("missing field"), "{err}");
        let Parsed { apps, .. } = parse(Path::new("apps.yaml"), "apps: []\n", &ranges(), &VipTable::new()).unwrap();
        assert!(apps.is_empty(), "an explicit empty list removes every app");
    }

    #[test]
    fn only_finished_writes_trigger_a_reload() {
        use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RenameMode};
        assert!(completes_a_write(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(completes_a_write(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(!completes_a_write(&EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        assert!(!completes_a_write(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn malformed_file_reports_line_and_column() {
        let err = parse(Path::new("apps.yaml"), "apps:\n  - hostname: [unclosed\n", &ranges(), &VipTable::new()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("apps.yaml:"), "{msg}");
        assert!(msg.contains(":2:") || msg.contains(":3:"), "location missing: {msg}");
        let err = parse(Path::new("a.json"), r#"{"apps": [{"hostname": "a", "vip": 1, "ports": "x"}]}"#, &ranges(), &VipTable::new());
        assert!(err.is_err());
        let err = parse(Path::new("a.yaml"), "apps: []\nunknown: 1\n", &ranges(), &VipTable::new()).unwrap_err();
        assert!(err.to_string().contains("unknown"), "{err}");
    }

    #[test]
    fn apps_without_a_vip_get_unique_ones_that_survive_reloads_and_restarts() {
        // 100k apps, none with a VIP, in a /12.
        let ranges = VipRanges::from_list(&["10.96.0.0/12".parse().unwrap()]).unwrap();
        let n = 100_000;
        let doc = |skip: Option<usize>| {
            let apps: Vec<String> = (0..n)
                .filter(|i| Some(*i) != skip)
                .map(|i| format!(r#"{{"hostname":"app{i}.example.com","ports":[{{"port":80}}]}}"#))
                .collect();
            format!(r#"{{"apps":[{}]}}"#, apps.join(","))
        };
        let first = parse(Path::new("a.json"), &doc(None), &ranges, &VipTable::new()).unwrap();
        assert!(first.rejected.is_empty());
        let unique: std::collections::HashSet<IpAddr> = first.apps.iter().map(|a| a.vip).collect();
        assert_eq!(unique.len(), n, "every app its own VIP");
        assert!(first.apps.iter().all(|a| ranges.v4.unwrap().contains(a.vip)));

        // A restart reads the record back: the same VIPs.
        let path = std::env::temp_dir().join(format!("svl-test-{}-record.vips.json", std::process::id()));
        let mut record = VipRecord::open(path.clone());
        record.record(first.vips.clone()).unwrap();
        let record = VipRecord::open(path.clone());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(record.table(), &first.vips);
        // An app removed, another added with the removed one's VIP asked for
        // explicitly, and a new one: nobody else moves.
        let mut text = doc(Some(7));
        let freed = first.vips["app7.example.com"];
        let taken = first.vips["app8.example.com"];
        text = text.replacen(
            r#"{"apps":["#,
            &format!(r#"{{"apps":[{{"hostname":"late.example.com","vip":"{freed}","ports":[{{"port":80}}]}},{{"hostname":"thief.example.com","vip":"{taken}","ports":[{{"port":80}}]}},{{"hostname":"fresh.example.com","ports":[{{"port":80}}]}},"#),
            1,
        );
        let second = parse(Path::new("a.json"), &text, &ranges, record.table()).unwrap();
        for app in &second.apps {
            if let Some(old) = first.vips.get(&app.hostname) {
                assert_eq!(app.vip, *old, "{} kept its VIP", app.hostname);
            }
        }
        assert_eq!(second.vips["late.example.com"], freed, "a free explicit VIP is granted");
        assert_eq!(second.rejected.len(), 1);
        assert!(second.rejected[0].reason.contains("already held by app8.example.com"), "{:?}", second.rejected);
        let unique: std::collections::HashSet<IpAddr> = second.apps.iter().map(|a| a.vip).collect();
        assert_eq!(unique.len(), second.apps.len());
    }

    #[test]
    fn a_corrupt_vip_record_is_reported_and_read_as_empty() {
        let path = std::env::temp_dir().join(format!("svl-test-{}-corrupt.vips.json", std::process::id()));
        std::fs::write(&path, b"{\"half").unwrap();
        assert!(VipRecord::open(path.clone()).table().is_empty());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn json_is_accepted() {
        let text = r#"{"apps": [{"hostname": "j.example.com", "vip": "10.96.0.20", "ports": [{"port": 53, "protocol": "UDP"}]}]}"#;
        let Parsed { apps, rejected, .. } = parse(Path::new("a.json"), text, &ranges(), &VipTable::new()).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(apps[0].ports[0].protocol, Protocol::Udp);
        assert_eq!(apps[0].ports[0].target_port, 53);
    }
}
