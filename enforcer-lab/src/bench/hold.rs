//! `bench hold`: held frames per second and their re-injection, side by side with the plain
//! path, on two network-namespace VMs with the daemon and its buffer; and the pieces the other
//! buffer benchmarks share (a buffered lab, a numbered blast, a counting receiver).

use std::{
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

use crate::netns::Lab;

/// `bench hold`: a post-snapshot sender blasting small frames at a pre-snapshot receiver for a
/// fixed time (every frame held by the buffer daemon), then the receiver advances and the held
/// frames are re-injected; side by side with the same blast on the plain path (both VMs at the
/// same epoch). The sender is an AF_XDP socket ([`super::xdp_tx`]), so the generator is not
/// the bottleneck. Checked at the receiver: every frame, in order.
pub async fn hold(seconds: f64) -> anyhow::Result<String> {
    let bench = BufferedLab::start("enfh", "enfhbh").await?;
    let result = async {
        let (lab, client) = (&bench.lab, &bench.client);
        client.set_mode(enforcer_common::Type3Mode::Buffer).await?;
        let mut tx = super::xdp_tx::XdpSender::open(lab, 0, 1, 47_500)?;
        let rx = lab.udp_socket(1, 47_500)?;
        rx.set_read_timeout(Some(Duration::from_millis(200)))?;
        // A receive buffer big enough for the whole burst: measure our path, not how fast the
        // receiving thread empties its socket.
        crate::netns::force_rcvbuf(&rx, 1 << 30)?;

        // Plain path: same epochs.
        let counter = Receiver::start(rx.try_clone()?);
        let (sent_plain, plain_secs) = tx.blast(0, seconds);
        let plain = counter.finish(Duration::from_millis(300));
        let plain_pps = plain.count as f64 / plain_secs;

        // Held: the sender advances; every frame to the receiver is held.
        client.advance(lab.vms[0].mac).await?;
        let counter = Receiver::start(rx.try_clone()?);
        let (sent_held, held_secs) = tx.blast(1, seconds);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let report = client.holds().await?;
        let held_pps = report.total(HoldTotal::Received) as f64 / held_secs;
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
        let reinjected = report.total(HoldTotal::Reinjected);
        let held = counter.finish_after(sent_held, Duration::from_secs(10));
        // Lost anywhere on the way (the kernel's part is in `report.kernel`).
        let lost = sent_held.saturating_sub(held.count);
        let mut out = String::new();
        out.push_str(&format!("hold benchmark: 2 netns VMs, UDP 58-byte frames from an AF_XDP sender, {seconds:.1} s blast\n"));
        out.push_str(&format!("plain path:      sent {sent_plain:>8} ({:.0} pps offered)  received {:>8}  {plain_pps:>10.0} pps\n", sent_plain as f64 / plain_secs, plain.count));
        out.push_str(&format!("held (buffer):   sent {sent_held:>8} ({:.0} pps offered)  held     {:>8}  {held_pps:>10.0} pps  delivered before the advance: {early}\n", sent_held as f64 / held_secs, report.total(HoldTotal::Received)));
        out.push_str(&format!("re-injected:     {reinjected:>8} frames in {reinject_secs:.3} s = {:.0} pps after the receiver advanced; received {}\n",
            reinjected as f64 / reinject_secs, held.count));
        out.push_str(&format!("buffer totals: {:?}; lost in the kernel: {:?}\n", report.totals, report.kernel));
        out.push_str(&format!("memory: peak held about {} bytes of frame data\n", sent_held * 60));
        out.push_str(&format!(
            "hold+reinject: {:.0} pps (ratio to plain path {:.2}), lost {}, reordered {}",
            held_pps.min(reinjected as f64 / reinject_secs),
            held_pps / plain_pps,
            lost,
            held.reordered
        ));
        anyhow::ensure!(early == 0, "{early} held frames reached the receiver before it advanced");
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    bench.stop().await?;
    result
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
            let payload = crate::traffic::Message {
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
                        Ok(n) => {
                            if let Some(m) = crate::traffic::Message::decode(&buf[..n]) {
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
