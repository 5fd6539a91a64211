//! Liveness and readiness, as /healthz and /readyz report them.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    dataplane_attached: AtomicBool,
    /// The source has delivered a full desired state at least once.
    source_synced: AtomicBool,
    /// The source's current problem, if any (API server unreachable, bad file).
    source_error: Mutex<Option<String>>,
    /// The first full desired state has been written to the maps.
    first_reconcile_done: AtomicBool,
}

impl Health {
    pub fn set_attached(&self) {
        self.inner.dataplane_attached.store(true, Ordering::Relaxed);
    }

    pub fn set_source_ok(&self) {
        self.inner.source_synced.store(true, Ordering::Relaxed);
        *self.inner.source_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn set_source_error(&self, error: String) {
        *self.inner.source_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub fn set_reconciled(&self) {
        self.inner.first_reconcile_done.store(true, Ordering::Relaxed);
    }

    /// Alive: the programs are attached (traffic flows without us anyway).
    pub fn live(&self) -> Result<(), String> {
        if self.inner.dataplane_attached.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("dataplane not attached yet".into())
        }
    }

    /// Ready: attached, source in sync and healthy, maps programmed.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.inner.source_synced.load(Ordering::Relaxed) {
            return Err("desired state not loaded yet".into());
        }
        if let Some(e) = self.inner.source_error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(format!("source unhealthy (maps keep their last state): {e}"));
        }
        if !self.inner.first_reconcile_done.load(Ordering::Relaxed) {
            return Err("first reconcile not finished".into());
        }
        Ok(())
    }
}
