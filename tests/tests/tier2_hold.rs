//! Tier 2, mode `buffer`: Type-3 frames held by the AF_XDP buffer daemon and re-injected in
//! order after their receiver advances; network-namespace VMs, the programs really attached,
//! the real daemon and API. Checked at the receivers.

use std::{
    collections::hash_map::DefaultHasher,
    hash::Hasher as _,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    agent::PortStats,
    api::client::Client,
    daemon::{self, DaemonConfig, Running},
    datapath::{AttachMode, ports::PortSource},
    hold::{HoldOptions, LoopHook, LoopPoint, QueueKey},
};
use enforcer_common::{HoldTotal, Outcome, Type3Mode};
use enforcer_lab::{netns::Lab, traffic::Message};
use enforcer_tests::{
    Inbox, PinRoot, assert_no_hold_losses, lab_prefix, register_all, require_root, send_stream,
};

struct Setup {
    lab: Lab,
    pins: PinRoot,
    running: Option<Running>,
    client: Client,
}

async fn start_daemon(
    lab: &Lab,
    pins: &PinRoot,
    max_bytes: usize,
    mode: Type3Mode,
) -> (Running, Client) {
    start_daemon_with(lab, pins, max_bytes, mode, AttachMode::Tc).await
}

async fn start_daemon_with(
    lab: &Lab,
    pins: &PinRoot,
    max_bytes: usize,
    mode: Type3Mode,
    attach: AttachMode,
) -> (Running, Client) {
    start_daemon_hooked(lab, pins, max_bytes, mode, attach, LoopHook::default()).await
}

async fn start_daemon_hooked(
    lab: &Lab,
    pins: &PinRoot,
    max_bytes: usize,
    mode: Type3Mode,
    attach: AttachMode,
    at_point: LoopHook,
) -> (Running, Client) {
    let running = daemon::start(DaemonConfig {
        ports: PortSource::Bridge(lab.bridge.clone()),
        pin_root: pins.path().to_owned(),
        attach,
        listen: pins.api_socket(),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: Some(mode),
        hold: Some(HoldOptions {
            device: format!("{}h", lab.prefix),
            max_bytes,
            at_point,
        }),
        snapshots: None,
    })
    .await
    .expect("starting the daemon with its buffer");
    let client = Client::new(running.addr.to_string(), None);
    (running, client)
}

async fn setup(tag: char, vms: usize, max_bytes: usize, mode: Type3Mode) -> Setup {
    setup_with(tag, vms, max_bytes, mode, AttachMode::Tc).await
}

async fn setup_with(
    tag: char,
    vms: usize,
    max_bytes: usize,
    mode: Type3Mode,
    attach: AttachMode,
) -> Setup {
    setup_hooked(tag, vms, max_bytes, mode, attach, LoopHook::default()).await
}

async fn setup_hooked(
    tag: char,
    vms: usize,
    max_bytes: usize,
    mode: Type3Mode,
    attach: AttachMode,
    at_point: LoopHook,
) -> Setup {
    require_root();
    let lab = Lab::create(&lab_prefix(tag), vms).unwrap();
    let pins = PinRoot::new("hold");
    let (running, client) =
        start_daemon_hooked(&lab, &pins, max_bytes, mode, attach, at_point).await;
    register_all(&client, &lab.vms).await;
    Setup {
        lab,
        pins,
        running: Some(running),
        client,
    }
}

impl Setup {
    async fn stop(mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }

    async fn port_stats(&self, vm: usize) -> PortStats {
        let port = &self.lab.vms[vm].port;
        self.client
            .stats()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.port.as_deref() == Some(port))
            .unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // A crashed buffer leaves its hold device behind on purpose; remove it here.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &format!("{}h", self.lab.prefix)])
            .output();
    }
}

/// `count` numbered messages from vm1 to vm2 starting at `first`, one every 300 µs.
fn to_vm2(tx: &UdpSocket, lab: &Lab, first: u32, count: u32, color: u32) {
    send_stream(
        tx,
        0,
        &[(1, addr(lab, 1))],
        first,
        count,
        color,
        Duration::from_micros(300),
    );
}

fn addr(lab: &Lab, vm: usize) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(lab.vms[vm].ip, 47_300)
}

/// Asserts the messages carry exactly the sequence numbers `first..first+count`, in order.
fn assert_in_order(got: &[(Message, Instant)], first: u32, count: u32, what: &str) {
    let seqs: Vec<u32> = got.iter().map(|(m, _)| m.seq).collect();
    let want: Vec<u32> = (first..first + count).collect();
    assert_eq!(
        seqs.len(),
        want.len(),
        "{what}: {} received, {} sent",
        seqs.len(),
        want.len()
    );
    assert_eq!(seqs, want, "{what}: lost, duplicated or out of order");
}

/// The skew scenario: vm1 advances, streams to vm2 (still behind) for ~1.2 s, then vm2 advances
/// while vm1 keeps sending. Returns what vm2 got from vm1 and the instant vm2 was advanced.
async fn skew(s: &Setup) -> (Vec<(Message, Instant)>, Instant, u32) {
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    s.client.advance(lab.vms[0].mac).await.unwrap();
    let (held, after) = (400, 100);
    let to = [(1u16, addr(lab, 1))];
    let sender = {
        let tx = tx.try_clone().unwrap();
        thread::spawn(move || send_stream(&tx, 0, &to, 0, held, 1, Duration::from_millis(3)))
    };
    sender.join().unwrap();
    thread::sleep(Duration::from_millis(100));
    let advanced_at = Instant::now();
    s.client.advance(lab.vms[1].mac).await.unwrap();
    // New frames right behind the re-injected ones: they must not overtake them.
    send_stream(&tx, 0, &to, held, after, 1, Duration::from_micros(200));
    thread::sleep(Duration::from_millis(300));
    (inbox.finish(), advanced_at, held + after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_held_over_skew_then_delivered_in_order() {
    udp_held_over_skew(AttachMode::Tc, 'h').await;
}

/// The same through the XDP port program (XDP_REDIRECT to the hold device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_held_over_skew_then_delivered_in_order_xdp() {
    udp_held_over_skew(AttachMode::Xdp, 'x').await;
}

async fn udp_held_over_skew(attach: AttachMode, tag: char) {
    let s = setup_with(tag, 2, 64 << 20, Type3Mode::Buffer, attach).await;
    let (got, advanced_at, total) = skew(&s).await;
    let early: Vec<_> = got.iter().filter(|(_, at)| *at < advanced_at).collect();
    assert!(
        early.is_empty(),
        "delivered before the receiver advanced: {} frames",
        early.len()
    );
    assert_in_order(&got, 0, total, "vm1 -> vm2 across the skew");

    let report = s.client.holds().await.unwrap();
    assert_eq!(report.held_frames, 0, "nothing left held");
    assert!(report.total(HoldTotal::Reinjected) >= 400, "{report:?}");
    assert_eq!(
        report.total(HoldTotal::DroppedBound)
            + report.total(HoldTotal::LostRing)
            + report.total(HoldTotal::InjectFailed),
        0,
        "{report:?}"
    );
    let sent_port = s.port_stats(0).await;
    assert_eq!(
        sent_port.frames(Outcome::Type3Held),
        400,
        "held at the sender's port"
    );
    assert_eq!(
        report
            .released_at_advance
            .get(&QueueKey::Vm(s.lab.vms[1].mac))
            .copied(),
        Some(400),
        "the receiver's advance released exactly what was held for it: {report:?}"
    );
    assert_eq!(
        sent_port.frames(Outcome::Type3Dropped) + sent_port.frames(Outcome::Type3Unbuffered),
        0
    );
    assert_eq!(
        sent_port.frames(Outcome::Type1) + sent_port.frames(Outcome::HeldForOrder),
        100,
        "frames after the advance: delivered directly or queued behind the held ones"
    );
    // The hold time histogram saw the skew.
    assert!(
        report.hold_time_sum_seconds / report.hold_time_count as f64 > 0.05,
        "{report:?}"
    );
    s.stop().await;
}

/// Stops the buffer thread at one point of its loop until released.
#[derive(Default)]
struct Pause {
    /// The point to stop at, and whether the thread is stopped there now.
    state: std::sync::Mutex<(Option<LoopPoint>, bool)>,
    changed: std::sync::Condvar,
}

impl Pause {
    fn hook(self: &Arc<Self>) -> LoopHook {
        let me = self.clone();
        LoopHook::new(move |point| {
            let mut state = me.state.lock().unwrap();
            if state.0 != Some(point) {
                return;
            }
            state.1 = true;
            me.changed.notify_all();
            while state.0 == Some(point) {
                state = me.changed.wait(state).unwrap();
            }
            state.1 = false;
        })
    }

    /// Returns once the thread is stopped at `point`.
    fn stop_at(&self, point: LoopPoint) {
        let mut state = self.state.lock().unwrap();
        state.0 = Some(point);
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(5), |s| !s.1)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "the buffer thread never reached {point:?}: {state:?}"
        );
    }

    fn release(&self) {
        self.state.lock().unwrap().0 = None;
        self.changed.notify_all();
    }
}

/// Case P1 of the datapath review: the sender advances while the buffer thread is stopped at a
/// point of its loop, then sends to a receiver still behind. The frame waits for the receiver's
/// advance whatever the thread had or had not read when it stopped: its color rides with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_released_early_wherever_the_buffer_thread_stops() {
    stopped_buffer_thread(AttachMode::Tc, 'p').await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_released_early_wherever_the_buffer_thread_stops_xdp() {
    stopped_buffer_thread(AttachMode::Xdp, 'q').await;
}

async fn stopped_buffer_thread(attach: AttachMode, tag: char) {
    let pause = Arc::new(Pause::default());
    let s = setup_hooked(tag, 2, 64 << 20, Type3Mode::Buffer, attach, pause.hook()).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    let to = [(1u16, addr(lab, 1))];
    for (round, point) in LoopPoint::ALL.into_iter().enumerate() {
        let (seq, color) = (round as u32, round as u32 + 1);
        let p = pause.clone();
        tokio::task::spawn_blocking(move || p.stop_at(point))
            .await
            .unwrap();
        s.client.advance(lab.vms[0].mac).await.unwrap();
        send_stream(&tx, 0, &to, seq, 1, color, Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pause.release();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            inbox.from(0).iter().all(|(m, _)| m.seq != seq),
            "stopped at {point:?}: the frame of color {color} reached the receiver at epoch {}",
            color - 1
        );
        s.client.advance(lab.vms[1].mac).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while inbox.from(0).len() <= round && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let n = LoopPoint::ALL.len() as u32;
    assert_in_order(
        &inbox.finish(),
        0,
        n,
        "one frame per stop, after its receiver advanced",
    );
    let report = s.client.holds().await.unwrap();
    assert_eq!(report.held_frames, 0, "{report:?}");
    assert_eq!(
        report.total(HoldTotal::Reinjected),
        u64::from(n),
        "{report:?}"
    );
    assert_eq!(
        s.port_stats(0).await.frames(Outcome::Type3Held),
        u64::from(n),
        "each held at the sender's port"
    );
    s.stop().await;
}

/// Case P3 of the datapath review: a second daemon on the same pins (another API socket, its
/// own buffer) used to reset the first one's hold device and links. It is refused before it
/// touches anything, and the first goes on holding and re-injecting as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_pins_is_refused_and_the_first_keeps_enforcing() {
    let s = setup('2', 2, 64 << 20, Type3Mode::Buffer).await;
    let other = format!("/run/enforcer/second-{}.sock", std::process::id());
    let second = daemon::start(DaemonConfig {
        ports: PortSource::Bridge(s.lab.bridge.clone()),
        pin_root: s.pins.path().to_owned(),
        attach: AttachMode::Tc,
        listen: other.parse().unwrap(),
        token: None,
        api_group: None,
        tls: None,
        type3_mode: Some(Type3Mode::Drop),
        hold: Some(HoldOptions {
            device: format!("{}s", s.lab.prefix),
            ..Default::default()
        }),
        snapshots: None,
    })
    .await
    .err()
    .expect("a second daemon on the same pin root is refused");
    assert!(second.to_string().contains("another daemon"), "{second}");
    assert!(
        !std::path::Path::new(&other).exists(),
        "refused before it made its socket"
    );
    assert_eq!(
        s.client.config().await.unwrap().type3_mode,
        Type3Mode::Buffer
    );
    let (got, advanced_at, total) = skew(&s).await;
    assert!(
        got.iter().all(|(_, at)| *at >= advanced_at),
        "the first daemon still holds Type-3 frames"
    );
    assert_in_order(&got, 0, total, "vm1 -> vm2 across the skew");
    s.stop().await;
}

/// Mode `drop` on the same scenario: the frames sent during the skew are gone (TCP would have
/// to retransmit them), the rest arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mode_on_the_same_scenario_loses_the_skewed_frames() {
    let s = setup('d', 2, 64 << 20, Type3Mode::Drop).await;
    let (got, advanced_at, _) = skew(&s).await;
    assert!(
        got.iter().all(|(_, at)| *at >= advanced_at),
        "nothing before the advance"
    );
    assert_in_order(&got, 400, 100, "only the frames sent after vm2 advanced");
    assert_eq!(s.port_stats(0).await.frames(Outcome::Type3Dropped), 400);
    s.stop().await;
}

/// Case F1: TCP at the kernel's default offloads (TSO/GSO on, as on virtio-net with tap):
/// the sender's segments reach the port as GSO super-frames, and those are held whole and
/// re-injected whole (the receiver's side segments them where the bridge's copy would have
/// been).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stream_survives_the_skew_at_default_offloads() {
    tcp_stream_survives_the_skew('t', None).await;
}

/// Case F2: the same with 9000-byte jumbo frames on every link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stream_survives_the_skew_with_jumbo_frames() {
    tcp_stream_survives_the_skew('j', Some(9000)).await;
}

async fn tcp_stream_survives_the_skew(tag: char, mtu: Option<u32>) {
    let s = setup(tag, 2, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    if let Some(mtu) = mtu {
        lab.set_mtu(mtu).unwrap();
    }
    let server_ip = lab.vms[1].ip;
    let listener = lab
        .in_vm(1, move || TcpListener::bind((server_ip, 47_400)).unwrap())
        .unwrap();
    let advanced = Arc::new(AtomicBool::new(false));
    let server = {
        let advanced = advanced.clone();
        thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let (mut hash, mut total, mut early) = (DefaultHasher::new(), 0usize, 0usize);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    return (hash.finish(), total, early);
                }
                if !advanced.load(Ordering::SeqCst) {
                    early += n;
                }
                hash.write(&buf[..n]);
                total += n;
            }
        })
    };
    let client_ip = lab.vms[1].ip;
    let mut conn = lab
        .in_vm(0, move || TcpStream::connect((client_ip, 47_400)).unwrap())
        .unwrap();
    // Connected at epoch 0; now the sender takes its snapshot, the receiver lags 1.5 s.
    s.client.advance(lab.vms[0].mac).await.unwrap();
    let data: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut sent_hash = DefaultHasher::new();
    sent_hash.write(&data);
    let writer = thread::spawn(move || {
        conn.write_all(&data).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    advanced.store(true, Ordering::SeqCst);
    s.client.advance(lab.vms[1].mac).await.unwrap();
    writer.join().unwrap();
    let (hash, total, early) = server.join().unwrap();
    assert_eq!(early, 0, "no stream byte reached the pre-snapshot receiver");
    assert_eq!(total, 4_000_000, "every byte arrived");
    assert_eq!(hash, sent_hash.finish(), "the stream's checksum matches");
    let port = s.port_stats(0).await;
    let held = port.frames(Outcome::Type3Held);
    assert!(held > 0, "the skew held segments");
    assert_eq!(
        port.frames(Outcome::Type3Unbuffered),
        0,
        "no segment too big to hold"
    );
    // Frames larger than the MTU on the wire: GSO super-frames (or, at 9000, jumbo frames)
    // were held as they were.
    let largest_wire_frame = 14 + mtu.unwrap_or(1500) as u64;
    let average = port.bytes(Outcome::Type3Held) / held;
    assert!(
        average > 1514,
        "held frames average {average} bytes (wire frames up to {largest_wire_frame})"
    );
    assert_no_hold_losses(&s.client.holds().await.unwrap());
    s.stop().await;
}

/// Case P2: order, and the end of drains, under steady traffic. vm1 streams to vm2 (a message
/// about every 200 µs: far under the 5 ms of quiet drains used to wait for, so they never
/// ended) through 8 snapshots, each: vm1 advances, 20 ms later vm2 does. Every message
/// arrives once and in order, and 50 ms after each of vm2's advances its drain has ended
/// while messages still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_and_drains_end_under_steady_traffic() {
    let s = setup('o', 2, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    let to = addr(lab, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                let m = Message {
                    from: 0,
                    to: 1,
                    seq,
                    color: 0,
                };
                tx.send_to(&m.encode(), to).unwrap();
                seq += 1;
                thread::sleep(Duration::from_micros(200));
            }
            seq
        })
    };
    let mut still_draining = Vec::new();
    for round in 0..8 {
        s.client.advance(lab.vms[0].mac).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.client.advance(lab.vms[1].mac).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let report = s.client.holds().await.unwrap();
        if report.queues.iter().any(|q| q.draining) {
            still_draining.push((round, report.queues));
        }
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_in_order(&inbox.finish(), 0, sent, "vm1 -> vm2 through 8 snapshots");
    assert!(
        still_draining.is_empty(),
        "drains still on 50 ms after the advance: {still_draining:?}"
    );
    let port = s.port_stats(0).await;
    for outcome in [Outcome::Type3Held, Outcome::HeldForOrder, Outcome::Type1] {
        assert!(port.frames(outcome) > 0, "{outcome:?}: {port:?}");
    }
    let report = s.client.holds().await.unwrap();
    assert_eq!(report.held_frames, 0);
    assert_eq!(
        report.total(HoldTotal::LostRing) + report.total(HoldTotal::InjectFailed),
        0,
        "{report:?}"
    );
    s.stop().await;
}

/// Several senders to one receiver, one sender to several receivers released one at a time,
/// and a broadcast held until the whole group advanced, then copied to every other member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_many_receivers_and_broadcast() {
    let s = setup('m', 4, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let sockets: Vec<UdpSocket> = (0..4).map(|i| lab.udp_socket(i, 47_300).unwrap()).collect();
    sockets[0].set_broadcast(true).unwrap();
    let inboxes: Vec<Inbox> = (0..4)
        .map(|i| Inbox::new(sockets[i].try_clone().unwrap()))
        .collect();
    // Broadcasts reach sockets bound to the wildcard address only.
    let bcast_inboxes: Vec<Inbox> = (0..4)
        .map(|i| {
            Inbox::new(
                lab.in_vm(i, || UdpSocket::bind("0.0.0.0:47301").unwrap())
                    .unwrap(),
            )
        })
        .collect();
    // vm1 and vm2 take their snapshot; vm3 and vm4 lag.
    s.client.advance(lab.vms[0].mac).await.unwrap();
    s.client.advance(lab.vms[1].mac).await.unwrap();
    let gap = Duration::from_micros(500);
    send_stream(
        &sockets[0],
        0,
        &[(2, addr(lab, 2)), (3, addr(lab, 3))],
        0,
        50,
        1,
        gap,
    );
    send_stream(&sockets[1], 1, &[(2, addr(lab, 2))], 0, 50, 1, gap);
    let bcast = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 213, 0, 255), 47_301);
    send_stream(&sockets[0], 0, &[(99, bcast)], 1000, 10, 1, gap);
    thread::sleep(Duration::from_millis(100));
    for (i, inbox) in inboxes.iter().enumerate() {
        assert!(
            inbox
                .from(0)
                .iter()
                .chain(&inbox.from(1))
                .all(|(m, _)| i < 2 && m.seq >= 1000),
            "vm{} got held frames before advancing",
            i + 1
        );
    }
    // (The sender's own stack loops its broadcast back to itself locally: skip vm1.)
    assert!(
        bcast_inboxes[1..].iter().all(|b| b.from(0).is_empty()),
        "the broadcast waits for the whole group"
    );

    s.client.advance(lab.vms[2].mac).await.unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_in_order(
        &inboxes[2]
            .from(0)
            .into_iter()
            .filter(|(m, _)| m.seq < 1000)
            .collect::<Vec<_>>(),
        0,
        50,
        "vm1 -> vm3",
    );
    assert_in_order(&inboxes[2].from(1), 0, 50, "vm2 -> vm3");
    assert!(
        inboxes[3].from(0).is_empty(),
        "vm4 has not advanced: its queue stays held"
    );
    assert!(
        bcast_inboxes[1..].iter().all(|b| b.from(0).is_empty()),
        "the broadcast still waits for vm4"
    );

    s.client.advance(lab.vms[3].mac).await.unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_in_order(
        &inboxes[3]
            .from(0)
            .into_iter()
            .filter(|(m, _)| m.seq < 1000)
            .collect::<Vec<_>>(),
        0,
        50,
        "vm1 -> vm4",
    );
    for (i, b) in bcast_inboxes.iter().enumerate().skip(1) {
        assert_in_order(&b.from(0), 1000, 10, &format!("broadcast at vm{}", i + 1));
    }
    assert_in_order(
        &bcast_inboxes[0].from(0),
        1000,
        10,
        "the sender's local copy only: none re-injected to it",
    );
    let report = s.client.holds().await.unwrap();
    assert_eq!(report.total(HoldTotal::Reinjected), 160, "{report:?}");
    assert_eq!(report.held_frames, 0);
    for inbox in inboxes.into_iter().chain(bcast_inboxes) {
        inbox.finish();
    }
    s.stop().await;
}

/// The memory bound: the newest frames beyond it are dropped and counted exactly; the rest are
/// delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bound_overflow_is_counted_exactly() {
    // Each message is a 58-byte frame: room for exactly 100.
    let s = setup('b', 2, 58 * 100, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    s.client.advance(lab.vms[0].mac).await.unwrap();
    to_vm2(&tx, lab, 0, 300, 1);
    thread::sleep(Duration::from_millis(100));
    let report = s.client.holds().await.unwrap();
    assert_eq!(report.held_frames, 100, "{report:?}");
    assert_eq!(report.total(HoldTotal::DroppedBound), 200, "{report:?}");
    assert_eq!(
        report.queues[0].dropped_bound, 200,
        "accounted per receiver"
    );
    s.client.advance(lab.vms[1].mac).await.unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_in_order(&inbox.finish(), 0, 100, "the first 100, in order");
    s.stop().await;
}

/// A daemon that dies while holding frames: the next one counts them (`lost_restart`), with
/// the frames redirected to the dead daemon's device after it died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_held_by_a_crashed_daemon_are_counted_by_the_next() {
    let mut s = setup('c', 2, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    s.client.advance(lab.vms[0].mac).await.unwrap();
    to_vm2(&tx, lab, 0, 50, 1);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(s.client.holds().await.unwrap().held_frames, 50);
    s.running.take().unwrap().crash().await.unwrap();
    to_vm2(&tx, lab, 50, 30, 1);
    thread::sleep(Duration::from_millis(100));

    let (running, client) = start_daemon(lab, &s.pins, 64 << 20, Type3Mode::Buffer).await;
    s.running = Some(running);
    s.client = client;
    let report = s.client.holds().await.unwrap();
    assert_eq!(
        report.total(HoldTotal::LostRestart),
        80,
        "50 held in the dead daemon's memory, 30 redirected to its device after it died \
         (the programs' tickets count them): {report:?}"
    );
    // The receiver advances: nothing was delivered (the frames are gone, and counted), and new
    // frames flow again.
    s.client.advance(lab.vms[1].mac).await.unwrap();
    to_vm2(&tx, lab, 80, 10, 1);
    thread::sleep(Duration::from_millis(200));
    assert_in_order(
        &inbox.finish(),
        80,
        10,
        "only frames sent after the restart and the advance",
    );
    s.stop().await;
}

/// Aborting the snapshot delivers what was held (the frames are ordinary again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_delivers_held_frames() {
    let s = setup('a', 2, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    s.client.advance(lab.vms[0].mac).await.unwrap();
    to_vm2(&tx, lab, 0, 40, 1);
    thread::sleep(Duration::from_millis(100));
    assert!(inbox.from(0).is_empty());
    let rolled = s.client.abort(1, 0).await.unwrap();
    assert_eq!(rolled.len(), 1, "vm1 rolled back");
    to_vm2(&tx, lab, 40, 10, 0);
    thread::sleep(Duration::from_millis(200));
    assert_in_order(&inbox.finish(), 0, 50, "held frames, then new ones");
    assert_eq!(s.client.vm(lab.vms[0].mac).await.unwrap().epoch, 0);
    s.stop().await;
}

/// A graceful stop with frames held: they may not be delivered (their receiver is behind), so
/// they are dropped and counted (`dropped_shutdown`); the next daemon finds nothing unaccounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_counts_what_it_drops() {
    let mut s = setup('g', 2, 64 << 20, Type3Mode::Buffer).await;
    let lab = &s.lab;
    let tx = lab.udp_socket(0, 47_300).unwrap();
    let inbox = Inbox::new(lab.udp_socket(1, 47_300).unwrap());
    s.client.advance(lab.vms[0].mac).await.unwrap();
    to_vm2(&tx, lab, 0, 25, 1);
    thread::sleep(Duration::from_millis(100));
    let report = s
        .running
        .take()
        .unwrap()
        .stop()
        .await
        .unwrap()
        .expect("the buffer's last report");
    assert_eq!(report.total(HoldTotal::DroppedShutdown), 25, "{report:?}");
    assert_eq!(report.held_frames, 0);
    // With no buffer, Type-3 frames are dropped by the datapath and counted there.
    to_vm2(&tx, lab, 25, 5, 1);

    let (running, client) = start_daemon(lab, &s.pins, 64 << 20, Type3Mode::Buffer).await;
    s.running = Some(running);
    s.client = client;
    let report = s.client.holds().await.unwrap();
    assert_eq!(
        report.total(HoldTotal::LostRestart),
        0,
        "nothing unaccounted: {report:?}"
    );
    assert_eq!(
        report.total(HoldTotal::DroppedShutdown),
        25,
        "totals survive the restart"
    );
    assert_eq!(s.port_stats(0).await.frames(Outcome::Type3Unbuffered), 5);
    s.client.advance(lab.vms[1].mac).await.unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(
        inbox.finish().is_empty(),
        "nothing from before the advance was delivered"
    );
    s.stop().await;
}

/// Case S19 of the security review: a hold device name that is another link's (here the VM
/// bridge's) is refused; the link is not touched (before: `ip link del` took the bridge, and
/// every VM's port with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_device_named_after_another_link_is_refused_and_the_link_kept() {
    require_root();
    let lab = Lab::create(&lab_prefix('w'), 1).unwrap();
    let pins = PinRoot::new("holdname");
    let err = daemon::start(DaemonConfig {
        type3_mode: Some(Type3Mode::Buffer),
        hold: Some(HoldOptions {
            device: lab.bridge.clone(),
            ..Default::default()
        }),
        ..enforcer_tests::daemon_config(&lab.bridge, &pins)
    })
    .await
    .err()
    .expect("a hold device named after the bridge");
    assert!(
        err.to_string().contains("not an enforcer hold device"),
        "{err}"
    );
    assert!(
        std::path::Path::new(&format!("/sys/class/net/{}", lab.bridge)).exists(),
        "the bridge is still there"
    );
}
