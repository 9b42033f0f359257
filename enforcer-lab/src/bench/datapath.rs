//! Benchmarks, measured side by side in one run (`cargo xtask bench datapath`): the same veth
//! path between two lab VMs without any program, with the tc program and with the XDP program
//! attached to the VM ports (on the hot Type-1 path), interleaved round by round. Small frames
//! come from an AF_XDP sender, so what is offered is not limited by the generator.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::Lab;
use enforcer::datapath::{self, AttachMode, Datapath, epochs};

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
    offered: Vec<f64>,
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
            let (offered, pps) = udp_pps(&lab, opts.seconds)?;
            let gbps = tcp_gbps(&lab, opts.seconds)?;
            eprintln!(
                "[bench] round {round}/{}: {:<7} {:>10.0} pps of {:>10.0} offered  {:>7.2} Gb/s",
                opts.rounds,
                setup.name(),
                pps,
                offered,
                gbps
            );
            samples[i].offered.push(offered);
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
        "{:<8} {:>12} {:>12} {:>8} {:>10} {:>8} {:>14}\n",
        "setup", "offered pps", "UDP 58B pps", "ratio", "TCP Gb/s", "ratio", "ns/frame(prog)"
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
            "{:<8} {:>12.0} {:>12.0} {:>8.3} {:>10.2} {:>8.3} {:>14}\n",
            setup.name(),
            median(&s.offered),
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
    out.push_str("UDP: an AF_XDP sender on vm1, the path (program, bridge, vm2's veth) steered to the other CPU, counted at vm2's interface\n");
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
        enforcer::model::MacAddr([2, 0, 0, 0, 0, 1]),
        enforcer::model::MacAddr([2, 0, 0, 0, 0, 2]),
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

/// Small UDP frames (58 bytes) from vm1 to vm2 for `seconds`, sent by an AF_XDP socket
/// ([`super::xdp_tx`]) so the generator is not the bottleneck; returns (frames offered per
/// second, frames that reached vm2's interface per second). Receive Packet Steering on vm1's
/// port moves the whole path — the port program, the bridge, vm2's veth — to the other CPU,
/// so that the sender's CPU only sends: the path is measured on one core at what the sender
/// offers.
fn udp_pps(lab: &Lab, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rps = format!("/sys/class/net/{}/queues/rx-0/rps_cpus", lab.vms[0].port);
    if cpus > 1 {
        std::fs::write(&rps, "2").with_context(|| format!("writing {rps}"))?;
    }
    let mut tx = super::xdp_tx::XdpSender::open(lab, 0, 1, 47_200)?;
    let delivered = || -> anyhow::Result<u64> {
        let out = lab
            .command(1, "cat")
            .arg("/sys/class/net/eth0/statistics/rx_packets")
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    // Warm up (bridge learning, caches), then count only the measured window.
    tx.blast(0, 0.2);
    thread::sleep(Duration::from_millis(100));
    let before = delivered()?;
    let (sent, elapsed) = tx.blast(0, seconds);
    thread::sleep(Duration::from_millis(100));
    let got = delivered()? - before;
    if cpus > 1 {
        let _ = std::fs::write(&rps, "0");
    }
    Ok((sent as f64 / elapsed, got as f64 / elapsed))
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
