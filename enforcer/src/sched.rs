//! Thread scheduling for the few threads on the snapshot's critical path (the coordinator's
//! per-VM threads from a VM's stop to its advance, the libvirt event thread that reports the
//! stop, a stopped VM's QEMU while it is captured) and the buffer thread, whose kernel rings
//! hold only ~20 ms of frames. May call nothing else of the product.

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

/// Every thread of another process at a higher CFS weight for a scope: a VM's QEMU from its
/// stop to its resume at a snapshot, so the QEMU threads that capture it (the main loop, the
/// migration thread that saves the device state and arms write tracking) are not kept waiting
/// by the busy vCPUs of the VMs already running again. A weight, not a real-time policy:
/// nothing starves. On drop every thread goes back to its nice value (threads started
/// meanwhile to the main thread's). Needs root; otherwise nothing is boosted (`None`).
pub struct Boost {
    pid: libc::pid_t,
    saved: Vec<(libc::pid_t, libc::c_int)>,
}

const BOOST_NICE: libc::c_int = -20;

fn threads_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn nice_of(tid: libc::pid_t) -> Option<libc::c_int> {
    // getpriority may return -1 as a value: errno tells.
    // SAFETY: errno is thread-local; getpriority takes plain integers.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (*libc::__errno_location() == 0).then_some(nice)
    }
}

fn set_nice(tid: libc::pid_t, nice: libc::c_int) -> bool {
    // SAFETY: setpriority on one thread id with plain integers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0 }
}

impl Boost {
    pub fn process(pid: u32) -> Option<Self> {
        let pid = libc::pid_t::try_from(pid).ok()?;
        let saved: Vec<_> = threads_of(pid)
            .into_iter()
            .filter_map(|tid| Some((tid, nice_of(tid)?)))
            .collect();
        let boosted = saved
            .iter()
            .filter(|(tid, _)| set_nice(*tid, BOOST_NICE))
            .count();
        (boosted > 0).then_some(Self { pid, saved })
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        let main = self
            .saved
            .iter()
            .find(|(tid, _)| *tid == self.pid)
            .map_or(0, |(_, n)| *n);
        for tid in threads_of(self.pid) {
            let nice = self
                .saved
                .iter()
                .find(|(t, _)| *t == tid)
                .map_or(main, |(_, n)| *n);
            set_nice(tid, nice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's threads, boosted and put back (as root; unprivileged, no boost at all).
    #[test]
    fn a_boost_is_undone_on_drop() {
        let me = std::process::id();
        let tid = libc::pid_t::try_from(me).unwrap();
        let before = nice_of(tid).unwrap();
        let boost = Boost::process(me);
        if let Some(b) = &boost {
            assert_eq!(nice_of(tid), Some(BOOST_NICE));
            assert!(b.saved.iter().any(|(t, n)| *t == tid && *n == before));
        } else {
            // SAFETY: geteuid has no arguments and cannot fail.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root may boost");
        }
        drop(boost);
        assert_eq!(nice_of(tid), Some(before));
    }
}
