//! Incremental Internet checksum updates (RFC 1624, eqn. 3), as 16-bit
//! big-endian words read from the packet. Used by XDP, where the skb checksum
//! helpers do not exist.

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Accumulates the change of one 16-bit word (`~old + new`).
#[inline(always)]
pub const fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + (!old) as u32 + new as u32
}

/// One's-complement sum of the eight 16-bit words of a 16-byte address,
/// from two 64-bit loads (no byte loop: cheap, and light on the BPF stack).
/// Native-order loads sum the byte-swapped words on little-endian
/// machines, and the sum of swapped words is the swapped sum (RFC 1071).
#[inline(always)]
pub fn sum_addr16(addr: &[u8; 16]) -> u16 {
    let (w0, w1) = crate::addr_words(addr);
    let mut s = (w0 & 0xffff_ffff) + (w0 >> 32) + (w1 & 0xffff_ffff) + (w1 >> 32);
    s = (s & 0xffff) + ((s >> 16) & 0xffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    u16::from_be(s as u16)
}

/// Accumulates the change of a 16-byte address (`~sum(old) + sum(new)`:
/// the per-word changes added up).
#[inline(always)]
pub fn diff_addr16(acc: u32, old: &[u8; 16], new: &[u8; 16]) -> u32 {
    let acc = acc + (!sum_addr16(old)) as u32 + sum_addr16(new) as u32;
    // Keep the accumulator far from overflow for callers that chain several.
    (acc & 0xffff) + (acc >> 16)
}

/// Accumulates the change of a 4-byte address.
#[inline(always)]
pub const fn diff_addr4(acc: u32, old: [u8; 4], new: [u8; 4]) -> u32 {
    let acc = diff16(acc, u16::from_be_bytes([old[0], old[1]]), u16::from_be_bytes([new[0], new[1]]));
    diff16(acc, u16::from_be_bytes([old[2], old[3]]), u16::from_be_bytes([new[2], new[3]]))
}

/// The new checksum field after words changed by `acc` (from `diff*`).
#[inline(always)]
pub const fn apply(check: u16, acc: u32) -> u16 {
    !fold((!check) as u32 + acc)
}

/// Adds the big-endian 16-bit words of `data` (even length) to a running
/// sum; `!fold(sum)` of a whole header is its checksum. Fixed sizes keep the
/// loop bounded for the verifier.
#[inline(always)]
pub fn add_words<const N: usize>(mut acc: u32, data: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    (acc & 0xffff) + (acc >> 16)
}

/// Full checksum over `data` (used by tests and fixture builders).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_update_equals_full_recompute() {
        // A 20-byte IPv4 header with its checksum field at bytes 10..12.
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 198, 51, 100, 7, 10, 96, 0, 1,
        ];
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&hdr), 0, "header with its checksum sums to zero");

        for new in [[10u8, 244, 1, 2], [0, 0, 0, 0], [255, 255, 255, 255], [10, 96, 0, 1]] {
            let mut h = hdr;
            let old = [h[16], h[17], h[18], h[19]];
            h[16..20].copy_from_slice(&new);
            let check = u16::from_be_bytes([h[10], h[11]]);
            let updated = apply(check, diff_addr4(0, old, new));
            h[10..12].copy_from_slice(&updated.to_be_bytes());
            assert_eq!(checksum(&h), 0, "incremental update to {new:?} is valid");
        }
    }

    #[test]
    fn address_sum_equals_the_word_by_word_sum() {
        for seed in 0..200u32 {
            let a: [u8; 16] = core::array::from_fn(|i| (seed.wrapping_mul(2_654_435_761) >> (i % 24)) as u8 ^ i as u8);
            let mut sum = 0u32;
            for w in a.chunks_exact(2) {
                sum += u16::from_be_bytes([w[0], w[1]]) as u32;
            }
            let by_words = fold(sum);
            let ours = sum_addr16(&a);
            // 0x0000 and 0xffff are the same one's-complement value.
            assert!(ours == by_words || (ours | by_words) == 0xffff && (ours & by_words) == 0, "{a:?}: {ours:#x} vs {by_words:#x}");
        }
    }

    #[test]
    fn word_sums_equal_the_full_checksum() {
        let data: [u8; 20] = core::array::from_fn(|i| (i * 29 + 3) as u8);
        assert_eq!(!fold(add_words(0, &data)), checksum(&data));
    }

    #[test]
    fn sixteen_byte_update_is_valid() {
        let mut data = [0u8; 34];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        data[32] = 0;
        data[33] = 0;
        let c = checksum(&data);
        data[32..34].copy_from_slice(&c.to_be_bytes());
        let old: [u8; 16] = data[0..16].try_into().expect("16 bytes");
        let new = [0xfe; 16];
        data[0..16].copy_from_slice(&new);
        let check = u16::from_be_bytes([data[32], data[33]]);
        let updated = apply(check, diff_addr16(0, &old, &new));
        data[32..34].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(checksum(&data), 0);
    }
}
