//! Changing an app's replica count: a Deployment's `scale` subresource, or
//! the platform's own command (file source).
//!
//! Waking is a compare-and-set from 0 to 1 in one request (a JSON patch
//! whose `test` operation the API server checks atomically), so any number
//! of nodes waking the same app at once make exactly one transition and
//! never raise it beyond 1 (an HPA, or a person, may have set more).

use std::{process::Stdio, time::Duration};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::io::AsyncReadExt as _;
use tracing::debug;

use crate::model::{AppSpec, ScaleTarget};

/// What a scale request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaled {
    /// This request made the transition.
    Changed,
    /// Already there (another node, an HPA or a person did it).
    Already,
}

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("the app has no scale target (no Deployment, no scale.exec)")]
    NoTarget,
    #[error("the Deployment changed while it was being scaled ({0}); retrying")]
    Conflict(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("this agent has no Kubernetes client for Deployment {0}")]
    NoClient(String),
    #[error("scale command {program} {detail}")]
    Exec { program: String, detail: String },
}

/// Runs scale requests. Cheap to clone.
#[derive(Clone)]
pub struct Scaler {
    kube: Option<Client>,
    /// Longest a scale command may run before it is killed.
    exec_timeout: Duration,
}

impl Scaler {
    pub fn new(kube: Option<Client>, exec_timeout: Duration) -> Self {
        Self { kube, exec_timeout }
    }

    /// Sets the app's replicas: waking (`replicas` 1) only from 0, sleeping
    /// (`replicas` 0) from any count.
    pub async fn scale(&self, app: &AppSpec, replicas: u32) -> Result<Scaled, ScaleError> {
        match app.lifecycle.scaler.as_ref().ok_or(ScaleError::NoTarget)? {
            ScaleTarget::Exec(argv) => self.exec(&app.hostname, argv, replicas).await,
            ScaleTarget::Deployment { namespace, name } => {
                let client = self.kube.clone().ok_or_else(|| ScaleError::NoClient(format!("{namespace}/{name}")))?;
                let api: Api<Deployment> = Api::namespaced(client, namespace);
                if replicas == 0 { sleep_deployment(&api, name).await } else { wake_deployment(&api, name).await }
            }
        }
    }

    async fn exec(&self, host: &str, argv: &[String], replicas: u32) -> Result<Scaled, ScaleError> {
        let program = argv.first().cloned().unwrap_or_default();
        let fail = |detail: String| ScaleError::Exec { program: program.clone(), detail };
        let mut child = tokio::process::Command::new(&program)
            .args(&argv[1..])
            .arg(replicas.to_string())
            .env("SERVICELESS_APP", host)
            .env("SERVICELESS_REPLICAS", replicas.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("could not start: {e}")))?;
        let mut stderr = child.stderr.take();
        let run = async {
            let mut text = String::new();
            if let Some(err) = stderr.as_mut() {
                // Bounded: a chatty command cannot grow the agent.
                let _ = err.take(4096).read_to_string(&mut text).await;
            }
            (child.wait().await, text)
        };
        match tokio::time::timeout(self.exec_timeout, run).await {
            Err(_) => Err(fail(format!("did not finish within {:?}; killed", self.exec_timeout))),
            Ok((Err(e), _)) => Err(fail(format!("failed: {e}"))),
            Ok((Ok(status), _)) if status.success() => Ok(Scaled::Changed),
            Ok((Ok(status), stderr)) => Err(fail(format!("exited with {status}: {}", stderr.trim()))),
        }
    }
}

/// 0 -> 1 as a compare-and-set; `Already` when it was not at 0.
///
/// The API server serialises a Scale at 0 replicas with an empty `spec`
/// (`replicas` is omitted when 0), so one JSON patch tests `spec == {}`
/// and adds `replicas: 1`. Should the test fail while the Scale is at 0
/// (a server that writes `replicas: 0` out), a patch guarded by the
/// Scale's resourceVersion does the same in two requests.
async fn wake_deployment(api: &Api<Deployment>, name: &str) -> Result<Scaled, ScaleError> {
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": "/spec", "value": {} },
        { "op": "add", "path": "/spec/replicas", "value": 1 },
    ]))
    .expect("a valid JSON patch");
    match api.patch_scale(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await {
        Ok(_) => return Ok(Scaled::Changed),
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => debug!(code = e.code, message = %e.message, "wake: the 0 -> 1 patch did not apply; looking at the Scale"),
        Err(e) => return Err(e.into()),
    }
    let scale = api.get_scale(name).await?;
    if scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) >= 1 {
        return Ok(Scaled::Already);
    }
    let guarded = serde_json::json!({
        "metadata": { "resourceVersion": scale.metadata.resource_version },
        "spec": { "replicas": 1 },
    });
    match api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&guarded)).await {
        Ok(_) => Ok(Scaled::Changed),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(ScaleError::Conflict(e.message)),
        Err(e) => Err(e.into()),
    }
}

async fn sleep_deployment(api: &Api<Deployment>, name: &str) -> Result<Scaled, ScaleError> {
    let patch = serde_json::json!({ "spec": { "replicas": 0 } });
    api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(Scaled::Changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Lifecycle, PortSpec, Protocol};

    fn app(argv: &[&str]) -> AppSpec {
        AppSpec {
            hostname: "a.example.com".into(),
            vip: "10.96.0.1".parse().unwrap(),
            ports: vec![PortSpec { port: 80, target_port: 80, protocol: Protocol::Tcp }],
            backends: vec![],
            lifecycle: Lifecycle {
                scaler: Some(ScaleTarget::Exec(argv.iter().map(|s| s.to_string()).collect())),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn commands_get_the_count_and_the_app_and_failures_are_explained() {
        let scaler = Scaler::new(None, Duration::from_millis(500));
        let dir = std::env::temp_dir().join(format!("svl-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let script = format!("echo \"$SERVICELESS_APP $SERVICELESS_REPLICAS $1\" > {}", out.display());
        assert_eq!(scaler.scale(&app(&["sh", "-c", &script, "sh"]), 1).await.unwrap(), Scaled::Changed);
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "a.example.com 1 1");

        let err = scaler.scale(&app(&["sh", "-c", "echo nope >&2; exit 3"]), 0).await.unwrap_err().to_string();
        assert!(err.contains("exited with") && err.contains("nope"), "{err}");
        let err = scaler.scale(&app(&["sleep", "5"]), 1).await.unwrap_err().to_string();
        assert!(err.contains("killed"), "{err}");
        let err = scaler.scale(&app(&["/nonexistent/orchestrator"]), 1).await.unwrap_err().to_string();
        assert!(err.contains("could not start"), "{err}");
        let mut none = app(&[]);
        none.lifecycle.scaler = None;
        assert!(matches!(scaler.scale(&none, 1).await, Err(ScaleError::NoTarget)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
