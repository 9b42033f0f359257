//! Thread scheduling for the few threads on the snapshot's critical path (the coordinator's
//! per-VM threads from a VM's stop to its advance, the libvirt event thread that reports the
//! stop) and the buffer thread, whose kernel rings hold only ~20 ms of frames. May call nothing
//! else of the product.

use tracing::warn;

/// Gives the calling thread a higher CFS weight (nice -15), so it runs promptly on a loaded
/// host (e.g. next to busy QEMU vCPUs). Root may; otherwise a warning and no change.
pub fn raise_this_thread(what: &str) {
    // SAFETY: setpriority on this thread (tid) with plain integers.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -15) };
    if r != 0 {
        warn!(err = %std::io::Error::last_os_error(), "raising the priority of {what}");
    }
}

/// Runs the calling thread under the real-time FIFO policy (lowest priority), so it preempts
/// ordinary threads the moment it wakes. Only for threads that block between short bursts of
/// work (the coordinator's per-VM threads, the libvirt event thread), never for pollers. Falls
/// back to [`raise_this_thread`] when not allowed.
pub fn make_this_thread_realtime(what: &str) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter block.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r != 0 {
        raise_this_thread(what);
    }
}

/// Back to ordinary scheduling (nice -15) after a real-time burst, before longer work.
pub fn leave_realtime(what: &str) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter block.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    raise_this_thread(what);
}

/// `SCHED_FIFO` for a scope: [`make_this_thread_realtime`] now, [`leave_realtime`] when
/// dropped, also on an early return or a panic (a pooled thread must not stay real-time).
/// Not `Clone`: a copy would leave real-time twice.
pub struct Realtime(&'static str);

impl Realtime {
    pub fn enter(what: &'static str) -> Self {
        make_this_thread_realtime(what);
        Self(what)
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        leave_realtime(self.0);
    }
}
