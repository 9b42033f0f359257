//! Benchmarks, measured side by side in one run (`cargo xtask bench datapath`): the same veth
//! path between two lab VMs without any program, with the tc program and with the XDP program
//! attached to the VM ports (on the hot Type-1 path), interleaved round by round.

use std::{
    io::ErrorKind,
    net::SocketAddrV4,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    datapath::{self, AttachMode, Datapath},
    epochs,
    lab::Lab,
};

pub struct DatapathBenchOptions {
    pub rounds: usize,
    pub seconds: f64,
}

impl Default for DatapathBenchOptions {
    fn default() -> Self {
        Self {
            rounds: 5,
            seconds: 3.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Without,
    With(AttachMode),
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Without => "without",
            Setup::With(AttachMode::Tc) => "tc",
            Setup::With(AttachMode::Xdp) => "xdp",
        }
    }
}

#[derive(Default, Clone)]
struct Samples {
    pps: Vec<f64>,
    gbps: Vec<f64>,
    ns_per_frame: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Runs the datapath benchmark; returns the report, whose last line is
/// `datapath throughput ratio (with/without): X.XX` for the default hook (tc).
pub fn datapath(opts: &DatapathBenchOptions) -> anyhow::Result<String> {
    which_iperf3()?;
    let lab = Lab::create("enfb", 2).context("creating the benchmark lab")?;
    let pin_root = std::path::PathBuf::from("/sys/fs/bpf/enforcer-bench");
    let _ = datapath::teardown(&pin_root);
    let setups = [
        Setup::Without,
        Setup::With(AttachMode::Tc),
        Setup::With(AttachMode::Xdp),
    ];
    let mut samples: Vec<Samples> = vec![Samples::default(); setups.len()];
    for round in 1..=opts.rounds {
        // Alternate the order (A B C, C B A, ...) so drift in the machine's load over a run
        // does not favour whichever setup always comes first.
        let mut order: Vec<usize> = (0..setups.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for i in order {
            let setup = &setups[i];
            let dp = match setup {
                Setup::Without => None,
                Setup::With(mode) => Some(attach(&lab, &pin_root, *mode)?),
            };
            let pps = udp_pps(&lab, opts.seconds)?;
            let gbps = tcp_gbps(&lab, opts.seconds)?;
            eprintln!(
                "[bench] round {round}/{}: {:<7} {:>10.0} pps  {:>7.2} Gb/s",
                opts.rounds,
                setup.name(),
                pps,
                gbps
            );
            samples[i].pps.push(pps);
            samples[i].gbps.push(gbps);
            drop(dp);
            let _ = datapath::teardown(&pin_root);
        }
    }
    // Kernel run-time stats under real traffic, in a pass of their own: the stats' clock
    // reads slow every run down, so they stay off while throughput is measured.
    for (i, setup) in setups.iter().enumerate() {
        let Setup::With(mode) = setup else { continue };
        let dp = attach(&lab, &pin_root, *mode)?;
        let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time stats")?;
        let (t0, c0) = program_totals(&dp)?;
        udp_pps(&lab, opts.seconds.min(1.0))?;
        let (t1, c1) = program_totals(&dp)?;
        drop(stats_fd);
        if c1 > c0 {
            samples[i]
                .ns_per_frame
                .push((t1 - t0) as f64 / (c1 - c0) as f64);
        }
        drop(dp);
        let _ = datapath::teardown(&pin_root);
    }
    drop(lab);
    let run_cost = test_run_cost(&pin_root)?;
    let _ = datapath::teardown(&pin_root);

    let base = &samples[0];
    let (base_pps, base_gbps) = (median(&base.pps), median(&base.gbps));
    let mut out = String::new();
    out.push_str(&format!(
        "datapath benchmark: 2 netns VMs on a bridge, veth ports, {} rounds (alternating order) x {:.1} s per measure, medians\n",
        opts.rounds, opts.seconds
    ));
    out.push_str(&format!(
        "{:<8} {:>12} {:>8} {:>10} {:>8} {:>14}\n",
        "setup", "UDP 64B pps", "ratio", "TCP Gb/s", "ratio", "ns/frame(prog)"
    ));
    let mut tc_ratio = f64::NAN;
    for (setup, s) in setups.iter().zip(&samples) {
        let (pps, gbps) = (median(&s.pps), median(&s.gbps));
        let cost = if s.ns_per_frame.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(&s.ns_per_frame))
        };
        out.push_str(&format!(
            "{:<8} {:>12.0} {:>8.3} {:>10.2} {:>8.3} {:>14}\n",
            setup.name(),
            pps,
            pps / base_pps,
            gbps,
            gbps / base_gbps,
            cost
        ));
        if *setup == Setup::With(AttachMode::Tc) {
            tc_ratio = (pps / base_pps).min(gbps / base_gbps);
        }
    }
    out.push_str("ns/frame(prog): kernel run-time stats (bpf_stats) in a separate UDP pass, including the stats' own clock reads\n");
    out.push_str(&format!(
        "program cost added per Type-1 frame, by BPF_PROG_TEST_RUN x{TEST_RUN_REPEAT} minus the same run of a null program ({:.0} / {:.0} ns): tc {:.1} ns, xdp {:.1} ns\n",
        run_cost.2, run_cost.3, run_cost.0, run_cost.1
    ));
    out.push_str("(ratio = with/without; the summary takes the lower of the UDP and TCP ratios of the default hook, tc)\n");
    out.push_str(&format!(
        "datapath throughput ratio (with/without): {tc_ratio:.2}"
    ));
    Ok(out)
}

const TEST_RUN_REPEAT: u32 = 1_000_000;

/// Mean program run time for a registered sender's Type-1 frame, measured by the kernel over
/// many repetitions of BPF_PROG_TEST_RUN (the sender is registered on loopback, where the
/// test runner delivers the frame).
fn test_run_cost(pin_root: &std::path::Path) -> anyhow::Result<(f64, f64, f64, f64)> {
    let _ = datapath::teardown(pin_root);
    let mut dp = Datapath::open(pin_root, AttachMode::Tc)?;
    let (a, b) = (
        crate::mac::MacAddr([2, 0, 0, 0, 0, 1]),
        crate::mac::MacAddr([2, 0, 0, 0, 0, 2]),
    );
    dp.ensure_port_slot(1)?;
    dp.ensure_port_slot(999_999)?;
    epochs::register(&mut dp, a, 1, 1, Some(0))?;
    epochs::register(&mut dp, b, 1, 999_999, Some(0))?;
    let mut frame = Vec::new();
    frame.extend_from_slice(&b.0);
    frame.extend_from_slice(&a.0);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.resize(60, 0);
    let mut cost = [0f64; 4];
    let measure = |fd: std::os::fd::RawFd| -> anyhow::Result<f64> {
        let mut runs = Vec::new();
        for _ in 0..5 {
            let (_, ns) = datapath::prog_test_run(fd, &frame, TEST_RUN_REPEAT)?;
            runs.push(f64::from(ns));
        }
        Ok(median(&runs))
    };
    for (i, mode) in [AttachMode::Tc, AttachMode::Xdp].into_iter().enumerate() {
        cost[i] = measure(dp.program_fd(mode)?)?;
        // The test runner's own cost per repetition: the same run of a program that only
        // returns, so that the difference is what our program adds per frame.
        let null = null_program(mode)?;
        use std::os::fd::AsRawFd as _;
        cost[2 + i] = measure(null.as_raw_fd())?;
    }
    let stats = dp.port_stats()?;
    let counted = stats.get(&1).map_or(0, |c| c.type1.frames);
    anyhow::ensure!(
        counted == 10 * u64::from(TEST_RUN_REPEAT),
        "test runs took the Type-1 path ({counted} counted)"
    );
    Ok((cost[0] - cost[2], cost[1] - cost[3], cost[2], cost[3]))
}

/// Loads a program of two instructions (`r0 = 0; exit`) of the hook's type: the baseline for
/// what the test runner itself costs per repetition.
fn null_program(mode: AttachMode) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_type};
    // BPF_ALU64|BPF_MOV|BPF_K r0, 0 ; BPF_JMP|BPF_EXIT
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    // SAFETY: bpf_attr is a plain C union of integers; all-zero is its "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the union is all zeros, a valid value of every member; we use this one only.
    let prog = unsafe { &mut attr.__bindgen_anon_3 };
    prog.prog_type = match mode {
        AttachMode::Tc => bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32,
        AttachMode::Xdp => bpf_prog_type::BPF_PROG_TYPE_XDP as u32,
    };
    prog.insn_cnt = insns.len() as u32;
    prog.insns = insns.as_ptr() as u64;
    prog.license = license.as_ptr() as u64;
    // SAFETY: a BPF_PROG_LOAD attr whose pointers (instructions, license) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_LOAD as libc::c_int,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("loading the baseline program");
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

fn which_iperf3() -> anyhow::Result<()> {
    let ok = Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success());
    anyhow::ensure!(
        matches!(ok, Ok(true)),
        "iperf3 not found: run scripts/setup.sh"
    );
    Ok(())
}

/// Attaches the program to both lab ports with both VMs registered at epoch 0 (Type-1 path).
fn attach(lab: &Lab, pin_root: &std::path::Path, mode: AttachMode) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::open(pin_root, mode)?;
    for vm in &lab.vms {
        let ifindex = dp.attach(&vm.port)?;
        epochs::register(&mut dp, vm.mac, 1, ifindex, Some(0))?;
    }
    Ok(dp)
}

fn program_totals(dp: &Datapath) -> anyhow::Result<(u64, u64)> {
    let info = dp.program_info()?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}

/// Small UDP frames (18-byte payload: 64-byte frames on the wire with FCS) from vm1 to vm2 for
/// `seconds`; returns frames received per second.
fn udp_pps(lab: &Lab, seconds: f64) -> anyhow::Result<f64> {
    let tx = lab.udp_socket(0, 47_200)?;
    let rx = lab.udp_socket(1, 47_200)?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let dst = SocketAddrV4::new(lab.vms[1].ip, 47_200);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let (stop, received) = (stop.clone(), received.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match rx.recv(&mut buf) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let payload = [0x42u8; 18];
    // Warm up (bridge learning, caches), then count only the measured window.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        let _ = tx.send_to(&payload, dst);
    }
    let start_count = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    while start.elapsed() < window {
        for _ in 0..64 {
            let _ = tx.send_to(&payload, dst);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed) - start_count;
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    Ok(got as f64 / elapsed)
}

/// TCP bulk throughput from vm1 to vm2 with iperf3; returns Gb/s received.
fn tcp_gbps(lab: &Lab, seconds: f64) -> anyhow::Result<f64> {
    let mut server = lab
        .command(1, "iperf3")
        .args(["-s", "-1", "-B", &lab.vms[1].ip.to_string(), "-p", "47201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 server")?;
    thread::sleep(Duration::from_millis(300));
    let out = lab
        .command(0, "iperf3")
        .args(["-c", &lab.vms[1].ip.to_string(), "-p", "47201", "-J", "-t"])
        .arg(format!("{seconds}"))
        .output()
        .context("running iperf3 client")?;
    let _ = server.wait();
    anyhow::ensure!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result without bits_per_second")?;
    Ok(bps / 1e9)
}

/// `bench hold`: a post-snapshot sender blasting small frames at a pre-snapshot receiver for a
/// fixed time (every frame held by the buffer daemon), then the receiver advances and the held
/// frames are re-injected; side by side with the same blast on the plain path (both VMs at the
/// same epoch). Checked at the receiver: every frame, in order.
pub async fn hold(seconds: f64) -> anyhow::Result<String> {
    let bench = BufferedLab::start("enfh", "enfhbh").await?;
    let result = async {
        let (lab, client) = (&bench.lab, &bench.client);
        client.set_mode(crate::api::ModeName::Buffer).await?;
        let tx = lab.udp_socket(0, 47_500)?;
        let rx = lab.udp_socket(1, 47_500)?;
        rx.set_read_timeout(Some(Duration::from_millis(200)))?;
        // A receive buffer big enough for the whole burst: measure our path, not how fast the
        // receiving thread empties its socket.
        crate::lab::force_rcvbuf(&rx, 1 << 30)?;
        let dst = SocketAddrV4::new(lab.vms[1].ip, 47_500);

        // Plain path: same epochs.
        let counter = Receiver::start(rx.try_clone()?);
        let (sent_plain, plain_secs) = blast(&tx, dst, 0, seconds);
        let plain = counter.finish(Duration::from_millis(300));
        let plain_pps = plain.count as f64 / plain_secs;

        // Held: the sender advances; every frame to the receiver is held.
        client.advance(lab.vms[0].mac).await?;
        let counter = Receiver::start(rx.try_clone()?);
        let (sent_held, held_secs) = blast(&tx, dst, 1, seconds);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let report = client.holds().await?;
        let held_pps = report.total("received") as f64 / held_secs;
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
        let reinjected = report.total("reinjected");
        let held = counter.finish_after(sent_held, Duration::from_secs(10));
        // Lost anywhere on the way (the kernel's part is in `report.kernel`).
        let lost = sent_held.saturating_sub(held.count);
        let mut out = String::new();
        out.push_str(&format!("hold benchmark: 2 netns VMs, UDP 58-byte frames from one userspace sender, {seconds:.1} s blast\n"));
        out.push_str(&format!("plain path:      sent {sent_plain:>8}  received {:>8}  {plain_pps:>10.0} pps\n", plain.count));
        out.push_str(&format!("held (buffer):   sent {sent_held:>8}  held     {:>8}  {held_pps:>10.0} pps  delivered before the advance: {early}\n", report.total("received")));
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
struct BufferedLab {
    lab: Lab,
    running: crate::daemon::Running,
    client: crate::client::Client,
    pin_root: std::path::PathBuf,
}

impl BufferedLab {
    async fn start(prefix: &str, hold_device: &str) -> anyhow::Result<Self> {
        use crate::{daemon::DaemonConfig, hold::HoldOptions, ports::PortSource};
        let lab = Lab::create(prefix, 2).context("creating the benchmark lab")?;
        let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/enforcer-bench-{prefix}"));
        let _ = datapath::teardown(&pin_root);
        let running = crate::daemon::start(DaemonConfig {
            ports: PortSource::Bridge(lab.bridge.clone()),
            pin_root: pin_root.clone(),
            attach: AttachMode::Tc,
            listen: "127.0.0.1:0".parse()?,
            token: None,
            type3_mode: None,
            hold: Some(HoldOptions {
                device: hold_device.into(),
                max_bytes: 1 << 30,
            }),
            snapshots: None,
        })
        .await?;
        let client = crate::client::Client::new(format!("http://{}", running.addr), None);
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

    async fn stop(self) -> anyhow::Result<()> {
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

/// One run of `bench tcp-skew`: bytes received over time.
struct SkewRun {
    mode: &'static str,
    skew: f64,
    /// (seconds since start, bytes received so far), one sample per read.
    progress: Vec<(f64, u64)>,
    /// Longest time after the sender's snapshot with no byte received.
    no_progress: f64,
}

/// `bench tcp-skew`: a TCP bulk stream vm1 → vm2; 2 s in, vm1 takes its snapshot (advances) and
/// vm2 follows `skew` seconds later; the no-progress period at the receiver, with Type-3 frames
/// dropped and with them held. GENI-VIOLIN's Figure 6, drawn to `figure` (SVG).
pub async fn tcp_skew(skews: &[f64], figure: &std::path::Path) -> anyhow::Result<String> {
    use crate::api::ModeName;
    let bench = BufferedLab::start("enfs", "enfsbh").await?;
    let result = async {
        let (lab, client) = (&bench.lab, &bench.client);
        // Segmentation offload off at the sender: MTU-sized segments, each of which can be held
        // (GSO super-frames are too big for the XDP hold path and would be dropped instead).
        let ok = lab
            .command(0, "ethtool")
            .args(["-K", "eth0", "tso", "off", "gso", "off"])
            .status()?
            .success();
        anyhow::ensure!(
            ok,
            "ethtool -K eth0 tso off gso off failed (install ethtool: scripts/setup.sh)"
        );
        let mut runs = Vec::new();
        for (mode, name) in [(ModeName::Drop, "drop"), (ModeName::Buffer, "buffer")] {
            client.set_mode(mode).await?;
            for &skew in skews {
                eprintln!("[bench] tcp-skew: {name}, skew {skew} s");
                runs.push(skew_run(lab, client, name, skew).await?);
            }
        }
        std::fs::write(figure, skew_svg(&runs, skews))
            .with_context(|| format!("writing {}", figure.display()))?;
        let mut out = String::from(
            "tcp-skew: TCP bulk vm1 -> vm2, sender snapshot at 2 s, receiver `skew` s later\n",
        );
        out.push_str(&format!(
            "{:<8} {:>8} {:>16} {:>14}\n",
            "mode", "skew s", "no-progress s", "target"
        ));
        let mut worst: f64 = f64::NEG_INFINITY;
        for r in &runs {
            let target = if r.mode == "buffer" {
                format!("<= {:.3}", r.skew + 0.05)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<8} {:>8.1} {:>16.3} {:>14}\n",
                r.mode, r.skew, r.no_progress, target
            ));
            if r.mode == "buffer" {
                worst = worst.max(r.no_progress - r.skew);
            }
        }
        out.push_str(&format!("figure: {}\n", figure.display()));
        out.push_str(&format!(
            "buffer no-progress beyond the skew: at most {:.0} ms (target 50 ms)",
            worst * 1000.0
        ));
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    bench.stop().await?;
    result
}

async fn skew_run(
    lab: &Lab,
    client: &crate::client::Client,
    mode: &'static str,
    skew: f64,
) -> anyhow::Result<SkewRun> {
    use std::io::{Read as _, Write as _};
    let server_ip = lab.vms[1].ip;
    let listener = lab.in_vm(1, move || std::net::TcpListener::bind((server_ip, 47_600)))??;
    let start = Instant::now();
    let server = thread::spawn(move || -> std::io::Result<Vec<(f64, u64)>> {
        let (mut conn, _) = listener.accept()?;
        let (mut buf, mut total, mut progress) = (vec![0u8; 1 << 16], 0u64, Vec::new());
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(progress);
            }
            total += n as u64;
            progress.push((start.elapsed().as_secs_f64(), total));
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = lab.in_vm(0, move || std::net::TcpStream::connect((server_ip, 47_600)))??;
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 14];
            while !stop.load(Ordering::Relaxed) {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        })
    };
    let at = |secs: f64| {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs_f64(secs),
        ))
    };
    at(2.0).await;
    client.advance(lab.vms[0].mac).await?;
    at(2.0 + skew).await;
    client.advance(lab.vms[1].mac).await?;
    at(2.0 + skew + 3.0).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let progress = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let after: Vec<f64> = progress
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t >= 2.0)
        .collect();
    let mut no_progress: f64 = 0.0;
    let mut last = 2.0;
    for t in after {
        no_progress = no_progress.max(t - last);
        last = t;
    }
    Ok(SkewRun {
        mode,
        skew,
        progress,
        no_progress,
    })
}

/// The figure: bytes received over time, one panel per mode, one line per skew.
fn skew_svg(runs: &[SkewRun], skews: &[f64]) -> String {
    const COLORS: [&str; 4] = ["#d62728", "#2ca02c", "#1f77b4", "#9467bd"];
    let (w, h, pad) = (460.0, 300.0, 50.0);
    let t_max = runs
        .iter()
        .flat_map(|r| r.progress.last())
        .map(|(t, _)| *t)
        .fold(1.0, f64::max);
    let y_max = runs
        .iter()
        .flat_map(|r| r.progress.last())
        .map(|(_, b)| *b as f64)
        .fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * w,
        h + 30.0
    );
    for (panel, mode) in ["drop", "buffer"].iter().enumerate() {
        let x0 = panel as f64 * w;
        let (px, py, pw, ph) = (x0 + pad, 30.0, w - pad - 15.0, h - pad - 10.0);
        svg += &format!(
            "<text x=\"{}\" y=\"18\" font-weight=\"bold\">({}) Type-3 frames {}</text>\n",
            px,
            if panel == 0 { 'a' } else { 'b' },
            if *mode == "drop" {
                "dropped"
            } else {
                "held and re-injected"
            }
        );
        svg += &format!(
            "<rect x=\"{px}\" y=\"{py}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>\n"
        );
        for tick in 0..=(t_max as u32) {
            let x = px + pw * f64::from(tick) / t_max;
            svg += &format!(
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"black\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>\n",
                py + ph,
                py + ph + 4.0,
                py + ph + 16.0
            );
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>\n",
            px + pw / 2.0,
            py + ph + 32.0
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" transform=\"rotate(-90 {} {})\" text-anchor=\"middle\">MB received</text>\n",
            x0 + 14.0,
            py + ph / 2.0,
            x0 + 14.0,
            py + ph / 2.0
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            px - 4.0,
            py + 10.0,
            y_max / 1e6
        );
        for (i, skew) in skews.iter().enumerate() {
            let Some(run) = runs.iter().find(|r| r.mode == *mode && r.skew == *skew) else {
                continue;
            };
            let color = COLORS[i % COLORS.len()];
            let step = (run.progress.len() / 1500).max(1);
            let points: Vec<String> = run
                .progress
                .iter()
                .step_by(step)
                .map(|(t, b)| {
                    format!(
                        "{:.1},{:.1}",
                        px + pw * t / t_max,
                        py + ph - ph * (*b as f64) / y_max
                    )
                })
                .collect();
            svg += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                points.join(" ")
            );
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">skew {skew} s: no progress {:.2} s</text>\n",
                px + 8.0,
                py + 16.0 + 14.0 * i as f64,
                run.no_progress
            );
        }
    }
    svg += "</svg>\n";
    svg
}
