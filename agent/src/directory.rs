//! The apps as the reconciler last programmed them, for the parts of the
//! agent that act on apps rather than on maps: the activator (which app is
//! this connection for, does it have a ready pod yet), the waker and the
//! sleeper. The reconcile loop is its only writer.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use tokio::sync::watch;

use crate::model::{AppSpec, Protocol};

#[derive(Default)]
struct Inner {
    apps: HashMap<String, Entry>,
    ids: HashMap<u32, String>,
    /// (VIP, port, protocol) -> the hostnames claiming it (more than one:
    /// contested, so nobody's).
    services: HashMap<(IpAddr, u16, Protocol), Vec<String>>,
}

#[derive(Clone)]
struct Entry {
    spec: Arc<AppSpec>,
    id: Option<u32>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<RwLock<Inner>>,
    /// Bumped on every change: held connections wait on it.
    changed: watch::Sender<u64>,
}

impl Default for Directory {
    fn default() -> Self {
        Self { inner: Arc::default(), changed: watch::channel(0).0 }
    }
}

impl Directory {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the reconciler programmed: `(hostname, spec or None if
    /// removed, app id)`. With `full`, apps not listed are gone.
    pub fn update(&self, changes: impl IntoIterator<Item = (String, Option<AppSpec>, Option<u32>)>, full: bool) {
        {
            let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
            if full {
                *inner = Inner::default();
            }
            for (host, spec, id) in changes {
                inner.remove(&host);
                if let Some(spec) = spec {
                    inner.insert(host, spec, id);
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// The app a VIP port belongs to, unless contested.
    pub fn by_service(&self, vip: IpAddr, port: u16, protocol: Protocol) -> Option<Arc<AppSpec>> {
        let inner = self.read();
        match inner.services.get(&(vip, port, protocol))?.as_slice() {
            [host] => inner.apps.get(host).map(|e| e.spec.clone()),
            _ => None,
        }
    }

    /// The app the kernel knows by `id`.
    pub fn by_id(&self, id: u32) -> Option<Arc<AppSpec>> {
        let inner = self.read();
        inner.ids.get(&id).and_then(|h| inner.apps.get(h)).map(|e| e.spec.clone())
    }

    pub fn get(&self, host: &str) -> Option<Arc<AppSpec>> {
        self.read().apps.get(host).map(|e| e.spec.clone())
    }

    /// Every app with its kernel id.
    pub fn all(&self) -> Vec<(Arc<AppSpec>, Option<u32>)> {
        self.read().apps.values().map(|e| (e.spec.clone(), e.id)).collect()
    }

    /// Wakes everyone waiting on a change (something else they look at changed).
    pub fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Notifies on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl Inner {
    fn remove(&mut self, host: &str) {
        let Some(old) = self.apps.remove(host) else { return };
        if let Some(id) = old.id
            && self.ids.get(&id).is_some_and(|h| h == host)
        {
            self.ids.remove(&id);
        }
        for p in &old.spec.ports {
            let key = (old.spec.vip, p.port, p.protocol);
            if let Some(hosts) = self.services.get_mut(&key) {
                hosts.retain(|h| h != host);
                if hosts.is_empty() {
                    self.services.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, host: String, spec: AppSpec, id: Option<u32>) {
        for p in &spec.ports {
            self.services.entry((spec.vip, p.port, p.protocol)).or_default().push(host.clone());
        }
        if let Some(id) = id {
            self.ids.insert(id, host.clone());
        }
        self.apps.insert(host, Entry { spec: Arc::new(spec), id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortSpec;

    fn app(host: &str, vip: &str) -> AppSpec {
        AppSpec {
            hostname: host.into(),
            vip: vip.parse().unwrap(),
            ports: vec![PortSpec { port: 80, target_port: 8080, protocol: Protocol::Tcp }],
            backends: vec![],
            lifecycle: Default::default(),
        }
    }

    #[test]
    fn finds_apps_by_service_and_id_and_contested_services_by_nobody() {
        let d = Directory::default();
        let rx = d.subscribe();
        d.update([("a".into(), Some(app("a", "10.96.0.1")), Some(3))], true);
        assert!(rx.has_changed().unwrap());
        let vip: IpAddr = "10.96.0.1".parse().unwrap();
        assert_eq!(d.by_service(vip, 80, Protocol::Tcp).unwrap().hostname, "a");
        assert!(d.by_service(vip, 80, Protocol::Udp).is_none());
        assert_eq!(d.by_id(3).unwrap().hostname, "a");
        d.update([("b".into(), Some(app("b", "10.96.0.1")), Some(4))], false);
        assert!(d.by_service(vip, 80, Protocol::Tcp).is_none(), "two apps claim it");
        d.update([("b".into(), None, None)], false);
        assert_eq!(d.by_service(vip, 80, Protocol::Tcp).unwrap().hostname, "a");
        assert!(d.by_id(4).is_none());
        d.update([], true);
        assert!(d.get("a").is_none(), "a full update replaces everything");
    }
}
