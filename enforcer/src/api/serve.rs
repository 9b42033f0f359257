//! Serving the API, for both daemon roles: listen where they are told ([`Endpoint`]) — a unix
//! socket that only root, the daemon's own user and one chosen group may use, or TCP only with
//! client certificates (mutual TLS, [`super::tls`]) or a token — serve a router within limits
//! (a header timeout, a connection cap) until told to stop, and wait for SIGINT/SIGTERM.

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::{TcpListener, UnixListener, UnixStream},
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use super::tls::{TlsFiles, server_config};
use crate::api::{ApiError, Endpoint, types::ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to serve the API over TCP ({0}) without authentication: any account that reaches \
         it could use it. Serve it on a unix socket (the default), or require client certificates \
         (--tls-cert, --tls-key, --tls-ca) or a token (--token-file or ENFORCER_TOKEN)"
    )]
    TokenRequired(SocketAddr),
    #[error("TLS is for an API served over TCP, not on the unix socket {0}")]
    TlsOnUnixSocket(PathBuf),
    #[error("the API's TLS: {0}")]
    Tls(#[from] super::tls::TlsError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("another daemon serves the API at {0} (stop it first)")]
    InUse(PathBuf),
    #[error("the API socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("no such group {0:?} for the API socket (--api-group)")]
    NoSuchGroup(String),
    #[error("serving the API: {0}")]
    Serve(io::Error),
}

/// Who may use a unix socket's API besides root and the daemon's own user: the members of
/// this group (owner of the socket, mode 0660).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Access {
    uid: u32,
    gid: Option<u32>,
}

/// A bound listener, ready for [`serve`].
pub(crate) enum Listener {
    /// With TLS, every client presents a certificate of the configured CA.
    Tcp {
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    },
    Unix {
        listener: UnixListener,
        path: PathBuf,
        access: Access,
    },
}

/// Binds `endpoint`: TCP only with a token or client certificates (`tls`); a unix socket made
/// afresh (a stale one left by a daemon that died is replaced; a live one is refused), owned by
/// root and `group`, mode 0660.
/// Returns the listener and where it listens (a TCP port 0 resolved).
pub(crate) async fn listen(
    endpoint: &Endpoint,
    token: Option<&str>,
    group: Option<&str>,
    tls: Option<&TlsFiles>,
) -> Result<(Listener, Endpoint), ServeError> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            if token.is_none() && tls.is_none() {
                return Err(ServeError::TokenRequired(*addr));
            }
            let tls = tls
                .map(|files| Ok::<_, ServeError>(TlsAcceptor::from(server_config(files)?)))
                .transpose()?;
            if tls.is_none() && !addr.ip().is_loopback() {
                warn!(
                    %addr,
                    "serving the API over plain HTTP beyond this host: the token crosses the network \
                     in clear (give --tls-cert, --tls-key and --tls-ca)"
                );
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: *addr,
                    source,
                })?;
            let bound = listener.local_addr().map_err(ServeError::Serve)?;
            Ok((Listener::Tcp { listener, tls }, Endpoint::Tcp(bound)))
        }
        Endpoint::Unix(path) => {
            if tls.is_some() {
                return Err(ServeError::TlsOnUnixSocket(path.clone()));
            }
            let gid = group
                .map(|name| {
                    nix::unistd::Group::from_name(name)
                        .ok()
                        .flatten()
                        .map(|g| g.gid.as_raw())
                        .ok_or_else(|| ServeError::NoSuchGroup(name.to_owned()))
                })
                .transpose()?;
            let listener = bind_socket(path, gid).await?;
            let access = Access {
                uid: nix::unistd::geteuid().as_raw(),
                gid,
            };
            Ok((
                Listener::Unix {
                    listener,
                    path: path.clone(),
                    access,
                },
                endpoint.clone(),
            ))
        }
    }
}

async fn bind_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::net::UnixStream::connect(path).await {
                Ok(_) => return Err(ServeError::InUse(path.to_owned())),
                // Nobody listens: a daemon that died left it (replaced below).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    return Err(err(io::Error::new(
                        e.kind(),
                        format!("cannot tell whether another daemon serves it ({e})"),
                    )));
                }
            }
        }
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        Err(_) => {}
    }
    // Made, owned and given its mode in a directory of this process's own (0700), then moved
    // into place: nobody can connect to it or swap it before it is ready, and no process-wide
    // umask is touched (other threads create files meanwhile).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let private = dir.join(format!(
        ".enf{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let staged = private.join("s");
    let made = (|| {
        let listener = UnixListener::bind(&staged)?;
        if let Some(gid) = gid {
            nix::unistd::chown(&staged, None, Some(nix::unistd::Gid::from_raw(gid)))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        std::fs::rename(&staged, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    made.map_err(err)
}

/// The credentials of a unix socket's peer (`SO_PEERCRED`) and its supplementary groups,
/// taken when it connects (not per request: its pid may be another process's by then).
#[derive(Clone, Debug)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    groups: Vec<u32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
                groups: cred.pid().map(supplementary_groups).unwrap_or_default(),
            },
            // Unknown: nobody (refused below).
            Err(_) => Peer {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
                groups: Vec::new(),
            },
        }
    }
}

impl Access {
    /// Root, the daemon's own user, or a member of the socket's group (primary or
    /// supplementary, as `/proc/<pid>/status` lists them).
    fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.uid {
            return true;
        }
        let Some(gid) = self.gid else {
            return false;
        };
        peer.gid == gid || peer.groups.contains(&gid)
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| groups_in_status(&status))
        .unwrap_or_default()
}

/// The `Groups:` line of a `/proc/<pid>/status`.
fn groups_in_status(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn require_peer(
    State(access): State<Arc<Access>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    if !access.allows(&peer) {
        warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "API call refused: not root, the daemon's user or its group");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "only root, the daemon's user and its API group may use this socket",
        )
        .into_response();
    }
    next.run(req).await
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How long a client may take to send a request's head (its line and headers), and how long
/// a kept-alive connection may sit idle before its next one: a connection that trickles its
/// head or sits idle does not keep a descriptor for ever (case S7 of the security review).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further clients wait in the listen backlog until one closes,
/// so descriptors stay for what the daemon itself needs (images, re-injection sockets).
pub const MAX_CONNECTIONS: usize = 256;

/// Serves `app` until `stopped` turns true, then lets open requests finish; a unix socket is
/// removed afterwards. Each connection is HTTP/1.1 with [`HEADER_READ_TIMEOUT`], at most
/// [`MAX_CONNECTIONS`] at once.
pub(crate) async fn serve(
    listener: Listener,
    app: Router,
    stopped: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    match listener {
        Listener::Tcp { listener, tls } => serve_connections(listener, tls, app, stopped).await,
        Listener::Unix {
            listener,
            path,
            access,
        } => {
            // Removed however serving ends, also when this future is dropped unfinished.
            let _socket = RemoveOnDrop(path);
            let app = app.layer(middleware::from_fn_with_state(
                Arc::new(access),
                require_peer,
            ));
            serve_connections(listener, None, app, stopped).await
        }
    }
}

/// A listener's next connection, with its peer's credentials where the socket has them.
trait Accept: Send + Sync {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next_connection(&self) -> impl Future<Output = io::Result<(Self::Io, Option<Peer>)>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next_connection(&self) -> io::Result<(Self::Io, Option<Peer>)> {
        Ok((self.accept().await?.0, None))
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn next_connection(&self) -> io::Result<(Self::Io, Option<Peer>)> {
        let (stream, _) = self.accept().await?;
        let peer = Peer::of(&stream);
        Ok((stream, Some(peer)))
    }
}

/// The accept loop: a connection slot first (the cap), then a connection, served on its own
/// task with the peer's credentials (unix sockets) in each request's extensions.
async fn serve_connections(
    listener: impl Accept,
    tls: Option<TlsAcceptor>,
    app: Router,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.next_connection() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or a connection reset before it was taken: the
                    // listener itself is fine; try again shortly rather than spin.
                    warn!(%err, "accepting an API connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            if let Some(peer) = &peer {
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
            }
            app.clone().oneshot(request.map(Body::new))
        });
        let (watcher, http, tls) = (graceful.watcher(), http.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let ended = match tls {
                // The handshake on the connection's own task, bounded like a request head.
                Some(tls) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            watcher
                                .watch(http.serve_connection(TokioIo::new(stream), service))
                                .await
                        }
                        Ok(Err(err)) => {
                            debug!(%err, "API connection refused: TLS handshake");
                            return;
                        }
                        Err(_) => {
                            debug!("API connection refused: no TLS handshake in time");
                            return;
                        }
                    }
                }
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
            };
            if let Err(err) = ended {
                debug!(%err, "API connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_the_daemons_user_and_its_group_are_allowed() {
        let access = Access {
            uid: 1000,
            gid: Some(50),
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
            groups: vec![4, 24],
        };
        assert!(access.allows(&peer(0, 0)));
        assert!(access.allows(&peer(1000, 1000)));
        assert!(access.allows(&peer(2000, 50)));
        assert!(!access.allows(&peer(65534, 65534)));
        assert!(!access.allows(&peer(u32::MAX, u32::MAX)));
        let no_group = Access { uid: 0, gid: None };
        assert!(!no_group.allows(&peer(2000, 50)));
        let supplementary = Access {
            uid: 0,
            gid: Some(24),
        };
        assert!(supplementary.allows(&peer(2000, 2000)));
        assert_eq!(
            groups_in_status("Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 50 \nNgid:\t0\n"),
            [4, 24, 50]
        );
        assert!(groups_in_status("Groups:\n").is_empty());
    }
}
