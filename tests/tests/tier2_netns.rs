//! Tier 2: network-namespace VMs on a bridge, the programs really attached to their ports, the
//! real daemon and HTTP API, and sequence-numbered traffic checked at the receivers.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer::{
    agent::PortStats,
    api::{Endpoint, client::Client},
    daemon::{self, DaemonConfig, Running},
    datapath::AttachMode,
};
use enforcer_common::{Outcome, Type3Mode};
use enforcer_lab::{
    netns::Lab,
    traffic::{self, Mesh, Message},
};
use enforcer_tests::{PinRoot, Undo, bpftool_dump, lab_prefix, register_all, require_root, run};

/// A daemon on the lab's bridge and `pins`, serving `pins`' API socket; no buffer (these tests
/// run `drop` mode with exact counters, see tier2_hold.rs) and no snapshots.
fn config(lab: &Lab, pins: &PinRoot) -> DaemonConfig {
    enforcer_tests::daemon_config(&lab.bridge, pins)
}

async fn start(lab: &Lab, pins: &PinRoot, attach: AttachMode) -> (Running, Client) {
    let running = daemon::start(DaemonConfig {
        attach,
        ..config(lab, pins)
    })
    .await
    .expect("starting the daemon");
    let client = Client::new(running.addr.to_string(), None);
    (running, client)
}

fn by_port(stats: &[PortStats]) -> BTreeMap<String, PortStats> {
    stats
        .iter()
        .filter_map(|s| Some((s.port.clone()?, s.clone())))
        .collect()
}

/// Every phase of the scenario, checked exactly: what each receiver got and what each port
/// counted, for one attach mode.
async fn phased_exact(attach: AttachMode, tag: char) {
    require_root();
    let lab = Lab::create(&lab_prefix(tag), 3).unwrap();
    let pins = PinRoot::new("phased");
    let (running, client) = start(&lab, &pins, attach).await;
    assert_eq!(
        client.ports().await.unwrap().len(),
        3,
        "attached to every bridge member"
    );
    client.set_mode(Type3Mode::Drop).await.unwrap();
    register_all(&client, &lab.vms).await;

    let mesh = Mesh::new(&lab).unwrap();
    let names: Vec<String> = lab.vms.iter().map(|v| v.name.clone()).collect();
    let per_pair = 25;
    let phases = traffic::run_phases(&mesh, &[1, 0, 2], per_pair, &names, |vm| {
        let mac = lab.vms[vm].mac;
        let client = client.clone();
        async move {
            client
                .advance(mac)
                .await
                .map(|_| ())
                .map_err(std::io::Error::other)
        }
    })
    .await
    .unwrap();

    // Expected per-port counters, derived from the epochs of each phase.
    let mut expected: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
    for phase in &phases {
        for p in &phase.pairs {
            let outcome = if p.color == p.receiver_epoch {
                Outcome::Type1
            } else if p.color < p.receiver_epoch {
                Outcome::Type2
            } else {
                Outcome::Type3Dropped
            };
            let want = if outcome == Outcome::Type3Dropped {
                0
            } else {
                p.sent
            };
            assert_eq!(
                p.delivered, want,
                "{}: {} -> {}: delivered",
                phase.title, p.from, p.to
            );
            assert_eq!(p.type3_delivered, 0, "{}: Type-3 delivered", phase.title);
            assert_eq!(p.reordered, 0, "{}: order", phase.title);
            *expected
                .entry(lab.vms[p.from].port.clone())
                .or_default()
                .entry(outcome.name())
                .or_default() += u64::from(p.sent);
        }
    }
    // The scenario really produced each type (so the checks above could fail).
    let all: Vec<&str> = expected.values().flat_map(|m| m.keys().copied()).collect();
    for name in ["type1", "type2", "type3_dropped"] {
        assert!(all.contains(&name), "scenario produced no {name}");
    }

    let stats = by_port(&client.stats().await.unwrap());
    for (port, want) in &expected {
        let got = &stats[port];
        for o in Outcome::ALL {
            let w = want.get(o.name()).copied().unwrap_or(0);
            assert_eq!(got.frames(o), w, "port {port}: {} counter", o.name());
        }
        // Each message is one 14+20+8+16 = 58-byte frame.
        let bytes: u64 = got.counters.values().map(|c| c.bytes).sum();
        assert_eq!(bytes, got.total_frames() * 58, "port {port}: bytes");
    }

    // bpftool reads the pinned maps with named fields (BTF).
    let dump = bpftool_dump(&pins.path().join("epochs"));
    let entries = dump.as_array().expect("a JSON array");
    assert_eq!(entries.len(), 3);
    for e in entries {
        // `formatted` is bpftool's BTF view: named fields, present only with BTF.
        let f = &e["formatted"];
        assert_eq!(f["value"]["epoch"], 1, "named field `epoch`: {e}");
        assert_eq!(f["value"]["group"], 1, "named field `group`: {e}");
        assert!(f["key"]["addr"].is_array(), "named field `addr`: {e}");
    }
    let stats_dump = bpftool_dump(&pins.path().join("port_stats"));
    let first = &stats_dump.as_array().unwrap()[0]["formatted"];
    assert!(
        first["values"][0]["value"]["type3_dropped"]["frames"].is_u64(),
        "per-CPU named counters: {first}"
    );

    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phased_epochs_exact_tc() {
    phased_exact(AttachMode::Tc, 'a').await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phased_epochs_exact_xdp() {
    phased_exact(AttachMode::Xdp, 'b').await;
}

/// Continuous traffic between 4 VMs while their epochs advance in a shuffled order, twice.
/// A receiver must never hold a message coloured above its epoch. The controller raises a
/// receiver's flag *before* updating the map, and a sender's flag *after*, so a message marked
/// post-snapshot that arrives while the receiver's flag is still down was classified with the
/// sender advanced and the receiver not: it would be a real violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_advances_never_deliver_type3() {
    require_root();
    let n = 4;
    let lab = Lab::create(&lab_prefix('c'), n).unwrap();
    let pins = PinRoot::new("concurrent");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    client.set_mode(Type3Mode::Drop).await.unwrap();
    register_all(&client, &lab.vms).await;

    let mesh = Arc::new(Mesh::new(&lab).unwrap());
    let sender_epoch: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let receiver_epoch: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));

    let sender = {
        let (mesh, sender_epoch, stop, sent) = (
            mesh.clone(),
            sender_epoch.clone(),
            stop.clone(),
            sent.clone(),
        );
        std::thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                for from in 0..n {
                    let color = sender_epoch[from].load(Ordering::SeqCst);
                    for to in (0..n).filter(|t| *t != from) {
                        mesh.send(Message {
                            from: from as u16,
                            to: to as u16,
                            seq,
                            color,
                        })
                        .unwrap();
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
                seq += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    let receiver = {
        let (mesh, receiver_epoch, stop) = (mesh.clone(), receiver_epoch.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut received, mut violations) = (0u64, Vec::new());
            let mut quiet_since = None::<Instant>;
            loop {
                let mut any = false;
                for to in 0..n {
                    // Read the flag before draining: anything drained was delivered earlier.
                    let epoch = receiver_epoch[to].load(Ordering::SeqCst);
                    for m in mesh.drain(to) {
                        any = true;
                        received += 1;
                        if m.color > epoch {
                            violations.push((m, epoch));
                        }
                    }
                }
                if stop.load(Ordering::SeqCst) {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if any {
                        quiet_since = Some(Instant::now());
                    } else if since.elapsed() > Duration::from_millis(300) {
                        return (received, violations);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for round in 1..=2u32 {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        for vm in order {
            tokio::time::sleep(Duration::from_millis(150)).await;
            receiver_epoch[vm].store(round, Ordering::SeqCst);
            client.set_epoch(lab.vms[vm].mac, round).await.unwrap();
            sender_epoch[vm].store(round, Ordering::SeqCst);
        }
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::SeqCst);
    sender.join().unwrap();
    let (received, violations) = receiver.join().unwrap();

    assert!(violations.is_empty(), "Type-3 delivered: {violations:?}");
    let stats = client.stats().await.unwrap();
    let counted: u64 = stats.iter().map(PortStats::total_frames).sum();
    let dropped: u64 = stats.iter().map(|s| s.frames(Outcome::Type3Dropped)).sum();
    let sent = u64::from(sent.load(Ordering::SeqCst));
    assert_eq!(counted, sent, "every frame sent was seen and counted once");
    assert_eq!(
        received + dropped,
        sent,
        "every frame was delivered or counted as dropped"
    );
    assert!(
        dropped > 0,
        "the skew produced Type-3 frames (else this test proves nothing)"
    );
    running.stop().await.unwrap();
}

/// Invariant 6: with the daemon gone, enforcement and counting go on; a new daemon adopts the
/// pinned maps (epochs kept, not reset) and the pinned links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datapath_outlives_the_daemon_and_is_adopted() {
    require_root();
    let lab = Lab::create(&lab_prefix('r'), 2).unwrap();
    let pins = PinRoot::new("restart");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    client.set_mode(Type3Mode::Drop).await.unwrap();
    register_all(&client, &lab.vms).await;
    client.advance(lab.vms[0].mac).await.unwrap();
    running.stop().await.unwrap();
    drop(client);

    // Daemon gone: vm1 (epoch 1) → vm2 (epoch 0) is Type-3 and must still be dropped.
    let mesh = Mesh::new(&lab).unwrap();
    let phase = traffic::exchange(&mesh, &[1, 0], 10, "daemon down").unwrap();
    let p12 = phase.pairs.iter().find(|p| p.from == 0).unwrap();
    let p21 = phase.pairs.iter().find(|p| p.from == 1).unwrap();
    assert_eq!(
        (p12.delivered, p21.delivered),
        (0, 10),
        "enforcement without the daemon"
    );

    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    let vms = client.vms().await.unwrap();
    assert_eq!(
        vms.iter().map(|v| v.epoch).collect::<Vec<_>>(),
        vec![1, 0],
        "epochs adopted, not reset"
    );
    assert_eq!(
        client.config().await.unwrap().type3_mode,
        Type3Mode::Drop,
        "mode adopted"
    );
    let stats = by_port(&client.stats().await.unwrap());
    assert_eq!(
        stats[&lab.vms[0].port].frames(Outcome::Type3Dropped),
        10,
        "drops counted while down"
    );
    let links = std::fs::read_dir(pins.path().join("links"))
        .unwrap()
        .count();
    assert_eq!(
        links, 2,
        "one pinned link per port, adopted rather than duplicated"
    );

    // The adopted links run the new daemon's program: advancing vm2 lets vm1 through.
    client.advance(lab.vms[1].mac).await.unwrap();
    let phase = traffic::exchange(&mesh, &[1, 1], 10, "after restart").unwrap();
    assert!(
        phase.pairs.iter().all(|p| p.delivered == 10),
        "{:?}",
        phase.pairs
    );
    running.stop().await.unwrap();
}

/// Ports are followed through netlink: a new bridge member is attached, a removed one detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_follow_bridge_membership() {
    require_root();
    let lab = Lab::create(&lab_prefix('p'), 1).unwrap();
    let pins = PinRoot::new("ports");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    assert_eq!(client.ports().await.unwrap().len(), 1);

    let extra = format!("{}x", lab.prefix);
    let ip = |args: &[&str]| {
        assert!(
            Command::new("ip").args(args).status().unwrap().success(),
            "ip {args:?}"
        )
    };
    ip(&[
        "link",
        "add",
        &extra,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{extra}y"),
    ]);
    ip(&["link", "set", &extra, "master", &lab.bridge, "up"]);
    let wait_for = |want: usize| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let ports = client.ports().await.unwrap();
                if ports.len() == want || Instant::now() > deadline {
                    return ports;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let ports = wait_for(2).await;
    assert!(
        ports.iter().any(|p| p.name == extra),
        "new member attached: {ports:?}"
    );
    ip(&["link", "del", &extra]);
    let ports = wait_for(1).await;
    assert!(
        !ports.iter().any(|p| p.name == extra),
        "deleted port detached: {ports:?}"
    );
    running.stop().await.unwrap();
}

/// Jumbo frames on real ports (MTU 9000): classified, delivered and counted in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_frames_on_real_ports() {
    require_root();
    let lab = Lab::create(&lab_prefix('j'), 2).unwrap();
    lab.set_mtu(9000).unwrap();
    let pins = PinRoot::new("jumbo");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    client.set_mode(Type3Mode::Drop).await.unwrap();
    register_all(&client, &lab.vms).await;
    let a = lab.udp_socket(0, 47_100).unwrap();
    let b = lab.udp_socket(1, 47_100).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let payload = vec![0x5a; 8900];
    a.send_to(&payload, (lab.vms[1].ip, 47_100)).unwrap();
    let mut buf = vec![0; 9100];
    assert_eq!(
        b.recv(&mut buf).unwrap(),
        8900,
        "jumbo Type-1 frame delivered whole"
    );
    client.advance(lab.vms[0].mac).await.unwrap();
    a.send_to(&payload, (lab.vms[1].ip, 47_100)).unwrap();
    assert!(
        b.recv(&mut buf).is_err(),
        "jumbo Type-3 frame not delivered"
    );
    let stats = by_port(&client.stats().await.unwrap());
    let port = &stats[&lab.vms[0].port];
    assert_eq!(port.counters["type1"].bytes, 8900 + 8 + 20 + 14);
    assert_eq!(port.counters["type3_dropped"].bytes, 8900 + 8 + 20 + 14);
    running.stop().await.unwrap();
}

/// Case R1 of the datapath review: the port program does not switch off the other tc filters
/// on the port (libvirt's `<bandwidth>`, an operator's own). An ingress u32 filter on vm1's
/// port mirrors every frame to an ifb device; with the daemon attached it still sees each
/// frame vm1 sends, and the frames still arrive. Before, the program's pass verdict ended tc
/// processing on the port and the filter saw nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tc_filters_on_a_port_keep_running() {
    require_root();
    let lab = Lab::create(&lab_prefix('f'), 2).unwrap();
    let ifb = format!("{}ifb", lab.prefix);
    run(&["ip", "link", "add", &ifb, "type", "ifb"]);
    let _ifb = Undo(vec!["ip".into(), "link".into(), "del".into(), ifb.clone()]);
    run(&["ip", "link", "set", &ifb, "up"]);
    let port = lab.vms[0].port.clone();
    run(&["tc", "qdisc", "add", "dev", &port, "clsact"]);
    run(&[
        "tc", "filter", "add", "dev", &port, "ingress", "protocol", "all", "u32", "match", "u32",
        "0", "0", "action", "mirred", "egress", "mirror", "dev", &ifb,
    ]);
    let mirrored = || -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{ifb}/statistics/rx_packets"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let pins = PinRoot::new("tcfilters");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    register_all(&client, &lab.vms).await;
    let a = lab.udp_socket(0, 47_150).unwrap();
    let b = lab.udp_socket(1, 47_150).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let before = mirrored();
    for i in 0..20u8 {
        a.send_to(&[i; 32], (lab.vms[1].ip, 47_150)).unwrap();
    }
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        b.recv(&mut buf).expect("delivered");
    }
    assert_eq!(mirrored() - before, 20, "the filter saw every frame");
    let stats = by_port(&client.stats().await.unwrap());
    assert_eq!(stats[&port].counters["type1"].frames, 20, "and so did ours");
    running.stop().await.unwrap();
}

/// Bad input gets clear 4xx errors; nothing is changed by a refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rejects_bad_input() {
    require_root();
    let lab = Lab::create(&lab_prefix('e'), 2).unwrap();
    let pins = PinRoot::new("api");
    let (running, client) = start(&lab, &pins, AttachMode::Tc).await;
    let (vm1, vm2) = (&lab.vms[0], &lab.vms[1]);
    client
        .register_vm(vm1.mac, 1, &vm1.port, Some(3))
        .await
        .unwrap();

    assert_eq!(
        status(client.register_vm(vm1.mac, 1, &vm2.port, None).await),
        Some(409),
        "MAC twice"
    );
    assert_eq!(
        status(client.register_vm(vm2.mac, 1, &vm1.port, None).await),
        Some(409),
        "port twice"
    );
    assert_eq!(
        status(client.register_vm(vm2.mac, 1, "nosuchport0", None).await),
        Some(400),
        "unknown port"
    );
    assert_eq!(
        status(client.register_vm(vm2.mac, 1, "lo", None).await),
        Some(409),
        "port not attached"
    );
    assert_eq!(
        status(client.set_epoch(vm1.mac, 2).await),
        Some(409),
        "epoch backwards"
    );
    assert_eq!(
        status(client.advance(vm2.mac).await),
        Some(404),
        "unknown VM"
    );
    assert_eq!(
        client.vm(vm1.mac).await.unwrap().epoch,
        3,
        "refused requests changed nothing"
    );
    // A new member joins at the group's epoch.
    assert_eq!(
        client
            .register_vm(vm2.mac, 1, &vm2.port, None)
            .await
            .unwrap()
            .epoch,
        3
    );

    let http = reqwest_like_get(&running, "/v1/vms/not-a-mac").await;
    assert_eq!(http.0, 400);
    assert!(http.1.contains("bad MAC address"), "{}", http.1);
    // Snapshot endpoints: bad input is a 400 before anything else; without libvirt, a 503
    // that says why.
    let bad_bridge = client
        .restore("g-1-e1", Some("br0'/><disk"))
        .await
        .unwrap_err();
    assert_eq!(
        bad_bridge.status().map(|s| s.as_u16()),
        Some(400),
        "{bad_bridge}"
    );
    assert_eq!(
        status(client.define_group("web", None, &[]).await),
        Some(503),
        "snapshots off"
    );
    let off = client.snapshots(None).await.unwrap_err();
    assert_eq!(off.status().map(|s| s.as_u16()), Some(503));
    assert!(off.to_string().contains("--no-libvirt"), "{off}");
    let metrics = client.metrics().await.unwrap();
    assert!(
        metrics.contains("enforcer_vm_epoch{mac=\"02:00:5e:10:00:01\",group=\"1\"} 3"),
        "{metrics}"
    );
    running.stop().await.unwrap();

    // TCP needs a token, on loopback too: any local account can reach a loopback port.
    for listen in ["0.0.0.0:0", "127.0.0.1:0"] {
        let err = daemon::start(DaemonConfig {
            listen: listen.parse().unwrap(),
            ..config(&lab, &pins)
        })
        .await
        .err()
        .expect("TCP without a token is refused");
        assert!(err.to_string().contains("token"), "{err}");
    }

    // With a token, requests without it are refused.
    let running = daemon::start(DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some("s3cret".into()),
        ..config(&lab, &pins)
    })
    .await
    .unwrap();
    let base = running.addr.to_string();
    assert_eq!(status(Client::new(&base, None).vms().await), Some(401));
    assert_eq!(
        status(Client::new(&base, Some("wrong".into())).vms().await),
        Some(401)
    );
    assert_eq!(
        Client::new(&base, Some("s3cret".into()))
            .vms()
            .await
            .unwrap()
            .len(),
        2
    );
    running.stop().await.unwrap();
}

fn status<T>(r: Result<T, enforcer::api::client::ClientError>) -> Option<u16> {
    r.err().and_then(|e| e.status()).map(|s| s.as_u16())
}

/// One HTTP request over a unix socket from a thread that has become `uid`/`gid` (with no
/// supplementary groups): credentials are per thread at the system-call level, and this thread
/// ends with them. `Err`: the connection was refused (the errno's kind).
fn request_as(
    uid: u32,
    gid: u32,
    socket: &std::path::Path,
    request: String,
) -> Result<u16, std::io::ErrorKind> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        // SAFETY: raw system calls on this thread's own credentials (glibc's wrappers would
        // change every thread's); groups first, the uid last (it takes the right to change).
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).map_err(|e| e.kind())?;
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        Ok(text.split_whitespace().nth(1).unwrap().parse().unwrap())
    })
    .join()
    .unwrap()
}

const NOBODY: u32 = 65534;

/// Case S1 of the security review: any local account controlled the daemon (`PUT /v1/config`
/// answered 200 to `nobody` and turned enforcement off). Now the API is a unix socket owned by
/// root, mode 0660: `nobody` cannot connect; were the socket opened to everyone, the daemon
/// still refuses a peer that is not root, its own user or in its API group; a member of that
/// group may use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_apis_owners_can_use_it() {
    require_root();
    let lab = Lab::create(&lab_prefix('o'), 1).unwrap();
    let pins = PinRoot::new("owners");
    let other_pins = PinRoot::new("owners2");
    let socket = match pins.api_socket() {
        Endpoint::Unix(path) => path,
        other => panic!("{other}"),
    };
    let body = r#"{"type3_mode":"monitor"}"#;
    let put = format!(
        "PUT /v1/config HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    for group in [None, Some("nogroup")] {
        let running = daemon::start(DaemonConfig {
            api_group: group.map(Into::into),
            tls: None,
            type3_mode: Some(Type3Mode::Drop),
            ..config(&lab, &pins)
        })
        .await
        .unwrap();
        let client = Client::new(running.addr.to_string(), None);
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let meta = std::fs::metadata(&socket).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
        assert_eq!(meta.uid(), 0);
        let as_nobody = request_as(NOBODY, NOBODY, &socket, put.clone());
        match group {
            None => {
                assert_eq!(
                    as_nobody,
                    Err(std::io::ErrorKind::PermissionDenied),
                    "nobody may not even connect"
                );
                // The file's mode is the first gate, not the only one.
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
                assert_eq!(
                    request_as(NOBODY, NOBODY, &socket, put.clone()),
                    Ok(403),
                    "a peer that is not root, the daemon's user or in its group is refused"
                );
                assert_eq!(client.config().await.unwrap().type3_mode, Type3Mode::Drop);
            }
            Some(_) => {
                assert_eq!(meta.gid(), NOBODY, "owned by the API group");
                assert_eq!(as_nobody, Ok(200), "a member of the API group may use it");
                assert_eq!(
                    client.config().await.unwrap().type3_mode,
                    Type3Mode::Monitor
                );
            }
        }
        // A second daemon on a live socket is refused, by the socket (its own pins, so the
        // pin root's lock does not refuse it first); the first one keeps serving.
        let second = daemon::start(DaemonConfig {
            pin_root: other_pins.path().to_owned(),
            listen: pins.api_socket(),
            ..config(&lab, &pins)
        })
        .await
        .err()
        .expect("a second daemon on the same socket is refused");
        assert!(
            second.to_string().contains("another daemon serves the API"),
            "{second}"
        );
        assert!(client.config().await.is_ok(), "the first still serves");
        running.stop().await.unwrap();
        assert!(!socket.exists(), "the socket goes with the daemon");
    }
}

/// A raw GET, for paths the typed client cannot express.
async fn reqwest_like_get(running: &Running, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Endpoint::Unix(socket) = &running.addr else {
        panic!("the tests' daemons serve a unix socket");
    };
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

/// Case S13 of the security review: libvirtd not there when the daemon starts (starting, being
/// restarted) is no reason to leave the VMs unenforced. The daemon starts, its datapath and API
/// run, the snapshot routes answer 503 with the reason, and snapshots come on by themselves
/// once libvirt answers (here: its socket appears where the URI points).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_without_libvirt_and_takes_snapshots_once_it_answers() {
    require_root();
    let lab = Lab::create(&lab_prefix('l'), 1).unwrap();
    let pins = PinRoot::new("nolibvirt");
    let socket =
        std::env::temp_dir().join(format!("enforcer-t2-libvirt-{}.sock", std::process::id()));
    let store = std::env::temp_dir().join(format!("enforcer-t2-store-{}", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let running = daemon::start(DaemonConfig {
        snapshots: Some(enforcer::agent::SnapshotOptions {
            uri: format!("qemu+unix:///system?socket={}", socket.display()),
            store: store.clone(),
            ..Default::default()
        }),
        ..config(&lab, &pins)
    })
    .await
    .expect("the daemon starts without libvirt");
    let client = Client::new(running.addr.to_string(), None);
    assert_eq!(client.health().await.unwrap().status, "ok");
    match client.snapshots(None).await {
        Err(enforcer::api::client::ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert_eq!(
                (status.as_u16(), code),
                (503, enforcer::api::ErrorCode::Unavailable),
                "{message}"
            );
            assert!(message.contains("retrying"), "{message}");
        }
        other => panic!("snapshots before libvirt answers: {other:?}"),
    }
    // libvirtd "comes up" where the URI points.
    std::os::unix::fs::symlink("/run/libvirt/libvirt-sock", &socket).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        match client.snapshots(None).await {
            Ok(list) => break list,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("snapshots never came on: {e}"),
        }
    };
    assert!(listed.is_empty());
    running.stop().await.unwrap();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&store);
}
