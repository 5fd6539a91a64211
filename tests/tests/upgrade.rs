//! Upgrading a running node from the previous release's agent (map layout
//! v1: loose flow tables) to this one, with live traffic: the pinned maps
//! are adopted or migrated, connections keep working, the old maps go.
//! Needs root and the previous agent binary in SERVICELESS_PREVIOUS_BIN
//! (`cargo xtask test` builds it from git); skipped with a message otherwise.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use serviceless_tests::{
    kernel_tests_enabled,
    scenario::{inspect_with, write_apps},
    topology::{Topology, http_get},
};

const VIP: &str = "10.96.0.10:80";

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_svl-test-server"))
}

#[test]
fn upgrading_from_the_previous_release_keeps_connections() {
    if !kernel_tests_enabled("upgrade") {
        return;
    }
    let Some(previous) = std::env::var_os("SERVICELESS_PREVIOUS_BIN").map(PathBuf::from) else {
        eprintln!("SKIP upgrade: set SERVICELESS_PREVIOUS_BIN to the previous release's agent (cargo xtask test builds it)");
        return;
    };
    let mut topo = Topology::new("svu1", &server_bin()).expect("topology");
    topo.add_pod(1, "pod-1").expect("pod");
    topo.add_pod(2, "pod-2").expect("pod");
    let file = topo.work_dir.join("apps.yaml");
    let pods = [("pod-1", "10.244.1.2", true), ("pod-2", "10.244.2.2", true)];
    write_apps(&file, &[("hello.example.com", "10.96.0.10", &pods)]);
    let mut old = topo.start_previous_agent(&previous, &file, "old.log").expect("previous agent");
    topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", topo.agent_log("old.log")));

    // A keep-alive connection made under the old agent, and new connections all along.
    let mut kept = topo.connect(VIP).expect("keep-alive connection");
    let first = kept.get().expect("request").server().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let client = {
        let ns = topo.client.name.clone();
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        thread::spawn(move || {
            serviceless_tests::netns::enter(&ns).expect("client namespace");
            while !stop.load(Ordering::Relaxed) {
                match http_get(VIP, "/") {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().expect("lock").push(format!("{:?}", other.map(|r| r.status))),
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));

    // The upgrade: the old agent stops (its programs stay), the new one adopts.
    old.terminate();
    let _new = topo.start_agent(&file, "new.log", &[]).expect("new agent");
    topo.wait_ready(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", topo.agent_log("new.log")));
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");

    let failed = failed.lock().expect("lock");
    let served = ok.load(Ordering::Relaxed);
    eprintln!("upgrade under load: {served} new connections served, {} failed", failed.len());
    assert_eq!(kept.get().expect("the connection made under the old agent survives").server(), first);
    assert!(failed.is_empty(), "{} failed requests (of {served}): {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let log = topo.agent_log("new.log");
    assert!(log.contains("upgraded from map layout v1"), "{log}");
    for old_map in serviceless_common::map_names::previous::ALL {
        assert!(!topo.pin_dir().join(old_map).exists(), "{old_map} unpinned");
    }
    let report = inspect_with(&topo, &["--connections", "100000"]);
    let migrated = report["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .any(|c| c["client"] == kept.local_addr().to_string() && c["table"] == "established");
    assert!(migrated, "the old connection is tracked as established: {report}");
}
