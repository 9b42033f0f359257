//! Where an API is served and reached: a unix socket, the default (local only, guarded by the
//! socket file's owner and mode and by the peer's credentials, as libvirt's and Docker's
//! sockets are), or TCP, which the daemons serve only with a bearer token (any local account
//! can reach a TCP port, loopback included).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

/// The agent's socket (`enforcer run`), where the CLI looks by default.
pub const DEFAULT_SOCKET: &str = "/run/enforcer/enforcer.sock";
/// The coordinator of several hosts' socket (`enforcer coordinator`).
pub const DEFAULT_COORDINATOR_SOCKET: &str = "/run/enforcer/coordinator.sock";

/// The longest path a unix socket address holds (`sun_path`, less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A place to serve the API: `unix:/path/to.sock` (or an absolute path), or `host:port` (also
/// written `http://host:port`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not an API address: give unix:/absolute/path.sock (at most 107 bytes) or ip:port"
)]
pub struct BadEndpoint(pub String);

impl FromStr for Endpoint {
    type Err = BadEndpoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEndpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("unix:").or(s.starts_with('/').then_some(s)) {
            if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH || path.ends_with('/') {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        s.strip_prefix("http://")
            .unwrap_or(s)
            .trim_end_matches('/')
            .parse()
            .map(Endpoint::Tcp)
            .map_err(|_| bad())
    }
}

impl fmt::Display for Endpoint {
    /// What [`super::client::Client::new`] takes to reach it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "http://{addr}"),
        }
    }
}

/// The socket path in an address the client was given (`unix:/path` or `/path`), if it is one.
pub fn unix_path(address: &str) -> Option<&str> {
    address
        .strip_prefix("unix:")
        .or(address.starts_with('/').then_some(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for (given, shown) in [
            (
                "unix:/run/enforcer/enforcer.sock",
                "unix:/run/enforcer/enforcer.sock",
            ),
            ("/run/x.sock", "unix:/run/x.sock"),
            ("127.0.0.1:7878", "http://127.0.0.1:7878"),
            ("http://[::1]:80/", "http://[::1]:80"),
        ] {
            let e: Endpoint = given.parse().unwrap();
            assert_eq!(e.to_string(), shown);
            assert_eq!(shown.parse::<Endpoint>().unwrap(), e);
        }
        let long = format!("unix:/{}", "a".repeat(107));
        for bad in [
            "unix:relative.sock",
            "unix:",
            "localhost",
            "",
            "/run/dir/",
            &long,
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(unix_path("unix:/a.sock"), Some("/a.sock"));
        assert_eq!(unix_path("http://10.0.0.1:7878"), None);
    }
}
