//! kube-proxy-style baselines: the iptables ruleset of its iptables mode
//! (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, applied with
//! `iptables-restore --noflush --counters` as kube-proxy does) and the
//! verdict-map ruleset of its nftables mode (applied with `nft -f`).

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// One service: VIP:80/TCP -> one endpoint pod:8080.
pub struct Svc {
    pub vip: Ipv4Addr,
    pub pod: Ipv4Addr,
}

fn svc_chain(i: usize) -> String {
    format!(
        "KUBE-SVC-{:016X}",
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

pub fn sep_chain(i: usize, generation: u8) -> String {
    format!(
        "KUBE-SEP-{:015X}{generation}",
        (i as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) >> 4
    )
}

fn services_rule(out: &mut String, i: usize, s: &Svc) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"bench/app-{i}:http cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 -j {}",
        s.vip,
        svc_chain(i)
    );
}

fn svc_and_sep_rules(out: &mut String, i: usize, pod: Ipv4Addr, generation: u8) {
    let (svc, sep) = (svc_chain(i), sep_chain(i, generation));
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"bench/app-{i}:http -> {pod}:8080\" -j {sep}"
    );
    let _ = writeln!(
        out,
        "-A {sep} -m comment --comment bench/app-{i}:http -s {pod}/32 -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(
        out,
        "-A {sep} -m comment --comment bench/app-{i}:http -m tcp -p tcp -j DNAT --to-destination {pod}:8080"
    );
}

/// The whole nat table kube-proxy writes on a full sync.
pub fn iptables_full(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 600 + 1024);
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    for i in 0..svcs.len() {
        let _ = writeln!(
            out,
            ":{} - [0:0]\n:{} - [0:0]",
            svc_chain(i),
            sep_chain(i, 0)
        );
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for (i, s) in svcs.iter().enumerate() {
        services_rule(&mut out, i, s);
    }
    for (i, s) in svcs.iter().enumerate() {
        svc_and_sep_rules(&mut out, i, s.pod, 0);
    }
    out.push_str("COMMIT\n");
    out
}

/// A kube-proxy partial sync after one endpoint of service `i` changed:
/// KUBE-SERVICES is rewritten in full (kube-proxy always writes it), the
/// changed service's chains are rewritten, the stale endpoint chain deleted.
pub fn iptables_one_change(svcs: &[Svc], i: usize, new_pod: Ipv4Addr, generation: u8) -> String {
    let mut out = String::with_capacity(svcs.len() * 200 + 1024);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    // The stale chain is declared (flushed) before it is deleted, as kube-proxy writes it.
    let _ = writeln!(
        out,
        ":{} - [0:0]\n:{} - [0:0]\n:{} - [0:0]",
        svc_chain(i),
        sep_chain(i, generation),
        sep_chain(i, 1 - generation)
    );
    for (j, s) in svcs.iter().enumerate() {
        services_rule(&mut out, j, s);
    }
    svc_and_sep_rules(&mut out, i, new_pod, generation);
    let _ = writeln!(out, "-X {}", sep_chain(i, 1 - generation));
    out.push_str("COMMIT\n");
    out
}

/// `iptables_full` for clients on the node too: kube-proxy also sends
/// OUTPUT through KUBE-SERVICES.
pub fn iptables_full_local(svcs: &[Svc]) -> String {
    let full = iptables_full(svcs);
    let portals = "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
    full.replacen(portals, &format!("{portals}-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"), 1)
}

pub const IPTABLES_EMPTY: &str =
    "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// kube-proxy's nftables mode: a `service-ips` verdict map keyed by
/// daddr . proto . port, one chain per service and per endpoint.
pub fn nft_full(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 400 + 1024);
    out.push_str("add table ip kube-proxy\n");
    out.push_str("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n");
    out.push_str("add chain ip kube-proxy services\n");
    out.push_str("add chain ip kube-proxy mark-for-masquerade\n");
    out.push_str("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    out.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n");
    out.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    out.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    for (i, s) in svcs.iter().enumerate() {
        let _ = writeln!(out, "add chain ip kube-proxy service-{i}");
        nft_endpoint(&mut out, i, s.pod, 0);
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto service-{i} }}",
            s.vip
        );
    }
    out
}

/// `nft_full` for clients on the node too: kube-proxy's nat-output chain.
pub fn nft_full_local(svcs: &[Svc]) -> String {
    let mut out = nft_full(svcs);
    out.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100 ; policy accept ; }\n");
    out.push_str("add rule ip kube-proxy nat-output jump services\n");
    out
}

fn nft_endpoint(out: &mut String, i: usize, pod: Ipv4Addr, generation: u8) {
    let _ = writeln!(out, "add chain ip kube-proxy endpoint-{i}-{generation}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy endpoint-{i}-{generation} ip saddr {pod} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy endpoint-{i}-{generation} meta l4proto tcp dnat to {pod}:8080"
    );
    let _ = writeln!(out, "flush chain ip kube-proxy service-{i}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy service-{i} numgen random mod 1 vmap {{ 0 : goto endpoint-{i}-{generation} }}"
    );
}

/// kube-proxy nftables partial sync: only the changed service's chains.
pub fn nft_one_change(i: usize, new_pod: Ipv4Addr, generation: u8) -> String {
    let mut out = String::new();
    nft_endpoint(&mut out, i, new_pod, generation);
    let old = 1 - generation;
    let _ = writeln!(out, "flush chain ip kube-proxy endpoint-{i}-{old}");
    let _ = writeln!(out, "delete chain ip kube-proxy endpoint-{i}-{old}");
    out
}

/// Runs `cmd args` inside netns `ns` with `input` on stdin; returns its wall time.
pub fn timed_stdin(ns: &str, cmd: &str, args: &[&str], input: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

pub fn iptables_restore(ns: &str, input: &str, noflush: bool) -> anyhow::Result<Duration> {
    let args: &[&str] = if noflush {
        &["--noflush", "--counters"]
    } else {
        &[]
    };
    timed_stdin(ns, "iptables-restore", args, input)
}

pub fn nft_apply(ns: &str, input: &str) -> anyhow::Result<Duration> {
    timed_stdin(ns, "nft", &["-f", "-"], input)
}

pub fn nft_clear(ns: &str) {
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "delete",
            "table",
            "ip",
            "kube-proxy",
        ])
        .stderr(Stdio::null())
        .status();
}
