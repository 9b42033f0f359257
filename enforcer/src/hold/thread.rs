//! The buffer thread: the I/O around the [`Core`]. It reads the AF_XDP ring, takes epoch
//! notices and report requests from its channel, raises views from colors learned from other
//! hosts' frames (through the one epoch-change path, [`advance::change_epoch`]), moves drains
//! on, and writes the totals to their pinned map. At start it accounts for what a daemon that
//! died left behind; at a graceful stop it delivers what it may and counts the rest.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use enforcer_common::{HoldKernel, HoldTotal, MacKey};
use tracing::{info, warn};

use super::{
    advance::{self, BufferLink},
    config::{HoldError, HoldOptions, LoopPoint},
    core::{BATCH, Core, Counted, Kernel, Key, Wire, account_restart},
    inject::Injector,
    learn::LearnedRing,
    protocol::{Command, Notice},
    report::{HoldReport, KernelLoss, QueueKey},
    xsk::XskSocket,
};
use crate::{
    datapath::{
        Datapath,
        epochs::{self, EpochStore as _},
    },
    model::MacAddr,
    sched::raise_this_thread,
    sync::lock,
};

pub(crate) struct Thread {
    dp: Arc<Mutex<Datapath>>,
    opts: HoldOptions,
    socket: XskSocket,
    core: Core,
    inject: Injector,
    learned: Option<LearnedRing>,
}

impl Wire for Injector {
    fn send(&mut self, ifindex: u32, mark: u32, frames: &[&[u8]]) -> usize {
        Injector::send(self, ifindex, mark, frames)
    }
}

/// The datapath as the core's drains see it.
struct Maps<'a>(&'a Mutex<Datapath>);

impl Kernel for Maps<'_> {
    fn handed(&mut self, counted: Counted) -> Option<u64> {
        let mut dp = lock(self.0);
        match counted {
            Counted::Port(slot) => dp.held_in_port(slot),
            Counted::Group(g) => dp.held_in_group(g),
        }
        .ok()
    }

    fn clear_draining(&mut self, key: Key) {
        let mut dp = lock(self.0);
        let r = match key {
            Key::Vm(mac) => epochs::clear_vm_draining(&mut *dp, &mac),
            Key::Group(g) => epochs::clear_group_draining(&mut *dp, g),
        };
        if let Err(err) = r {
            warn!(%err, "clearing a draining flag");
        }
    }

    fn barrier(&mut self) {
        rcu_barrier();
    }
}

/// The thread's own link for colors it learned: the copy is updated at once (before the map
/// is written, like any change); the releases wait until the map's lock is let go, so a long
/// re-injection never holds up the API.
struct SelfLink<'a> {
    core: &'a mut Core,
    inject: &'a mut Injector,
    later: Vec<Notice>,
}

impl BufferLink for SelfLink<'_> {
    fn running(&self) -> bool {
        true
    }

    fn tell(&mut self, notice: Notice) -> bool {
        match notice {
            Notice::Vm { .. } => self.core.on_notice(self.inject, notice, Instant::now()),
            _ => self.later.push(notice),
        }
        true
    }
}

impl Thread {
    /// The thread's state over the maps as they are: the pinned totals brought up to date
    /// with what a previous daemon left, and every draining flag cleared (nothing is held any
    /// more; a flag left set would route the VM's traffic through userspace for ever).
    pub(crate) fn new(
        dp: &mut Datapath,
        shared: Arc<Mutex<Datapath>>,
        opts: HoldOptions,
        socket: XskSocket,
        learned: Option<LearnedRing>,
    ) -> Result<Self, HoldError> {
        let read_port = dp.held_in_ports()?;
        let read_group = dp.held_in_groups()?;
        let no_socket = dp.hold_kernel(HoldKernel::NoSocket)?;
        let mut totals = dp.hold_totals()?;
        let handed = read_port.iter().chain(&read_group).sum();
        let (in_memory, unread) = account_restart(&mut totals, handed, no_socket);
        if in_memory + unread > 0 {
            warn!(
                in_memory,
                unread, "frames held by a previous buffer daemon were lost with it"
            );
        }
        dp.set_hold_totals(&totals)?;
        let vms = dp.vms()?;
        for (mac, _) in &vms {
            epochs::clear_vm_draining(dp, mac)?;
        }
        let mut groups = Vec::new();
        for g in epochs::list_groups(dp)? {
            let aborts = dp.group(g.group)?.map_or(0, |s| s.aborts);
            groups.push((g.group, g.min_epoch, aborts));
            epochs::clear_group_draining(dp, g.group)?;
        }
        Ok(Self {
            dp: shared,
            core: Core::new(opts.max_bytes, vms, groups, read_port, read_group, totals),
            opts,
            socket,
            inject: Injector::default(),
            learned,
        })
    }

    pub(crate) fn run(mut self, commands: mpsc::Receiver<Command>) {
        // The kernel's rings hold ~20 ms of small frames at line rate: this thread must not wait
        // behind busy threads for longer than that.
        raise_this_thread("the buffer thread");
        let mut last_flush = Instant::now();
        loop {
            let mut busy = false;
            self.opts.at_point.at(LoopPoint::TakeNotices);
            loop {
                match commands.try_recv() {
                    Ok(Command::Stop { graceful, done }) => {
                        let report = if graceful {
                            Some(self.shutdown())
                        } else {
                            None
                        };
                        let _ = done.send(report.unwrap_or_default());
                        return;
                    }
                    Ok(Command::Notice(notice)) => {
                        busy = true;
                        self.core
                            .on_notice(&mut self.inject, notice, Instant::now());
                    }
                    Ok(Command::Report(tx)) => {
                        busy = true;
                        let _ = tx.send(self.report());
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // Every sender gone: the daemon is gone without a word. Behave as if it
                    // had crashed (the next one accounts for what was held).
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.opts.at_point.at(LoopPoint::ApplyLearned);
            busy |= self.apply_learned();
            self.opts.at_point.at(LoopPoint::ReadRing);
            busy |= self.receive();
            self.opts.at_point.at(LoopPoint::ProgressDrains);
            self.core
                .progress_drains(&mut Maps(&self.dp), Instant::now());
            if last_flush.elapsed() > Duration::from_millis(20) {
                self.flush_totals();
                last_flush = Instant::now();
            }
            if !busy {
                self.opts.at_point.at(LoopPoint::Wait);
                self.wait_for_frames(Duration::from_millis(1));
            }
        }
    }

    fn wait_for_frames(&self, timeout: Duration) {
        let pfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = vec![pfd(self.socket.rx.as_raw_fd())];
        if let Some(ring) = &self.learned {
            fds.push(pfd(ring.raw_fd()));
        }
        // SAFETY: valid pollfds for the duration of the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
    }

    /// Raises this host's views of VMs on other hosts to the colors their frames carried,
    /// through the same path as every epoch change.
    fn apply_learned(&mut self) -> bool {
        let Some(ring) = self.learned.as_mut() else {
            return false;
        };
        let learned = ring.drain();
        let applied = ring.applied.clone();
        let any = !learned.is_empty();
        for (mac, color) in learned {
            let mut link = SelfLink {
                core: &mut self.core,
                inject: &mut self.inject,
                later: Vec::new(),
            };
            let mut dp = lock(&self.dp);
            let Ok(Some(current)) = dp.vm(&mac) else {
                continue;
            };
            if color <= current.epoch {
                // The coordinator's message got there first; keep our copy level with it.
                drop(dp);
                link.tell(Notice::Vm {
                    mac,
                    vm: Some(current),
                });
                continue;
            }
            let changed =
                advance::change_epoch(&mut *dp, &mut link, MacAddr::from(mac), Some(color), true);
            drop(dp);
            match changed {
                Ok(c) if c.changed => {
                    applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(err) => warn!(%err, "raising a learned view"),
            }
            let (later, now) = (link.later, Instant::now());
            for notice in later {
                self.core.on_notice(&mut self.inject, notice, now);
            }
        }
        any
    }

    fn flush_totals(&mut self) {
        if let Some(totals) = self.core.take_dirty_totals()
            && let Err(err) = self
                .dp
                .lock()
                .expect("datapath lock")
                .set_hold_totals(&totals)
        {
            warn!(%err, "writing hold totals");
        }
    }

    /// Reads what the ring has; returns whether there was anything.
    fn receive(&mut self) -> bool {
        let frames = self.socket.receive(4 * BATCH as u32);
        if frames.is_empty() {
            return false;
        }
        // Each frame's color rides in its hold header: whatever epoch notices are still unread,
        // none of these is released before its receiver reached that color.
        let now = Instant::now();
        for data in frames {
            self.core.on_frame(&mut self.inject, data, now);
        }
        true
    }

    fn report(&self) -> HoldReport {
        let core = self.core.report(Instant::now());
        let mut kernel = std::collections::BTreeMap::new();
        {
            let mut dp = self.dp.lock().expect("datapath lock");
            for (counter, loss) in [
                (HoldKernel::NoSocket, KernelLoss::NoSocket),
                (HoldKernel::NoHeadroom, KernelLoss::NoHeadroom),
            ] {
                if let Ok(n) = dp.hold_kernel(counter) {
                    kernel.insert(loss, n);
                }
            }
        }
        let (dropped, ring_full, fill_empty) = self.socket.kernel_drops();
        kernel.insert(KernelLoss::SocketDropped, dropped);
        kernel.insert(KernelLoss::RingFull, ring_full);
        kernel.insert(KernelLoss::FillRingEmpty, fill_empty);
        HoldReport {
            device: self.opts.device.clone(),
            held_frames: core.held_frames,
            held_bytes: core.held_bytes,
            max_bytes: self.opts.max_bytes as u64,
            queues: core.queues,
            totals: HoldTotal::ALL
                .iter()
                .map(|t| (*t, core.totals[t.index() as usize]))
                .collect(),
            kernel,
            hold_time_buckets: core.hold_time_buckets,
            hold_time_sum_seconds: core.hold_time_sum_seconds,
            hold_time_count: core.hold_time_count,
            released_at_advance: core
                .released_at_advance
                .into_iter()
                .map(|(mac, n)| (QueueKey::Vm(MacAddr::from(mac)), n))
                .collect(),
        }
    }

    /// Graceful stop: no more holds, take in what is in flight, deliver what may be delivered,
    /// drop and count the rest, clear every flag.
    fn shutdown(&mut self) -> HoldReport {
        if let Err(err) = lock(&self.dp).set_hold_ifindex(0) {
            warn!(%err, "clearing the hold device in the config");
        }
        rcu_barrier();
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            if !self.receive() {
                self.wait_for_frames(Duration::from_millis(5));
            }
        }
        self.core.shutdown(&mut self.inject, Instant::now());
        {
            let mut dp = lock(&self.dp);
            let macs: Vec<MacKey> = self.core.vm_macs();
            for mac in macs {
                let _ = epochs::clear_vm_draining(&mut *dp, &mac);
            }
            for g in self.core.groups() {
                let _ = epochs::clear_group_draining(&mut *dp, g);
            }
        }
        self.flush_totals();
        info!(
            dropped = self.core.total(HoldTotal::DroppedShutdown),
            "buffer daemon stopped"
        );
        self.report()
    }
}

/// Waits until every BPF program run that started before now has finished (an RCU grace
/// period: membarrier(MEMBARRIER_CMD_GLOBAL) calls synchronize_rcu).
fn rcu_barrier() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        // Not available (nohz_full): a grace period is well under this.
        thread::sleep(Duration::from_millis(50));
    }
}
