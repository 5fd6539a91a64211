//! Fixtures for pods on other nodes, through BPF_PROG_TEST_RUN: the
//! encapsulation node A writes (outer headers built independently here,
//! checksums included), the decapsulation and translation node B does, the
//! MSS clamps, the choice every node agrees on, and what happens to bad or
//! unroutable input. Route and neighbour lookups use a real network
//! namespace's tables (a veth with addresses and neighbour entries).
//! Needs root; skipped (with a message) otherwise.

use std::net::{IpAddr, Ipv4Addr};

use serviceless_common::{CtEvent, ENCAP_OVERHEAD, FABRIC_F_ENCAP, FABRIC_F_PREFER_LOCAL, FABRIC_F_SNAT, Fabric, Verdict};
use serviceless_agent::model::{AppSpec, from_addr};
use serviceless_tests::{
    TEST_SIZES, TestDataplane, app,
    fixture::*,
    kernel_tests_enabled,
    netns::{Netns, enter},
    packet::{ACK, L4, Packet, SYN, gue_frame, hex, mss_option},
};
use serviceless_common::csum::checksum;

const NODE_A: &str = "192.0.2.11";
const NODE_B: &str = "192.0.2.12";
/// A node with a route but no resolved link-layer address.
const NODE_UNRESOLVED: &str = "192.0.2.13";
/// A node the namespace's routes say is unreachable.
const NODE_UNROUTED: &str = "203.0.113.50";
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const NODE_C: &str = "192.0.2.14";
const NODE_C_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x14];
/// The router clients are behind.
const ROUTER: &str = "192.0.2.1";
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SNAT_PORTS: (u16, u16) = (61000, 61003);
const ENCAP_PORT: u16 = 6080;
const MTU: u16 = 1500;
const REMOTE_VIP: &str = "10.96.0.40";
const REMOTE_POD: &str = "10.244.2.2";

fn fabric(node: &str, flags: u32) -> Fabric {
    let node4: Ipv4Addr = node.parse().unwrap();
    Fabric {
        node4: node4.octets(),
        flags: FABRIC_F_ENCAP | flags,
        encap_port: ENCAP_PORT.to_be(),
        mtu: MTU,
        mss4: MTU - ENCAP_OVERHEAD - 40,
        mss6: MTU - ENCAP_OVERHEAD - 60,
        snat_port_min: 0,
        snat_port_max: 0,
    }
}

/// An app whose pods are on the given nodes (`None`: this node).
fn app_on(hostname: &str, vip: &str, pods: &[(&str, Option<&str>)]) -> AppSpec {
    let mut a = app(hostname, vip, &pods.iter().map(|(ip, _)| (*ip, true)).collect::<Vec<_>>());
    for (b, (_, node)) in a.backends.iter_mut().zip(pods) {
        b.node = node.map(|n| n.parse::<IpAddr>().unwrap());
    }
    a
}

/// Node A's network namespace: uplink `fxa` (192.0.2.11/24, forwarding on)
/// with a permanent neighbour entry for node B and none for 192.0.2.13.
struct NodeNet {
    ns: Netns,
    ifindex: u32,
    mac: [u8; 6],
}

fn node_net(tag: &str) -> NodeNet {
    let ns = Netns::new(&format!("svlfab{tag}{}", std::process::id())).expect("netns");
    ns.ip("link add fxa type veth peer name fxb").expect("veth");
    ns.ip(&format!("addr add {NODE_A}/24 dev fxa")).unwrap();
    ns.ip("link set fxa up").unwrap();
    ns.ip("link set fxb up").unwrap();
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let mac = NODE_B_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&format!("neigh add {NODE_B} lladdr {mac} dev fxa nud permanent")).unwrap();
    let mac_c = NODE_C_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&format!("neigh add {NODE_C} lladdr {mac_c} dev fxa nud permanent")).unwrap();
    // Pods of node B behind it (host-gateway routes); clients behind a router.
    ns.ip(&format!("route add 10.244.2.0/24 via {NODE_B}")).unwrap();
    let router = ROUTER_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&format!("neigh add {ROUTER} lladdr {router} dev fxa nud permanent")).unwrap();
    ns.ip(&format!("route add default via {ROUTER}")).unwrap();
    ns.ip(&format!("route add unreachable {NODE_UNROUTED}")).unwrap();
    let link = ns.ip("-o link show fxa").unwrap();
    let ifindex: u32 = link.split(':').next().unwrap().trim().parse().unwrap();
    let ether = link.split("link/ether ").nth(1).unwrap().split_whitespace().next().unwrap();
    let mac: Vec<u8> = ether.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    NodeNet { ns, ifindex, mac: mac.try_into().unwrap() }
}

fn node_a(apps: Vec<AppSpec>, flags: u32) -> TestDataplane {
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load the dataplane");
    dp.join_fabric(&[NODE_A], &fabric(NODE_A, flags)).unwrap();
    let outcome = dp.apply(apps);
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    dp
}

fn node_b(apps: Vec<AppSpec>) -> TestDataplane {
    let mut dp = TestDataplane::new(TEST_SIZES).expect("load the dataplane");
    dp.join_fabric(&[NODE_B], &fabric(NODE_B, 0)).unwrap();
    let outcome = dp.apply(apps);
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    dp
}

fn delta(dp: &TestDataplane, before: &std::collections::HashMap<Verdict, u64>, v: Verdict) -> u64 {
    dp.verdicts()[&v] - before[&v]
}

fn syn(sport: u16, vip: &str) -> Packet {
    Packet::tcp(CLIENT, sport, vip, 80).with(|p| {
        p.tcp_options = mss_option(1460);
        p.payload.clear();
    })
}

/// The UDP source port A chose (entropy), after checking its range.
fn encap_sport(out: &[u8]) -> u16 {
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(sport & 0xc000, 0xc000, "source port in the dynamic range");
    sport
}

#[test]
fn a_remote_pod_is_reached_by_encapsulation_and_its_node_translates() {
    if !kernel_tests_enabled("a_remote_pod_is_reached_by_encapsulation_and_its_node_translates") {
        return;
    }
    let net = node_net("1");
    enter(&net.ns.name).unwrap();
    let remote = app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B))]);
    let a = node_a(vec![remote.clone()], 0);
    let b = node_b(vec![app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, None)])]);
    assert_eq!(a.reconciler.remote_nodes(), [NODE_B.parse::<IpAddr>().unwrap()]);

    // A: the SYN leaves encapsulated to B, its MSS clamped, no state kept.
    let input = syn(40000, REMOTE_VIP);
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &input.frame()).unwrap();
    assert_eq!(action, XDP_TX, "sent back out of the uplink it came in on\n{}", hex(&out));
    assert_eq!(delta(&a, &before, Verdict::EncapForwarded), 1);
    let clamped_mss = MTU - ENCAP_OVERHEAD - 40;
    let inner = input.clone().with(|p| p.tcp_options = mss_option(clamped_mss)).ip_bytes();
    let node_a4: Ipv4Addr = NODE_A.parse().unwrap();
    let node_b4: Ipv4Addr = NODE_B.parse().unwrap();
    let expected = gue_frame(NODE_B_MAC, net.mac, node_a4, node_b4, encap_sport(&out), ENCAP_PORT, &inner);
    assert_eq!(out, expected, "encapsulated SYN\n got:\n{}\nwant:\n{}", hex(&out), hex(&expected));
    assert!(a.conntrack().is_empty(), "the front node keeps no state for a remote pod's connection");

    // B: strips the outer headers, translates to its pod, tracks the connection.
    let before = b.verdicts();
    let (action, decapped) = b.ingress(&out).unwrap();
    assert_eq!(action, XDP_PASS, "{}", hex(&decapped));
    assert_eq!(delta(&b, &before, Verdict::Decapsulated), 1);
    assert_eq!(delta(&b, &before, Verdict::BackendNewFlow), 1);
    let translated = input.clone().with(|p| p.tcp_options = mss_option(clamped_mss)).nat(None, Some((REMOTE_POD, 8080)));
    let mut want = Vec::new();
    want.extend(NODE_B_MAC);
    want.extend(net.mac);
    want.extend(0x0800u16.to_be_bytes());
    want.extend(translated.ip_bytes());
    assert_eq!(decapped, want, "decapsulated and translated\n got:\n{}\nwant:\n{}", hex(&decapped), hex(&want));
    assert_eq!(b.conntrack().len(), 2, "B owns the connection (forward and reply entries)");

    // B's egress: the pod's SYN-ACK leaves from the VIP with its MSS clamped.
    let syn_ack = Packet::tcp(REMOTE_POD, 8080, CLIENT, 40000).flags(SYN | ACK).with(|p| {
        p.tcp_options = [vec![1], mss_option(1460), vec![1, 1, 1]].concat();
        p.payload.clear();
    });
    let clamped_before = b.ct_events()[&CtEvent::MssClamped];
    let (rc, reply) = b.egress(&syn_ack.frame_back()).unwrap();
    assert_eq!(rc, TC_ACT_OK);
    let want = syn_ack
        .clone()
        .with(|p| p.tcp_options = [vec![1], mss_option(clamped_mss), vec![1, 1, 1]].concat())
        .nat(Some((REMOTE_VIP, 80)), None)
        .frame_back();
    assert_eq!(reply, want, "SYN-ACK from the VIP, MSS clamped (option at an odd offset)\n got:\n{}\nwant:\n{}", hex(&reply), hex(&want));
    assert_eq!(b.ct_events()[&CtEvent::MssClamped] - clamped_before, 1);

    // A: a later segment, with no state on A, goes the same way (it may
    // reach any node), not answered with a RST.
    let ack = Packet::tcp(CLIENT, 40000, REMOTE_VIP, 80).flags(ACK);
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &ack.frame()).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(delta(&a, &before, Verdict::EncapForwarded), 1);
    assert_eq!(delta(&a, &before, Verdict::RstNoConnection), 0);
    let expected = gue_frame(NODE_B_MAC, net.mac, node_a4, node_b4, encap_sport(&out), ENCAP_PORT, &ack.ip_bytes());
    assert_eq!(out, expected);
    // ... and B follows its connection.
    let before = b.verdicts();
    let (action, _) = b.ingress(&out).unwrap();
    assert_eq!(action, XDP_PASS);
    assert_eq!(delta(&b, &before, Verdict::BackendEstablished), 1);

    // A segment of a connection B does not have, encapsulated to B: dropped
    // (a RST would go back through A), never answered or forwarded again.
    let stray = Packet::tcp(CLIENT, 40001, REMOTE_VIP, 80).flags(ACK);
    let (_, out) = a.ingress_on(net.ifindex, &stray.frame()).unwrap();
    let before = b.verdicts();
    let (action, _) = b.ingress(&out).unwrap();
    assert_eq!((action, delta(&b, &before, Verdict::DropTunnelInvalid)), (XDP_DROP, 1));

    // An ICMP error the client sends about a reply it got from the VIP
    // ("fragmentation needed" for server -> client segments) reaches A,
    // which has no state: it goes to B, which translates it for its pod.
    let reply = Packet::tcp(REMOTE_VIP, 80, CLIENT, 40000).flags(ACK);
    let icmp = Packet::new(CLIENT, REMOTE_VIP, L4::IcmpError { icmp_type: 3, code: 4, inner: Box::new(reply.clone()) });
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &icmp.frame()).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::EncapForwarded)), (XDP_TX, 1), "{}", hex(&out));
    let before = b.verdicts();
    let (action, translated) = b.ingress(&out).unwrap();
    assert_eq!((action, delta(&b, &before, Verdict::IcmpErrorTranslated)), (XDP_PASS, 1), "{}", hex(&translated));
    let want = Packet::new(CLIENT, REMOTE_POD, L4::IcmpError { icmp_type: 3, code: 4, inner: Box::new(reply.nat(Some((REMOTE_POD, 8080)), None)) });
    assert_eq!(&translated[14..], &want.ip_bytes()[..], "the pod gets the error about its own segment");

    // UDP goes the same way.
    let dns = Packet::udp(CLIENT, 5300, REMOTE_VIP, 53);
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &dns.frame()).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::EncapForwarded)), (XDP_TX, 1));
    let before = b.verdicts();
    let (action, decapped) = b.ingress(&out).unwrap();
    assert_eq!((action, delta(&b, &before, Verdict::BackendNewFlow)), (XDP_PASS, 1));
    assert_eq!(&decapped[14..], &dns.nat(None, Some((REMOTE_POD, 5353))).ip_bytes()[..]);
}

#[test]
fn every_node_picks_the_same_pod_and_prefer_local_stays_local() {
    if !kernel_tests_enabled("every_node_picks_the_same_pod_and_prefer_local_stays_local") {
        return;
    }
    let net = node_net("2");
    enter(&net.ns.name).unwrap();
    // One pod on A, two on B; each node sees the other's pods as remote.
    let seen_from_a = [("10.244.1.2", None), ("10.244.2.2", Some(NODE_B)), ("10.244.2.3", Some(NODE_B))];
    let seen_from_b = [("10.244.1.2", Some(NODE_A)), ("10.244.2.2", None), ("10.244.2.3", None)];
    let a = node_a(vec![app_on("spread.example.com", REMOTE_VIP, &seen_from_a)], 0);
    let b = node_b(vec![app_on("spread.example.com", REMOTE_VIP, &seen_from_b)]);
    let (mut local, mut remote) = (0, 0);
    for sport in 41000..41064 {
        let input = syn(sport, REMOTE_VIP);
        let (action_a, out_a) = a.ingress_on(net.ifindex, &input.frame()).unwrap();
        // The same SYN reaching B directly.
        let (action_b, out_b) = b.ingress(&input.frame()).unwrap();
        if action_a == XDP_PASS {
            local += 1;
            assert_eq!(&out_a[30..34], &[10, 244, 1, 2], "A's only local pod");
            // B sends it on to A (here A's address is local to the
            // namespace, so B's route lookup drops it): B never takes it.
            assert_ne!(action_b, XDP_PASS, "sport {sport}: B must not pick a pod of its own");
        } else {
            remote += 1;
            assert_eq!(action_a, XDP_TX);
            // B decapsulating A's packet picks the pod it picks for the SYN directly.
            let (action, decapped) = b.ingress(&out_a).unwrap();
            assert_eq!((action, action_b), (XDP_PASS, XDP_PASS));
            assert_eq!(&decapped[30..34], &out_b[30..34], "sport {sport}: the same pod from either node");
        }
        b.clear_conntrack().unwrap();
    }
    assert!(local > 5 && remote > 20, "rendezvous hashing spreads over all three pods: {local} local, {remote} remote");

    // --prefer-local: A sends everything to its own pod.
    let a = node_a(vec![app_on("spread.example.com", REMOTE_VIP, &seen_from_a)], FABRIC_F_PREFER_LOCAL);
    for sport in 42000..42032 {
        let (action, out) = a.ingress_on(net.ifindex, &syn(sport, REMOTE_VIP).frame()).unwrap();
        assert_eq!((action, &out[30..34]), (XDP_PASS, &[10u8, 244, 1, 2][..]));
    }
}

#[test]
fn unroutable_oversize_and_malformed_tunnel_input_is_dropped_and_counted() {
    if !kernel_tests_enabled("unroutable_oversize_and_malformed_tunnel_input_is_dropped_and_counted") {
        return;
    }
    let net = node_net("3");
    enter(&net.ns.name).unwrap();
    let a = node_a(
        vec![
            app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B))]),
            app_on("unresolved.example.com", "10.96.0.41", &[("10.244.3.2", Some(NODE_UNRESOLVED))]),
            app_on("unrouted.example.com", "10.96.0.42", &[("10.244.4.2", Some(NODE_UNROUTED))]),
            app_on("remote6.example.com", "fd00:96::40", &[("fd00:244::2", Some(NODE_B))]),
        ],
        0,
    );
    let check = |name: &str, frame: Vec<u8>, action: u32, verdict: Verdict| {
        let before = a.verdicts();
        let (got, out) = a.ingress_on(net.ifindex, &frame).unwrap();
        assert_eq!((got, delta(&a, &before, verdict)), (action, 1), "{name}\n{}", hex(&out));
        if action != XDP_TX && action != XDP_PASS {
            return;
        }
        if verdict == Verdict::PassNotVip || verdict == Verdict::DropTunnelInvalid {
            assert_eq!(out, frame, "{name}: untouched");
        }
    };
    check("no neighbour entry for the pod's node", syn(43000, "10.96.0.41").frame(), XDP_DROP, Verdict::DropEncapNoNeighbour);
    check("no route to the pod's node", syn(43001, "10.96.0.42").frame(), XDP_DROP, Verdict::DropEncapNoRoute);
    // A full-size packet cannot grow by the encapsulation within the MTU:
    // the client is told the MTU that is left (and one that may be
    // fragmented, which XDP cannot do, is dropped).
    let big = Packet::tcp(CLIENT, 43002, REMOTE_VIP, 80).flags(ACK).with(|p| p.payload = vec![0x61; 1460]);
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &big.frame()).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::EncapTooBig)), (XDP_TX, 1));
    let want = too_big_answer(&big, MTU - ENCAP_OVERHEAD);
    assert_eq!(out, want, "fragmentation needed\n got:\n{}\nwant:\n{}", hex(&out), hex(&want));
    let mut may_fragment = big.frame();
    may_fragment[14 + 6] = 0; // DF clear
    let sum = checksum(&{
        let mut h = may_fragment[14..34].to_vec();
        h[10] = 0;
        h[11] = 0;
        h
    });
    may_fragment[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    check("too big, may be fragmented", may_fragment, XDP_DROP, Verdict::EncapTooBig);
    let big6 = Packet::tcp(CLIENT6, 43010, "fd00:96::40", 80).flags(ACK).with(|p| p.payload = vec![0x62; 1440]);
    let (action, out) = a.ingress_on(net.ifindex, &big6.frame()).unwrap();
    assert_eq!(action, XDP_TX);
    let want = too_big_answer(&big6, MTU - ENCAP_OVERHEAD);
    assert_eq!(out, want, "packet too big\n got:\n{}\nwant:\n{}", hex(&out), hex(&want));

    let node_a4: Ipv4Addr = NODE_A.parse().unwrap();
    let peer: Ipv4Addr = NODE_B.parse().unwrap();
    let tunnel = |inner: &[u8], port: u16| gue_frame(net.mac, NODE_B_MAC, peer, node_a4, 0xc001, port, inner);
    let not_vip = Packet::tcp(CLIENT, 43003, "10.1.2.3", 80).ip_bytes();
    check("tunnelled packet not for a VIP", tunnel(&not_vip, ENCAP_PORT), XDP_DROP, Verdict::DropTunnelInvalid);
    let mut garbage = syn(43004, REMOTE_VIP).ip_bytes();
    garbage[0] = 0x55;
    check("tunnelled bytes that are not IP", tunnel(&garbage, ENCAP_PORT), XDP_DROP, Verdict::DropTunnelInvalid);
    let mut short = tunnel(&syn(43005, REMOTE_VIP).ip_bytes(), ENCAP_PORT);
    short.truncate(14 + 20 + 8 + 10);
    check("tunnelled packet cut short", short, XDP_DROP, Verdict::DropTunnelInvalid);
    let inner = syn(43006, REMOTE_VIP).ip_bytes();
    check("UDP to the node on another port", tunnel(&inner, 6081), XDP_PASS, Verdict::PassNotVip);
    // A packet encapsulated to this node for a pod elsewhere is never sent on.
    let before = a.verdicts();
    let (action, _) = a.ingress_on(net.ifindex, &tunnel(&inner, ENCAP_PORT)).unwrap();
    assert_eq!(action, XDP_DROP);
    assert_eq!(delta(&a, &before, Verdict::DropTunnelInvalid), 1);
    assert_eq!(delta(&a, &before, Verdict::EncapForwarded), 0);
}

/// The ICMP error a router sends for `p` when only `mtu` bytes fit (RFC
/// 1191 "fragmentation needed" / RFC 8201 "packet too big"), from the
/// address `p` was sent to, quoting its first 64 bytes.
fn too_big_answer(p: &Packet, mtu: u16) -> Vec<u8> {
    let quote = p.ip_bytes()[..64].to_vec();
    let mut icmp = if p.src.is_ipv4() {
        let [hi, lo] = mtu.to_be_bytes();
        vec![3, 4, 0, 0, 0, 0, hi, lo]
    } else {
        let m = (mtu as u32).to_be_bytes();
        vec![2, 0, 0, 0, m[0], m[1], m[2], m[3]]
    };
    icmp.extend(&quote);
    let mut out = Vec::new();
    out.extend(serviceless_tests::packet::CLIENT_MAC);
    out.extend(serviceless_tests::packet::NODE_MAC);
    match (p.dst, p.src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
            ip.extend([0, 0, 0, 0, 64, 1, 0, 0]);
            ip.extend(from.octets());
            ip.extend(to.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend(0x0800u16.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let mut pseudo = Vec::new();
            pseudo.extend(from.octets());
            pseudo.extend(to.octets());
            pseudo.extend((icmp.len() as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, 58]);
            let sum = checksum(&[pseudo, icmp.clone()].concat());
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            out.extend(0x86ddu16.to_be_bytes());
            out.extend([0x60, 0, 0, 0]);
            out.extend((icmp.len() as u16).to_be_bytes());
            out.extend([58, 64]);
            out.extend(from.octets());
            out.extend(to.octets());
        }
        _ => unreachable!(),
    }
    out.extend(icmp);
    out
}

#[test]
fn node_entries_follow_the_backends_that_name_them() {
    if !kernel_tests_enabled("node_entries_follow_the_backends_that_name_them") {
        return;
    }
    let mut a = node_a(vec![app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B)), ("10.244.1.2", Some(NODE_A))])], 0);
    let nodes: Vec<IpAddr> = a.maps().nodes().map(|(_, n)| from_addr(&n.addr)).collect();
    assert_eq!(nodes, [NODE_B.parse::<IpAddr>().unwrap()], "this node's own pods need no entry");
    let local: Vec<u16> = a.maps().backends().map(|(_, b)| b.node).collect();
    assert!(local.contains(&0), "the pod on this node is local");
    // A restarted agent adopts the ids; the pod moving away frees the entry.
    a.restart_reconciler().unwrap();
    assert_eq!(a.reconciler.remote_nodes(), [NODE_B.parse::<IpAddr>().unwrap()]);
    let outcome = a.apply(vec![app_on("remote.example.com", REMOTE_VIP, &[("10.244.1.2", Some(NODE_A))])]);
    assert!(outcome.failed.is_empty());
    assert_eq!(a.maps().nodes().count(), 0);
    assert!(a.reconciler.remote_nodes().is_empty());
}

#[test]
fn snat_mode_translates_the_source_to_this_node_and_replies_back() {
    if !kernel_tests_enabled("snat_mode_translates_the_source_to_this_node_and_replies_back") {
        return;
    }
    let net = node_net("snat");
    enter(&net.ns.name).unwrap();
    let mut a = TestDataplane::new(TEST_SIZES).expect("load the dataplane");
    let snat = Fabric { flags: FABRIC_F_ENCAP | FABRIC_F_SNAT, snat_port_min: SNAT_PORTS.0, snat_port_max: SNAT_PORTS.1, ..fabric(NODE_A, 0) };
    a.join_fabric(&[NODE_A], &snat).unwrap();
    let o = a.apply(vec![app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B))])]);
    assert!(o.failed.is_empty(), "{o:?}");
    let clamped_mss = MTU - ENCAP_OVERHEAD - 40;
    let frame = |dst: [u8; 6], src: [u8; 6], p: &Packet| [&dst[..], &src[..], &[0x08, 0x00][..], &p.ip_bytes()[..]].concat();

    // The SYN leaves for the pod with this node's address and a port of the range.
    let input = syn(44000, REMOTE_VIP);
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &input.frame()).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::SnatForwarded)), (XDP_TX, 1), "{}", hex(&out));
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "SNAT port {port}");
    let translated = input.clone().with(|p| p.tcp_options = mss_option(clamped_mss)).nat(Some((NODE_A, port)), Some((REMOTE_POD, 8080)));
    let want = frame(NODE_B_MAC, net.mac, &translated);
    assert_eq!(out, want, "translated SYN\n got:\n{}\nwant:\n{}", hex(&out), hex(&want));

    // The pod's SYN-ACK comes back to this node and leaves for the client from the VIP.
    let syn_ack = Packet::tcp(REMOTE_POD, 8080, NODE_A, port).flags(SYN | ACK).with(|p| {
        p.seq = 9000;
        p.payload.clear();
    });
    let before = a.verdicts();
    let (action, out) = a.ingress_on(net.ifindex, &frame(net.mac, NODE_B_MAC, &syn_ack)).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::SnatReplyTranslated)), (XDP_TX, 1), "{}", hex(&out));
    let want = frame(ROUTER_MAC, net.mac, &syn_ack.nat(Some((REMOTE_VIP, 80)), Some((CLIENT, 44000))));
    assert_eq!(out, want, "translated SYN-ACK\n got:\n{}\nwant:\n{}", hex(&out), hex(&want));

    // The client's ACK completes the handshake and follows the connection.
    let ack = Packet::tcp(CLIENT, 44000, REMOTE_VIP, 80).flags(ACK).with(|p| p.ack = 9001);
    let promoted = a.ct_events()[&CtEvent::Promoted];
    let (action, out) = a.ingress_on(net.ifindex, &ack.frame()).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(out, frame(NODE_B_MAC, net.mac, &ack.nat(Some((NODE_A, port)), Some((REMOTE_POD, 8080)))));
    assert_eq!(a.ct_events()[&CtEvent::Promoted] - promoted, 1, "established");

    // The node's own traffic at the same address passes untouched: another
    // port of the range nobody translated to, a port outside it.
    for (sport, dport) in [(8080, if port == SNAT_PORTS.0 { SNAT_PORTS.1 } else { SNAT_PORTS.0 }), (8080, 22)] {
        let own = frame(net.mac, NODE_B_MAC, &Packet::tcp(REMOTE_POD, sport, NODE_A, dport).flags(ACK));
        let before = a.verdicts();
        let (action, out) = a.ingress_on(net.ifindex, &own).unwrap();
        assert_eq!((action, delta(&a, &before, Verdict::PassNotVip)), (XDP_PASS, 1));
        assert_eq!(out, own);
    }

    // Four ports, four connections to the pod; the fifth is refused, counted.
    for sport in 44001..44004 {
        let (action, _) = a.ingress_on(net.ifindex, &syn(sport, REMOTE_VIP).frame()).unwrap();
        assert_eq!(action, XDP_TX, "connection from {sport} takes one of the remaining ports");
    }
    let before = a.verdicts();
    let (action, _) = a.ingress_on(net.ifindex, &syn(44010, REMOTE_VIP).frame()).unwrap();
    assert_eq!((action, delta(&a, &before, Verdict::DropSnatPortsExhausted)), (XDP_DROP, 1));
    let ports: std::collections::BTreeSet<u16> =
        a.conntrack().iter().filter(|(k, _)| k.dir == 0).map(|(_, e)| u16::from_be(e.client_port)).collect();
    assert_eq!(ports, (SNAT_PORTS.0..=SNAT_PORTS.1).collect(), "each connection has its own port");
}

#[test]
fn a_flow_sent_to_another_node_keeps_going_there_when_the_pods_change() {
    if !kernel_tests_enabled("a_flow_sent_to_another_node_keeps_going_there_when_the_pods_change") {
        return;
    }
    let net = node_net("mem");
    enter(&net.ns.name).unwrap();
    let both = app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B)), ("10.244.3.2", Some(NODE_C))]);
    let only_b = app_on("remote.example.com", REMOTE_VIP, &[(REMOTE_POD, Some(NODE_B))]);
    let mut a = node_a(vec![both.clone()], 0);
    let node_of = |out: &[u8]| Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string();
    // A flow the hash sends to node C once both pods are there ...
    let sport = (45000..45100)
        .find(|sport| {
            let (_, out) = a.ingress_on(net.ifindex, &Packet::tcp(CLIENT, *sport, REMOTE_VIP, 80).flags(ACK).frame()).unwrap();
            node_of(&out) == NODE_C
        })
        .expect("some flow hashes to node C");
    // ... opened while only node B had a pod.
    let mut a2 = node_a(vec![only_b], 0);
    std::mem::swap(&mut a, &mut a2);
    drop(a2);
    let (_, out) = a.ingress_on(net.ifindex, &syn(sport, REMOTE_VIP).frame()).unwrap();
    assert_eq!(node_of(&out), NODE_B);
    // Node C gets a pod: the connection's next segments still go to node B.
    assert!(a.upsert(both).failed.is_empty());
    for _ in 0..3 {
        let (action, out) = a.ingress_on(net.ifindex, &Packet::tcp(CLIENT, sport, REMOTE_VIP, 80).flags(ACK).frame()).unwrap();
        assert_eq!((action, node_of(&out)), (XDP_TX, NODE_B.to_string()), "the remembered node, not the new hash winner");
    }
    // A SYN (a new connection on the same tuple) chooses anew.
    let (_, out) = a.ingress_on(net.ifindex, &syn(sport, REMOTE_VIP).frame()).unwrap();
    assert_eq!(node_of(&out), NODE_C, "a new connection takes the current choice");
}
