//! `enforcer run`: loads (or adopts) the datapath, attaches to every VM port and follows ports
//! as they come and go, starts the buffer and (with libvirt) the snapshot service, and serves
//! the agent's API until SIGINT/SIGTERM. Stopping the daemon leaves the programs attached and
//! the maps pinned: enforcement goes on without it (invariant 6 in docs/design.md).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use enforcer_common::Type3Mode;
use tracing::{info, warn};

use super::lock::{LockError, PinRootLock};
use crate::{
    agent::{self, Agent, SnapshotOptions, SnapshotsError},
    api::{
        self,
        serve::{self, ServeError},
    },
    datapath::{
        AttachMode, Datapath, DatapathError,
        ports::{PortError, PortEvent, PortSource, PortWatcher},
    },
    hold::{Buffer, HoldError, HoldOptions, HoldReport, learn::LearnedRing},
};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub ports: PortSource,
    pub pin_root: PathBuf,
    pub attach: AttachMode,
    /// Where the API is served: a unix socket ([`api::DEFAULT_SOCKET`] by default), or TCP,
    /// which needs `token`.
    pub listen: api::Endpoint,
    pub token: Option<String>,
    /// The group whose members may use the API's unix socket besides root and the daemon's
    /// own user (`None`: only those two).
    pub api_group: Option<String>,
    /// TLS for an API served over TCP: this certificate presented, clients' certificates
    /// of this CA required (see [`api::tls`]).
    pub tls: Option<api::tls::TlsFiles>,
    /// Set the Type-3 mode at start; `None` keeps what the pinned config says.
    pub type3_mode: Option<Type3Mode>,
    /// Run the buffer daemon (hold Type-3 frames and re-inject them); `None`: no buffer, so
    /// `buffer` mode drops Type-3 frames (counted as `type3_unbuffered`).
    pub hold: Option<HoldOptions>,
    /// Group snapshots over libvirt; `None`: the snapshot endpoints answer 503.
    pub snapshots: Option<SnapshotOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Ports(#[from] PortError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("snapshots: {0}")]
    Snapshots(#[from] SnapshotsError),
    #[error("buffer daemon: {0}")]
    Hold(#[from] HoldError),
    #[error(transparent)]
    Locked(#[from] LockError),
}

/// A started daemon: the API's address and a handle to stop it.
pub struct Running {
    /// Where the API listens (what [`api::client::Client::new`] takes, as `addr.to_string()`).
    pub addr: api::Endpoint,
    pub agent: Arc<Agent>,
    /// Held until the daemon is gone (see [`super::lock`]).
    _pin_root: PinRootLock,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops serving and following ports; the datapath stays attached and pinned. The buffer
    /// stops gracefully: held frames that cannot be delivered yet are dropped and counted.
    pub async fn stop(self) -> Result<Option<HoldReport>, DaemonError> {
        self.stop_with(true).await
    }

    /// Stops as a crashed daemon would: the buffer vanishes with what it holds (the next daemon
    /// counts it as `lost_restart`). For testing invariant 4 across restarts.
    pub async fn crash(self) -> Result<(), DaemonError> {
        self.stop_with(false).await.map(|_| ())
    }

    async fn stop_with(self, graceful: bool) -> Result<Option<HoldReport>, DaemonError> {
        let _ = self.shutdown.send(true);
        let result = self.task.await.unwrap_or(Ok(()));
        let report = match self.agent.take_buffer() {
            Some(buffer) => tokio::task::spawn_blocking(move || buffer.stop(graceful))
                .await
                .unwrap_or(None),
            None => None,
        };
        result.map(|()| report).map_err(DaemonError::from)
    }

    /// Waits until a signal arrives, then stops.
    pub async fn wait_for_signal(self) -> Result<(), DaemonError> {
        serve::signal(" (datapath stays attached)").await?;
        self.stop().await.map(|_| ())
    }
}

/// Starts the daemon on the current tokio runtime.
pub async fn start(config: DaemonConfig) -> Result<Running, DaemonError> {
    // Before anything is touched: the pins may belong to a daemon that runs.
    let pin_root = PinRootLock::acquire(&config.pin_root)?;
    let (listener, addr) = serve::listen(
        &config.listen,
        config.token.as_deref(),
        config.api_group.as_deref(),
        config.tls.as_ref(),
    )
    .await?;
    let mut datapath = Datapath::open(&config.pin_root, config.attach)?;
    if let Some(mode) = config.type3_mode {
        datapath.set_type3_mode(mode)?;
    }
    // Until a buffer socket is bound, nothing may be redirected to a hold device.
    datapath.set_hold_ifindex(0)?;
    if datapath.type3_mode()? == Type3Mode::Buffer && config.hold.is_none() {
        warn!(
            "Type-3 mode is `buffer` but the buffer daemon is off: Type-3 frames are dropped and counted as type3_unbuffered"
        );
    }

    let mut watcher = PortWatcher::new(config.ports.clone()).await?;
    for (_, name) in watcher.current().await? {
        datapath.attach(&name)?;
    }
    datapath.remove_stale_links();

    let learned_applied = Arc::new(AtomicU64::new(0));
    let learned = LearnedRing::new(datapath.take_learned_ring()?, learned_applied.clone());
    let datapath = Arc::new(Mutex::new(datapath));
    let (buffer, learned) = match config.hold.clone() {
        Some(opts) => {
            let dp = datapath.clone();
            let buffer =
                tokio::task::spawn_blocking(move || Buffer::start(dp, opts, Some(learned)))
                    .await
                    .expect("buffer start task")?;
            (Some(buffer), None)
        }
        None => (None, Some(learned)),
    };
    let agent = Arc::new(Agent::new(datapath, buffer, learned_applied));
    if let Some(ring) = learned {
        agent::learn::spawn_without_buffer(ring, Arc::downgrade(&agent));
    }
    if let Some(opts) = &config.snapshots {
        let opts_for_retry = opts.clone();
        let (for_open, opts) = (agent.clone(), opts.clone());
        // Opening may abort a snapshot a previous daemon left unfinished: blocking work.
        let service =
            tokio::task::spawn_blocking(move || agent::local_epochs::open(&opts, &for_open))
                .await
                .expect("snapshot service task");
        match service {
            Ok(c) => agent.set_snapshots(Arc::new(c)),
            // libvirtd not there yet (starting, restarting): the datapath, the buffer and the
            // API run now, snapshots once libvirt answers (case S13 of the security review).
            Err(agent::SnapshotsError::Libvirt(err)) => {
                warn!(%err, "snapshots wait for libvirt; retrying every 2 s");
                agent.set_snapshots_pending(Some(format!("{err}; retrying every 2 s")));
                agent::local_epochs::open_when_ready(opts_for_retry, Arc::downgrade(&agent));
            }
            Err(err) => {
                if let Some(buffer) = agent.take_buffer() {
                    buffer.stop(true);
                }
                return Err(DaemonError::Snapshots(err));
            }
        }
    }
    info!(%addr, "API listening");

    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let app = api::router(agent.clone(), config.token);
    let ports_agent = agent.clone();
    let mut stop_following = stopped.clone();
    let task = tokio::spawn(async move {
        let follow = async {
            while let Some(event) = watcher.next_event().await {
                apply_port_event(&ports_agent, event);
            }
            warn!("netlink link events ended; ports are no longer followed");
            std::future::pending::<()>().await;
        };
        tokio::select! {
            result = serve::serve(listener, app, stopped) => result,
            _ = follow => Ok(()),
            _ = stop_following.wait_for(|s| *s) => Ok(()),
        }
    });
    Ok(Running {
        addr,
        agent,
        _pin_root: pin_root,
        shutdown,
        task,
    })
}

/// A port appeared (attach) or went (detach).
fn apply_port_event(agent: &Agent, event: PortEvent) {
    let mut dp = agent.datapath();
    match event {
        PortEvent::Up { ifindex, name } if !dp.is_attached(ifindex) => {
            if let Err(err) = dp.attach(&name) {
                warn!(port = name, %err, "cannot attach to new port");
            }
        }
        PortEvent::Down { ifindex } if dp.is_attached(ifindex) => {
            if let Err(err) = dp.detach(ifindex) {
                warn!(ifindex, %err, "detaching");
            }
        }
        _ => {}
    }
}
