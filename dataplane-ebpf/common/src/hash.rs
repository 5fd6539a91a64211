//! Flow hashing and backend choice by rendezvous (highest random weight)
//! hashing: each backend's score for a flow depends only on the flow and that
//! backend, so adding or removing one of N backends moves only the flows that
//! backend wins or held, about 1/N of them, and no others.

use crate::{Addr, FlowKey, addr_words};

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

/// Hash of a client flow (its 5-tuple as received).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u64 {
    let (shi, slo) = addr_words(&key.src);
    let (dhi, dlo) = addr_words(&key.dst);
    let ports = ((key.sport as u64) << 32) | ((key.dport as u64) << 16) | key.proto as u64;
    mix64(mix64(mix64(shi ^ mix64(slo)) ^ dhi) ^ mix64(dlo ^ ports))
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

    fn flows(n: u32) -> Vec<u64> {
        (0..n)
            .map(|i| {
                let key = FlowKey {
                    src: ipv4_mapped([198, 51, (i >> 8) as u8, i as u8]),
                    dst: ipv4_mapped([10, 96, 0, 1]),
                    sport: (1024 + i % 50_000) as u16,
                    dport: 80,
                    proto: 6,
                    pad: [0; 3],
                };
                flow_hash(&key)
            })
            .collect()
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
