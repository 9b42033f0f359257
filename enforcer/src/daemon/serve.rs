//! What both daemon roles do the same way: refuse a non-loopback address without a token,
//! listen, serve a router until told to stop, and wait for SIGINT/SIGTERM.

use std::net::SocketAddr;

use axum::Router;
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

use crate::api::is_local;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to serve the API on non-loopback {0} without a token (--token or ENFORCER_TOKEN)"
    )]
    TokenRequired(SocketAddr),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the API: {0}")]
    Serve(std::io::Error),
}

/// Checks the address against the token, then binds it.
pub(crate) async fn listen(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<(TcpListener, SocketAddr), ServeError> {
    if !is_local(&addr) && token.is_none() {
        return Err(ServeError::TokenRequired(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let bound = listener.local_addr().map_err(ServeError::Serve)?;
    Ok((listener, bound))
}

/// Serves `app` until `stopped` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
        .map_err(ServeError::Serve)
}

/// Returns when SIGINT or SIGTERM arrives.
pub(crate) async fn signal(what: &str) -> Result<(), ServeError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Serve)?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping{what}"),
        _ = term.recv() => info!("SIGTERM: stopping{what}"),
    }
    Ok(())
}
