//! The agent's side of connection tracking: running the in-kernel garbage
//! collector (`svl_ct_gc`, through BPF_PROG_TEST_RUN) on a timer, the
//! timeouts and flood budget written to the config map, and the flow hash
//! key every node must share.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use serviceless_common::{Config, program_names};
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// Conntrack settings the kernel reads from the config map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub syn: Duration,
    pub established: Duration,
    pub close: Duration,
    pub udp: Duration,
    /// New connections each CPU may track per second (0: unlimited).
    pub new_per_cpu_per_sec: u32,
}

impl Timeouts {
    /// Writes them into the kernel config entry.
    pub fn apply(&self, c: &mut Config) {
        let secs = |d: Duration| d.as_secs().clamp(1, u32::MAX as u64) as u32;
        c.ct_syn_timeout_s = secs(self.syn);
        c.ct_established_timeout_s = secs(self.established);
        c.ct_close_timeout_s = secs(self.close);
        c.ct_udp_timeout_s = secs(self.udp);
        c.ct_new_per_cpu_per_sec = self.new_per_cpu_per_sec;
    }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the kernel programs
/// stamp conntrack entries and activity with.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs one garbage-collection pass in the kernel; returns how long it took.
pub fn collect(ebpf: &Ebpf) -> anyhow::Result<Duration> {
    let prog: &Xdp = ebpf
        .program(program_names::CT_GC)
        .context("conntrack GC program missing from the eBPF object")?
        .try_into()?;
    // XDP test runs need a frame; the GC program does not read it.
    let frame = [0u8; 64];
    let started = Instant::now();
    prog.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })
        .context("running the conntrack GC program (BPF_PROG_TEST_RUN)")?;
    Ok(started.elapsed())
}

/// Collects garbage every `interval` until the process exits. Runs on its
/// own thread: a pass over a million entries takes milliseconds of kernel
/// time, which must not stall the async runtime.
pub fn spawn_gc(ebpf: Ebpf, interval: Duration, metrics: Metrics) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ct-gc".into())
        .spawn(move || {
            let mut failures = 0u32;
            loop {
                std::thread::sleep(interval);
                match collect(&ebpf) {
                    Ok(took) => {
                        failures = 0;
                        metrics.ct_gc_duration.observe(took.as_secs_f64());
                        debug!(took_us = took.as_micros() as u64, "conntrack GC pass");
                    }
                    Err(e) => {
                        metrics.ct_gc_errors.inc();
                        failures += 1;
                        // Once per streak, so a persistent failure is seen but does not flood the log.
                        if failures == 1 {
                            warn!(error = %format!("{e:#}"), "conntrack GC pass failed; expired connections stay until it works");
                        }
                    }
                }
            }
        })
        .context("starting the conntrack GC thread")
}

/// Length of the flow hash key in a key file (128 bits, as hex).
const KEY_HEX_LEN: usize = 32;

/// Where the flow hash key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKeySource {
    /// A file holding 32 hex digits (in Kubernetes: a Secret shared by every node).
    File(PathBuf),
    /// Keep the key already in the pinned config, or make a random one for
    /// this node (nodes then disagree on which pod a flow gets).
    NodeLocal,
}

/// The key for `Config::hash_key`. `pinned` is the key the running
/// dataplane already uses, if any: a restart must not change it.
pub fn hash_key(source: &HashKeySource, pinned: Option<[u64; 2]>) -> anyhow::Result<[u64; 2]> {
    match source {
        HashKeySource::File(path) => read_key_file(path),
        HashKeySource::NodeLocal => match pinned {
            Some(key) if key != [0, 0] => Ok(key),
            _ => {
                warn!(
                    "no --flow-hash-key-file: using a random flow hash key for this node; give every node the same key so they pick the same pod for a flow"
                );
                random_key()
            }
        },
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<[u64; 2]> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the flow hash key from {} (--flow-hash-key-file); in Kubernetes create it once per cluster: kubectl -n kube-system create secret generic serviceless-flow-hash-key --from-literal=key=$(openssl rand -hex 16)",
            path.display()
        )
    })?;
    parse_key(text.trim()).with_context(|| format!("flow hash key in {}", path.display()))
}

/// 32 hex digits -> the two SipHash key words.
pub fn parse_key(hex: &str) -> anyhow::Result<[u64; 2]> {
    if hex.len() != KEY_HEX_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "expected {KEY_HEX_LEN} hex digits (128 bits), got {} characters; make one with `openssl rand -hex 16`",
            hex.len()
        );
    }
    let word = |s: &str| u64::from_str_radix(s, 16).context("hex digits");
    let key = [word(&hex[..16])?, word(&hex[16..])?];
    if key == [0, 0] {
        bail!("an all-zero key is no secret; make one with `openssl rand -hex 16`");
    }
    Ok(key)
}

fn random_key() -> anyhow::Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    // SAFETY: valid buffer of the given length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom for the flow hash key");
    }
    let (a, b) = bytes.split_at(8);
    Ok([u64::from_ne_bytes(a.try_into()?), u64::from_ne_bytes(b.try_into()?)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_must_hold_128_bits_of_hex() {
        assert_eq!(
            parse_key("000102030405060708090a0b0c0d0e0f").unwrap(),
            [0x0001_0203_0405_0607, 0x0809_0a0b_0c0d_0e0f]
        );
        for bad in ["", "abc", "zz0102030405060708090a0b0c0d0e0f", "000102030405060708090a0b0c0d0e0f00"] {
            let err = parse_key(bad).unwrap_err().to_string();
            assert!(err.contains("openssl rand -hex 16"), "{bad}: {err}");
        }
        assert!(parse_key(&"0".repeat(32)).is_err(), "all-zero key refused");
    }

    #[test]
    fn a_node_local_key_survives_restarts() {
        let pinned = [7, 9];
        assert_eq!(hash_key(&HashKeySource::NodeLocal, Some(pinned)).unwrap(), pinned);
        let fresh = hash_key(&HashKeySource::NodeLocal, None).unwrap();
        assert_ne!(fresh, [0, 0]);
        assert_ne!(fresh, hash_key(&HashKeySource::NodeLocal, Some([0, 0])).unwrap(), "random each time");
    }
}
