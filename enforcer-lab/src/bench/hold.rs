//! `bench hold`: held frames per second and their re-injection, side by side with the plain
//! path, on two network-namespace VMs with the daemon and its buffer; and the pieces the other
//! buffer benchmarks share (a buffered lab, a numbered blast, a counting receiver).

use std::{
    fmt::Write as _,
    io::ErrorKind,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::HoldTotal;

use enforcer::datapath;

use super::xdp_tx::Pace;
use crate::{netns::Lab, traffic::Message};

/// `bench hold`: a post-snapshot sender blasting frames at a pre-snapshot receiver for a fixed
/// time (every frame held by the buffer daemon), then the receiver advances and the held
/// frames are re-injected; side by side with the same blast on the plain path (both VMs at the
/// same epoch). Three cases in one run: 58-byte frames (frames per second), 1514-byte frames
/// and GSO super-frames (Gb/s). Small and full-size frames come from an AF_XDP socket
/// ([`super::xdp_tx`]), so the generator is not the bottleneck; super-frames from a UDP socket
/// with segmentation offload, as a guest's bulk UDP leaves. Checked at the receiver: every
/// datagram, in order. The last line is the small frames'.
pub async fn hold(seconds: f64) -> anyhow::Result<String> {
    let bench = BufferedLab::start("enfh", "enfhbh").await?;
    let result = async {
        let (lab, client) = (&bench.lab, &bench.client);
        client.set_mode(enforcer_common::Type3Mode::Buffer).await?;
        let rx = lab.udp_socket(1, 47_500)?;
        rx.set_read_timeout(Some(Duration::from_millis(200)))?;
        // A receive buffer big enough for the whole burst: measure our path, not how fast the
        // receiving thread empties its socket.
        crate::netns::force_rcvbuf(&rx, 1 << 30)?;
        let mut xdp = Generator::Xdp(Box::new(super::xdp_tx::XdpSender::open(lab, 0, 1, 47_500)?));
        let small = case(&bench, &rx, &mut xdp, seconds, false).await?;
        if let Generator::Xdp(tx) = &mut xdp {
            tx.set_payload(super::xdp_tx::MTU_PAYLOAD)?;
        }
        let full = case(&bench, &rx, &mut xdp, seconds, true).await?;
        let gso = {
            let socket = lab.udp_socket(0, 47_501)?;
            crate::netns::udp_segment(&socket, GSO_SEGMENT as libc::c_int)?;
            let to = SocketAddrV4::new(lab.vms[1].ip, 47_500);
            case(
                &bench,
                &rx,
                &mut Generator::Gso { socket, to },
                seconds,
                true,
            )
            .await?
        };
        let report = client.holds().await?;

        let mut out = String::new();
        let _ = writeln!(
            out,
            "hold benchmark: 2 netns VMs, UDP to a pre-snapshot receiver, a {seconds:.1} s blast \
             per case and path"
        );
        let _ = writeln!(out, "58-byte frames from an AF_XDP sender:");
        let _ = writeln!(
            out,
            "  plain path:  sent {:>8} ({:.0} pps offered)  received {:>8}  {:>10.0} pps",
            small.sent_plain,
            small.offered_plain(),
            small.plain.count,
            small.plain_rate()
        );
        let _ = writeln!(
            out,
            "  held:        sent {:>8} ({:.0} pps offered)  held     {:>8}  {:>10.0} pps",
            small.sent_held,
            small.offered_held(),
            small.held_frames,
            small.held_frames as f64 / small.held_secs
        );
        let _ = writeln!(
            out,
            "  re-injected: {:>8} frames in {:.3} s = {:.0} pps after the receiver advanced; \
             received {}",
            small.reinjected,
            small.reinject_secs,
            small.reinjected as f64 / small.reinject_secs,
            small.received.count
        );
        for (what, c) in [
            ("1514-byte frames from an AF_XDP sender", &full),
            (
                "GSO super-frames (UDP_SEGMENT, 44 datagrams of 1400 bytes per send)",
                &gso,
            ),
        ] {
            let _ = writeln!(
                out,
                "{what}: plain path {:.2} Gb/s ({:.2} offered); held {:.2} Gb/s offered for \
                 {:.2} s: {} frames held, {:.2} Gb/s re-injected, {} lost{}",
                c.gbps(c.plain.count, c.plain_secs),
                c.gbps(c.sent_plain, c.plain_secs),
                c.gbps(c.sent_held, c.held_secs),
                c.held_secs,
                c.held_frames,
                c.gbps(c.received.count, c.reinject_secs),
                c.lost(),
                c.lossy
                    .iter()
                    .map(|(rate, lost)| format!(
                        "; before, at {:.2} Gb/s offered: {lost} lost",
                        rate * c.wire_bytes as f64 * 8.0 / 1e9
                    ))
                    .collect::<String>()
            );
        }
        let _ = writeln!(
            out,
            "buffer totals: {:?}; lost in the kernel: {:?}",
            report.totals, report.kernel
        );
        let _ = writeln!(
            out,
            "memory: peak held about {} bytes of frame data (small frames)",
            small.sent_held * 60
        );
        for (what, c) in [("1514-byte", &full), ("GSO", &gso)] {
            let rate = c
                .gbps(c.received.count, c.held_secs)
                .min(c.gbps(c.received.count, c.reinject_secs));
            let _ = writeln!(
                out,
                "hold+reinject {what}: {rate:.2} Gb/s (ratio to plain path {:.2}), lost {}, \
                 reordered {}",
                rate / c.gbps(c.plain.count, c.plain_secs),
                c.lost(),
                c.received.reordered
            );
        }
        let rate = (small.held_frames as f64 / small.held_secs)
            .min(small.reinjected as f64 / small.reinject_secs);
        let _ = write!(
            out,
            "hold+reinject: {rate:.0} pps (ratio to plain path {:.2}), lost {}, reordered {}",
            rate / small.plain_rate(),
            small.lost(),
            small.received.reordered
        );
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    crate::demo::vms::first_error(result, bench.stop().await)
}

/// Datagrams per GSO send and their payload size: 44 × 1400 = 61,600 bytes, under the 64 KiB
/// one super-frame carries.
const GSO_SEGMENTS: usize = 44;
const GSO_SEGMENT: usize = 1400;

/// What sends a case's blast.
enum Generator {
    /// Frames of one size from an AF_XDP socket.
    Xdp(Box<super::xdp_tx::XdpSender>),
    /// GSO super-frames from a UDP socket with `UDP_SEGMENT` set.
    Gso {
        socket: std::net::UdpSocket,
        to: SocketAddrV4,
    },
}

impl Generator {
    /// Numbered datagrams for `seconds`, as `pace` allows: (datagrams sent, seconds taken).
    fn blast(&mut self, color: u32, seconds: f64, pace: Pace) -> std::io::Result<(u64, f64)> {
        match self {
            Self::Xdp(tx) => Ok(tx.blast_paced(color, seconds, pace)),
            Self::Gso { socket, to } => {
                let start = Instant::now();
                let window = Duration::from_secs_f64(seconds);
                let mut seq = 0u32;
                let mut buf = vec![0u8; GSO_SEGMENTS * GSO_SEGMENT];
                while start.elapsed() < window && u64::from(seq) < pace.most {
                    if !pace.may_send(u64::from(seq), start) {
                        continue;
                    }
                    for (i, segment) in buf.chunks_mut(GSO_SEGMENT).enumerate() {
                        let m = Message {
                            from: 0,
                            to: 1,
                            seq: seq + i as u32,
                            color,
                        };
                        segment[..Message::LEN].copy_from_slice(&m.encode());
                    }
                    // A full socket buffer: try again, every datagram counts (within the
                    // window: a buffer that never empties ends the blast).
                    while let Err(e) = socket.send_to(&buf, *to) {
                        let full = e.raw_os_error() == Some(libc::ENOBUFS)
                            || e.kind() == ErrorKind::WouldBlock;
                        if !full || start.elapsed() >= window {
                            return Err(e);
                        }
                    }
                    seq += GSO_SEGMENTS as u32;
                }
                Ok((u64::from(seq), start.elapsed().as_secs_f64()))
            }
        }
    }

    /// Bytes on the wire per datagram: its own Ethernet frame, once segmented.
    fn wire_bytes(&self) -> usize {
        match self {
            Self::Xdp(tx) => tx.frame_len(),
            Self::Gso { .. } => 14 + 20 + 8 + GSO_SEGMENT,
        }
    }
}

/// One case: the plain path's blast, then the held blast and its re-injection.
struct Case {
    /// Bytes on the wire per datagram ([`Generator::wire_bytes`]).
    wire_bytes: usize,
    sent_plain: u64,
    plain_secs: f64,
    plain: ReceiverResult,
    /// Held blasts that lost datagrams at a higher offered rate, before this one: (offered
    /// datagrams a second, lost).
    lossy: Vec<(f64, u64)>,
    sent_held: u64,
    held_secs: f64,
    /// Frames the buffer received (a super-frame is one).
    held_frames: u64,
    reinjected: u64,
    reinject_secs: f64,
    /// What the receiver got of the held blast, once re-injected.
    received: ReceiverResult,
}

impl Case {
    fn offered_plain(&self) -> f64 {
        self.sent_plain as f64 / self.plain_secs
    }
    fn offered_held(&self) -> f64 {
        self.sent_held as f64 / self.held_secs
    }
    fn plain_rate(&self) -> f64 {
        self.plain.count as f64 / self.plain_secs
    }
    /// `datagrams` in `secs`, in Gb/s of wire bytes.
    fn gbps(&self, datagrams: u64, secs: f64) -> f64 {
        datagrams as f64 * self.wire_bytes as f64 * 8.0 / secs / 1e9
    }
    /// Held datagrams that never reached the receiver.
    fn lost(&self) -> u64 {
        self.sent_held.saturating_sub(self.received.count)
    }
}

/// Wire bytes one held blast may send, in every case: within the buffer's memory bound (1 GiB
/// here), so that a loss is the hold path's, not the bound's (the small frames' 2 s stay far
/// below it).
const HELD_BYTES: u64 = 512 << 20;
/// Held blasts a search may try, each offered 0.7 times the last.
const TRIES: usize = 6;

/// Runs one case on the lab (both VMs at one epoch on entry; further on return). `search`:
/// the held blast is offered the rate the plain path delivered, and less while it loses
/// datagrams (the rate it sustains without loss); otherwise as fast as the generator goes.
/// Fails if a held frame reached the receiver before it advanced.
async fn case(
    bench: &BufferedLab,
    rx: &std::net::UdpSocket,
    generator: &mut Generator,
    seconds: f64,
    search: bool,
) -> anyhow::Result<Case> {
    let (lab, client) = (&bench.lab, &bench.client);
    // Plain path: same epochs.
    let counter = Receiver::start(rx.try_clone()?);
    let (sent_plain, plain_secs) = generator.blast(0, seconds, Pace::FULL)?;
    let plain = counter.finish(Duration::from_millis(300));
    let mut pace = Pace {
        per_second: search.then_some(plain.count as f64 / plain_secs),
        most: HELD_BYTES / generator.wire_bytes() as u64,
    };
    let mut lossy = Vec::new();
    for attempt in 1..=TRIES {
        // Held: the sender advances; every frame to the receiver is held.
        let before = client.holds().await?;
        client.advance(lab.vms[0].mac).await?;
        let counter = Receiver::start(rx.try_clone()?);
        let (sent_held, held_secs) = generator.blast(1, seconds, pace)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let report = client.holds().await?;
        let held_frames = report.total(HoldTotal::Received) - before.total(HoldTotal::Received);
        let early = counter.count();
        let release = Instant::now();
        client.advance(lab.vms[1].mac).await?;
        // Re-injection is done when the buffer holds nothing more.
        let mut report = client.holds().await?;
        while report.held_frames > 0 && release.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(2)).await;
            report = client.holds().await?;
        }
        let reinject_secs = release.elapsed().as_secs_f64();
        let reinjected = report.total(HoldTotal::Reinjected) - before.total(HoldTotal::Reinjected);
        let received = counter.finish_after(sent_held, Duration::from_secs(10));
        anyhow::ensure!(
            early == 0,
            "{early} held frames reached the receiver before it advanced"
        );
        let c = Case {
            wire_bytes: generator.wire_bytes(),
            sent_plain,
            plain_secs,
            plain,
            lossy,
            sent_held,
            held_secs,
            held_frames,
            reinjected,
            reinject_secs,
            received,
        };
        let Some(rate) = pace.per_second.filter(|_| c.lost() > 0 && attempt < TRIES) else {
            return Ok(c);
        };
        let tried = (c.offered_held(), c.lost());
        lossy = c.lossy;
        lossy.push(tried);
        pace.per_second = Some(rate * 0.7);
    }
    unreachable!("the last try returns")
}

/// A lab of two VMs with the daemon and its buffer running, both VMs registered at epoch 0.
pub(crate) struct BufferedLab {
    pub(crate) lab: Lab,
    running: enforcer::daemon::Running,
    pub(crate) client: enforcer::api::client::Client,
    pin_root: std::path::PathBuf,
}

impl BufferedLab {
    pub(crate) async fn start(prefix: &str, hold_device: &str) -> anyhow::Result<Self> {
        use enforcer::{
            daemon::DaemonConfig,
            datapath::{AttachMode, ports::PortSource},
            hold::HoldOptions,
        };
        let lab = Lab::create(prefix, 2).context("creating the benchmark lab")?;
        let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-{prefix}"));
        let _ = datapath::teardown(&pin_root);
        let running = enforcer::daemon::start(DaemonConfig {
            ports: PortSource::Bridge(lab.bridge.clone()),
            pin_root: pin_root.clone(),
            attach: AttachMode::Tc,
            listen: crate::api_socket("bench-hold"),
            token: None,
            api_group: None,
            tls: None,
            type3_mode: None,
            hold: Some(HoldOptions {
                device: hold_device.into(),
                max_bytes: 1 << 30,
                ..Default::default()
            }),
            snapshots: None,
        })
        .await?;
        let client = enforcer::api::client::Client::new(running.addr.to_string(), None);
        for vm in &lab.vms {
            client.register_vm(vm.mac, 1, &vm.port, Some(0)).await?;
        }
        Ok(Self {
            lab,
            running,
            client,
            pin_root,
        })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.running.stop().await?;
        let _ = datapath::teardown(&self.pin_root);
        Ok(())
    }
}

/// Sends numbered 16-byte datagrams (58-byte frames) as fast as one thread can for `seconds`.
pub(crate) fn blast(
    tx: &std::net::UdpSocket,
    dst: SocketAddrV4,
    color: u32,
    seconds: f64,
) -> (u64, f64) {
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    let mut seq = 0u32;
    while start.elapsed() < window {
        for _ in 0..64 {
            let payload = Message {
                from: 0,
                to: 1,
                seq,
                color,
            }
            .encode();
            // A full socket buffer: try again, every frame counts.
            while tx.send_to(&payload, dst).is_err() {}
            seq += 1;
        }
    }
    (u64::from(seq), start.elapsed().as_secs_f64())
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct ReceiverResult {
    pub(crate) count: u64,
    pub(crate) reordered: u64,
}

/// Counts numbered datagrams and out-of-order arrivals on a thread.
pub(crate) struct Receiver {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl Receiver {
    pub(crate) fn start(rx: std::net::UdpSocket) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (count, stop) = (count.clone(), stop.clone());
            thread::spawn(move || {
                let (mut buf, mut next, mut reordered) = ([0u8; 64], 0u32, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match rx.recv(&mut buf) {
                        // A longer datagram comes truncated to the buffer: its message
                        // is at its start.
                        Ok(n) => {
                            if let Some(m) =
                                buf.get(..Message::LEN.min(n)).and_then(Message::decode)
                            {
                                if m.seq < next {
                                    reordered += 1;
                                }
                                next = m.seq + 1;
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
                reordered
            })
        };
        Self {
            count,
            stop,
            thread,
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn finish(self, settle: Duration) -> ReceiverResult {
        thread::sleep(settle);
        self.stop.store(true, Ordering::Relaxed);
        let reordered = self.thread.join().unwrap_or(0);
        ReceiverResult {
            count: self.count.load(Ordering::Relaxed),
            reordered,
        }
    }

    /// Waits until `want` frames arrived (or `max`), then stops.
    pub(crate) fn finish_after(self, want: u64, max: Duration) -> ReceiverResult {
        let start = Instant::now();
        while self.count() < want && start.elapsed() < max {
            thread::sleep(Duration::from_millis(1));
        }
        self.finish(Duration::from_millis(100))
    }
}
