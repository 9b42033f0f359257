//! Tier 2 across hosts: two emulated hosts on this machine, each with its own bridge, daemon
//! (agent), pin root and buffer, joined by a VXLAN-GBP overlay (`enforcer_lab::overlay`); a group
//! of network-namespace VMs spanning them. The coordinator's side is `enforcer::hosts::Hosts`,
//! the same code `enforcer coordinator` runs. Checked at the receivers.

use std::time::{Duration, Instant};

use enforcer::{
    api::{
        Endpoint, ErrorCode,
        client::{Client, ClientError},
        pki::{self, Role},
        tls::{ClientTls, TlsFiles},
    },
    daemon::{self, DaemonConfig, Running},
    datapath::{AttachMode, ports::PortSource},
    hold::HoldOptions,
    model::{GroupSpec, MacAddr, VmSpec},
    multihost::Hosts,
    snapshot::{EpochControl, HvError},
};
use enforcer_common::{HoldTotal, Outcome, Type3Mode};
use enforcer_lab::{
    netns::Lab,
    overlay::{HOST_NAMES, Overlay},
    traffic::{Mesh, Message},
};
use enforcer_tests::{PinRoot, lab_prefix, require_root};

const GROUP: u32 = 7;

struct Host {
    pins: PinRoot,
    bridge: String,
    hold_device: String,
    addr: Endpoint,
    running: Option<Running>,
    client: Client,
}

/// An agent on its unix socket, or with `tls` on a loopback TCP port (as agents serve the
/// coordinator between hosts).
async fn start_agent(
    bridge: &str,
    pins: &PinRoot,
    hold_device: &str,
    tls: Option<&TlsFiles>,
) -> Running {
    daemon::start(DaemonConfig {
        ports: PortSource::Bridge(bridge.to_owned()),
        pin_root: pins.path().to_owned(),
        attach: AttachMode::Tc,
        listen: match tls {
            Some(_) => "127.0.0.1:0".parse().unwrap(),
            None => pins.api_socket(),
        },
        token: None,
        api_group: None,
        tls: tls.cloned(),
        type3_mode: Some(Type3Mode::Buffer),
        hold: Some(HoldOptions {
            device: hold_device.to_owned(),
            max_bytes: 16 << 20,
            ..Default::default()
        }),
        snapshots: None,
    })
    .await
    .expect("starting an agent")
}

impl Host {
    async fn start(bridge: &str, hold_device: String, tag: &str) -> Self {
        let pins = PinRoot::new(tag);
        let running = start_agent(bridge, &pins, &hold_device, None).await;
        let addr = running.addr.clone();
        Self {
            pins,
            bridge: bridge.to_owned(),
            hold_device,
            client: Client::new(addr.to_string(), None),
            addr,
            running: Some(running),
        }
    }

    /// An agent serving TLS with a certificate of the CA in `pki` (made for it here); its
    /// client (the test's, as an operator) presents `operator`.
    async fn start_tls(
        bridge: &str,
        hold_device: String,
        tag: &str,
        pki: &std::path::Path,
        operator: &ClientTls,
    ) -> Self {
        let pins = PinRoot::new(tag);
        let (cert, key) = pki::issue(pki, tag, Role::Agent, &["127.0.0.1".into()]).unwrap();
        let files = TlsFiles {
            cert,
            key,
            ca: pki.join("ca.crt"),
        };
        let running = start_agent(bridge, &pins, &hold_device, Some(&files)).await;
        let addr = running.addr.clone();
        Self {
            pins,
            bridge: bridge.to_owned(),
            hold_device,
            client: Client::with_tls(https(&addr), None, Some(operator)),
            addr,
            running: Some(running),
        }
    }

    /// Kills the agent as a crash would (its buffer vanishes with what it holds).
    async fn crash(&mut self) {
        self.running.take().expect("running").crash().await.unwrap();
    }

    /// A new agent on the same pins and address (the coordinator knows it by its URL).
    async fn restart(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.hold_device])
            .output();
        self.running = Some(start_agent(&self.bridge, &self.pins, &self.hold_device, None).await);
    }

    async fn stop(mut self) {
        self.running.take().expect("running").stop().await.unwrap();
    }

    async fn epoch_of(&self, mac: MacAddr) -> u32 {
        self.client.vm(mac).await.expect("a registered VM").epoch
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A crashed buffer leaves its hold device behind on purpose; remove it here.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.hold_device])
            .output();
    }
}

/// Two emulated hosts with `per_host` VMs each, joined by a VXLAN-GBP overlay.
fn two_hosts(tag: char, per_host: &[usize]) -> (Lab, Overlay) {
    let lab = Lab::create_hosts(&lab_prefix(tag), per_host).unwrap();
    let overlay = Overlay::create(
        &format!("{}o", &lab.prefix[..5]),
        [&lab.bridges[0], &lab.bridges[1]],
    )
    .expect("the VXLAN-GBP overlay");
    (lab, overlay)
}

/// The lab's VMs as the coordinator names them (`domain@host`).
fn specs(lab: &Lab) -> Vec<VmSpec> {
    lab.vms
        .iter()
        .map(|v| VmSpec {
            name: format!("{}@{}", v.name, HOST_NAMES[v.host]),
            mac: v.mac,
        })
        .collect()
}

/// Every VM of the lab registered at `epoch` on its owner and as a view everywhere else.
async fn register_all(hosts: &Hosts, lab: &Lab, epoch: u32) {
    for (vm, v) in specs(lab).into_iter().zip(&lab.vms) {
        let (h, port) = (hosts.clone(), v.port.clone());
        let got = blocking(move || h.register(&vm, GROUP, &port, Some(epoch)))
            .await
            .expect("registering on the owner and as a view everywhere else");
        assert_eq!(got, epoch);
    }
}

fn https(addr: &Endpoint) -> String {
    addr.to_string().replace("http://", "https://")
}

/// The coordinator's check before a snapshot: registers again what an agent forgot, with
/// each VM's port from the lab.
async fn reregister(hosts: &Hosts, group: &GroupSpec, lab: &Lab) -> Vec<String> {
    let ports: Vec<(MacAddr, String)> = lab.vms.iter().map(|v| (v.mac, v.port.clone())).collect();
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || {
        h.restore_registrations(&g, &|vm: &VmSpec| {
            Ok(ports
                .iter()
                .find(|(m, _)| *m == vm.mac)
                .expect("a lab VM")
                .1
                .clone())
        })
    })
    .await
    .unwrap()
}

/// Runs blocking coordinator calls off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn send(mesh: &Mesh, from: usize, to: usize, seqs: std::ops::Range<u32>, color: u32) {
    for seq in seqs {
        mesh.send(Message {
            from: from as u16,
            to: to as u16,
            seq,
            color,
        })
        .unwrap();
    }
}

/// What `vm` received from `from` until nothing came for `quiet`, once anything came from
/// it (within 2 s: a first frame across the overlay of a loaded CI machine may take longer
/// than `quiet`; a CI run once saw none within 200 ms of the first send at epoch 0).
fn received(mesh: &Mesh, to: usize, from: usize, quiet: Duration) -> Vec<Message> {
    let ours = |got: &[Message]| -> Vec<Message> {
        got.iter()
            .filter(|m| m.from as usize == from)
            .copied()
            .collect()
    };
    let start = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && start.elapsed() < Duration::from_secs(2) {
        got = ours(&mesh.drain(to));
        std::thread::sleep(Duration::from_millis(2));
    }
    let more = mesh.collect(quiet, Duration::from_secs(10));
    got.extend(ours(&more[to]));
    got
}

fn assert_in_order(got: &[Message], seqs: std::ops::Range<u32>, what: &str) {
    let want: Vec<u32> = seqs.collect();
    let seen: Vec<u32> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seen, want, "{what}: every frame, once, in order");
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A group of three VMs on two hosts: vm1 and vm2 on host A, vm3 on host B.
///
/// 1. vm1 advances on its host only (the coordinator's message to B is "lost"). Its frames
///    to vm3 are Type-3 to A's view of vm3: held on A, on the sender's side.
/// 2. vm3 advances on its host only. Its frames to vm1 are Type-3 to B's stale view of vm1
///    (0): held on B, conservatively (vm1 is really at 1 already).
/// 3. A learns vm3's advance (the coordinator's update). A releases vm1's frames to vm3; they
///    cross the overlay carrying color 1, and B learns from them that vm1 is at 1 — nobody
///    told B — and releases vm3's frames to vm1.
///
/// Every frame arrives once, in order, and none before its receiver advanced. Then vm2
/// advances through the coordinator while B is down: the update is retried until B is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn views_lag_never_lead_and_frames_carry_their_color_across_hosts() {
    require_root();
    let (lab, overlay) = two_hosts('m', &[2, 1]);
    let a = Host::start(&lab.bridges[0], format!("{}h0", lab.prefix), "mh-a").await;
    let mut b = Host::start(&lab.bridges[1], format!("{}h1", lab.prefix), "mh-b").await;
    let hosts = Hosts::new(
        overlay.host_specs([a.addr.to_string(), b.addr.to_string()]),
        None,
        tokio::runtime::Handle::current(),
    );
    let all = specs(&lab);
    let spec = |i: usize| all[i].clone();
    register_all(&hosts, &lab, 0).await;
    let (vm1, vm2, vm3) = (lab.vms[0].mac, lab.vms[1].mac, lab.vms[2].mac);
    let views = b.client.vms().await.unwrap();
    assert!(
        views.iter().any(|v| v.mac == vm1 && v.remote)
            && views.iter().any(|v| v.mac == vm3 && !v.remote),
        "B: vm3 its own, vm1 a view: {views:?}"
    );

    let mesh = Mesh::new(&lab).unwrap();
    // Baseline: the overlay carries the group's traffic both ways.
    send(&mesh, 0, 2, 0..20, 0);
    assert_in_order(
        &received(&mesh, 2, 0, Duration::from_millis(200)),
        0..20,
        "vm1 -> vm3 at epoch 0",
    );
    send(&mesh, 2, 0, 0..20, 0);
    assert_in_order(
        &received(&mesh, 0, 2, Duration::from_millis(200)),
        0..20,
        "vm3 -> vm1 at epoch 0",
    );

    // The coordinator announces the snapshot to epoch 1 everywhere before any owner moves:
    // from now on views accept colors up to 1 (and no higher).
    for host in [&a, &b] {
        host.client.announce(GROUP, 1).await.unwrap();
    }
    // 1. vm1 advances on A only.
    a.client.advance(vm1).await.unwrap();
    assert_eq!(b.epoch_of(vm1).await, 0, "B was not told");
    send(&mesh, 0, 2, 20..120, 1);
    assert!(
        received(&mesh, 2, 0, Duration::from_millis(300)).is_empty(),
        "vm1's post-snapshot frames reached pre-snapshot vm3"
    );
    // vm3's pre-snapshot frames to vm1 are Type-2: delivered.
    send(&mesh, 2, 0, 20..40, 0);
    assert_in_order(
        &received(&mesh, 0, 2, Duration::from_millis(200)),
        20..40,
        "vm3 -> vm1, Type-2",
    );

    // 2. vm3 advances on B only; B's view of vm1 is stale, so vm3's frames to it are held.
    b.client.advance(vm3).await.unwrap();
    send(&mesh, 2, 0, 40..140, 1);
    let early = received(&mesh, 0, 2, Duration::from_millis(300));
    assert!(
        early.is_empty(),
        "held on B while its view of vm1 is 0: {early:?}"
    );
    let learned_before = b.client.health().await.unwrap().learned_epochs;

    // 3. A learns that vm3 advanced: vm1's held frames go; B learns vm1 from their color.
    a.client.raise_epoch(vm3, 1).await.unwrap();
    let got = mesh.collect(Duration::from_millis(400), Duration::from_secs(10));
    let pick = |to: usize, from: usize| -> Vec<Message> {
        got[to]
            .iter()
            .filter(|m| m.from as usize == from)
            .copied()
            .collect()
    };
    let (at_vm3, at_vm1) = (pick(2, 0), pick(0, 2));
    assert_in_order(
        &at_vm3,
        20..120,
        "vm1 -> vm3, held on A, re-injected across",
    );
    wait_for("B to learn vm1's epoch from its frames", async || {
        b.epoch_of(vm1).await == 1
    })
    .await;
    let health = b.client.health().await.unwrap();
    assert!(
        health.learned_epochs > learned_before,
        "B's view rose from a frame's color: {health:?}"
    );
    assert_eq!(health.learn_lost, 0);
    assert_in_order(
        &at_vm1,
        40..140,
        "vm3 -> vm1, held on B until it learned vm1's epoch",
    );
    for m in at_vm3.iter().chain(&at_vm1) {
        assert_eq!(m.color, 1);
    }

    // What each datapath counted: held on the sender's host, Type-1 at the receiver's.
    let holds_a = a.client.holds().await.unwrap();
    let holds_b = b.client.holds().await.unwrap();
    assert_eq!(holds_a.total(HoldTotal::Reinjected), 100, "A: {holds_a:?}");
    assert_eq!(holds_b.total(HoldTotal::Reinjected), 100, "B: {holds_b:?}");
    let stats_a = a.client.stats().await.unwrap();
    let port_vm1 = stats_a
        .iter()
        .find(|s| s.vm == Some(vm1) && !s.remote)
        .expect("vm1's port counters");
    assert_eq!(port_vm1.frames(Outcome::Type3Held), 100);
    let stats_b = b.client.stats().await.unwrap();
    let from_vm1 = stats_b
        .iter()
        .find(|s| s.vm == Some(vm1) && s.remote)
        .expect("B's counters of frames from vm1 (a slot of its own on the overlay)");
    assert_eq!(from_vm1.frames(Outcome::Type3Held), 0, "{from_vm1:?}");
    assert_eq!(
        from_vm1.frames(Outcome::Type1),
        120,
        "20 at epoch 0, 100 re-injected"
    );

    // vm2 advances through the coordinator while B is down: the view update is retried.
    b.crash().await;
    let (h, vm) = (hosts.clone(), spec(1));
    assert_eq!(blocking(move || h.advance(&vm)).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.restart().await;
    wait_for("the retried update to reach the restarted B", async || {
        b.epoch_of(vm2).await == 1
    })
    .await;
    // The restarted agent kept its views (pinned): lagging or level, never ahead.
    assert_eq!(b.epoch_of(vm1).await, 1);
    assert_eq!(b.epoch_of(vm3).await, 1);
    // Everyone at epoch 1: every pair delivers, across the hosts too.
    for (from, to) in [(0usize, 2usize), (2, 0), (1, 2), (2, 1)] {
        send(&mesh, from, to, 200..230, 1);
        assert_in_order(
            &received(&mesh, to, from, Duration::from_millis(200)),
            200..230,
            &format!("vm{} -> vm{} at epoch 1", from + 1, to + 1),
        );
    }
    let propagated = hosts.take_propagation_ms();
    assert!(
        !propagated.is_empty(),
        "the coordinator timed its view updates"
    );

    // B replaced: an agent on empty maps knows nothing. Before a snapshot relies on it, the
    // coordinator registers again what it forgot: vm3 where it runs, at the group's epoch, and
    // the views of vm1 and vm2 at their owners' epochs.
    b.running.take().expect("running").stop().await.unwrap();
    enforcer::datapath::teardown(b.pins.path()).unwrap();
    b.restart().await;
    assert!(b.client.vms().await.unwrap().is_empty(), "a fresh agent");
    let group = GroupSpec {
        name: "g".parse().unwrap(),
        id: GROUP,
        vms: (0..3).map(spec).collect(),
    };
    let again = reregister(&hosts, &group, &lab).await;
    assert_eq!(
        again.len(),
        3,
        "vm3 on b, the views of vm1 and vm2 on b: {again:?}"
    );
    for (mac, remote) in [(vm1, true), (vm2, true), (vm3, false)] {
        let v = b.client.vm(mac).await.unwrap();
        assert_eq!((v.epoch, v.remote), (1, remote), "{v:?}");
    }
    let (h, g) = (hosts.clone(), group.clone());
    let nothing = blocking(move || {
        h.restore_registrations(&g, &|vm: &VmSpec| {
            Err(HvError::failed(&vm.name, "not asked"))
        })
    })
    .await
    .unwrap();
    assert!(
        nothing.is_empty(),
        "nothing forgotten any more: {nothing:?}"
    );

    // B's overlay device made again (new ifindex): its views pointed at the old one, so frames
    // from vm1 and vm2 would be foreign there. The check before a snapshot moves them.
    overlay.recreate(1, &lab.bridges[1]).unwrap();
    let new_ifindex = enforcer::datapath::ifindex_of(&overlay.devices[1]).unwrap();
    wait_for("B to attach its new overlay port", async || {
        b.client
            .ports()
            .await
            .unwrap()
            .iter()
            .any(|p| p.ifindex == new_ifindex)
    })
    .await;
    let again = reregister(&hosts, &group, &lab).await;
    assert_eq!(again.len(), 2, "the views of vm1 and vm2 on b: {again:?}");
    for mac in [vm1, vm2] {
        let v = b.client.vm(mac).await.unwrap();
        assert_eq!(
            (v.epoch, v.remote, v.ifindex),
            (1, true, new_ifindex),
            "{v:?}"
        );
    }
    send(&mesh, 2, 0, 300..330, 1);
    assert_in_order(
        &received(&mesh, 0, 2, Duration::from_millis(200)),
        300..330,
        "vm3 -> vm1 through the replaced agent",
    );

    a.stop().await;
    b.stop().await;
    drop(overlay);
}

/// An aborted snapshot across hosts moves the members forward, never back: the VM that had
/// advanced keeps its epoch, the others join it, held frames are released, and every view
/// ends level with its owner. The agents serve TLS with client certificates, as deployed
/// between hosts (`enforcer tls`), and the coordinator reaches them with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abort_across_hosts_moves_forward_and_releases_held_frames() {
    require_root();
    let (lab, overlay) = two_hosts('n', &[1, 1]);
    let pki_dir = std::env::temp_dir().join(format!("enforcer-mh-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pki_dir);
    let ca = pki::new_ca(&pki_dir).unwrap();
    let (op_crt, op_key) = pki::issue(&pki_dir, "op", Role::Operator, &[]).unwrap();
    let operator = ClientTls::new(&ca, Some((&op_crt, &op_key))).unwrap();
    let (co_crt, co_key) = pki::issue(&pki_dir, "co", Role::Coordinator, &[]).unwrap();
    let coordinator = ClientTls::new(&ca, Some((&co_crt, &co_key))).unwrap();
    let a = Host::start_tls(
        &lab.bridges[0],
        format!("{}h0", lab.prefix),
        "ab-a",
        &pki_dir,
        &operator,
    )
    .await;
    let b = Host::start_tls(
        &lab.bridges[1],
        format!("{}h1", lab.prefix),
        "ab-b",
        &pki_dir,
        &operator,
    )
    .await;
    let _ = std::fs::remove_dir_all(&pki_dir);
    let hosts = Hosts::with_tls(
        overlay.host_specs([https(&a.addr), https(&b.addr)]),
        None,
        Some(&coordinator),
        tokio::runtime::Handle::current(),
    );
    let specs = specs(&lab);
    register_all(&hosts, &lab, 3).await;
    let mesh = Mesh::new(&lab).unwrap();
    let group = GroupSpec {
        name: "g".parse().unwrap(),
        id: GROUP,
        vms: specs.clone(),
    };
    // The snapshot to 4 is announced; vm1 (A) advanced in it, and it is about to fail; vm2
    // (B) did not advance.
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || h.announce(&g, 4)).await.unwrap();
    let (h, vm) = (hosts.clone(), specs[0].clone());
    blocking(move || h.advance(&vm)).await.unwrap();
    send(&mesh, 0, 1, 0..50, 4);
    assert!(received(&mesh, 1, 0, Duration::from_millis(300)).is_empty());

    let h = hosts.clone();
    blocking(move || h.abort_epochs(&group, 3)).await.unwrap();
    assert_in_order(
        &received(&mesh, 1, 0, Duration::from_millis(300)),
        0..50,
        "released by the abort",
    );
    for host in [&a, &b] {
        for v in host.client.vms().await.unwrap() {
            assert_eq!(v.epoch, 4, "forward, never back: {v:?}");
        }
    }
    let h = hosts.clone();
    let report = blocking(move || h.hold_report()).await.unwrap().unwrap();
    // Held on A (the sender's side); B may hold them again briefly behind its own release of
    // vm2 (held for order), so the merged report adds both agents up.
    let (on_a, on_b) = (
        a.client.holds().await.unwrap().total(HoldTotal::Reinjected),
        b.client.holds().await.unwrap().total(HoldTotal::Reinjected),
    );
    assert_eq!(on_a, 50);
    assert_eq!(
        report.total(HoldTotal::Reinjected),
        on_a + on_b,
        "the merged report of both agents"
    );
    a.stop().await;
    b.stop().await;
    drop(overlay);
}

/// Case S5 of the security review: one VXLAN-GBP packet from the underlay, claiming to come
/// from vm1 with a color of the forger's choice, must not raise host B's view of vm1 above
/// what the coordinator announced (invariant 2 across hosts: a view lags, never leads). It is
/// dropped and counted `forged_color`; a color up to the announced epoch is vm1's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_color_never_raises_a_view_above_the_announced_epoch() {
    require_root();
    let (lab, overlay) = two_hosts('f', &[1, 1]);
    let a = Host::start(&lab.bridges[0], format!("{}h0", lab.prefix), "fg-a").await;
    let b = Host::start(&lab.bridges[1], format!("{}h1", lab.prefix), "fg-b").await;
    let hosts = Hosts::new(
        overlay.host_specs([a.addr.to_string(), b.addr.to_string()]),
        None,
        tokio::runtime::Handle::current(),
    );
    register_all(&hosts, &lab, 0).await;
    let (vm1, vm2) = (lab.vms[0].mac, lab.vms[1].mac);
    let forged_at_b = async || {
        b.client
            .stats()
            .await
            .unwrap()
            .iter()
            .find(|s| s.vm == Some(vm1) && s.remote)
            .expect("B's counters of frames from vm1")
            .frames(Outcome::ForgedColor)
    };
    let forge = |color: u32| {
        overlay
            .forge(1, vm1, vm2, color)
            .expect("sending a forged packet")
    };

    // Nothing announced: every color above the view is forged, up to the largest the wire
    // can say. None raises the view.
    for color in [1, 2, 0x3fff] {
        forge(color);
    }
    wait_for("B to count three forged colors", async || {
        forged_at_b().await == 3
    })
    .await;
    assert_eq!(
        b.epoch_of(vm1).await,
        0,
        "a forged color raised B's view of vm1"
    );
    let health = b.client.health().await.unwrap();
    assert_eq!(health.learned_epochs, 0, "{health:?}");

    // The coordinator announces the snapshot to 1: a frame of vm1 may now carry 1 (it is
    // learned: vm1 may be there already), never 2.
    for host in [&a, &b] {
        host.client.announce(GROUP, 1).await.unwrap();
    }
    forge(2);
    wait_for("B to count the fourth forged color", async || {
        forged_at_b().await == 4
    })
    .await;
    assert_eq!(b.epoch_of(vm1).await, 0);
    forge(1);
    wait_for("B to learn the announced color", async || {
        b.epoch_of(vm1).await == 1
    })
    .await;
    assert_eq!(forged_at_b().await, 4);
    // Nor can a raw change through the API take a view past the announcement.
    match b.client.raise_epoch(vm1, 2).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, ErrorCode::AboveCeiling),
        other => panic!("raising B's view of vm1 past the announced epoch: {other:?}"),
    }
    assert_eq!(b.epoch_of(vm1).await, 1);

    // B's view of vm1 may now lead vm1 (still at 0) by the announced step, no more; vm1's
    // genuine frames carry their exact color 0 and are Type-1 to vm2 at 0: delivered.
    let mesh = Mesh::new(&lab).unwrap();
    send(&mesh, 0, 1, 0..20, 0);
    assert_in_order(
        &received(&mesh, 1, 0, Duration::from_millis(300)),
        0..20,
        "vm1 -> vm2 after the forgeries",
    );
    a.stop().await;
    b.stop().await;
    drop(overlay);
}

/// The channel state across hosts (invariant 7): vm2 on host B is cut first; what vm1 on host A
/// sends meanwhile crosses the overlay with color 0 and reaches vm2 after its cut. B's agent
/// records exactly those frames; the coordinator takes the recordings from both agents and a
/// replay through B's agent puts them in front of vm2 again, in order. The receiver got each
/// frame once as it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_channel_state_is_recorded_and_replayed_across_hosts() {
    require_root();
    let (lab, overlay) = two_hosts('r', &[1, 1]);
    let a = Host::start(&lab.bridges[0], format!("{}h0", lab.prefix), "ch-a").await;
    let b = Host::start(&lab.bridges[1], format!("{}h1", lab.prefix), "ch-b").await;
    let hosts = Hosts::new(
        overlay.host_specs([a.addr.to_string(), b.addr.to_string()]),
        None,
        tokio::runtime::Handle::current(),
    );
    register_all(&hosts, &lab, 0).await;
    let all = specs(&lab);
    let group = GroupSpec {
        name: "g".parse().unwrap(),
        id: GROUP,
        vms: all.clone(),
    };
    let mesh = Mesh::new(&lab).unwrap();
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || {
        h.announce(&g, 1)?;
        h.record_begin(&g)
    })
    .await
    .expect("both agents record");

    // Before either cut: in vm2's image, not recorded.
    send(&mesh, 0, 1, 0..20, 0);
    let before = received(&mesh, 1, 0, Duration::from_millis(300));
    assert_in_order(&before, 0..20, "before the cuts");
    // vm2's cut on B (its agent takes its tap's queue: a veth has none).
    let (h, vm2) = (hosts.clone(), all[1].clone());
    assert_eq!(blocking(move || h.advance(&vm2)).await.unwrap(), 1);
    send(&mesh, 0, 1, 20..50, 0);
    let (h, vm1) = (hosts.clone(), all[0].clone());
    assert_eq!(blocking(move || h.advance(&vm1)).await.unwrap(), 1);
    send(&mesh, 0, 1, 50..60, 1);
    let after = received(&mesh, 1, 0, Duration::from_millis(300));
    assert_in_order(&after, 20..60, "vm2 as it ran");

    let (h, g) = (hosts.clone(), group.clone());
    let recorded = blocking(move || h.record_end(&g)).await.expect("taken");
    let at_vm2 = &recorded[&lab.vms[1].mac];
    let seqs: Vec<u32> = at_vm2
        .frames
        .iter()
        .filter_map(|f| Message::decode(f.data.get(42..)?).map(|m| m.seq))
        .collect();
    assert_eq!(
        seqs,
        (20..50).collect::<Vec<_>>(),
        "B recorded what crossed vm2's cut, in order, once"
    );
    assert_eq!((at_vm2.problem.as_deref(), at_vm2.lost_at_most), (None, 0));
    assert!(
        recorded
            .get(&lab.vms[0].mac)
            .is_none_or(|r| r.frames.is_empty()),
        "nothing crossed vm1's cut"
    );

    let (h, vm2, port, frames) = (
        hosts.clone(),
        all[1].clone(),
        lab.vms[1].port.clone(),
        at_vm2.frames.clone(),
    );
    let replayed = blocking(move || h.replay(&vm2, &port, &frames))
        .await
        .expect("replayed through B's agent");
    assert_eq!((replayed.sent, replayed.dropped), (30, 0));
    let again = received(&mesh, 1, 0, Duration::from_millis(300));
    assert_in_order(&again, 20..50, "the replay");

    // The next snapshot shuts vm2 and then fails before its cut; the abort moves the group
    // forward on every host without a take: vm2 must not stay shut (found in review).
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || {
        h.announce(&g, 2)?;
        h.record_begin(&g)
    })
    .await
    .unwrap();
    let (h, vm2) = (hosts.clone(), all[1].clone());
    assert!(blocking(move || h.shut_before_cut(&vm2)).await.unwrap());
    send(&mesh, 0, 1, 60..70, 1);
    let held = received(&mesh, 1, 0, Duration::from_millis(300));
    assert!(held.is_empty(), "held while shut: {held:?}");
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || h.abort_epochs(&g, 1)).await.unwrap();
    let released = received(&mesh, 1, 0, Duration::from_millis(300));
    assert_in_order(&released, 60..70, "released by the abort");
    send(&mesh, 0, 1, 70..80, 2);
    let after = received(&mesh, 1, 0, Duration::from_millis(300));
    assert_in_order(&after, 70..80, "no longer held");
    let (h, g) = (hosts.clone(), group.clone());
    blocking(move || h.record_end(&g)).await.unwrap();
    a.stop().await;
    b.stop().await;
}
