//! The handle to the running buffer: starting it (hold device, its socket, accounting for
//! what a previous daemon left, the thread), telling it epoch notices, asking for reports, and
//! stopping it gracefully or as a crash would.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use tracing::info;

use super::{
    config::{HoldError, HoldOptions},
    device::HoldDevice,
    learn::LearnedRing,
    protocol::{Command, Notice},
    record::Recording,
    report::HoldReport,
    ring::PacketRing,
    thread::Thread,
};
use crate::datapath::Datapath;

/// Asks the buffer thread for a [`HoldReport`], without holding on to the buffer (or a lock
/// around it) while it answers.
#[derive(Clone)]
pub struct Reporter(mpsc::Sender<Command>);

impl Reporter {
    /// The report, or `None` when the thread does not answer within 5 s.
    pub fn report(&self) -> Option<HoldReport> {
        let (tx, rx) = mpsc::channel();
        self.0.send(Command::Report(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(5)).ok()
    }

    /// Arms recordings of channel state for these hold queues (see `hold::record`); false when
    /// the thread is gone.
    pub fn record_arm(&self, queues: Vec<u32>) -> bool {
        self.0.send(Command::RecordArm { queues }).is_ok()
    }

    /// What was recorded for these hold queues, once every frame handed over for them has come
    /// (call it after `enforcer_record` was detached); `None` when the thread is gone or does
    /// not answer within `timeout`.
    pub fn record_take(
        &self,
        queues: Vec<u32>,
        timeout: Duration,
    ) -> Option<Vec<(u32, Recording)>> {
        let (reply, rx) = mpsc::channel();
        self.0.send(Command::RecordTake { queues, reply }).ok()?;
        rx.recv_timeout(timeout).ok()
    }
}

/// Handle to the running buffer.
pub struct Buffer {
    commands: mpsc::Sender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    device: HoldDevice,
    /// `enforcer_inject` on the hold device, for as long as this buffer runs.
    _inject: aya::programs::links::FdLink,
}

impl Buffer {
    /// Creates the hold device, binds its socket, accounts for what a previous daemon left,
    /// and starts the thread. From then on the datapath redirects held frames here.
    /// `learned`: the ring of colors learned from other hosts' frames, which this thread then
    /// consumes (see `learn.rs`).
    pub fn start(
        dp: Arc<Mutex<Datapath>>,
        opts: HoldOptions,
        learned: Option<LearnedRing>,
    ) -> Result<Self, HoldError> {
        let mut guard = crate::sync::lock(&dp);
        // Nothing is held while the buffer starts (a daemon that died left the hold device
        // set): Type-3 is dropped and counted, nothing waits for order. Once program runs that
        // saw the old device have ended, what was handed over is all the old buffer's.
        guard.set_hold_ifindex(0)?;
        super::thread::rcu_barrier();
        let device = HoldDevice::create(&opts.device)?;
        let inject = guard.attach_inject(&device.name)?;
        let socket_ifindex = crate::datapath::ifindex_of(&device.socket_side)?;
        let ring = PacketRing::bind(&device.socket_side, socket_ifindex)?;
        let state = Thread::new(
            &mut guard,
            dp.clone(),
            opts.clone(),
            ring,
            socket_ifindex,
            learned,
        )?;
        // Only now, with a socket to take them, may the datapath hold frames.
        guard.set_hold_ifindex(device.ifindex)?;
        drop(guard);
        let (commands, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("enforcer-hold".into())
            .spawn(move || state.run(rx))
            .map_err(HoldError::Thread)?;
        info!(
            device = opts.device,
            max_bytes = opts.max_bytes,
            "buffer daemon started"
        );
        Ok(Self {
            commands,
            thread: Some(thread),
            device,
            _inject: inject,
        })
    }

    /// Hands the thread an epoch notice (see [`super::advance`]).
    pub fn tell(&self, notice: Notice) {
        // The thread only stops on `Stop`; a send after that has nothing left to do.
        let _ = self.commands.send(Command::Notice(notice));
    }

    /// A way to ask for reports without holding on to the buffer (or a lock around it) while
    /// waiting for the answer.
    pub fn reporter(&self) -> Reporter {
        Reporter(self.commands.clone())
    }

    /// Stops the thread (see [`Command::Stop`]). Graceful: removes the hold device. Otherwise
    /// it stays, as after a crash: frames still redirected to it are lost, and the next daemon
    /// counts them (`lost_restart`) from the programs' tickets.
    pub fn stop(mut self, graceful: bool) -> Option<HoldReport> {
        let (tx, rx) = mpsc::channel();
        let _ = self.commands.send(Command::Stop { graceful, done: tx });
        let report = rx.recv_timeout(Duration::from_secs(10)).ok();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if graceful {
            drop(self.device);
        } else {
            std::mem::forget(self.device);
        }
        report.filter(|_| graceful)
    }
}
