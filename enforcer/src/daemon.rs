//! `enforcer run`: loads (or adopts) the datapath, attaches to every VM port and follows ports
//! as they come and go, and serves the API until SIGINT/SIGTERM. Stopping the daemon leaves
//! the programs attached and the maps pinned: enforcement goes on without it (invariant 6).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64},
};

use enforcer_common::Type3Mode;
use tokio::{net::TcpListener, sync::Mutex};
use tracing::{info, warn};

use crate::{
    api::{self, AppState, Shared},
    datapath::{AttachMode, Datapath, DatapathError},
    hold::{Buffer, HoldError, HoldOptions, HoldReport},
    learn::LearnedRing,
    ports::{PortError, PortEvent, PortSource, PortWatcher},
    snapshots::SnapshotOptions,
};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub ports: PortSource,
    pub pin_root: PathBuf,
    pub attach: AttachMode,
    pub listen: SocketAddr,
    pub token: Option<String>,
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
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve the API on non-loopback {0} without a token (--token or ENFORCER_TOKEN)"
    )]
    TokenRequired(SocketAddr),
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
    #[error("snapshots: {0}")]
    Snapshots(#[from] crate::snapshots::SnapshotsError),
    #[error("buffer daemon: {0}")]
    Hold(#[from] HoldError),
}

/// A started daemon: the API's address and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Shared,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), DaemonError>>,
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
        let buffer = self.state.buffer.lock().expect("buffer lock").take();
        let report = match buffer {
            Some(buffer) => tokio::task::spawn_blocking(move || buffer.stop(graceful))
                .await
                .unwrap_or(None),
            None => None,
        };
        result.map(|()| report)
    }

    /// Waits until the daemon stops by itself (an error) or a signal arrives.
    pub async fn wait_for_signal(self) -> Result<(), DaemonError> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Serve)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping (datapath stays attached)"),
            _ = term.recv() => info!("SIGTERM: stopping (datapath stays attached)"),
        }
        self.stop().await.map(|_| ())
    }
}

/// Starts the daemon on the current tokio runtime.
pub async fn start(config: DaemonConfig) -> Result<Running, DaemonError> {
    if !api::is_local(&config.listen) && config.token.is_none() {
        return Err(DaemonError::TokenRequired(config.listen));
    }
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

    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
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
    let state: Shared = Arc::new(AppState {
        datapath,
        token: config.token,
        buffer: std::sync::Mutex::new(buffer),
        snapshots: std::sync::OnceLock::new(),
        learned_applied,
        begun: Default::default(),
    });
    if let Some(ring) = learned {
        crate::learn::spawn_without_buffer(
            ring,
            Arc::downgrade(&state),
            tokio::runtime::Handle::current(),
        );
    }
    if let Some(opts) = &config.snapshots {
        let (for_open, opts, rt) = (
            state.clone(),
            opts.clone(),
            tokio::runtime::Handle::current(),
        );
        // Opening may abort a snapshot a previous daemon left unfinished: blocking work.
        let service =
            tokio::task::spawn_blocking(move || crate::snapshots::open(&opts, &for_open, rt))
                .await
                .expect("snapshot service task");
        match service {
            Ok(c) => {
                let _ = state.snapshots.set(Arc::new(c));
            }
            Err(err) => {
                if let Some(buffer) = state.buffer.lock().expect("buffer lock").take() {
                    buffer.stop(true);
                }
                return Err(DaemonError::Snapshots(err));
            }
        }
    }
    info!(%addr, "API listening");

    let (shutdown, mut stopped) = tokio::sync::watch::channel(false);
    let app = api::router(state.clone());
    let ports_state = state.clone();
    let task = tokio::spawn(async move {
        let mut serve_stopped = stopped.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = serve_stopped.wait_for(|s| *s).await;
        });
        let follow = async {
            while let Some(event) = watcher.next_event().await {
                apply_port_event(&ports_state, event).await;
            }
            warn!("netlink link events ended; ports are no longer followed");
            std::future::pending::<()>().await;
        };
        tokio::select! {
            result = server => result.map_err(DaemonError::Serve),
            _ = follow => Ok(()),
            _ = stopped.wait_for(|s| *s) => Ok(()),
        }
    });
    Ok(Running {
        addr,
        state,
        shutdown,
        task,
    })
}

async fn apply_port_event(state: &Shared, event: PortEvent) {
    let mut dp = state.datapath.lock().await;
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

/// `enforcer coordinator`: group snapshots across several hosts, over their agents.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub hosts: Vec<crate::hosts::HostSpec>,
    pub listen: SocketAddr,
    /// For this API and for the agents'.
    pub token: Option<String>,
    /// Manifests, journals and groups (the images stay on the hosts that run the VMs).
    pub store: PathBuf,
    pub timeouts: crate::coordinator::Timeouts,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorRoleError {
    #[error(
        "refusing to serve the API on non-loopback {0} without a token (--token or ENFORCER_TOKEN)"
    )]
    TokenRequired(SocketAddr),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Coordinator(#[from] crate::coordinator::CoordinatorError),
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
}

pub struct RunningCoordinator {
    pub addr: SocketAddr,
    pub state: Arc<api::CoordinatorState>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), CoordinatorRoleError>>,
}

impl RunningCoordinator {
    pub async fn stop(self) -> Result<(), CoordinatorRoleError> {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap_or(Ok(()))
    }

    pub async fn wait_for_signal(self) -> Result<(), CoordinatorRoleError> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(CoordinatorRoleError::Serve)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
            _ = term.recv() => info!("SIGTERM: stopping"),
        }
        self.stop().await
    }
}

/// Starts the coordinator on the current tokio runtime. Opening aborts a snapshot a previous
/// coordinator left unfinished (on every agent).
pub async fn start_coordinator(
    config: CoordinatorConfig,
) -> Result<RunningCoordinator, CoordinatorRoleError> {
    use crate::coordinator::{Coordinator, EpochControl, Hypervisor};
    if !api::is_local(&config.listen) && config.token.is_none() {
        return Err(CoordinatorRoleError::TokenRequired(config.listen));
    }
    let hosts = crate::hosts::Hosts::new(
        config.hosts.clone(),
        config.token.clone(),
        tokio::runtime::Handle::current(),
    );
    let (for_open, store, timeouts) = (hosts.clone(), config.store.clone(), config.timeouts);
    let snapshots = tokio::task::spawn_blocking(move || {
        Coordinator::open(
            Box::new(for_open.clone()) as Box<dyn Hypervisor>,
            Box::new(for_open) as Box<dyn EpochControl>,
            &store,
            timeouts,
        )
    })
    .await
    .expect("coordinator open task")?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| CoordinatorRoleError::Listen {
                addr: config.listen,
                source,
            })?;
    let addr = listener.local_addr().map_err(CoordinatorRoleError::Serve)?;
    let state = Arc::new(api::CoordinatorState {
        snapshots: Arc::new(snapshots),
        hosts,
        token: config.token,
    });
    let app = api::coordinator_router(state.clone());
    let (shutdown, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .map_err(CoordinatorRoleError::Serve)
    });
    info!(%addr, hosts = config.hosts.len(), "coordinator listening");
    Ok(RunningCoordinator {
        addr,
        state,
        shutdown,
        task,
    })
}
