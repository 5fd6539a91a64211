//! Sources of desired state and the store they share with the reconciler.
//!
//! A source (the file watcher, the Kubernetes Pod watch) writes validated
//! apps into the `Store`; the reconciler takes whatever changed since it last
//! looked. Changes coalesce: ten updates to one app before the reconciler
//! wakes cost one diff, and memory is bounded by the number of apps.

pub mod file;
pub mod kubernetes;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use tokio::sync::Notify;

use crate::model::AppSpec;

/// When a change was seen, for the programming-latency metrics.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    /// When the source received the change.
    pub at: Instant,
    /// When the change happened at its origin (a Pod's Ready transition), if known.
    pub origin: Option<SystemTime>,
}

impl Observed {
    pub fn now() -> Self {
        Self { at: Instant::now(), origin: None }
    }

    /// The earlier of two observations: latency counts from the first change.
    fn earliest(self, other: Self) -> Self {
        Self {
            at: self.at.min(other.at),
            origin: match (self.origin, other.origin) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

#[derive(Default)]
struct Inner {
    apps: HashMap<String, AppSpec>,
    dirty: HashMap<String, Observed>,
    /// Set when the whole state was replaced: diff everything, remove what is absent.
    full: Option<Observed>,
}

/// Desired state shared by a source (writer) and the reconciler (reader).
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

/// What changed since the reconciler last looked.
pub struct Batch {
    /// Present when the whole state must be diffed (start, file reload, relist).
    pub full: Option<Observed>,
    /// Apps to diff: hostname, desired spec (None = remove), when observed.
    pub changed: Vec<(String, Option<AppSpec>, Observed)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.full.is_none() && self.changed.is_empty()
    }
}

impl Store {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-written in a
        // way that matters more than losing the agent, so take the data.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the whole desired state (level-triggered: absent apps are removed).
    pub fn replace_all(&self, apps: impl IntoIterator<Item = AppSpec>, observed: Observed) {
        let mut inner = self.lock();
        inner.apps = apps.into_iter().map(|a| (a.hostname.clone(), a)).collect();
        inner.full = Some(inner.full.map_or(observed, |f| f.earliest(observed)));
        inner.dirty.clear();
        drop(inner);
        self.notify.notify_one();
    }

    /// Sets one app; a no-op if nothing changed.
    pub fn upsert(&self, app: AppSpec, observed: Observed) {
        let mut inner = self.lock();
        if inner.apps.get(&app.hostname) == Some(&app) {
            return;
        }
        let host = app.hostname.clone();
        inner.apps.insert(host.clone(), app);
        Self::mark(&mut inner, host, observed);
        drop(inner);
        self.notify.notify_one();
    }

    /// Removes one app; a no-op if absent.
    pub fn remove(&self, hostname: &str, observed: Observed) {
        let mut inner = self.lock();
        if inner.apps.remove(hostname).is_none() {
            return;
        }
        Self::mark(&mut inner, hostname.to_string(), observed);
        drop(inner);
        self.notify.notify_one();
    }

    fn mark(inner: &mut Inner, host: String, observed: Observed) {
        let entry = inner.dirty.entry(host).or_insert(observed);
        *entry = entry.earliest(observed);
    }

    /// Takes the pending changes.
    pub fn take(&self) -> Batch {
        let mut inner = self.lock();
        let full = inner.full.take();
        let changed = if let Some(observed) = full {
            inner.dirty.clear();
            inner.apps.iter().map(|(h, a)| (h.clone(), Some(a.clone()), observed)).collect()
        } else {
            let dirty = std::mem::take(&mut inner.dirty);
            dirty.into_iter().map(|(h, o)| (h.clone(), inner.apps.get(&h).cloned(), o)).collect()
        };
        Batch { full, changed }
    }

    /// Marks apps for another diff (after a failed write).
    pub fn retry(&self, hostnames: impl IntoIterator<Item = String>) {
        let mut inner = self.lock();
        for h in hostnames {
            Self::mark(&mut inner, h, Observed::now());
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Waits until something changed since the last `take`.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PortSpec, Protocol};

    fn app(host: &str) -> AppSpec {
        AppSpec {
            hostname: host.into(),
            vip: "10.96.0.1".parse().unwrap(),
            ports: vec![PortSpec { port: 80, target_port: 80, protocol: Protocol::Tcp }],
            backends: vec![],
            lifecycle: Default::default(),
        }
    }

    #[test]
    fn changes_coalesce_and_full_replaces_dirty() {
        let store = Store::default();
        store.upsert(app("a"), Observed::now());
        store.upsert(app("a"), Observed::now());
        store.upsert(app("b"), Observed::now());
        store.remove("b", Observed::now());
        let batch = store.take();
        assert!(batch.full.is_none());
        let mut hosts: Vec<_> = batch.changed.iter().map(|(h, a, _)| (h.clone(), a.is_some())).collect();
        hosts.sort();
        assert_eq!(hosts, vec![("a".into(), true), ("b".into(), false)]);
        assert!(store.take().is_empty());

        store.upsert(app("a"), Observed::now());
        assert!(store.take().is_empty(), "an identical upsert is not a change");

        store.replace_all([app("c")], Observed::now());
        let batch = store.take();
        assert!(batch.full.is_some());
        assert_eq!(batch.changed.len(), 1);
        assert_eq!(batch.changed[0].0, "c");
    }
}
