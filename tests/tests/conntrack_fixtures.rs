//! Connection tracking through BPF_PROG_TEST_RUN: the real programs and GC,
//! maps filled by the agent's reconciler, every output packet compared byte
//! for byte with one built independently (`serviceless_tests::packet`), and
//! the conntrack table and counters checked after each step.
//! Needs root; skipped (with a message) otherwise.

use std::{net::IpAddr, thread, time::Duration};

use serviceless_agent::maps::CtTable;
use serviceless_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CT_KIND_ACTIVATOR, CT_STATE_CLOSING, CT_STATE_ESTABLISHED,
    CT_STATE_SYN_RECV, CtEvent, CtKey, Verdict, ipv4_mapped,
};
use serviceless_tests::{
    TEST_SIZES, TestDataplane, app, kernel_tests_enabled,
    packet::{ACK, FIN, L4, Packet, RST, SYN, hex},
    pin_to_cpu0,
};

use serviceless_tests::fixture::{ACT, CLIENT, CLIENT6, POD, POD6, VIP, VIP6, XDP_DROP, XDP_PASS, XDP_TX};

const ASLEEP: &str = "10.96.0.20";
const UNUSED: &str = "10.96.9.9";

fn dataplane() -> TestDataplane {
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load the dataplane");
    let outcome = dp.apply(vec![
        app("live.example.com", VIP, &[(POD, true)]),
        app("live6.example.com", VIP6, &[(POD6, true)]),
        app("asleep.example.com", ASLEEP, &[]),
    ]);
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    dp
}

/// Runs ingress on `input`; checks the action, the output and that exactly
/// `verdict` was counted once.
#[track_caller]
fn ingress(dp: &TestDataplane, what: &str, input: &[u8], action: u32, want: &[u8], verdict: Verdict) {
    let before = dp.verdicts();
    let (got_action, out) = dp.ingress(input).expect("test run");
    let after = dp.verdicts();
    let moved: Vec<_> = after.iter().filter(|(k, v)| before[k] != **v).map(|(k, _)| k.name()).collect();
    assert!(
        got_action == action && out == want && after[&verdict] - before[&verdict] == 1,
        "[{what}] action {got_action} (want {action}), counters moved: {moved:?} (want {})\n input:\n{}\n got:\n{}\n want:\n{}",
        verdict.name(),
        hex(input),
        hex(&out),
        hex(want)
    );
}

/// Runs egress on `input`; checks the output and the verdict.
#[track_caller]
fn egress(dp: &TestDataplane, what: &str, input: &[u8], want: &[u8], verdict: Verdict) {
    let before = dp.verdicts();
    let (action, out) = dp.egress(input).expect("test run");
    let after = dp.verdicts();
    let moved: Vec<_> = after.iter().filter(|(k, v)| before[k] != **v).map(|(k, _)| k.name()).collect();
    assert!(
        action == 0 && out == want && after[&verdict] - before[&verdict] == 1,
        "[{what}] tc action {action}, counters moved: {moved:?} (want {})\n input:\n{}\n got:\n{}\n want:\n{}",
        verdict.name(),
        hex(input),
        hex(&out),
        hex(want)
    );
}

fn event_delta(dp: &TestDataplane, before: &std::collections::HashMap<CtEvent, u64>, e: CtEvent) -> u64 {
    dp.ct_events()[&e] - before[&e]
}

fn verdict_delta(dp: &TestDataplane, before: &std::collections::HashMap<Verdict, u64>, v: Verdict) -> u64 {
    dp.verdicts()[&v] - before[&v]
}

fn total_delta(dp: &TestDataplane, before: &std::collections::HashMap<Verdict, u64>) -> u64 {
    dp.verdicts().iter().map(|(k, v)| v - before[k]).sum()
}

fn addr(s: &str) -> [u8; 16] {
    match s.parse::<IpAddr>().expect("address") {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn forward_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey {
    CtKey { src: addr(src), dst: addr(dst), sport: sport.to_be(), dport: dport.to_be(), proto, dir: CT_DIR_FORWARD, pad: [0; 2] }
}

fn reply_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey {
    CtKey { dir: CT_DIR_REPLY, ..forward_key(src, sport, dst, dport, proto) }
}

/// A TCP handshake client:sport -> VIP:80 through both programs, to `pod`:8080.
fn handshake(dp: &TestDataplane, client: &str, sport: u16, vip: &str, pod: &str) {
    let syn = Packet::tcp(client, sport, vip, 80);
    let (a, _) = dp.ingress(&syn.frame()).expect("syn");
    assert_eq!(a, XDP_PASS);
    let synack = Packet::tcp(pod, 8080, client, sport).flags(SYN | ACK);
    egress(dp, "syn-ack", &synack.frame(), &synack.nat(Some((vip, 80)), None).frame(), Verdict::ReplyTranslated);
    // The client acknowledges the pod's initial sequence number.
    let ack = syn.clone().flags(ACK).with(|p| p.ack = synack.seq + 1);
    let (a, _) = dp.ingress(&ack.frame()).expect("ack");
    assert_eq!(a, XDP_PASS);
}

#[test]
fn a_connection_is_one_truth_and_a_lost_reply_entry_is_rebuilt() {
    if !kernel_tests_enabled("conntrack: one truth") {
        return;
    }
    let dp = dataplane();
    handshake(&dp, CLIENT, 50000, VIP, POD);
    let fwd = forward_key(CLIENT, 50000, VIP, 80, 6);
    let rev = reply_key(POD, 8080, CLIENT, 50000, 6);
    let table = dp.conntrack();
    let entry = table.iter().find(|(k, _)| *k == fwd).map(|(_, e)| *e).expect("forward entry");
    assert_eq!(entry.state, CT_STATE_ESTABLISHED, "handshake seen from both directions: {entry:?}");
    assert_eq!(dp.conntrack_table(&fwd), Some(CtTable::Established), "the completed handshake moved it");
    assert!(table.iter().any(|(k, _)| *k == rev), "reply entry");
    assert_eq!(table.len(), 2, "exactly two entries per connection: {table:?}");

    // Lose the reply direction (the old design lost it to LRU eviction).
    dp.delete_conntrack(&rev).expect("delete reply entry");
    let reply = Packet::tcp(POD, 8080, CLIENT, 50000).flags(ACK);
    egress(&dp, "reply without its reply entry", &reply.frame(), &reply.frame(), Verdict::EgressPass);
    // The next client packet after the refresh interval rebuilds it.
    let mut aged = entry;
    aged.last_seen_ns -= 2_000_000_000;
    dp.put_conntrack(&fwd, &aged).expect("age entry");
    let before = dp.ct_events();
    let data = Packet::tcp(CLIENT, 50000, VIP, 80).flags(ACK);
    ingress(&dp, "client data", &data.frame(), XDP_PASS, &data.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);
    assert_eq!(event_delta(&dp, &before, CtEvent::ReplyRepaired), 1);
    egress(&dp, "reply after repair", &reply.frame(), &reply.nat(Some((VIP, 80)), None).frame(), Verdict::ReplyTranslated);

    // A reply entry whose connection is gone is stale: removed, not used.
    dp.delete_conntrack(&fwd).expect("delete forward entry");
    egress(&dp, "reply of a vanished connection", &reply.frame(), &reply.frame(), Verdict::EgressStaleReply);
    assert!(dp.conntrack().is_empty(), "stale reply entry removed: {:?}", dp.conntrack());
}

#[test]
fn one_client_port_to_two_vips_through_the_activator_keeps_both_apart() {
    if !kernel_tests_enabled("conntrack: activator identity") {
        return;
    }
    let dp = dataplane();
    let a = Packet::tcp(CLIENT, 41000, ASLEEP, 80);
    ingress(&dp, "first VIP -> activator", &a.frame(), XDP_PASS, &a.nat(None, Some((ACT, 8080))).frame(), Verdict::ActivatorNoBackend);
    // The same client ip:port to another VIP (an L7 proxy reuses source ports).
    let before = dp.ct_events();
    let b = Packet::tcp(CLIENT, 41000, UNUSED, 80);
    let (action, out) = dp.ingress(&b.frame()).expect("run");
    assert_eq!(action, XDP_PASS);
    assert_eq!(event_delta(&dp, &before, CtEvent::PortRewritten), 1, "the clash is resolved by a port rewrite");
    let rewritten = u16::from_be_bytes([out[14 + 20], out[14 + 21]]);
    assert!((32768..61000).contains(&rewritten), "rewritten client port {rewritten}");
    assert_eq!(out, b.nat(Some((CLIENT, rewritten)), Some((ACT, 8080))).frame(), "second connection to the activator");

    // Each reply leaves from its own VIP, to the client's own port.
    let ra = Packet::tcp(ACT, 8080, CLIENT, 41000).flags(SYN | ACK);
    egress(&dp, "activator reply, first VIP", &ra.frame(), &ra.nat(Some((ASLEEP, 80)), None).frame(), Verdict::ReplyTranslated);
    let rb = Packet::tcp(ACT, 8080, CLIENT, rewritten).flags(SYN | ACK);
    egress(
        &dp,
        "activator reply, second VIP",
        &rb.frame(),
        &rb.nat(Some((UNUSED, 80)), Some((CLIENT, 41000))).frame(),
        Verdict::ReplyTranslated,
    );
    // The activator can tell which VIP each connection was for from the reply entry.
    let table = dp.conntrack();
    let vip_of = |port: u16| {
        table
            .iter()
            .find(|(k, _)| *k == reply_key(ACT, 8080, CLIENT, port, 6))
            .map(|(_, e)| (e.addr, u16::from_be(e.port)))
    };
    assert_eq!(vip_of(41000), Some((addr(ASLEEP), 80)));
    assert_eq!(vip_of(rewritten), Some((addr(UNUSED), 80)));
}

#[test]
fn spoofed_segments_create_nothing_and_move_nothing() {
    if !kernel_tests_enabled("conntrack: spoofing") {
        return;
    }
    let mut dp = dataplane();
    // A victim held by the activator, handshake complete.
    let victim = Packet::tcp(CLIENT, 42000, ASLEEP, 80);
    dp.ingress(&victim.frame()).expect("syn");
    let synack = Packet::tcp(ACT, 8080, CLIENT, 42000).flags(SYN | ACK);
    dp.egress(&synack.frame()).expect("syn-ack");
    dp.ingress(&victim.clone().flags(ACK).frame()).expect("ack");
    let table = dp.conntrack();

    // Non-SYN segments with no connection: a RST comes back, nothing is tracked.
    for (what, p) in [
        ("spoofed ACK to an unused VIP", Packet::tcp(CLIENT, 42000, UNUSED, 80).flags(ACK)),
        ("spoofed ACK to a live VIP", Packet::tcp("203.0.113.9", 1234, VIP, 80).flags(ACK)),
        ("spoofed FIN to a live VIP", Packet::tcp("203.0.113.9", 1235, VIP, 80).flags(FIN | ACK)),
        ("ipv6 ACK without a connection", Packet::tcp(CLIENT6, 1236, VIP6, 80).flags(ACK)),
    ] {
        ingress(&dp, what, &p.frame(), XDP_TX, &p.rst_answer().frame_back(), Verdict::RstNoConnection);
    }
    let stray_rst = Packet::tcp(CLIENT, 42000, UNUSED, 80).flags(RST);
    ingress(&dp, "stray RST", &stray_rst.frame(), XDP_DROP, &stray_rst.frame(), Verdict::DropNoConnection);
    assert_eq!(dp.conntrack(), table, "nothing created, nothing changed");

    // The app wakes; a spoofed SYN on the victim's tuple must not move it to a pod.
    dp.upsert(app("asleep.example.com", ASLEEP, &[("10.244.2.2", true)]));
    ingress(
        &dp,
        "SYN on an answered activator connection",
        &victim.frame(),
        XDP_PASS,
        &victim.nat(None, Some((ACT, 8080))).frame(),
        Verdict::ActivatorNoBackend,
    );
    let data = victim.clone().flags(ACK);
    ingress(&dp, "victim's data", &data.frame(), XDP_PASS, &data.nat(None, Some((ACT, 8080))).frame(), Verdict::ActivatorNoBackend);
}

#[test]
fn fin_or_rst_then_a_new_syn_on_the_same_tuple_opens_a_new_connection() {
    if !kernel_tests_enabled("conntrack: close and reopen") {
        return;
    }
    let dp = dataplane();
    let fwd = forward_key(CLIENT, 43000, VIP, 80, 6);
    let state = |dp: &TestDataplane| dp.conntrack().iter().find(|(k, _)| *k == fwd).map(|(_, e)| e.state);
    for closer in ["fin", "rst"] {
        handshake(&dp, CLIENT, 43000, VIP, POD);
        assert_eq!(state(&dp), Some(CT_STATE_ESTABLISHED));
        if closer == "fin" {
            dp.ingress(&Packet::tcp(CLIENT, 43000, VIP, 80).flags(FIN | ACK).frame()).expect("client fin");
            assert_ne!(state(&dp), Some(CT_STATE_CLOSING), "half-closed is not closed");
            dp.egress(&Packet::tcp(POD, 8080, CLIENT, 43000).flags(FIN | ACK).frame()).expect("pod fin");
        } else {
            dp.egress(&Packet::tcp(POD, 8080, CLIENT, 43000).flags(RST | ACK).frame()).expect("pod rst");
        }
        assert_eq!(state(&dp), Some(CT_STATE_CLOSING), "{closer}");
        let before = dp.ct_events();
        let syn = Packet::tcp(CLIENT, 43000, VIP, 80);
        ingress(&dp, "new SYN on a closed tuple", &syn.frame(), XDP_PASS, &syn.nat(None, Some((POD, 8080))).frame(), Verdict::BackendNewFlow);
        assert_eq!(event_delta(&dp, &before, CtEvent::Reopened), 1, "{closer}");
        dp.clear_conntrack().expect("clear");
    }
}

#[test]
fn idle_connections_expire_by_state_and_the_gc_counts_them() {
    if !kernel_tests_enabled("conntrack: timeouts") {
        return;
    }
    let mut dp = dataplane();
    dp.update_config(|c| {
        c.ct_syn_timeout_s = 1;
        c.ct_udp_timeout_s = 1;
        c.ct_close_timeout_s = 1;
        c.ct_established_timeout_s = 100;
    })
    .expect("config");
    handshake(&dp, CLIENT, 44000, VIP, POD); // established: stays
    dp.ingress(&Packet::tcp(CLIENT, 44001, VIP, 80).frame()).expect("half-open");
    dp.ingress(&Packet::udp(CLIENT, 44002, VIP, 53).frame()).expect("udp");
    handshake(&dp, CLIENT, 44003, VIP, POD);
    dp.egress(&Packet::tcp(POD, 8080, CLIENT, 44003).flags(RST).frame()).expect("closed by rst");
    handshake(&dp, CLIENT, 44004, VIP, POD);
    dp.delete_conntrack(&forward_key(CLIENT, 44004, VIP, 80, 6)).expect("orphan its reply entry");
    assert_eq!(dp.conntrack().len(), 9);

    dp.collect_garbage().expect("gc");
    assert_eq!(dp.conntrack().len(), 9, "nothing is idle long enough yet");
    thread::sleep(Duration::from_millis(2300));
    let before = dp.ct_events();
    dp.collect_garbage().expect("gc");
    for (e, n) in [
        (CtEvent::ExpiredHalfOpen, 1),
        (CtEvent::ExpiredUdp, 1),
        (CtEvent::ExpiredClosing, 1),
        (CtEvent::ExpiredEstablished, 0),
        (CtEvent::ReplyOrphanRemoved, 1),
        (CtEvent::GcRuns, 1),
    ] {
        assert_eq!(event_delta(&dp, &before, e), n, "{}", e.name());
    }
    let left: Vec<CtKey> = dp.conntrack().into_iter().map(|(k, _)| k).collect();
    let mut want = vec![forward_key(CLIENT, 44000, VIP, 80, 6), reply_key(POD, 8080, CLIENT, 44000, 6)];
    want.sort();
    let mut left = left;
    left.sort();
    assert_eq!(left, want, "only the established connection is left");
    let summary = dp.maps().ct_summary();
    assert_eq!((summary.by_state[CT_STATE_ESTABLISHED as usize], summary.replies), (1, 1), "{summary:?}");
    // It still works.
    let data = Packet::tcp(CLIENT, 44000, VIP, 80).flags(ACK);
    ingress(&dp, "surviving connection", &data.frame(), XDP_PASS, &data.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);
}

#[test]
fn a_connection_whose_pod_is_gone_gets_a_rst_never_another_pod() {
    if !kernel_tests_enabled("conntrack: pod removed") {
        return;
    }
    let mut dp = dataplane();
    let other = "10.244.1.3";
    dp.upsert(app("live.example.com", VIP, &[(POD, true), (other, true)]));
    // Find a client port whose connection lands on POD.
    let sport = (45000..45100)
        .find(|&port| {
            let (_, out) = dp.ingress(&Packet::tcp(CLIENT, port, VIP, 80).frame()).expect("syn");
            out[14 + 16..14 + 20] == [10, 244, 1, 2]
        })
        .expect("some port lands on POD");
    dp.upsert(app("live.example.com", VIP, &[(other, true)]));
    let before = dp.ct_events();
    let data = Packet::tcp(CLIENT, sport, VIP, 80).flags(ACK);
    ingress(&dp, "segment for the removed pod", &data.frame(), XDP_TX, &data.rst_answer().frame_back(), Verdict::RstBackendGone);
    assert_eq!(event_delta(&dp, &before, CtEvent::BackendGone), 1);
    assert!(!dp.conntrack().iter().any(|(k, _)| *k == forward_key(CLIENT, sport, VIP, 80, 6)), "entry removed");
    ingress(&dp, "next segment", &data.frame(), XDP_TX, &data.rst_answer().frame_back(), Verdict::RstNoConnection);
    let syn = Packet::tcp(CLIENT, sport, VIP, 80);
    ingress(&dp, "the client reconnects", &syn.frame(), XDP_PASS, &syn.nat(None, Some((other, 8080))).frame(), Verdict::BackendNewFlow);
    // UDP has no connection to break: its next datagram is balanced anew.
    let udp = Packet::udp(CLIENT, 45500, VIP, 53);
    dp.upsert(app("live.example.com", VIP, &[(POD, true)]));
    dp.ingress(&udp.frame()).expect("udp");
    dp.upsert(app("live.example.com", VIP, &[(other, true)]));
    ingress(&dp, "udp after its pod left", &udp.frame(), XDP_PASS, &udp.nat(None, Some((other, 5353))).frame(), Verdict::BackendNewFlow);
}

#[test]
fn unanswered_flows_leave_the_activator_when_a_pod_is_ready() {
    if !kernel_tests_enabled("conntrack: leave the activator") {
        return;
    }
    let mut dp = dataplane();
    let udp = Packet::udp(CLIENT, 46000, ASLEEP, 53);
    ingress(&dp, "udp to a sleeping app", &udp.frame(), XDP_PASS, &udp.nat(None, Some((ACT, 8080))).frame(), Verdict::ActivatorNoBackend);
    let syn = Packet::tcp(CLIENT, 46001, ASLEEP, 80);
    ingress(&dp, "syn to a sleeping app", &syn.frame(), XDP_PASS, &syn.nat(None, Some((ACT, 8080))).frame(), Verdict::ActivatorNoBackend);
    let pod = "10.244.2.2";
    dp.upsert(app("asleep.example.com", ASLEEP, &[(pod, true)]));
    ingress(&dp, "udp once a pod is ready", &udp.frame(), XDP_PASS, &udp.nat(None, Some((pod, 5353))).frame(), Verdict::MovedFromActivator);
    ingress(&dp, "retransmitted syn", &syn.frame(), XDP_PASS, &syn.nat(None, Some((pod, 8080))).frame(), Verdict::MovedFromActivator);
    let reply = Packet::udp(pod, 5353, CLIENT, 46000);
    egress(&dp, "the pod's udp reply", &reply.frame(), &reply.nat(Some((ASLEEP, 53)), None).frame(), Verdict::ReplyTranslated);
    let kinds: Vec<u8> = dp.conntrack().iter().filter(|(k, _)| k.dir == CT_DIR_FORWARD).map(|(_, e)| e.kind).collect();
    assert!(!kinds.contains(&CT_KIND_ACTIVATOR), "nothing left at the activator: {kinds:?}");
}

#[test]
fn icmp_errors_to_a_vip_reach_the_backend_in_both_families() {
    if !kernel_tests_enabled("conntrack: icmp") {
        return;
    }
    let dp = dataplane();
    handshake(&dp, CLIENT6, 47000, VIP6, POD6);
    // IPv6 Packet Too Big from the client about the VIP's reply: path-MTU discovery.
    let quoted = Packet::tcp(VIP6, 80, CLIENT6, 47000).flags(ACK);
    let ptb = Packet::new(CLIENT6, VIP6, L4::IcmpError { icmp_type: 2, code: 0, inner: Box::new(quoted.clone()) });
    let want = Packet::new(CLIENT6, POD6, L4::IcmpError { icmp_type: 2, code: 0, inner: Box::new(quoted.nat(Some((POD6, 8080)), None)) });
    ingress(&dp, "icmpv6 packet too big", &ptb.frame(), XDP_PASS, &want.frame(), Verdict::IcmpErrorTranslated);
    // About no connection we track: dropped, counted.
    let stray = Packet::new(CLIENT6, VIP6, L4::IcmpError {
        icmp_type: 2,
        code: 0,
        inner: Box::new(Packet::tcp(VIP6, 80, CLIENT6, 47999)),
    });
    ingress(&dp, "icmpv6 about nothing", &stray.frame(), XDP_DROP, &stray.frame(), Verdict::IcmpErrorNoConnection);
    handshake(&dp, CLIENT, 47001, VIP, POD);
    let quoted = Packet::tcp(VIP, 80, CLIENT, 47001).flags(ACK);
    let frag = Packet::new(CLIENT, VIP, L4::IcmpError { icmp_type: 3, code: 4, inner: Box::new(quoted.clone()) });
    let want = Packet::new(CLIENT, POD, L4::IcmpError { icmp_type: 3, code: 4, inner: Box::new(quoted.nat(Some((POD, 8080)), None)) });
    ingress(&dp, "icmpv4 fragmentation needed", &frag.frame(), XDP_PASS, &want.frame(), Verdict::IcmpErrorTranslated);
}

/// A frame with `ip_bytes` (possibly shorter than the headers claim) padded
/// with zeros to 60 bytes, as Ethernet pads short frames.
fn padded(p: &Packet, ip_bytes: Vec<u8>) -> Vec<u8> {
    let mut f = p.frame()[..14].to_vec();
    f.extend(ip_bytes);
    f.resize(f.len().max(60), 0);
    f
}

/// Sets the IPv4 total length and fixes the header checksum.
fn with_total_len(mut ip: Vec<u8>, total: u16) -> Vec<u8> {
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[10..12].fill(0);
    let c = serviceless_common::csum::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

#[test]
fn l4_headers_are_checked_against_the_ip_length_not_the_frame() {
    if !kernel_tests_enabled("conntrack: lengths") {
        return;
    }
    let dp = dataplane();
    let syn = Packet::tcp(CLIENT, 48000, VIP, 80).with(|p| p.payload.clear());
    let ip = syn.ip_bytes();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("tcp header cut by the ip length, frame padded", padded(&syn, with_total_len(ip[..32].to_vec(), 32))),
        ("tcp data offset 4", {
            let mut b = ip.clone();
            b[20 + 12] = 0x40;
            padded(&syn, b)
        }),
        ("tcp data offset past the ip length", {
            let mut b = ip.clone();
            b[20 + 12] = 0xf0;
            padded(&syn, b)
        }),
    ];
    let udp = Packet::udp(CLIENT, 48001, VIP, 53).with(|p| p.payload = vec![1, 2, 3, 4]);
    let uip = udp.ip_bytes();
    cases.push(("udp length past the ip length", {
        let mut b = uip.clone();
        b[20 + 4..20 + 6].copy_from_slice(&200u16.to_be_bytes());
        padded(&udp, b)
    }));
    cases.push(("udp length below its header", {
        let mut b = uip.clone();
        b[20 + 4..20 + 6].copy_from_slice(&4u16.to_be_bytes());
        padded(&udp, b)
    }));
    let v6 = Packet::tcp(CLIENT6, 48002, VIP6, 80).with(|p| p.payload.clear());
    cases.push(("ipv6 tcp header cut by the payload length", {
        let mut b = v6.ip_bytes();
        b[4..6].copy_from_slice(&12u16.to_be_bytes());
        b.truncate(40 + 12);
        padded(&v6, b)
    }));
    for (what, frame) in cases {
        ingress(&dp, what, &frame, XDP_PASS, &frame, Verdict::PassMalformed);
    }
    assert!(dp.conntrack().is_empty(), "malformed packets create no state: {:?}", dp.conntrack());
    // Padding after a well-formed packet is fine.
    let frame = padded(&syn, ip.clone());
    let mut want = syn.nat(None, Some((POD, 8080))).frame();
    want.resize(frame.len(), 0);
    ingress(&dp, "well-formed, padded", &frame, XDP_PASS, &want, Verdict::BackendNewFlow);
}

/// Splits an IPv4 packet into a first fragment carrying `first` bytes of
/// its payload (a multiple of 8) and a second with the rest.
fn fragment(p: &Packet, first: usize) -> (Vec<u8>, Vec<u8>) {
    let ip = p.ip_bytes();
    let payload = &ip[20..];
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut h = ip[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        let flags = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h[10..12].fill(0);
        let c = serviceless_common::csum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = p.frame()[..14].to_vec();
        f.extend(h);
        f.extend(data);
        f
    };
    (piece(&payload[..first], 0, true), piece(&payload[first..], first, false))
}

/// The frame going the other way (node -> client MACs) is not needed for
/// egress: the program does not look at Ethernet addresses.
#[test]
fn fragments_are_translated_both_ways() {
    if !kernel_tests_enabled("conntrack: fragments") {
        return;
    }
    let dp = dataplane();
    let big = Packet::udp(CLIENT, 49000, VIP, 53).with(|p| {
        p.payload = (0..64u8).collect();
        p.ip_id = 0x4242;
    });
    let (first, second) = fragment(&big, 24);
    let (want_first, want_second) = fragment(&big.nat(None, Some((POD, 5353))), 24);
    ingress(&dp, "first fragment", &first, XDP_PASS, &want_first, Verdict::BackendNewFlow);
    ingress(&dp, "second fragment", &second, XDP_PASS, &want_second, Verdict::FragmentTranslated);
    let stranger = big.clone().with(|p| p.ip_id = 0x4343);
    let (_, lone) = fragment(&stranger, 24);
    ingress(&dp, "fragment whose first never came", &lone, XDP_DROP, &lone, Verdict::DropFragmentUnknown);

    let reply = Packet::udp(POD, 5353, CLIENT, 49000).with(|p| {
        p.payload = (0..64u8).rev().collect();
        p.ip_id = 0x5151;
    });
    let (first, second) = fragment(&reply, 32);
    let (want_first, want_second) = fragment(&reply.nat(Some((VIP, 53)), None), 32);
    egress(&dp, "first reply fragment", &first, &want_first, Verdict::ReplyTranslated);
    egress(&dp, "second reply fragment", &second, &want_second, Verdict::FragmentTranslated);
}

#[test]
fn replies_with_ipv6_extension_headers_are_translated() {
    if !kernel_tests_enabled("conntrack: ipv6 extension headers") {
        return;
    }
    let dp = dataplane();
    handshake(&dp, CLIENT6, 49500, VIP6, POD6);
    let reply = Packet::tcp(POD6, 8080, CLIENT6, 49500)
        .flags(ACK)
        .with(|p| p.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![1, 4, 0, 0, 0, 0])]);
    egress(&dp, "reply with hop-by-hop and destination options", &reply.frame(), &reply.nat(Some((VIP6, 80)), None).frame(), Verdict::ReplyTranslated);
}

#[test]
fn the_flood_guard_refuses_new_connections_and_never_touches_established_ones() {
    if !kernel_tests_enabled("conntrack: flood guard") {
        return;
    }
    pin_to_cpu0().expect("pin to one CPU (the budget is per CPU)");
    let mut dp = dataplane();
    handshake(&dp, CLIENT, 50500, VIP, POD);
    dp.update_config(|c| c.ct_new_per_cpu_per_sec = 5).expect("config");
    let before = dp.verdicts();
    for port in 51000..51010 {
        dp.ingress(&Packet::tcp("203.0.113.50", port, VIP, 80).frame()).expect("flood");
    }
    let after = dp.verdicts();
    let new = after[&Verdict::BackendNewFlow] - before[&Verdict::BackendNewFlow];
    let limited = after[&Verdict::DropCtRateLimited] - before[&Verdict::DropCtRateLimited];
    assert_eq!((new, limited), (5, 5), "five tracked, five refused");
    let data = Packet::tcp(CLIENT, 50500, VIP, 80).flags(ACK);
    ingress(&dp, "established during the flood", &data.frame(), XDP_PASS, &data.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);

}

#[test]
fn half_open_floods_churn_only_the_new_table_and_established_connections_stay() {
    if !kernel_tests_enabled("conntrack: half-open flood") {
        return;
    }
    // Room for 8 established and 16 new connections.
    let sizes = serviceless_agent::dataplane::Sizes { connections: 8, new_connections: 16, ..TEST_SIZES };
    let mut dp = TestDataplane::new(sizes).expect("load");
    dp.apply(vec![app("live.example.com", VIP, &[(POD, true)])]);
    for port in 52000..52004 {
        handshake(&dp, CLIENT, port, VIP, POD);
        assert_eq!(dp.conntrack_table(&forward_key(CLIENT, port, VIP, 80, 6)), Some(CtTable::Established));
    }
    // A SYN flood 30 times the new-connection table, from spoofed sources.
    for i in 0..500u32 {
        let src = format!("198.18.{}.{}", i >> 8, i & 255);
        dp.ingress(&Packet::tcp(&src, 1024 + i as u16, VIP, 80).frame()).expect("flood");
    }
    for port in 52000..52004 {
        let data = Packet::tcp(CLIENT, port, VIP, 80).flags(ACK);
        ingress(&dp, "established during the flood", &data.frame(), XDP_PASS, &data.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);
    }
    // A real client's handshake right after the flood completes and is kept.
    let before = dp.ct_events();
    handshake(&dp, CLIENT, 52010, VIP, POD);
    assert_eq!(event_delta(&dp, &before, CtEvent::Promoted), 1);
    // Fill the established table: the next completed handshake stays in the
    // new table, counted, and still works.
    for port in 52011..52014 {
        handshake(&dp, CLIENT, port, VIP, POD);
    }
    let before = dp.ct_events();
    handshake(&dp, CLIENT, 52020, VIP, POD);
    assert_eq!(event_delta(&dp, &before, CtEvent::PromoteFailed), 1, "the ninth connection does not fit");
    assert_eq!(dp.conntrack_table(&forward_key(CLIENT, 52020, VIP, 80, 6)), Some(CtTable::New));
    let data = Packet::tcp(CLIENT, 52020, VIP, 80).flags(ACK);
    ingress(&dp, "connection left in the new table", &data.frame(), XDP_PASS, &data.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);
}

#[test]
fn a_blind_spoofed_handshake_is_never_established() {
    if !kernel_tests_enabled("conntrack: blind handshake") {
        return;
    }
    let dp = dataplane();
    let spoofer = "203.0.113.66";
    let syn = Packet::tcp(spoofer, 54000, VIP, 80);
    dp.ingress(&syn.frame()).expect("syn");
    // The pod answers the spoofed address; the spoofer never sees its ISN.
    let synack = Packet::tcp(POD, 8080, spoofer, 54000).flags(SYN | ACK).with(|p| p.seq = 777_000);
    dp.egress(&synack.frame()).expect("syn-ack");
    let fwd = forward_key(spoofer, 54000, VIP, 80, 6);
    let before = dp.ct_events();
    for guess in [1001, 777_000, 778_000] {
        let ack = syn.clone().flags(ACK).with(|p| p.ack = guess);
        ingress(&dp, "guessed ack", &ack.frame(), XDP_PASS, &ack.nat(None, Some((POD, 8080))).frame(), Verdict::BackendEstablished);
    }
    assert_eq!(event_delta(&dp, &before, CtEvent::HandshakeMismatch), 3);
    assert_eq!(event_delta(&dp, &before, CtEvent::Promoted), 0);
    assert_eq!(dp.conntrack_table(&fwd), Some(CtTable::New), "still only a new connection");
    let state = dp.conntrack().into_iter().find(|(k, _)| *k == fwd).map(|(_, e)| e.state);
    assert_eq!(state, Some(CT_STATE_SYN_RECV));
    // The real ack (ISN + 1) establishes it.
    dp.ingress(&syn.clone().flags(ACK).with(|p| p.ack = 777_001).frame()).expect("ack");
    assert_eq!(event_delta(&dp, &before, CtEvent::Promoted), 1);
    assert_eq!(dp.conntrack_table(&fwd), Some(CtTable::Established));
}

#[test]
fn a_restart_rebuilds_exactly_what_it_wrote_whatever_the_hostname_length() {
    if !kernel_tests_enabled("conntrack: restart identity") {
        return;
    }
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load");
    let prefix = "x".repeat(70);
    let long_a = format!("{prefix}.a.example.com");
    let long_b = format!("{prefix}.b.example.com");
    let apps = vec![
        app(&long_a, "10.96.1.1", &[("10.244.5.1", true)]),
        app(&long_b, "10.96.1.2", &[("10.244.5.2", true)]),
        app("short.example.com", "10.96.1.3", &[("10.244.5.3", true)]),
    ];
    assert!(dp.apply(apps.clone()).failed.is_empty());
    let services = |dp: &TestDataplane| {
        let mut v: Vec<_> = dp.maps().services().map(|(k, v)| (k.vip, k.port, v.app_id)).collect();
        v.sort();
        v
    };
    let before = services(&dp);
    let syn = Packet::tcp(CLIENT, 53000, "10.96.1.2", 80);
    dp.ingress(&syn.frame()).expect("connect to a long-named app");

    dp.restart_reconciler().expect("restart");
    assert_eq!(dp.reconciler.app_count(), 3, "both long names adopted, neither dropped as a duplicate");
    let outcome = dp.apply(apps);
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    assert_eq!(services(&dp), before, "same ids, same VIP entries, no orphans");
    assert_eq!(dp.reconciler.app_count(), 3);
    let data = syn.clone().flags(ACK);
    ingress(&dp, "connection across the restart", &data.frame(), XDP_PASS, &data.nat(None, Some(("10.244.5.2", 8080))).frame(), Verdict::BackendEstablished);
}

/// The benchmark's replay wrapper (serviceless_tests::replay) restores its
/// template before every repeated run: a varied SYN is a new connection on
/// every run, with valid checksums (the output is compared with a packet
/// built independently), and a fixed ACK of a tracked connection stays an
/// established hit; around the XDP_PASS floor it passes.
#[test]
fn the_replay_wrapper_keeps_every_repeated_run_on_its_path() {
    use serviceless_tests::{replay::Replay, xdp_pass::Floor};
    if !kernel_tests_enabled("conntrack: replay wrapper") {
        return;
    }
    let dp = dataplane();
    let floor = Floor::load().expect("floor");
    let pass = Packet::tcp(CLIENT, 40000, "192.168.50.1", 80).frame();
    let (action, out, _) = Replay::new(floor.fd(), &pass, false).expect("wrapper").run(1000, None).expect("run");
    assert_eq!((action, out), (XDP_PASS, pass), "the wrapper around the floor passes the template");

    let ingress_fd = dp.ingress_fd().expect("ingress fd");
    let syn = Packet::tcp("10.2.0.0", 0, VIP, 80).with(|p| p.ip_id = 0);
    let varied = Replay::new(ingress_fd, &syn.frame(), true).expect("varied wrapper");
    let before = dp.verdicts();
    let (action, out, _) = varied.run(1, None).expect("run");
    let first = Packet::tcp("10.2.0.1", 0xfffe, VIP, 80).with(|p| p.ip_id = 0xfffe);
    assert_eq!(action, XDP_PASS);
    assert_eq!(hex(&out), hex(&first.nat(None, Some((POD, 8080))).frame()), "stamp 1, checksums valid, DNATed");
    let (_, out, _) = varied.run(999, None).expect("run");
    let last = Packet::tcp("10.2.3.232", !1000u16, VIP, 80).with(|p| p.ip_id = !1000u16);
    assert_eq!(hex(&out), hex(&last.nat(None, Some((POD, 8080))).frame()), "stamp 1000");
    assert_eq!(verdict_delta(&dp, &before, Verdict::BackendNewFlow), 1000, "every run a new connection");
    assert_eq!(total_delta(&dp, &before), 1000, "and nothing else");
    assert_eq!(dp.conntrack().len(), 2000, "two entries per connection");

    handshake(&dp, CLIENT, 50000, VIP, POD);
    let ack = Packet::tcp(CLIENT, 50000, VIP, 80).flags(ACK);
    let fixed = Replay::new(ingress_fd, &ack.frame(), false).expect("fixed wrapper");
    let before = dp.verdicts();
    let (action, out, _) = fixed.run(1000, None).expect("run");
    assert_eq!((action, hex(&out)), (XDP_PASS, hex(&ack.nat(None, Some((POD, 8080))).frame())));
    assert_eq!(verdict_delta(&dp, &before, Verdict::BackendEstablished), 1000, "every run an established hit");
    assert_eq!(total_delta(&dp, &before), 1000, "and nothing else");
}
