//! The buffer thread: the I/O around the [`Core`]. It reads the hold device's ring, takes epoch
//! notices and report requests from its channel, raises views from colors learned from other
//! hosts' frames (through the one epoch-change path, [`advance::change_epoch`]), moves drains
//! on, and writes the totals to their pinned map. At start it accounts for what a daemon that
//! died left behind; at a graceful stop it delivers what it may and counts the rest.

use std::{
    collections::HashMap,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use enforcer_common::{HoldKernel, HoldSeq, HoldTotal, MacKey};
use tracing::{info, warn};

use super::{
    advance::{self, BufferLink},
    config::{HoldError, HoldOptions, LoopPoint},
    core::{Core, Kernel, Key, Outgoing, Wire, account_restart},
    fence::Fence,
    inject::Injector,
    learn::LearnedRing,
    protocol::{Command, Notice},
    record::Recording,
    report::{HoldReport, KernelLoss, QueueKey},
    ring::PacketRing,
};
use crate::{
    datapath::{
        AttachMode, Datapath, OrderDone, SlotPorts,
        epochs::{self, EpochStore as _},
    },
    model::MacAddr,
    sched::raise_this_thread,
    sync::lock,
};

/// Blocks of the ring read per turn of the loop.
const BLOCKS_PER_TURN: usize = 4;

pub(crate) struct Thread {
    dp: Arc<Mutex<Datapath>>,
    opts: HoldOptions,
    ring: PacketRing,
    core: Core,
    out: Out,
    grace: Arc<Grace>,
    learned: Option<LearnedRing>,
    /// Frames the ring cut short (longer than a block: never expected), dropped and counted.
    truncated: u64,
    /// Recordings asked for and not handed over yet, by take.
    takes: HashMap<u64, mpsc::Sender<Vec<(u32, Recording)>>>,
    next_take: u64,
}

/// The way out: re-injection, and the order counts the programs read.
pub(crate) struct Out {
    inject: Injector,
    order_done: OrderDone,
    /// Which port each counter slot names now.
    slots: SlotPorts,
    /// The tc port program runs on the ports (it clears the re-injection bit again).
    tc: bool,
}

impl Wire for Out {
    fn send(&mut self, slot: u32, ifindex: u32, mark: u32, frames: &[Outgoing<'_>]) -> usize {
        // The slot must still name the port the frames came in on, and that port exist: a
        // freed slot may have gone to another port (whose VM the frames would then seem to
        // come from), and a deleted port would drop them in the kernel without a word.
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname requires.
        let exists = unsafe { !libc::if_indextoname(ifindex, name.as_mut_ptr()).is_null() };
        if ifindex == 0 || self.slots.get(slot) != ifindex || !exists {
            return 0;
        }
        self.inject.send(slot, mark, self.tc, frames)
    }

    fn order_done(&mut self, queue: u32, done: u64) {
        self.order_done.set(queue, done);
    }
}

/// RCU grace periods for the drains, waited out on a thread of their own (a grace period
/// takes milliseconds; the buffer thread must keep reading its ring meanwhile). Tokens count
/// requests: grace period `t` has passed once `completed >= t`.
#[derive(Default)]
pub(crate) struct Grace {
    state: Mutex<(u64, u64)>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Grace {
    /// Starts the thread that waits the grace periods out.
    fn spawn() -> Result<Arc<Self>, HoldError> {
        let grace = Arc::new(Self::default());
        let g = grace.clone();
        thread::Builder::new()
            .name("enforcer-grace".into())
            .spawn(move || {
                loop {
                    let target = {
                        let mut st = lock(&g.state);
                        while st.1 >= st.0 && !g.stop.load(Ordering::Acquire) {
                            st = g.wake.wait(st).expect("grace lock");
                        }
                        if g.stop.load(Ordering::Acquire) {
                            return;
                        }
                        st.0
                    };
                    rcu_barrier();
                    lock(&g.state).1 = target;
                }
            })
            .map_err(HoldError::Thread)?;
        Ok(grace)
    }

    fn start(&self) -> u64 {
        let mut st = lock(&self.state);
        st.0 += 1;
        self.wake.notify_one();
        st.0
    }

    fn passed(&self, token: u64) -> bool {
        lock(&self.state).1 >= token
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _st = lock(&self.state);
        self.wake.notify_one();
    }
}

/// The datapath as the core's drains see it.
struct Maps<'a>(&'a Mutex<Datapath>, &'a Grace);

impl Fence for Maps<'_> {
    fn handed(&mut self, queue: u32) -> Option<Vec<HoldSeq>> {
        lock(self.0).hold_seq(queue).ok()
    }

    fn grace_start(&mut self) -> u64 {
        self.1.start()
    }

    fn grace_passed(&mut self, token: u64) -> bool {
        self.1.passed(token)
    }
}

impl Kernel for Maps<'_> {
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
}

/// The thread's own link for colors it learned: the copy is updated at once (before the map
/// is written, like any change); the releases wait until the map's lock is let go, so a long
/// re-injection never holds up the API.
struct SelfLink<'a> {
    core: &'a mut Core,
    out: &'a mut Out,
    later: Vec<Notice>,
}

impl BufferLink for SelfLink<'_> {
    fn running(&self) -> bool {
        true
    }

    fn tell(&mut self, notice: Notice) -> bool {
        match notice {
            Notice::Vm { .. } => self.core.on_notice(self.out, notice, Instant::now()),
            _ => self.later.push(notice),
        }
        true
    }
}

impl Thread {
    /// The thread's state over the maps as they are: the pinned totals brought up to date
    /// with what a previous daemon left, and every draining flag cleared (nothing is held any
    /// more; a flag left set would route the VM's traffic through userspace for ever). Called
    /// while the datapath holds nothing (`hold_ifindex` 0, a grace period passed), so what the
    /// programs handed over until now is all another buffer's.
    pub(crate) fn new(
        dp: &mut Datapath,
        shared: Arc<Mutex<Datapath>>,
        opts: HoldOptions,
        ring: PacketRing,
        inject_ifindex: u32,
        learned: Option<LearnedRing>,
    ) -> Result<Self, HoldError> {
        let handed = dp.hold_seqs()?;
        let order_issued = dp.hold_order_issued()?;
        let order_done = dp.hold_order_done()?;
        let mut totals = dp.hold_totals()?;
        let total: u64 = handed
            .iter()
            .flat_map(|(_, cpus)| cpus.iter().map(|s| s.all))
            .sum();
        let (in_memory, unread) = account_restart(&mut totals, total);
        if in_memory + unread > 0 {
            warn!(
                in_memory,
                unread, "frames held by a previous buffer daemon were lost with it"
            );
        }
        dp.set_hold_totals(&totals)?;
        // Every order frame held so far is finished with: no newer frame waits behind them.
        for (queue, issued) in order_issued.iter().enumerate() {
            order_done.set(queue as u32, *issued);
        }
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
        let order_issued = order_issued
            .into_iter()
            .enumerate()
            .filter(|(_, n)| *n > 0)
            .map(|(q, n)| (q as u32, n));
        Ok(Self {
            dp: shared,
            core: Core::new(opts.max_bytes, vms, groups, handed, order_issued, totals),
            opts,
            ring,
            out: Out {
                inject: Injector::new(inject_ifindex),
                order_done,
                slots: dp.slot_ports()?,
                tc: dp.attach_mode() == AttachMode::Tc,
            },
            grace: Grace::spawn()?,
            learned,
            truncated: 0,
            takes: HashMap::new(),
            next_take: 0,
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
                        self.core.on_notice(&mut self.out, notice, Instant::now());
                    }
                    Ok(Command::Report(tx)) => {
                        busy = true;
                        let _ = tx.send(self.report());
                    }
                    Ok(Command::RecordArm { queues }) => self.core.recorder.arm(&queues),
                    Ok(Command::RecordTake { queues, reply }) => {
                        self.next_take += 1;
                        self.core.recorder.take(self.next_take, queues);
                        self.takes.insert(self.next_take, reply);
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
            let (read, ring_idle) = self.receive();
            busy |= read;
            busy |= self.core.release_more(&mut self.out, Instant::now());
            self.opts.at_point.at(LoopPoint::ProgressDrains);
            self.core.progress_drains(
                &mut self.out,
                &mut Maps(&self.dp, &self.grace),
                ring_idle,
                Instant::now(),
            );
            if !self.takes.is_empty() {
                for (id, recordings) in self.core.progress_takes(&mut Maps(&self.dp, &self.grace)) {
                    if let Some(reply) = self.takes.remove(&id) {
                        let _ = reply.send(recordings);
                    }
                }
            }
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
        let mut fds = vec![pfd(self.ring.raw_fd())];
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
                out: &mut self.out,
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
                self.core.on_notice(&mut self.out, notice, now);
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

    /// Reads what the ring has; returns whether there was anything, and whether the ring was
    /// left empty.
    fn receive(&mut self) -> (bool, bool) {
        let frames = self.ring.receive(BLOCKS_PER_TURN, &mut self.truncated);
        let idle = frames.is_empty();
        // Each frame's color rides in its hold header: whatever epoch notices are still unread,
        // none of these is released before its receiver reached that color.
        let now = Instant::now();
        let any = !frames.is_empty();
        for frame in frames {
            self.core.on_frame(&mut self.out, frame, now);
        }
        (any, idle)
    }

    fn report(&mut self) -> HoldReport {
        let core = self.core.report(Instant::now());
        let mut kernel = std::collections::BTreeMap::new();
        {
            let mut dp = self.dp.lock().expect("datapath lock");
            for (counter, loss) in [
                (HoldKernel::NoHeadroom, KernelLoss::NoHeadroom),
                (HoldKernel::InjectRefused, KernelLoss::InjectRefused),
            ] {
                if let Ok(n) = dp.hold_kernel(counter) {
                    kernel.insert(loss, n);
                }
            }
        }
        kernel.insert(KernelLoss::RingFull, self.ring.dropped());
        kernel.insert(KernelLoss::Truncated, self.truncated);
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
            if !self.receive().0 {
                self.wait_for_frames(Duration::from_millis(5));
            }
        }
        self.core.shutdown(&mut self.out, Instant::now());
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

impl Drop for Thread {
    fn drop(&mut self) {
        self.grace.stop();
    }
}

/// Waits until every BPF program run that started before now has finished (an RCU grace
/// period: membarrier(MEMBARRIER_CMD_GLOBAL) calls synchronize_rcu).
pub(crate) fn rcu_barrier() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        // Not available (nohz_full): a grace period is well under this.
        thread::sleep(Duration::from_millis(50));
    }
}
