//! TLS for the API between hosts (rustls on ring; case S6 of the security review): a daemon
//! serving TCP presents its certificate and requires one from every client, signed by the
//! deployment's CA (mutual TLS, RFC 8446 §4.3.2); the coordinator presents its own to the
//! agents and trusts only certificates of that CA. `cargo xtask deploy` makes the CA and the
//! certificates: the agents' for serving only (extended key usage serverAuth), the
//! coordinator's for serving and as a client (serverAuth and clientAuth), so a host that is
//! taken over cannot use its own certificate to drive the other agents.
//!
//! Files are PEM: certificate chains, PKCS#8/PKCS#1/SEC1 private keys (which must not be
//! readable by other accounts), CA bundles.

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(PathBuf),
    #[error("{path}: no PEM private key in it ({detail})")]
    NoKey { path: PathBuf, detail: String },
    #[error("{path} is readable by other accounts (mode {mode:o}): chmod 600 it")]
    KeyNotPrivate { path: PathBuf, mode: u32 },
    #[error("{path}: not a CA certificate rustls can trust: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// This process's TLS files: its certificate chain and key, and the CA it trusts (for the
/// peers' certificates, whichever side they are on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A client's TLS: trusts only the given CA, and presents a certificate when it has one.
#[derive(Clone, Debug)]
pub struct ClientTls(pub(crate) Arc<ClientConfig>);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(read)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| read(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyNotPrivate {
            path: path.to_owned(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: ca.to_owned(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The server's configuration: `files.cert`/`files.key` presented, a client certificate
/// signed by `files.ca` (for client authentication) required of every connection.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: files.ca.clone(),
            detail: e.to_string(),
        })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)?;
    Ok(Arc::new(config))
}

impl ClientTls {
    /// Trusts only `ca`; presents `identity` (certificate, key) when given.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, key)) => {
                builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self(Arc::new(config)))
    }

    /// From this process's files: trusts `files.ca`, presents `files.cert`.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::new(&files.ca, Some((&files.cert, &files.key)))
    }
}
