//! Desired state: what every source (file, Kubernetes) produces and the
//! reconciler consumes. Values here are already validated.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};
use serviceless_common::{Addr, IPPROTO_TCP, IPPROTO_UDP, MAX_BACKENDS_PER_APP, ipv4_mapped};

/// One app: the hostname users and the load balancer know, its VIP, its
/// ports, and the pods behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppSpec {
    pub hostname: String,
    pub vip: IpAddr,
    pub ports: Vec<PortSpec>,
    pub backends: Vec<BackendSpec>,
    /// How the app is woken and put to sleep (the maps never depend on it).
    pub lifecycle: Lifecycle,
}

/// Scale to zero: what wakes the app, when it sleeps, how long its first
/// connections wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lifecycle {
    /// What scales the app; `None`: nothing (its pods come and go by other
    /// means, and connections held for it wait for them).
    pub scaler: Option<ScaleTarget>,
    /// Put to sleep after this long without traffic; `None`: never.
    pub idle_after: Option<Duration>,
    /// How long a connection held for it waits for a ready pod; `None`:
    /// the agent's default (`--hold-timeout`).
    pub hold_timeout: Option<Duration>,
    /// Held connections handed to a pod start with a PROXY protocol v2
    /// header carrying the client's address.
    pub proxy_protocol: bool,
}

/// What the agent changes to wake or sleep an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ScaleTarget {
    /// A command (the platform's orchestrator), run with the replica count
    /// appended (file source).
    Exec(Vec<String>),
    /// A Deployment's `scale` subresource (Kubernetes source).
    Deployment { namespace: String, name: String },
}

impl ScaleTarget {
    /// The namespace wake budgets are counted in (empty for commands).
    pub fn namespace(&self) -> &str {
        match self {
            ScaleTarget::Exec(_) => "",
            ScaleTarget::Deployment { namespace, .. } => namespace,
        }
    }
}

impl AppSpec {
    /// Ready pods, for the activator.
    pub fn ready_backends(&self) -> impl Iterator<Item = &BackendSpec> {
        self.backends.iter().filter(|b| b.ready)
    }

    /// Awake: some pod takes new connections.
    pub fn has_ready_pod(&self) -> bool {
        self.backends.iter().any(|b| b.ready)
    }

    /// The port entry for a VIP port and protocol.
    pub fn port(&self, port: u16, protocol: Protocol) -> Option<&PortSpec> {
        self.ports.iter().find(|p| p.port == port && p.protocol == protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// Port on the VIP.
    pub port: u16,
    /// Port the pods listen on.
    pub target_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendSpec {
    pub ip: IpAddr,
    /// Ready pods take new flows; others only keep the flows they have.
    pub ready: bool,
    /// Where this backend came from (a pod name), for `inspect`.
    pub source: Option<String>,
    /// The address of the node the pod runs on (`status.hostIP`); `None`:
    /// not known, reached by routing like a pod on this node.
    pub node: Option<IpAddr>,
}

/// A range VIPs must come from (and, for Kubernetes, are derived in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRange {
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl VipRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = prefix_mask_u32(self.prefix_len);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = prefix_mask_u128(self.prefix_len);
                u128::from(ip) & mask == u128::from(net) & mask
            }
            _ => false,
        }
    }

    /// Network and mask in the 16-byte form the kernel's config uses.
    pub fn to_net_mask(self) -> (Addr, Addr) {
        match self.network {
            IpAddr::V4(net) => {
                let mask = prefix_mask_u32(self.prefix_len);
                (
                    ipv4_mapped((u32::from(net) & mask).to_be_bytes()),
                    // The IPv4-mapped prefix must match too: all ones there.
                    {
                        let mut m = [0xff; 16];
                        m[12..].copy_from_slice(&mask.to_be_bytes());
                        m
                    },
                )
            }
            IpAddr::V6(net) => {
                let mask = prefix_mask_u128(self.prefix_len);
                ((u128::from(net) & mask).to_be_bytes(), mask.to_be_bytes())
            }
        }
    }

    /// Number of addresses, saturating.
    pub fn size(&self) -> u128 {
        let bits = if self.network.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(self.prefix_len);
        if host_bits >= 128 { u128::MAX } else { 1u128 << host_bits }
    }

    /// The `index`-th address of the range (modulo its size).
    pub fn nth(&self, index: u128) -> IpAddr {
        let offset = index % self.size();
        match self.network {
            IpAddr::V4(net) => {
                let base = u32::from(net) & prefix_mask_u32(self.prefix_len);
                IpAddr::V4((base | offset as u32).into())
            }
            IpAddr::V6(net) => {
                let base = u128::from(net) & prefix_mask_u128(self.prefix_len);
                IpAddr::V6((base | offset).into())
            }
        }
    }
}

fn prefix_mask_u32(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

fn prefix_mask_u128(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

impl FromStr for VipRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not a CIDR range (expected e.g. 10.96.0.0/16)"))?;
        let network: IpAddr = addr.parse().map_err(|e| format!("'{addr}': {e}"))?;
        let prefix_len: u8 = len.parse().map_err(|e| format!("prefix length '{len}': {e}"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("prefix length {prefix_len} is longer than {max}"));
        }
        Ok(Self { network, prefix_len })
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// The configured VIP ranges, at most one per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipRanges {
    pub v4: Option<VipRange>,
    pub v6: Option<VipRange>,
}

impl VipRanges {
    pub fn from_list(ranges: &[VipRange]) -> Result<Self, String> {
        let mut out = Self::default();
        for r in ranges {
            let slot = if r.network.is_ipv4() { &mut out.v4 } else { &mut out.v6 };
            if slot.replace(*r).is_some() {
                return Err(format!("more than one VIP range for the family of {r}"));
            }
        }
        Ok(out)
    }

    pub fn for_ip(&self, ip: IpAddr) -> Option<VipRange> {
        if ip.is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// Why an app description was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("hostname '{0}' is not a valid DNS name (RFC 1123: dot-separated labels of a-z, 0-9 and '-', each at most 63 characters, 253 in all)")]
    Hostname(String),
    #[error("VIP {vip} is outside the configured VIP range{}", range.map(|r| format!(" {r}")).unwrap_or_else(|| " (no range configured for its family; see --vip-range)".into()))]
    VipOutOfRange { vip: IpAddr, range: Option<VipRange> },
    #[error("port {0} is not in 1..=65535")]
    Port(u32),
    #[error("app has no ports")]
    NoPorts,
    #[error("port {port}/{protocol} is listed twice")]
    DuplicatePort { port: u16, protocol: Protocol },
    #[error("pod IP {ip} is not of the VIP's address family ({vip})")]
    FamilyMismatch { ip: IpAddr, vip: IpAddr },
    #[error("pod IP {0} is listed twice")]
    DuplicateBackend(IpAddr),
    #[error("{count} pods exceed the limit of {MAX_BACKENDS_PER_APP} per app")]
    TooManyBackends { count: usize },
    #[error("pod IP {0} is not a usable unicast address")]
    BackendAddress(IpAddr),
}

/// RFC 1123 hostname check (lower case, as Kubernetes requires).
pub fn validate_hostname(name: &str) -> Result<(), Invalid> {
    let bad = || Invalid::Hostname(name.to_string());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

impl AppSpec {
    /// Checks everything the dataplane relies on.
    pub fn validate(&self, ranges: &VipRanges) -> Result<(), Invalid> {
        validate_hostname(&self.hostname)?;
        let range = ranges.for_ip(self.vip);
        if !range.is_some_and(|r| r.contains(self.vip)) {
            return Err(Invalid::VipOutOfRange { vip: self.vip, range });
        }
        if self.ports.is_empty() {
            return Err(Invalid::NoPorts);
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            for port in [p.port, p.target_port] {
                if port == 0 {
                    return Err(Invalid::Port(0));
                }
            }
            if !seen.insert((p.port, p.protocol)) {
                return Err(Invalid::DuplicatePort { port: p.port, protocol: p.protocol });
            }
        }
        if self.backends.len() > MAX_BACKENDS_PER_APP as usize {
            return Err(Invalid::TooManyBackends { count: self.backends.len() });
        }
        let mut ips = std::collections::BTreeSet::new();
        for b in &self.backends {
            if b.ip.is_ipv4() != self.vip.is_ipv4() {
                return Err(Invalid::FamilyMismatch { ip: b.ip, vip: self.vip });
            }
            if b.ip.is_unspecified() || b.ip.is_multicast() || b.ip.is_loopback() {
                return Err(Invalid::BackendAddress(b.ip));
            }
            if !ips.insert(b.ip) {
                return Err(Invalid::DuplicateBackend(b.ip));
            }
        }
        Ok(())
    }
}

/// An address in the kernel's 16-byte form.
pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The `IpAddr` for a 16-byte kernel address.
pub fn from_addr(addr: &Addr) -> IpAddr {
    match serviceless_common::as_ipv4(addr) {
        Some(v4) => IpAddr::from(v4),
        None => IpAddr::from(*addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> VipRanges {
        VipRanges::from_list(&["10.96.0.0/16".parse().unwrap(), "fd00:96::/64".parse().unwrap()])
            .unwrap()
    }

    fn app(vip: &str) -> AppSpec {
        AppSpec {
            hostname: "hello.apps.example.com".into(),
            vip: vip.parse().unwrap(),
            ports: vec![PortSpec { port: 80, target_port: 8080, protocol: Protocol::Tcp }],
            backends: vec![BackendSpec { ip: "10.244.1.2".parse().unwrap(), ready: true, source: None, node: None }],
            lifecycle: Lifecycle::default(),
        }
    }

    #[test]
    fn hostnames_follow_rfc1123() {
        for ok in ["a", "hello.apps.example.com", "x-1.y", &"a".repeat(63)] {
            assert_eq!(validate_hostname(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Hello.com", "-a.b", "a-.b", "a..b", "a_b", &"a".repeat(64), "a b"] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vip_must_be_in_range_and_family_must_match() {
        assert_eq!(app("10.96.0.10").validate(&ranges()), Ok(()));
        assert!(matches!(app("10.97.0.10").validate(&ranges()), Err(Invalid::VipOutOfRange { .. })));
        assert!(matches!(app("fd00:96::1").validate(&ranges()), Err(Invalid::FamilyMismatch { .. })));
        let v4_only = VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap();
        let mut v6 = app("fd00:96::1");
        v6.backends[0].ip = "fd00:244::2".parse().unwrap();
        assert!(matches!(v6.validate(&v4_only), Err(Invalid::VipOutOfRange { range: None, .. })));
        assert_eq!(v6.validate(&ranges()), Ok(()));
    }

    #[test]
    fn ports_and_backends_are_checked() {
        let mut a = app("10.96.0.10");
        a.ports.push(a.ports[0]);
        assert!(matches!(a.validate(&ranges()), Err(Invalid::DuplicatePort { .. })));
        let mut a = app("10.96.0.10");
        a.ports[0].target_port = 0;
        assert_eq!(a.validate(&ranges()), Err(Invalid::Port(0)));
        let mut a = app("10.96.0.10");
        a.backends.push(a.backends[0].clone());
        assert!(matches!(a.validate(&ranges()), Err(Invalid::DuplicateBackend(_))));
    }

    #[test]
    fn ranges_give_kernel_masks_and_nth_addresses() {
        let r: VipRange = "10.96.0.0/16".parse().unwrap();
        let (net, mask) = r.to_net_mask();
        assert_eq!(net, ipv4_mapped([10, 96, 0, 0]));
        assert_eq!(&mask[12..], &[255, 255, 0, 0]);
        assert_eq!(r.nth(258), "10.96.1.2".parse::<IpAddr>().unwrap());
        assert!("10.96.0.0/33".parse::<VipRange>().is_err());
        assert!("10.96.0.0".parse::<VipRange>().is_err());
    }
}
