//! Packet fixtures through BPF_PROG_TEST_RUN: the real programs, maps filled
//! by the agent's reconciler, output compared byte for byte (checksums
//! included) with a packet built independently, and counters checked.
//! Needs root; skipped (with a message) otherwise.

use serviceless_common::Verdict;
use serviceless_tests::{
    TEST_SIZES, TestDataplane, app, kernel_tests_enabled,
    packet::{ACK, L4, Packet, SYN, hex},
};

use serviceless_tests::fixture::*;

/// What a fixture expects from the ingress program.
enum Expect {
    /// Rewritten to this packet.
    Rewritten(Packet),
    /// Left exactly as it was.
    Unchanged,
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    expect: Expect,
    verdict: Verdict,
}

fn case(name: &'static str, input: Packet, action: u32, expect: Expect, verdict: Verdict) -> Case {
    Case { name, input: input.frame(), action, expect, verdict }
}

fn raw(name: &'static str, input: Vec<u8>, action: u32, verdict: Verdict) -> Case {
    Case { name, input, action, expect: Expect::Unchanged, verdict }
}

/// The standard desired state for fixtures.
fn dataplane() -> TestDataplane {
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load the dataplane");
    let outcome = dp.apply(vec![
        app("live.example.com", VIP, &[(POD, true)]),
        app("live6.example.com", VIP6, &[(POD6, true)]),
        app("asleep.example.com", "10.96.0.20", &[("10.244.2.2", false)]),
        app("a.example.com", "10.96.0.30", &[("10.244.3.2", true)]),
        app("b.example.com", "10.96.0.30", &[("10.244.3.3", true)]),
    ]);
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    dp
}

fn run_cases(dp: &TestDataplane, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in cases {
        let before = dp.verdicts();
        let (action, out) = dp.ingress(&c.input).expect("test run");
        let after = dp.verdicts();
        let counted = after[&c.verdict] - before[&c.verdict];
        let expected_bytes = match &c.expect {
            Expect::Rewritten(p) => p.frame(),
            Expect::Unchanged => c.input.clone(),
        };
        let mut problems = Vec::new();
        if action != c.action {
            problems.push(format!("action {action}, expected {}", c.action));
        }
        if out != expected_bytes {
            problems.push(format!(
                "output differs\n  input:\n{}\n  got:\n{}\n  expected:\n{}",
                hex(&c.input),
                hex(&out),
                hex(&expected_bytes)
            ));
        }
        if counted != 1 {
            let changed: Vec<_> = after.iter().filter(|(k, v)| before[k] != **v).map(|(k, _)| k.name()).collect();
            problems.push(format!("verdict {} counted {counted} times; counters that moved: {changed:?}", c.verdict.name()));
        }
        if !problems.is_empty() {
            failures.push(format!("[{}] {}", c.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{} fixture(s) failed:\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn ingress_fixtures() {
    if !kernel_tests_enabled("ingress_fixtures") {
        return;
    }
    let dp = dataplane();
    let syn = Packet::tcp(CLIENT, 40000, VIP, 80);
    let to_pod = |p: &Packet| Expect::Rewritten(p.nat(None, Some((POD, 8080))));
    let mut cases = vec![
        case("tcp syn to VIP -> pod", syn.clone(), XDP_PASS, to_pod(&syn), Verdict::BackendNewFlow),
        case("same flow again -> established", syn.clone(), XDP_PASS, to_pod(&syn), Verdict::BackendEstablished),
        {
            let p = Packet::udp(CLIENT, 40001, VIP, 53);
            case("udp to VIP -> pod", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((POD, 5353)))), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::new(CLIENT, VIP, L4::Udp { sport: 40002, dport: 53, zero_checksum: true });
            case("udp without checksum keeps zero", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((POD, 5353)))), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::tcp(CLIENT6, 40003, VIP6, 80);
            case("ipv6 tcp -> pod", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((POD6, 8080)))), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::udp(CLIENT6, 40004, VIP6, 53);
            case("ipv6 udp -> pod", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((POD6, 5353)))), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::tcp(CLIENT, 40005, VIP, 80).with(|p| p.vlan = Some(42));
            case("vlan tagged -> pod, tag kept", p.clone(), XDP_PASS, to_pod(&p), Verdict::BackendNewFlow)
        },
        {
            // Record-route style option: type 7, length 8, pointer 4, padding to 8 bytes.
            let p = Packet::tcp(CLIENT, 40006, VIP, 80).with(|p| p.ipv4_options = vec![7, 7, 4, 0, 0, 0, 0, 1]);
            case("ipv4 options -> pod", p.clone(), XDP_PASS, to_pod(&p), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::tcp(CLIENT6, 40007, VIP6, 80)
                .with(|p| p.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])]);
            case("ipv6 hop-by-hop + dest options -> pod", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((POD6, 8080)))), Verdict::BackendNewFlow)
        },
        {
            let p = Packet::tcp(CLIENT, 40008, "10.96.0.20", 80);
            case("app without ready pod -> activator", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((ACT, 8080)))), Verdict::ActivatorNoBackend)
        },
        {
            let p = Packet::tcp(CLIENT, 40009, VIP, 81);
            case("VIP port no app holds -> activator", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((ACT, 8080)))), Verdict::ActivatorUnknownService)
        },
        {
            let p = Packet::tcp(CLIENT, 40010, "10.96.9.9", 80);
            case("VIP in range no app holds -> activator", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((ACT, 8080)))), Verdict::ActivatorUnknownService)
        },
        {
            let p = Packet::tcp(CLIENT6, 40011, "fd00:96::99", 80);
            case("ipv6 unknown VIP -> ipv6 activator", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((ACT6, 8080)))), Verdict::ActivatorUnknownService)
        },
        {
            let p = Packet::tcp(CLIENT, 40012, "10.96.0.30", 80);
            case("contested VIP -> activator", p.clone(), XDP_PASS, Expect::Rewritten(p.nat(None, Some((ACT, 8080)))), Verdict::ActivatorCollision)
        },
        case("not a VIP -> untouched", Packet::tcp(CLIENT, 40013, "10.0.0.1", 80), XDP_PASS, Expect::Unchanged, Verdict::PassNotVip),
        case("ipv6 not a VIP -> untouched", Packet::tcp(CLIENT6, 40014, "2001:db8::1", 80), XDP_PASS, Expect::Unchanged, Verdict::PassNotVip),
        {
            let p = Packet::tcp(CLIENT, 40015, VIP, 80).with(|p| p.fragment = Some((0, true)));
            case("first fragment to VIP -> pod (it carries the ports)", p.clone(), XDP_PASS, to_pod(&p), Verdict::BackendNewFlow)
        },
        case(
            "later fragment whose first was never seen -> drop",
            Packet::new(CLIENT, VIP, L4::Raw { proto: 6, bytes: vec![0xab; 24] }).with(|p| {
                p.fragment = Some((185, false));
                p.ip_id = 0x7777;
            }),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropFragmentUnknown,
        ),
        case(
            "ipv6 fragment header to VIP -> drop",
            Packet::tcp(CLIENT6, 40017, VIP6, 80).with(|p| p.ipv6_ext = vec![(44, vec![0, 0, 0, 0, 0, 1])]),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropFragment,
        ),
        case(
            "icmp echo to VIP -> drop",
            Packet::new(CLIENT, VIP, L4::Raw { proto: 1, bytes: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0] }),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropUnsupportedProtocol,
        ),
        case(
            "gre to VIP -> drop",
            Packet::new(CLIENT, VIP, L4::Raw { proto: 47, bytes: vec![0; 8] }),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropUnsupportedProtocol,
        ),
        case(
            "sctp over ipv6 to VIP -> drop",
            Packet::new(CLIENT6, VIP6, L4::Raw { proto: 132, bytes: vec![0; 12] }),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropUnsupportedProtocol,
        ),
        case(
            "icmp echo elsewhere -> untouched",
            Packet::new(CLIENT, "10.0.0.1", L4::Raw { proto: 1, bytes: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0] }),
            XDP_PASS,
            Expect::Unchanged,
            Verdict::PassNotVip,
        ),
    ];

    // Truncations at every header boundary of a packet to the VIP.
    let full = Packet::tcp(CLIENT, 40020, VIP, 80).frame();
    for (name, len) in [
        ("truncated: ipv4 header cut before dst", 14 + 12),
        ("truncated: ipv4 header only, no tcp header", 14 + 20),
        ("truncated: tcp ports cut", 14 + 20 + 3),
        ("truncated: tcp header cut before checksum", 14 + 20 + 12),
    ] {
        cases.push(raw(name, full[..len].to_vec(), XDP_PASS, Verdict::PassMalformed));
    }
    let vlan = Packet::tcp(CLIENT, 40021, VIP, 80).with(|p| p.vlan = Some(7)).frame();
    cases.push(raw("truncated: vlan tag cut", vlan[..16].to_vec(), XDP_PASS, Verdict::PassMalformed));
    let v6 = Packet::tcp(CLIENT6, 40022, VIP6, 80).frame();
    cases.push(raw("truncated: ipv6 header cut", v6[..14 + 30].to_vec(), XDP_PASS, Verdict::PassMalformed));
    cases.push(raw("truncated: ipv6 l4 cut", v6[..14 + 40 + 2].to_vec(), XDP_PASS, Verdict::PassMalformed));
    let v6ext = Packet::tcp(CLIENT6, 40023, VIP6, 80).with(|p| p.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0])]).frame();
    cases.push(raw("truncated: ipv6 extension header cut", v6ext[..14 + 40 + 1].to_vec(), XDP_PASS, Verdict::PassMalformed));
    // Bad lengths and versions.
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    cases.push(raw("ipv4 ihl 4 (< 5)", bad_ihl, XDP_PASS, Verdict::PassMalformed));
    let mut long_total = full.clone();
    long_total[16..18].copy_from_slice(&2000u16.to_be_bytes());
    cases.push(raw("ipv4 total length beyond frame", long_total, XDP_PASS, Verdict::PassMalformed));
    let mut short_total = full.clone();
    short_total[16..18].copy_from_slice(&10u16.to_be_bytes());
    cases.push(raw("ipv4 total length below header", short_total, XDP_PASS, Verdict::PassMalformed));
    let mut huge_ihl = full.clone();
    huge_ihl[14] = 0x4f;
    cases.push(raw("ipv4 ihl 15 beyond the packet", huge_ihl, XDP_PASS, Verdict::PassMalformed));
    let mut wrong_version = full.clone();
    wrong_version[14] = 0x65;
    cases.push(raw("version 6 in an ipv4 ethertype", wrong_version, XDP_PASS, Verdict::PassMalformed));
    let mut v6_long = v6.clone();
    v6_long[18..20].copy_from_slice(&4000u16.to_be_bytes());
    cases.push(raw("ipv6 payload length beyond frame", v6_long, XDP_PASS, Verdict::PassMalformed));
    let arp = {
        let mut f = full[..12].to_vec();
        f.extend([0x08, 0x06]);
        f.extend([0u8; 28]);
        f
    };
    cases.push(raw("arp -> untouched", arp, XDP_PASS, Verdict::PassNotVip));

    run_cases(&dp, cases);
}

#[test]
fn no_activator_configured_drops_instead_of_misrouting() {
    if !kernel_tests_enabled("no_activator_configured") {
        return;
    }
    let mut dp = dataplane();
    dp.configure(None, None).expect("config");
    run_cases(
        &dp,
        vec![case(
            "unknown VIP without an activator -> drop",
            Packet::tcp(CLIENT, 41000, "10.96.9.9", 80),
            XDP_DROP,
            Expect::Unchanged,
            Verdict::DropNoActivator,
        )],
    );
}

#[test]
fn egress_reverse_nat_and_icmp_fixtures() {
    if !kernel_tests_enabled("egress_fixtures") {
        return;
    }
    let dp = dataplane();
    // Establish flows (v4 TCP, v4 UDP, v6 TCP, one to the activator).
    for p in [
        Packet::tcp(CLIENT, 42000, VIP, 80),
        Packet::udp(CLIENT, 42001, VIP, 53),
        Packet::tcp(CLIENT6, 42002, VIP6, 80),
        Packet::tcp(CLIENT, 42003, "10.96.0.20", 80),
    ] {
        let (action, _) = dp.ingress(&p.frame()).expect("run");
        assert_eq!(action, XDP_PASS);
    }
    let reply = |src: &str, sport: u16, dst: &str, dport: u16| {
        Packet::new(src, dst, L4::Tcp { sport, dport, flags: SYN | ACK })
    };
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, Verdict)> = vec![
        {
            let p = reply(POD, 8080, CLIENT, 42000);
            ("tcp reply from pod leaves as VIP:80", p.frame(), p.nat(Some((VIP, 80)), None).frame(), Verdict::ReplyTranslated)
        },
        {
            let p = Packet::udp(POD, 5353, CLIENT, 42001);
            ("udp reply leaves as VIP:53", p.frame(), p.nat(Some((VIP, 53)), None).frame(), Verdict::ReplyTranslated)
        },
        {
            let p = reply(POD6, 8080, CLIENT6, 42002);
            ("ipv6 reply leaves as VIP", p.frame(), p.nat(Some((VIP6, 80)), None).frame(), Verdict::ReplyTranslated)
        },
        {
            let p = reply(ACT, 8080, CLIENT, 42003);
            ("activator reply leaves as VIP", p.frame(), p.nat(Some(("10.96.0.20", 80)), None).frame(), Verdict::ReplyTranslated)
        },
        {
            let p = reply(POD, 8080, CLIENT, 49999);
            ("reply of an unknown flow untouched", p.frame(), p.frame(), Verdict::EgressPass)
        },
        {
            // The pod says "port unreachable" about the client's packet to it.
            let quoted = Packet::udp(CLIENT, 42001, POD, 5353);
            let err = Packet::new(POD, CLIENT, L4::IcmpError { icmp_type: 3, code: 3, inner: Box::new(quoted.clone()) });
            let want = Packet::new(VIP, CLIENT, L4::IcmpError {
                icmp_type: 3,
                code: 3,
                inner: Box::new(quoted.nat(None, Some((VIP, 53)))),
            });
            ("icmp error from pod quotes the VIP", err.frame(), want.frame(), Verdict::IcmpErrorTranslated)
        },
        {
            let quoted = Packet::tcp(CLIENT6, 42002, POD6, 8080);
            let err = Packet::new(POD6, CLIENT6, L4::IcmpError { icmp_type: 1, code: 4, inner: Box::new(quoted.clone()) });
            let want = Packet::new(VIP6, CLIENT6, L4::IcmpError {
                icmp_type: 1,
                code: 4,
                inner: Box::new(quoted.nat(None, Some((VIP6, 80)))),
            });
            ("icmpv6 error from pod quotes the VIP", err.frame(), want.frame(), Verdict::IcmpErrorTranslated)
        },
    ];
    let mut failures = Vec::new();
    for (name, input, want, verdict) in cases {
        let before = dp.verdicts();
        let (action, out) = dp.egress(&input).expect("run");
        let counted = dp.verdicts()[&verdict] - before[&verdict];
        if action != TC_ACT_OK || out != want || counted != 1 {
            failures.push(format!(
                "[{name}] action {action} counted {counted}\n input:\n{}\n got:\n{}\n want:\n{}",
                hex(&input),
                hex(&out),
                hex(&want)
            ));
        }
    }
    // Ingress ICMP error from the client about a reply: goes to the pod, quoting the pod.
    let quoted = Packet::tcp(VIP, 80, CLIENT, 42000);
    let err = Packet::new(CLIENT, VIP, L4::IcmpError { icmp_type: 3, code: 4, inner: Box::new(quoted.clone()) });
    let want = Packet::new(CLIENT, POD, L4::IcmpError {
        icmp_type: 3,
        code: 4,
        inner: Box::new(quoted.nat(Some((POD, 8080)), None)),
    });
    let before = dp.verdicts();
    let (action, out) = dp.ingress(&err.frame()).expect("run");
    let counted = dp.verdicts()[&Verdict::IcmpErrorTranslated] - before[&Verdict::IcmpErrorTranslated];
    if action != XDP_PASS || out != want.frame() || counted != 1 {
        failures.push(format!(
            "[ingress icmp error about a reply] action {action} counted {counted}\n got:\n{}\n want:\n{}",
            hex(&out),
            hex(&want.frame())
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn as_refs(v: &[(String, bool)]) -> Vec<(&str, bool)> {
    v.iter().map(|(a, r)| (a.as_str(), *r)).collect()
}

/// The backend of the connection from a client port. A SYN opens it, or
/// (a retransmission) follows the connection already tracked.
fn backend_of(dp: &TestDataplane, sport: u16) -> std::net::IpAddr {
    let p = Packet::tcp(CLIENT, sport, VIP, 80);
    let (action, out) = dp.ingress(&p.frame()).expect("run");
    assert_eq!(action, XDP_PASS);
    std::net::IpAddr::from(<[u8; 4]>::try_from(&out[14 + 16..14 + 20]).expect("4 bytes"))
}

#[test]
fn consistent_hash_moves_about_one_in_n_and_flows_stay() {
    if !kernel_tests_enabled("consistent_hash") {
        return;
    }
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load");
    let pods4: Vec<(String, bool)> = (1..=4).map(|i| (format!("10.244.1.{i}"), true)).collect();
    dp.apply(vec![app("live.example.com", VIP, &as_refs(&pods4))]);
    let ports: Vec<u16> = (20000..22000).collect();
    let first: Vec<_> = ports.iter().map(|&p| backend_of(&dp, p)).collect();
    let mut per_backend = std::collections::HashMap::new();
    for b in &first {
        *per_backend.entry(*b).or_insert(0) += 1;
    }
    assert_eq!(per_backend.len(), 4, "all backends get flows: {per_backend:?}");
    assert!(per_backend.values().all(|&n| n > 350), "even spread: {per_backend:?}");

    let mut pods5 = pods4.clone();
    pods5.push(("10.244.1.5".into(), true));
    dp.apply(vec![app("live.example.com", VIP, &as_refs(&pods5))]);
    let kept: Vec<_> = ports.iter().map(|&p| backend_of(&dp, p)).collect();
    assert_eq!(first, kept, "established flows keep their backend when one is added");

    dp.clear_conntrack().expect("clear conntrack");
    let rehashed: Vec<_> = ports.iter().map(|&p| backend_of(&dp, p)).collect();
    let new: std::net::IpAddr = "10.244.1.5".parse().expect("ip");
    let mut moved = 0;
    for (a, b) in first.iter().zip(&rehashed) {
        if a != b {
            assert_eq!(*b, new, "a flow moved between two old backends");
            moved += 1;
        }
    }
    let share = moved as f64 / ports.len() as f64;
    assert!((0.14..0.27).contains(&share), "new flows moved {share:.3}, expected about 1/5");

    // A backend turning not-ready keeps its flows; removing it moves only them.
    let draining = first[0];
    let pods_draining: Vec<(String, bool)> =
        pods5.iter().map(|(a, r)| (a.clone(), *r && a.parse::<std::net::IpAddr>().ok() != Some(draining))).collect();
    dp.apply(vec![app("live.example.com", VIP, &as_refs(&pods_draining))]);
    assert_eq!(backend_of(&dp, ports[0]), draining, "established flow stays on a draining backend");
    let pods_removed: Vec<(String, bool)> =
        pods5.iter().filter(|(a, _)| a.parse::<std::net::IpAddr>().ok() != Some(draining)).cloned().collect();
    dp.apply(vec![app("live.example.com", VIP, &as_refs(&pods_removed))]);
    let after: Vec<_> = ports.iter().map(|&p| backend_of(&dp, p)).collect();
    for ((before, now), port) in rehashed.iter().zip(&after).zip(&ports) {
        if *before == draining {
            assert_ne!(*now, draining, "port {port}: flow still sent to a removed pod");
        } else {
            assert_eq!(before, now, "port {port}: a flow on a surviving pod moved");
        }
    }
}

#[test]
fn full_map_is_reported_and_disturbs_nothing_else() {
    if !kernel_tests_enabled("full_map") {
        return;
    }
    let sizes = serviceless_agent::dataplane::Sizes { services: 6, ..TEST_SIZES };
    let mut dp = TestDataplane::new(sizes).expect("load");
    // Each app has two ports: three apps fit, the fourth does not.
    let apps: Vec<_> = (1..=4)
        .map(|i| app(&format!("app{i}.example.com"), &format!("10.96.1.{i}"), &[(&format!("10.244.5.{i}"), true)]))
        .collect();
    let outcome = dp.apply(apps.clone());
    assert_eq!(outcome.failed, vec!["app4.example.com".to_string()], "{outcome:?}");
    let text = dp.metrics.encode().expect("metrics");
    assert!(
        text.lines().any(|l| l.starts_with("serviceless_map_write_errors_total{map=\"svl_services_v1\"} ") && !l.ends_with(" 0")),
        "map write error metric missing:\n{text}"
    );
    for i in 1..=3 {
        let p = Packet::tcp(CLIENT, 43000 + i, &format!("10.96.1.{i}"), 80);
        let (action, out) = dp.ingress(&p.frame()).expect("run");
        assert_eq!((action, out), (XDP_PASS, p.nat(None, Some((&format!("10.244.5.{i}"), 8080))).frame()), "app{i}");
    }
    // The app that did not fit goes to the activator rather than anywhere wrong.
    let p = Packet::tcp(CLIENT, 43010, "10.96.1.4", 80);
    let (_, out) = dp.ingress(&p.frame()).expect("run");
    assert_eq!(out, p.nat(None, Some((ACT, 8080))).frame());
    // Freeing room lets a retry succeed.
    let outcome = dp.apply(apps[1..].to_vec());
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    let (_, out) = dp.ingress(&p.frame()).expect("run");
    assert_eq!(out, p.nat(None, Some(("10.244.5.4", 8080))).frame());
}

#[test]
fn aborted_is_never_returned_for_garbage() {
    if !kernel_tests_enabled("garbage") {
        return;
    }
    let dp = dataplane();
    // Deterministic pseudo-random frames, some with our VIP and ethertypes planted.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let template = Packet::tcp(CLIENT, 44000, VIP, 80).frame();
    for i in 0..2000 {
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let len = 14 + (next() % 110) as usize;
        let mut frame: Vec<u8> = if i % 2 == 0 {
            let mut f = template.clone();
            f.resize(len, 0);
            f
        } else {
            (0..len).map(|_| next() as u8).collect()
        };
        for _ in 0..(next() % 4) {
            if !frame.is_empty() {
                let at = (next() as usize) % frame.len();
                frame[at] = next() as u8;
            }
        }
        let (action, _) = dp.ingress(&frame).expect("run");
        assert_ne!(action, XDP_ABORTED, "frame {i} aborted:\n{}", hex(&frame));
        let (tc, _) = dp.egress(&frame).unwrap_or((0, Vec::new()));
        assert_eq!(tc, TC_ACT_OK, "egress never drops");
    }
}
