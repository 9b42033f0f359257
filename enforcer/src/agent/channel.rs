//! Channel state on this host (invariant 7 in docs/design.md): recording, while a group
//! snapshot runs, the frames delivered to its members after their cut that were sent before
//! their sender's, and replaying them into restored VMs before they run.
//!
//! Just before an instant cut each receiver is shut ([`Agent::shut_before_cut`]): every frame
//! to it is held in its buffer queue until its cut, so its tap is empty when it stops and
//! QEMU, which still reads one frame after a stop into a queue no snapshot saves, finds none.
//! The frames held meanwhile leave the buffer after its cut: those sent before their sender's
//! cut are recorded on the way (2. below).
//!
//! Two sources, in this order per receiver:
//! 1. at its cut (its epoch's advance, while it is stopped), what waits in its tap's queue:
//!    delivered since it stopped (its epoch advances ms after the stop) or before and not read
//!    yet (`hold::tap`). Meanwhile its buffer queue is frozen and `enforcer_record` leaves it
//!    alone, so nothing newer overtakes those frames or is recorded twice; they go back into
//!    the queue for the running VM, in order;
//! 2. from then on, every frame `enforcer_record` sees delivered to it with a color below its
//!    epoch (the buffer keeps the copies: `hold::record`).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use enforcer_common::receiver_queue;

use super::{
    datapath::AgentDatapath,
    recording::RecordingVm,
    service::{Agent, AgentError},
};
use crate::{
    datapath::{
        DatapathError,
        epochs::{self, EpochError},
    },
    hold::{
        Notice, RecordedFrame, Recording, Replayed, put_back, rcu_barrier, replay_into,
        tap::TapQueue,
    },
    model::MacAddr,
};

impl<D: AgentDatapath> Agent<D> {
    /// The counter slot and port of a VM registered on this host; `None` for a VM on another
    /// host (its own host records it).
    fn record_target(&self, mac: MacAddr) -> Result<Option<(u32, u32)>, AgentError> {
        let vm = self
            .datapath()
            .vm(&mac.key())?
            .ok_or(EpochError::UnknownVm(mac))?;
        Ok((!vm.is_remote()).then_some((vm.slot, vm.ifindex)))
    }

    /// Starts recording the channel state of these VMs (those of this host): their buffer
    /// recordings are armed, `enforcer_record` is attached to their ports, and their taps'
    /// queues are opened for their cuts. Nothing is left attached when it fails.
    pub fn record_begin(&self, macs: &[MacAddr]) -> Result<(), AgentError> {
        let buffer = self.buffer_handle()?;
        // Begun again before any cut (a coordinator's retry): what the earlier begin left for
        // these VMs goes first (its program detached, its copies of their queues closed), and
        // this begin starts afresh. Before a cut nothing was recorded yet (no member had
        // advanced). A recording whose cut has begun (shut, or cut) is refused instead, unless
        // it is older than any snapshot runs (its coordinator died without ending it).
        let stale: Vec<RecordingVm> = {
            let mut recording = self.recording.lock().expect("recording lock");
            if let Some(mac) = macs.iter().find(|mac| {
                recording.get(*mac).is_some_and(|r| {
                    (r.shut || r.cut) && r.begun.elapsed() < RECORDING_ABANDONED_AFTER
                })
            }) {
                return Err(AgentError::RecordingUnderWay { mac: *mac });
            }
            macs.iter()
                .filter_map(|mac| recording.remove(mac))
                .collect()
        };
        if !stale.is_empty() {
            tracing::warn!(vms = stale.len(), "recording begun again: starting afresh");
        }
        drop(stale);
        let mut targets = Vec::new();
        for mac in macs {
            if let Some((slot, ifindex)) = self.record_target(*mac)? {
                targets.push((*mac, slot, ifindex));
            }
        }
        let queues: Vec<u32> = targets.iter().map(|(_, s, _)| receiver_queue(*s)).collect();
        // Armed first: a copy that comes for no recording is dropped.
        if !buffer.record_arm(queues.clone()) {
            return Err(AgentError::BufferSilent);
        }
        let mut vms = Vec::new();
        for (mac, slot, ifindex) in &targets {
            // A cut that died half-way may have left it set (it is pinned).
            self.datapath().set_record_skip(*slot, false)?;
            let attached = self.datapath().attach_record(*ifindex);
            let link = match attached {
                Ok(link) => link,
                Err(e) => {
                    // The links made so far are dropped (detached), the recordings taken back.
                    drop(vms);
                    let _ = buffer.record_take(queues, Duration::from_secs(10));
                    return Err(e.into());
                }
            };
            let port = self.datapath().port_name(*ifindex).unwrap_or_default();
            let tap = TapQueue::of(&port)
                .map(Arc::new)
                .map_err(|e| format!("opening {port}'s queue: {e}"));
            vms.push((
                *mac,
                RecordingVm {
                    _link: link,
                    slot: *slot,
                    ifindex: *ifindex,
                    tap,
                    at_cut: Vec::new(),
                    problem: None,
                    shut: false,
                    cut: false,
                    begun: Instant::now(),
                    qemu_may_keep: 0,
                },
            ));
        }
        self.recording.lock().expect("recording lock").extend(vms);
        Ok(())
    }

    /// Shuts a VM whose channel state is being recorded just before its cut (an instant cut:
    /// before the group's gate opens), so that nothing reaches its tap from now until its cut:
    /// its map entry is flagged draining (every frame to it is held for order, in its buffer
    /// queue, which stays frozen until its cut). Then waits, up to [`SHUT_WAIT`], for QEMU to
    /// read what was already in the tap while the VM still runs.
    ///
    /// Why: once a VM stops, QEMU still reads one frame from its tap into a queue of its own
    /// (it reads before asking whether the device can take it; QEMU's `net/tap.c`), which the
    /// snapshot does not save and a restored VM never gets. With nothing in the tap at the
    /// stop, there is none. A tap that did not empty in time is counted: the recording may
    /// miss one frame (`lost_at_most`). Returns whether the tap was empty; nothing to do for
    /// a VM not being recorded.
    pub fn shut_before_cut(&self, mac: MacAddr) -> Result<bool, AgentError> {
        let (tap, key) = {
            let recording = self.recording.lock().expect("recording lock");
            let Some(rec) = recording.get(&mac) else {
                return Ok(true);
            };
            (rec.tap.clone().ok(), mac.key())
        };
        self.tell_buffer(Notice::Freeze { mac: key });
        // Once the buffer has the freeze (the report comes after it), no drain still under
        // way from an earlier advance can end and clear the flag set next.
        let flagged = match self.hold_report() {
            Some(_) => epochs::flag_vm_draining(&mut *self.datapath(), mac).map_err(Into::into),
            None => Err(AgentError::BufferSilent),
        };
        if let Err(e) = flagged {
            self.tell_buffer(Notice::Thaw { mac: key });
            return Err(e);
        }
        // From here its end (its cut, the recording's end, an epoch moved by an abort, or the
        // buffer's bound on a freeze) thaws it.
        if let Some(rec) = self.recording.lock().expect("recording lock").get_mut(&mac) {
            rec.shut = true;
        }
        // Every program run that read the entry before the flag has ended: what it delivered
        // is in the tap's queue now, and nothing more comes.
        rcu_barrier();
        let deadline = Instant::now() + SHUT_WAIT;
        let empty = loop {
            match &tap {
                Some(tap) if tap.has_waiting() => {}
                _ => break true,
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if !empty {
            tracing::warn!(%mac, "its tap still had frames when it was shut: QEMU may keep one");
            if let Some(rec) = self.recording.lock().expect("recording lock").get_mut(&mac) {
                // One frame per queue: QEMU reads each queue of the tap on its own.
                rec.qemu_may_keep = tap.as_ref().map_or(1, |t| t.queues() as u64);
            }
        }
        Ok(empty)
    }

    /// A VM shut before its cut whose epoch moved some other way (an abort across hosts moves
    /// its members forward) is shut no more: its queue thaws and drains.
    pub(crate) fn end_shut(&self, mac: MacAddr) {
        let mut recording = self.recording.lock().expect("recording lock");
        if let Some(rec) = recording.get_mut(&mac)
            && std::mem::take(&mut rec.shut)
        {
            self.tell_buffer(Notice::Thaw { mac: mac.key() });
        }
    }

    /// A VM's cut, while it is stopped: its epoch advances, and if its channel state is being
    /// recorded, what waits in its tap's queue is taken into the recording and put back, ahead
    /// of anything newer (see the module's header).
    ///
    /// `target`: the epoch to move to, as the stop of a snapshot across hosts names it (only
    /// raised: an abort may have moved it there already); `None`: the next one.
    pub fn advance_at_cut(
        &self,
        mac: MacAddr,
        target: Option<u32>,
    ) -> Result<crate::datapath::epochs::VmRecord, AgentError> {
        self.cut(mac, target, false)
    }

    /// [`Agent::advance_at_cut`] for a VM a snapshot stopped and runs again afterwards: from
    /// its advance until [`Agent::runs_again`], every frame its buffer queue holds for it (the
    /// Type-3 frames this advance releases, and the newer ones held behind them for order)
    /// waits in the buffer rather than in its tap, whose queue a stopped VM does not empty: a
    /// tap queue overflows at its length, and what the buffer re-injected into it would be
    /// lost yet counted re-injected (case R4 of the datapath review). Bounded by the buffer
    /// (`hold::core::FREEZE_MAX`, 30 s, and `FROZEN_SHARE`, a quarter of its memory bound):
    /// past either they go to its tap as before.
    pub fn advance_stopped(
        &self,
        mac: MacAddr,
        target: Option<u32>,
    ) -> Result<crate::datapath::epochs::VmRecord, AgentError> {
        self.cut(mac, target, true)
    }

    /// A VM advanced by [`Agent::advance_stopped`] runs again: what waited in the buffer for
    /// it goes on, in order. Nothing to do for any other VM.
    pub fn runs_again(&self, mac: MacAddr) {
        if self.stopped.lock().expect("stopped lock").remove(&mac) {
            self.tell_buffer(Notice::Thaw { mac: mac.key() });
        }
    }

    fn cut(
        &self,
        mac: MacAddr,
        target: Option<u32>,
        stopped: bool,
    ) -> Result<crate::datapath::epochs::VmRecord, AgentError> {
        if stopped {
            // Before the advance, so that nothing it releases reaches the stopped VM.
            self.stopped.lock().expect("stopped lock").insert(mac);
            self.tell_buffer(Notice::Freeze { mac: mac.key() });
        }
        let cut = self.cut_epoch(mac, target, stopped);
        // Kept back only when its epoch moved (its snapshot then says when it runs again): a
        // cut that failed, or that an abort had already made (its snapshot is over), has
        // nobody to end it.
        if stopped && !matches!(cut, Ok((_, true))) {
            self.runs_again(mac);
        }
        cut.map(|(vm, _)| vm)
    }

    /// The advance of [`Agent::cut`], with the tap's queue taken for a recorded VM; says
    /// whether the epoch moved.
    fn cut_epoch(
        &self,
        mac: MacAddr,
        target: Option<u32>,
        stopped: bool,
    ) -> Result<(crate::datapath::epochs::VmRecord, bool), AgentError> {
        let mut recording = self.recording.lock().expect("recording lock");
        let Some(rec) = recording.get_mut(&mac) else {
            drop(recording);
            return self
                .change_epoch_reporting(mac, target, target.is_some())
                .map(|c| (c.vm, c.changed));
        };
        let key = mac.key();
        rec.cut = true;
        // Stopped without being shut first (pre-copy: QEMU stops it by itself), QEMU may have
        // read one frame after the stop that no snapshot saves.
        if !rec.shut
            && let Ok(tap) = &rec.tap
        {
            rec.qemu_may_keep = rec.qemu_may_keep.max(tap.queues() as u64);
        }
        self.datapath().set_record_skip(rec.slot, true)?;
        self.tell_buffer(Notice::Freeze { mac: key });
        let advanced = self
            .change_epoch_reporting(mac, target, target.is_some())
            .map(|c| (c.vm, c.changed));
        if advanced.is_ok() {
            // Every program run that began before the advance has ended: what it delivered
            // is in the queue now; what came later waits in the frozen buffer queue.
            rcu_barrier();
            if let Err(why) = take_queue(rec) {
                tracing::warn!(%mac, %why, "channel state at the cut");
                rec.problem.get_or_insert(why);
            }
        }
        let cleared = self.datapath().set_record_skip(rec.slot, false);
        // A stopped VM's queue stays frozen until it runs ([`Agent::cut`] says when not).
        if !stopped {
            self.tell_buffer(Notice::Thaw { mac: key });
        }
        rec.shut = false;
        let vm = advanced?;
        cleared?;
        Ok(vm)
    }

    /// Stops recording for these VMs (those of this host) and hands over what was recorded for
    /// each: `enforcer_record` is detached first, then the buffer answers once every copy
    /// handed over before has come (or is known lost). `timeout`: how long the buffer may take.
    pub fn record_end(
        &self,
        macs: &[MacAddr],
        timeout: Duration,
    ) -> Result<BTreeMap<MacAddr, Recording>, AgentError> {
        // Detached first (the links dropped here), keeping what was taken at the cuts.
        let mut at_cut: BTreeMap<MacAddr, (Vec<RecordedFrame>, Option<String>, u64)> =
            BTreeMap::new();
        {
            let mut recording = self.recording.lock().expect("recording lock");
            for mac in macs {
                if let Some(RecordingVm {
                    at_cut: frames,
                    problem,
                    shut,
                    qemu_may_keep,
                    ..
                }) = recording.remove(mac)
                {
                    if shut {
                        // Shut, and its cut never came (the snapshot failed before it): its
                        // queue goes, and the drain clears its flag.
                        self.tell_buffer(Notice::Thaw { mac: mac.key() });
                    }
                    at_cut.insert(*mac, (frames, problem, qemu_may_keep));
                }
            }
        }
        let buffer = self.buffer_handle()?;
        // Every member still registered here: one gone meanwhile (its recording is dropped
        // when a later snapshot arms its slot again) does not keep the others armed.
        let mut queues = BTreeMap::new();
        for mac in macs {
            if let Ok(Some((slot, _))) = self.record_target(*mac) {
                queues.insert(receiver_queue(slot), *mac);
            }
        }
        let taken = buffer
            .record_take(queues.keys().copied().collect(), timeout)
            .ok_or(AgentError::BufferSilent)?;
        Ok(taken
            .into_iter()
            .filter_map(|(queue, mut recording)| {
                let mac = *queues.get(&queue)?;
                if let Some((frames, problem, qemu_may_keep)) = at_cut.remove(&mac) {
                    recording.bytes += frames.iter().map(|f| f.data.len() as u64).sum::<u64>();
                    let later = std::mem::replace(&mut recording.frames, frames);
                    recording.frames.extend(later);
                    recording.problem = problem;
                    recording.lost_at_most += qemu_may_keep;
                }
                Some((mac, recording))
            })
            .collect())
    }

    /// Replays recorded frames into VM `mac` behind `port` (restored there and not yet
    /// running): out of the port toward the VM, in order, into the queue it reads once it
    /// runs. The port's queue is made long enough for them first. Errors: `mac` is not
    /// registered on `port` ([`AgentError::NotOnPort`]), the port fails.
    pub fn replay(
        &self,
        mac: MacAddr,
        port: &str,
        frames: &[RecordedFrame],
    ) -> Result<Replayed, AgentError> {
        let ifindex = self.datapath().ifindex(port)?;
        if self.vm(mac)?.ifindex != ifindex {
            return Err(AgentError::NotOnPort {
                mac,
                port: port.to_owned(),
            });
        }
        let io = |e: std::io::Error| {
            AgentError::Datapath(DatapathError::Link {
                port: port.to_owned(),
                detail: format!("replaying channel state: {e}"),
            })
        };
        ensure_queue_len(port, frames.len() as u32 + 64).map_err(io)?;
        let dropped_before = tx_dropped(port);
        let result = replay_into(ifindex, frames);
        // Counted whatever the outcome: frames a failed replay sent reached the port too.
        let replayed = Replayed {
            sent: match &result {
                Ok(sent) | Err((sent, _)) => *sent as u64,
            },
            dropped: tx_dropped(port).saturating_sub(dropped_before),
        };
        self.replayed.add(replayed);
        match result {
            Ok(_) => Ok(replayed),
            Err((sent, e)) => Err(io(std::io::Error::new(
                e.kind(),
                format!("{sent} of {} frames sent, then: {e}", frames.len()),
            ))),
        }
    }

    /// Channel state replayed here so far: frames sent into restored VMs' ports, and frames
    /// those ports dropped meanwhile.
    pub fn replayed_totals(&self) -> Replayed {
        self.replayed.totals()
    }
}

/// How long after its begin a recording whose cut has begun is taken for abandoned (its
/// coordinator died before ending it), so that a new begin may replace it: longer than any
/// snapshot's steps may take.
pub const RECORDING_ABANDONED_AFTER: Duration = Duration::from_secs(600);

/// How long a VM shut before its cut may take to read what its tap already had
/// ([`Agent::shut_before_cut`]): QEMU reads it at once while the VM runs and the guest has
/// room; a guest that has none keeps its frames waiting.
pub const SHUT_WAIT: Duration = Duration::from_millis(200);

/// Takes what waits in a recording VM's tap queue into its recording, and puts it back.
fn take_queue(rec: &mut RecordingVm) -> Result<(), String> {
    let tap = rec.tap.as_ref().map_err(Clone::clone)?;
    if tap.is_empty() {
        return Ok(());
    }
    // What was read goes back whatever else failed: the running VM must not lose it.
    let (frames, read) = tap.take();
    let back = if frames.is_empty() {
        Ok(0)
    } else {
        put_back(rec.ifindex, &frames)
    };
    let n = frames.len();
    rec.at_cut.extend(frames);
    match (read, back) {
        (None, Ok(_)) => Ok(()),
        (Some(e), _) => Err(format!("reading the tap's queue: {e} ({n} frames read)")),
        (None, Err((sent, e))) => Err(format!(
            "putting {n} frames back into the tap's queue: {sent} went, then {e}"
        )),
    }
}

/// The port's transmit-side drops so far (`/sys/class/net/<port>/statistics/tx_dropped`).
fn tx_dropped(port: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{port}/statistics/tx_dropped"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes `port`'s transmit queue (for a tap: its ring of frames toward the VM) at least `len`
/// frames long (`SIOCSIFTXQLEN`).
fn ensure_queue_len(port: &str, len: u32) -> std::io::Result<()> {
    let now: u32 = std::fs::read_to_string(format!("/sys/class/net/{port}/tx_queue_len"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable tx_queue_len"))?;
    if now >= len {
        return Ok(());
    }
    // SAFETY: a plain datagram socket for the ioctl, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid starting value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(port.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_metric = len as libc::c_int;
    // SAFETY: SIOCSIFTXQLEN reads the name and the length from `req`, which outlives the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCSIFTXQLEN,
            &req as *const libc::ifreq,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
