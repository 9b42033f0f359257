//! `enforcer coordinator`: group snapshots across several hosts, over their agents.

use std::{path::PathBuf, sync::Arc};

use tracing::info;

use crate::api::serve::{self, ServeError};
use crate::{
    api::{
        Endpoint,
        tls::{ClientTls, TlsFiles},
    },
    multihost::{CoordinatorState, HostSpec, Hosts, api},
    snapshot::{Coordinator, CoordinatorError, EpochControl, Hypervisor, Timeouts},
};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub hosts: Vec<HostSpec>,
    /// Where the API is served: a unix socket (by default
    /// [`crate::api::DEFAULT_COORDINATOR_SOCKET`]), or TCP, which needs `token`.
    pub listen: Endpoint,
    /// For this API and for the agents'.
    pub token: Option<String>,
    /// The group whose members may use the API's unix socket besides root and the
    /// coordinator's own user.
    pub api_group: Option<String>,
    /// TLS: for this API when served over TCP (clients' certificates of the CA required), and
    /// towards the agents (`https://` ones: their certificates must be of the CA; this one is
    /// presented to them).
    pub tls: Option<TlsFiles>,
    /// Manifests, journals and groups (the images stay on the hosts that run the VMs).
    pub store: PathBuf,
    pub timeouts: Timeouts,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorRoleError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    #[error(
        "host {0}'s agent is https://, and no TLS is configured to check it or to present to it \
         (--tls-cert, --tls-key, --tls-ca)"
    )]
    AgentNeedsTls(String),
    #[error(
        "host {0}'s agent is http://, and TLS is configured: name it https:// (the token would \
         cross the network in clear)"
    )]
    AgentInClear(String),
}

pub struct RunningCoordinator {
    pub addr: Endpoint,
    pub state: Arc<CoordinatorState>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningCoordinator {
    pub async fn stop(self) -> Result<(), CoordinatorRoleError> {
        let _ = self.shutdown.send(true);
        Ok(self.task.await.unwrap_or(Ok(()))?)
    }

    pub async fn wait_for_signal(self) -> Result<(), CoordinatorRoleError> {
        serve::signal("").await?;
        self.stop().await
    }
}

/// Starts the coordinator on the current tokio runtime. Opening aborts a snapshot a previous
/// coordinator left unfinished (on every agent).
pub async fn start_coordinator(
    config: CoordinatorConfig,
) -> Result<RunningCoordinator, CoordinatorRoleError> {
    let (listener, addr) = serve::listen(
        &config.listen,
        config.token.as_deref(),
        config.api_group.as_deref(),
        config.tls.as_ref(),
    )
    .await?;
    if config.tls.is_none()
        && let Some(h) = config
            .hosts
            .iter()
            .find(|h| h.agent.starts_with("https://"))
    {
        return Err(CoordinatorRoleError::AgentNeedsTls(h.name.clone()));
    }
    // With TLS configured, nothing goes to an agent in clear (the token included).
    if config.tls.is_some()
        && let Some(h) = config.hosts.iter().find(|h| h.agent.starts_with("http://"))
    {
        return Err(CoordinatorRoleError::AgentInClear(h.name.clone()));
    }
    let client_tls = config
        .tls
        .as_ref()
        .map(ClientTls::from_files)
        .transpose()
        .map_err(ServeError::from)?;
    let hosts = Hosts::with_tls(
        config.hosts.clone(),
        config.token.clone(),
        client_tls.as_ref(),
        tokio::runtime::Handle::current(),
    );
    let (for_open, store, timeouts) = (hosts.clone(), config.store.clone(), config.timeouts);
    let snapshots = tokio::task::spawn_blocking(move || {
        Coordinator::open(
            Arc::new(for_open.clone()) as Arc<dyn Hypervisor>,
            Arc::new(for_open) as Arc<dyn EpochControl>,
            &store,
            timeouts,
        )
    })
    .await
    .expect("coordinator open task")?;
    let state = Arc::new(CoordinatorState {
        snapshots: Arc::new(snapshots),
        hosts,
    });
    let app = api::router(state.clone(), config.token);
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve::serve(listener, app, stopped));
    info!(%addr, hosts = config.hosts.len(), "coordinator listening");
    Ok(RunningCoordinator {
        addr,
        state,
        shutdown,
        task,
    })
}
