//! A stand-in for a platform's orchestrator, for the file source's
//! `scale.exec` hook: a shell script that, run with `<replicas>` appended,
//! logs the call, waits as a pod would take to start, records the app's
//! state and rewrites the desired-state file with the app's pod present
//! (1) or absent (0). The file stays the only source of truth.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::topology::Topology;

/// An app the orchestrator wakes and puts to sleep.
pub struct ManagedApp<'a> {
    pub hostname: &'a str,
    pub vip: &'a str,
    /// The pod it gets when awake: (name, ip); it listens on 8080.
    pub pod: (&'a str, &'a str),
    /// More YAML lines of the app (`idleAfter: 3s`, ...).
    pub extra: &'a str,
    /// The app's `ports:` (YAML flow list); empty: 80 -> 8080.
    pub ports: &'a str,
}

pub struct Orchestrator {
    pub script: PathBuf,
    pub log: PathBuf,
    /// `<start_ns> <end_ns>` (UNIX, nanoseconds) of each call: from the
    /// moment it was run to the file holding the app's new pods.
    pub timing: PathBuf,
    state: PathBuf,
}

impl Orchestrator {
    /// Writes the script into `dir` and renders `file` once (every app
    /// asleep). `fixed` is YAML for apps it does not manage (list items),
    /// `start_delay` the seconds a wake takes (`sleep` syntax).
    pub fn install(dir: &Path, file: &Path, fixed: &str, apps: &[ManagedApp], start_delay: &str) -> anyhow::Result<Self> {
        let script = dir.join("orchestrate.sh");
        let log = dir.join("scale.log");
        let timing = dir.join("scale.timing");
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let mut render = String::from("render() {\n  echo 'apps:'\n");
        for line in fixed.lines() {
            render.push_str(&format!("  echo '{line}'\n"));
        }
        for app in apps {
            let lines = [
                format!("  - hostname: {}", app.hostname),
                format!("    vip: {}", app.vip),
                format!("    ports: {}", if app.ports.is_empty() { "[{ port: 80, targetPort: 8080 }]" } else { app.ports }),
                format!("    scale: {{ exec: [\"{}\"] }}", script.display()),
            ];
            for line in lines.iter().map(String::as_str).chain(app.extra.lines().map(str::trim)) {
                let line = if line.starts_with("  ") { line.to_string() } else { format!("    {line}") };
                render.push_str(&format!("  echo '{line}'\n"));
            }
            render.push_str(&format!(
                "  if [ \"$(cat {}/{} 2>/dev/null)\" = 1 ]; then echo '    pods: [{{ name: {}, ip: {} }}]'; fi\n",
                state.display(),
                app.hostname,
                app.pod.0,
                app.pod.1
            ));
        }
        render.push_str("}\n");
        let body = format!(
            "#!/bin/sh\n# Test orchestrator: orchestrate.sh <replicas> (SERVICELESS_APP names the app).\nset -e\n{render}\
             if [ $# -gt 0 ]; then\n  start=$(date +%s%N)\n  echo \"$SERVICELESS_APP $1\" >> {log}\n  sleep {start_delay}\n  echo \"$1\" > {state}/$SERVICELESS_APP\nfi\n\
             render > {file}.tmp && mv {file}.tmp {file}\n\
             if [ $# -gt 0 ]; then echo \"$start $(date +%s%N)\" >> {timing}; fi\n",
            log = log.display(),
            timing = timing.display(),
            state = state.display(),
            file = file.display(),
        );
        std::fs::write(&script, body)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let status = std::process::Command::new(&script).status()?;
        anyhow::ensure!(status.success(), "rendering {} failed", file.display());
        Ok(Self { script, log, timing, state })
    }

    /// Every call so far: `<hostname> <replicas>`.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// (start, end) of every call, UNIX nanoseconds.
    pub fn timings(&self) -> Vec<(u128, u128)> {
        std::fs::read_to_string(&self.timing)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    }

    /// Runs the orchestrator as the agent would (`replicas` appended).
    pub fn run(&self, app: &str, replicas: u32) -> anyhow::Result<()> {
        let status = std::process::Command::new(&self.script).arg(replicas.to_string()).env("SERVICELESS_APP", app).status()?;
        anyhow::ensure!(status.success(), "orchestrator failed");
        Ok(())
    }

    /// Makes the orchestrator accept wakes but never start a pod.
    pub fn break_pods(&self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.script)?.replace("echo \"$1\" >", "echo 0 >");
        std::fs::write(&self.script, text)?;
        Ok(())
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }
}

/// The usual scale-to-zero test bed: a topology whose agent runs its own
/// activator, pod-1 (10.244.1.2, HTTP on 8080), and the orchestrator
/// managing `apps` (plus the unmanaged YAML `fixed`). The agent is not
/// started (tests pass their own flags).
pub struct ScaleBed {
    pub topo: Topology,
    /// The desired-state file.
    pub file: PathBuf,
    pub orchestrator: Orchestrator,
}

impl ScaleBed {
    pub fn new(tag: &str, server_bin: &Path, fixed: &str, apps: &[ManagedApp], start_delay: &str) -> anyhow::Result<Self> {
        let mut topo = Topology::new(tag, server_bin)?;
        topo.external_activator = false;
        topo.add_pod(1, "pod-1")?;
        let file = topo.work_dir.join("apps.yaml");
        let orchestrator = Orchestrator::install(&topo.work_dir, &file, fixed, apps, start_delay)?;
        Ok(Self { topo, file, orchestrator })
    }

    /// Starts the agent on the file and waits until it is ready.
    pub fn start(&self, extra: &[&str]) -> anyhow::Result<crate::netns::Proc> {
        let agent = self.topo.start_agent(&self.file, "agent.log", extra)?;
        self.topo
            .wait_ready(std::time::Duration::from_secs(20))
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.topo.agent_log("agent.log")))?;
        Ok(agent)
    }
}
