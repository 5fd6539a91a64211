//! Flow hashing and backend choice by rendezvous (highest random weight)
//! hashing: each backend's score for a flow depends only on the flow and that
//! backend, so adding or removing one of N backends moves only the flows that
//! backend wins or held, about 1/N of them, and no others.
//!
//! The flow hash is SipHash-1-3 under a secret key (`Config::hash_key`), the
//! same on every node: every node picks the same pod for a flow, and a
//! client cannot compute which source ports land on which pod.

use crate::{Addr, CtKey, addr_words};

/// The murmur3/splitmix 64-bit finalizer: cheap, and every input bit affects
/// every output bit.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

#[inline(always)]
const fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 of five little-endian 8-byte words (a 40-byte message).
#[inline(always)]
pub const fn siphash13_5(key: &[u64; 2], m: [u64; 5]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < 5 {
        v[3] ^= m[i];
        sip_round(&mut v);
        v[0] ^= m[i];
        i += 1;
    }
    // The final block: the message length (40) in the top byte.
    let b = 40u64 << 56;
    v[3] ^= b;
    sip_round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Keyed hash of a client flow (its 5-tuple as received; `dir` ignored).
#[inline(always)]
pub fn flow_hash(flow: &CtKey, key: &[u64; 2]) -> u64 {
    let (s0, s1) = addr_words(&flow.src);
    let (d0, d1) = addr_words(&flow.dst);
    let ports = (flow.sport as u64) | ((flow.dport as u64) << 16) | ((flow.proto as u64) << 32);
    siphash13_5(key, [s0.to_le(), s1.to_le(), d0.to_le(), d1.to_le(), ports])
}

/// FNV-1a of a hostname: with the stored (possibly truncated) name it tells
/// a restarted agent exactly which app an `svl_apps_v2` entry belongs to.
pub const fn name_hash(name: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < name.len() {
        h ^= name[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// Hash identifying a backend, independent of its slot.
#[inline(always)]
pub fn backend_hash(addr: &Addr) -> u64 {
    let (hi, lo) = addr_words(addr);
    mix64(hi ^ mix64(lo ^ 0x9e37_79b9_7f4a_7c15))
}

/// Rendezvous score of a backend for a flow; the highest score wins.
#[inline(always)]
pub fn score(flow_hash: u64, backend_hash: u64) -> u64 {
    mix64(flow_hash ^ backend_hash)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ipv4_mapped;
    use std::vec::Vec;

    fn pick(flow: u64, backends: &[Addr]) -> Addr {
        *backends
            .iter()
            .max_by_key(|b| score(flow, backend_hash(b)))
            .expect("at least one backend")
    }

    const KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];

    fn flow(i: u32) -> CtKey {
        CtKey {
            src: ipv4_mapped([198, 51, (i >> 8) as u8, i as u8]),
            dst: ipv4_mapped([10, 96, 0, 1]),
            sport: (1024 + i % 50_000) as u16,
            dport: 80,
            proto: 6,
            ..Default::default()
        }
    }

    fn flows(n: u32) -> Vec<u64> {
        (0..n).map(|i| flow_hash(&flow(i), &KEY)).collect()
    }

    #[test]
    fn siphash_matches_the_reference_implementation() {
        use core::hash::Hasher as _;
        for seed in 0..64u64 {
            let words = [seed, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), !seed, seed << 7, u64::MAX - seed];
            let key = [seed ^ 0x1234, seed.rotate_left(17)];
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut reference = siphasher::sip::SipHasher13::new_with_keys(key[0], key[1]);
            reference.write(&bytes);
            assert_eq!(siphash13_5(&key, words), reference.finish(), "seed {seed}");
        }
    }

    #[test]
    fn flow_hash_depends_on_the_key() {
        let other = [KEY[0] ^ 1, KEY[1]];
        let same = (0..1000).filter(|&i| flow_hash(&flow(i), &KEY) == flow_hash(&flow(i), &other)).count();
        assert_eq!(same, 0);
        // Which backend a flow gets changes with the key (so it cannot be precomputed).
        let set = backends(4);
        let moved = (0..1000)
            .filter(|&i| pick(flow_hash(&flow(i), &KEY), &set) != pick(flow_hash(&flow(i), &other), &set))
            .count();
        assert!((600..900).contains(&moved), "about 3/4 of flows change backend with the key: {moved}");
    }

    #[test]
    fn name_hash_tells_names_with_a_common_prefix_apart() {
        let a = std::format!("{}.a.example.com", "x".repeat(70));
        let b = std::format!("{}.b.example.com", "x".repeat(70));
        assert_ne!(name_hash(a.as_bytes()), name_hash(b.as_bytes()));
        assert_eq!(name_hash(b"a"), 0xaf63_dc4c_8601_ec8c, "FNV-1a test vector");
    }

    fn backends(n: u8) -> Vec<Addr> {
        (1..=n).map(|i| ipv4_mapped([10, 244, 1, i])).collect()
    }

    #[test]
    fn adding_one_backend_moves_only_flows_to_it_about_one_in_n() {
        let flows = flows(20_000);
        let before = backends(8);
        let after = backends(9);
        let new = after[8];
        let mut moved = 0;
        for &f in &flows {
            let (a, b) = (pick(f, &before), pick(f, &after));
            if a != b {
                assert_eq!(b, new, "a flow moved between two old backends");
                moved += 1;
            }
        }
        let share = moved as f64 / flows.len() as f64;
        assert!((0.08..0.145).contains(&share), "moved {share}, expected about 1/9");
    }

    #[test]
    fn removing_one_backend_moves_only_its_flows() {
        let flows = flows(20_000);
        let before = backends(8);
        let removed = before[3];
        let after: Vec<_> = before.iter().copied().filter(|b| *b != removed).collect();
        let mut moved = 0;
        for &f in &flows {
            let a = pick(f, &before);
            if a != pick(f, &after) {
                assert_eq!(a, removed, "a flow on a surviving backend moved");
                moved += 1;
            }
        }
        let share = moved as f64 / flows.len() as f64;
        assert!((0.09..0.16).contains(&share), "moved {share}, expected about 1/8");
    }

    #[test]
    fn flows_spread_evenly() {
        let flows = flows(40_000);
        let set = backends(4);
        let mut counts = [0u32; 4];
        for &f in &flows {
            let b = pick(f, &set);
            counts[set.iter().position(|x| *x == b).expect("picked from set")] += 1;
        }
        for c in counts {
            assert!((8_500..11_500).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn choice_does_not_depend_on_slot_order() {
        let flows = flows(1_000);
        let set = backends(5);
        let mut reversed = set.clone();
        reversed.reverse();
        for &f in &flows {
            assert_eq!(pick(f, &set), pick(f, &reversed));
        }
    }
}
