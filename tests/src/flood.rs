//! A spoofed TCP SYN flood from inside a test namespace: IPv4 SYNs from
//! 198.18.0.0/15 (the benchmarking range) through a raw socket
//! (IP_HDRINCL), bounded in count and time.

use std::{
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{netns, packet::Packet};

/// How hard and how long to flood.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    /// At most this many SYNs.
    pub count: u32,
    /// For at most this long.
    pub max: Duration,
    /// Pause this long after every 1,000 SYNs (`ZERO`: as fast as possible).
    pub pause_per_1000: Duration,
}

/// Sends the flood to `vip` from inside network namespace `ns`; returns how
/// many SYNs were sent.
pub fn syn_flood(ns: &str, vip: SocketAddr, flood: Flood) -> anyhow::Result<u32> {
    let ns = ns.to_string();
    thread::spawn(move || -> anyhow::Result<u32> {
        netns::enter(&ns)?;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(libc::IPPROTO_RAW)))
            .context("raw socket (needs CAP_NET_RAW)")?;
        let dst = socket2::SockAddr::from(vip);
        let deadline = Instant::now() + flood.max;
        let mut sent = 0;
        for i in 0..flood.count {
            if i % 1000 == 999 {
                if !flood.pause_per_1000.is_zero() {
                    thread::sleep(flood.pause_per_1000);
                }
                if Instant::now() > deadline {
                    break;
                }
            }
            let src = Ipv4Addr::new(198, 18 + ((i >> 16) % 2) as u8, (i >> 8) as u8, i as u8).to_string();
            let syn = Packet::tcp(&src, 1024 + (i % 60000) as u16, &vip.ip().to_string(), vip.port()).with(|p| p.payload.clear());
            if sock.send_to(&syn.ip_bytes(), &dst).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
}
