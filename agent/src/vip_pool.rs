//! VIP allocation inside one range: every app gets an address no other app
//! holds, and the range holds as many apps as it has addresses.
//!
//! An app's first choice is its hostname's hash (the VIP the agent used to
//! derive, so apps that never collided keep theirs); when that is taken the
//! next free address after it is used (linear probing over a bitmap). A
//! hostname chosen to collide therefore only moves its own app along.
//! The pool is in memory: whoever allocates (the file source, the elected
//! Kubernetes allocator) rebuilds it from the recorded allocations.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use crate::model::{VipRange, VipRanges};

/// Ranges up to this many addresses get a bitmap (2^24 bits = 2 MiB, a /8);
/// larger (IPv6) ranges are sparse and a set is enough.
const BITMAP_MAX_ADDRESSES: u128 = 1 << 24;

#[derive(Clone, Debug)]
enum Used {
    Bitmap(Vec<u64>),
    Sparse(HashSet<u128>),
}

/// Which addresses of a range are taken.
#[derive(Clone, Debug)]
pub struct VipPool {
    range: VipRange,
    size: u128,
    used: Used,
    count: usize,
}

impl VipPool {
    pub fn new(range: VipRange) -> Self {
        let size = range.size();
        let used = if size <= BITMAP_MAX_ADDRESSES {
            Used::Bitmap(vec![0; size.div_ceil(64) as usize])
        } else {
            Used::Sparse(HashSet::new())
        };
        Self { range, size, used, count: 0 }
    }

    pub fn range(&self) -> VipRange {
        self.range
    }

    /// Addresses taken.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Addresses that can be allocated: all but the network address.
    pub fn capacity(&self) -> u128 {
        self.size.saturating_sub(1)
    }

    /// The offset of `ip` in the range, if it is an allocatable address.
    fn offset(&self, ip: IpAddr) -> Option<u128> {
        if !self.range.contains(ip) {
            return None;
        }
        let offset = match (ip, self.range.network) {
            (IpAddr::V4(ip), IpAddr::V4(_)) => u128::from(u32::from(ip)) % self.size,
            (IpAddr::V6(ip), IpAddr::V6(_)) => u128::from(ip) % self.size,
            _ => return None,
        };
        (offset != 0).then_some(offset)
    }

    fn is_set(&self, offset: u128) -> bool {
        match &self.used {
            Used::Bitmap(words) => words[(offset / 64) as usize] & (1 << (offset % 64)) != 0,
            Used::Sparse(set) => set.contains(&offset),
        }
    }

    fn set(&mut self, offset: u128, on: bool) -> bool {
        let changed = match &mut self.used {
            Used::Bitmap(words) => {
                let (word, bit) = (&mut words[(offset / 64) as usize], 1u64 << (offset % 64));
                let was = *word & bit != 0;
                if on { *word |= bit } else { *word &= !bit }
                was != on
            }
            Used::Sparse(set) => {
                if on {
                    set.insert(offset)
                } else {
                    set.remove(&offset)
                }
            }
        };
        if changed {
            if on { self.count += 1 } else { self.count -= 1 }
        }
        changed
    }

    /// Whether `ip` can be taken: inside the range, not the network address, free.
    pub fn is_free(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some_and(|o| !self.is_set(o))
    }

    pub fn is_taken(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some_and(|o| self.is_set(o))
    }

    /// Takes `ip`; false if it is outside the range or already taken.
    pub fn reserve(&mut self, ip: IpAddr) -> bool {
        match self.offset(ip) {
            Some(o) => self.set(o, true),
            None => false,
        }
    }

    /// Gives `ip` back.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(o) = self.offset(ip) {
            self.set(o, false);
        }
    }

    /// The address a hostname would get in an empty pool.
    pub fn preferred(&self, hostname: &str) -> IpAddr {
        self.range.nth(self.preferred_offset(hostname))
    }

    fn preferred_offset(&self, hostname: &str) -> u128 {
        1 + u128::from(hostname_hash(hostname)) % self.capacity().max(1)
    }

    /// Takes a free address for `hostname`: its preferred one, else the next
    /// free one after it. `None` when the range is full.
    pub fn allocate(&mut self, hostname: &str) -> Option<IpAddr> {
        let offset = self.next_free(self.preferred_offset(hostname))?;
        self.set(offset, true);
        Some(self.range.nth(offset))
    }

    /// The first free offset at or after `start`, wrapping (offset 0 is never free).
    fn next_free(&self, start: u128) -> Option<u128> {
        if self.count as u128 >= self.capacity() {
            return None;
        }
        match &self.used {
            Used::Sparse(set) => {
                let mut o = start;
                loop {
                    if o != 0 && !set.contains(&o) {
                        return Some(o);
                    }
                    o = (o + 1) % self.size;
                }
            }
            Used::Bitmap(words) => {
                // Word by word: at most size/64 steps however full the range
                // is; the last step revisits the first word's lower bits.
                let n = words.len();
                let first = (start / 64) as usize;
                for step in 0..=n {
                    let i = (first + step) % n;
                    let mut free = !words[i];
                    if step == 0 {
                        free &= u64::MAX << (start % 64);
                    }
                    if i == 0 {
                        free &= !1; // the network address
                    }
                    let valid_bits = (self.size - i as u128 * 64).min(64);
                    if valid_bits < 64 {
                        free &= (1u64 << valid_bits) - 1;
                    }
                    if free != 0 {
                        return Some(i as u128 * 64 + u128::from(free.trailing_zeros()));
                    }
                }
                None
            }
        }
    }
}

/// One app asking for a VIP.
pub struct Want<'a> {
    pub hostname: &'a str,
    /// An explicit VIP: granted when valid and free, else refused.
    pub requested: Option<IpAddr>,
    /// Which family to allocate from when nothing is requested.
    pub ipv6: bool,
}

/// Gives every app a VIP at once, as the file source does on each load.
///
/// Apps that keep the VIP they had (`prior`) are served first, so adding an
/// app never moves another; then explicit requests, granted when free;
/// then the rest are allocated. Each result is the VIP or why there is none.
pub fn assign_all(ranges: &VipRanges, prior: &BTreeMap<String, IpAddr>, wants: &[Want]) -> Vec<Result<IpAddr, String>> {
    let mut pools = [ranges.v4.map(VipPool::new), ranges.v6.map(VipPool::new)];
    let pool_for = |pools: &[Option<VipPool>; 2], ip: IpAddr| -> Option<usize> {
        let i = usize::from(ip.is_ipv6());
        pools[i].as_ref().is_some_and(|p| p.range().contains(ip)).then_some(i)
    };
    let mut holder: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut out: Vec<Option<Result<IpAddr, String>>> = vec![None; wants.len()];
    // 1. Unchanged VIPs.
    for (i, w) in wants.iter().enumerate() {
        let Some(&had) = prior.get(w.hostname) else { continue };
        if w.requested.is_some_and(|r| r != had) || (w.requested.is_none() && had.is_ipv6() != w.ipv6) {
            continue;
        }
        if let Some(p) = pool_for(&pools, had)
            && pools[p].as_mut().is_some_and(|pool| pool.reserve(had))
        {
            holder.insert(had, w.hostname);
            out[i] = Some(Ok(had));
        }
    }
    // 2. New explicit requests.
    for (i, w) in wants.iter().enumerate() {
        let (None, Some(ip)) = (&out[i], w.requested) else { continue };
        out[i] = Some(match pool_for(&pools, ip) {
            None => Err(format!("VIP {ip} is outside the configured VIP range")),
            Some(p) if pools[p].as_mut().is_some_and(|pool| pool.reserve(ip)) => {
                holder.insert(ip, w.hostname);
                Ok(ip)
            }
            Some(_) => Err(match holder.get(&ip) {
                Some(other) => format!("VIP {ip} is already held by {other}"),
                None => format!("VIP {ip} is the range's network address"),
            }),
        });
    }
    // 3. Allocations.
    for (i, w) in wants.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let family = if w.ipv6 { "IPv6" } else { "IPv4" };
        out[i] = Some(match pools[usize::from(w.ipv6)].as_mut() {
            None => Err(format!("no {family} VIP range is configured (--vip-range) to allocate from")),
            Some(pool) => pool.allocate(w.hostname).ok_or_else(|| format!("the VIP range {} is full", pool.range())),
        });
    }
    out.into_iter().map(|r| r.expect("every app was decided")).collect()
}

/// FNV-1a of the name, then a strong mix: the hash VIPs used to be derived from.
pub fn hostname_hash(hostname: &str) -> u64 {
    serviceless_common::hash::mix64(
        hostname.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Want<'_> {
        fn ipv6_family(self) -> Self {
            Self { ipv6: true, ..self }
        }
    }

    fn pool(cidr: &str) -> VipPool {
        let (net, len) = cidr.split_once('/').unwrap();
        VipPool::new(VipRange { network: net.parse().unwrap(), prefix_len: len.parse().unwrap() })
    }

    #[test]
    fn a_range_holds_as_many_apps_as_it_has_addresses() {
        // A /12 (IPv4) serves 2^20 - 1 apps, all distinct, then says full.
        let mut p = pool("10.96.0.0/12");
        let mut seen = HashSet::new();
        for i in 0..p.capacity() {
            let ip = p.allocate(&format!("app{i}.example.com")).expect("free address");
            assert!(p.range().contains(ip) && ip != "10.96.0.0".parse::<IpAddr>().unwrap());
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(p.allocate("one-too-many.example.com"), None);
        assert_eq!(p.len() as u128, p.capacity());
        let some = *seen.iter().next().unwrap();
        p.release(some);
        assert_eq!(p.allocate("late.example.com"), Some(some), "a released address is reused");
    }

    #[test]
    fn first_choice_is_the_old_derivation_and_collisions_probe_on() {
        let mut p = pool("10.96.0.0/16");
        let want = p.preferred("x.example.com");
        assert_eq!(p.allocate("x.example.com"), Some(want));
        // A second name hashing to the same place (simulated by reserving) moves on.
        let mut q = pool("10.96.0.0/16");
        q.reserve(want);
        let got = q.allocate("x.example.com").unwrap();
        assert_ne!(got, want);
        assert!(q.is_taken(got) && q.is_taken(want));
    }

    #[test]
    fn reserve_refuses_taken_outside_and_network_addresses() {
        let mut p = pool("10.96.0.0/30");
        assert!(p.reserve("10.96.0.1".parse().unwrap()));
        assert!(!p.reserve("10.96.0.1".parse().unwrap()), "taken");
        assert!(!p.reserve("10.96.0.0".parse().unwrap()), "network address");
        assert!(!p.reserve("10.97.0.1".parse().unwrap()), "outside");
        assert!(!p.reserve("fd00::1".parse().unwrap()), "other family");
        let a = p.allocate("a").unwrap();
        let b = p.allocate("b").unwrap();
        assert_eq!(HashSet::from([a, b]), HashSet::from(["10.96.0.2".parse().unwrap(), "10.96.0.3".parse().unwrap()]));
        assert_eq!(p.allocate("c"), None);
    }

    #[test]
    fn assign_all_keeps_old_vips_grants_free_requests_and_refuses_taken_ones() {
        let ranges = VipRanges::from_list(&["10.96.0.0/16".parse().unwrap()]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let want = |h, r: Option<&str>| Want { hostname: h, requested: r.map(|r| r.parse().unwrap()), ipv6: false };
        let prior = BTreeMap::from([("old.example.com".to_string(), ip("10.96.0.9"))]);
        let out = assign_all(
            &ranges,
            &prior,
            &[
                // A newcomer asking for the old app's VIP, listed first, does not get it.
                want("thief.example.com", Some("10.96.0.9")),
                want("old.example.com", None),
                want("explicit.example.com", Some("10.96.0.20")),
                want("same.example.com", Some("10.96.0.20")),
                want("new.example.com", None),
                want("six.example.com", None).ipv6_family(),
            ],
        );
        assert!(out[0].as_ref().unwrap_err().contains("already held by old.example.com"), "{:?}", out[0]);
        assert_eq!(out[1], Ok(ip("10.96.0.9")));
        assert_eq!(out[2], Ok(ip("10.96.0.20")));
        assert!(out[3].as_ref().unwrap_err().contains("explicit.example.com"));
        let new = out[4].clone().unwrap();
        assert!(![ip("10.96.0.9"), ip("10.96.0.20")].contains(&new));
        assert!(out[5].as_ref().unwrap_err().contains("no IPv6 VIP range"));
    }

    #[test]
    fn ipv6_ranges_are_sparse() {
        let mut p = pool("fd00:96::/64");
        let a = p.allocate("a.example.com").unwrap();
        assert!(p.range().contains(a) && p.is_taken(a));
        assert_ne!(p.allocate("a.example.com").unwrap(), a, "the same name twice gets two addresses");
    }
}
