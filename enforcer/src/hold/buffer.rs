//! The handle to the running buffer: starting it (hold device, AF_XDP socket, accounting for
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
    report::HoldReport,
    thread::Thread,
    xsk::XskSocket,
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
}

/// Handle to the running buffer.
pub struct Buffer {
    commands: mpsc::Sender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    device: HoldDevice,
    link_pin: std::path::PathBuf,
}

impl Buffer {
    /// Creates the hold device, binds the AF_XDP socket, accounts for what a previous daemon
    /// left, and starts the thread. From then on the datapath redirects held frames here.
    /// `learned`: the ring of colors learned from other hosts' frames, which this thread then
    /// consumes (see `learn.rs`).
    pub fn start(
        dp: Arc<Mutex<Datapath>>,
        opts: HoldOptions,
        learned: Option<LearnedRing>,
    ) -> Result<Self, HoldError> {
        let device = HoldDevice::create(&opts.device)?;
        let mut guard = crate::sync::lock(&dp);
        let link_pin = guard.attach_hold_program(&device.socket_side)?;
        let socket = XskSocket::bind(&device.socket_side)?;
        guard.set_hold_socket(socket.rx.as_raw_fd())?;
        let state = Thread::new(&mut guard, dp.clone(), opts.clone(), socket, learned)?;
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
            link_pin,
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

    /// Stops the thread (see [`Command::Stop`]). Graceful: removes the hold device and its
    /// link. Otherwise both stay, as after a crash: frames still redirected to the device are
    /// counted by its program (`no_socket`) until the next daemon replaces it.
    pub fn stop(mut self, graceful: bool) -> Option<HoldReport> {
        let (tx, rx) = mpsc::channel();
        let _ = self.commands.send(Command::Stop { graceful, done: tx });
        let report = rx.recv_timeout(Duration::from_secs(10)).ok();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if graceful {
            let _ = std::fs::remove_file(&self.link_pin);
            drop(self.device);
        } else {
            std::mem::forget(self.device);
        }
        report.filter(|_| graceful)
    }
}
