//! A deployment's certificates for [`super::tls`] (rcgen): one CA per deployment, and the
//! certificates it signs — an agent's for serving only (extended key usage serverAuth), the
//! coordinator's for serving and as a client (serverAuth and clientAuth), an operator's as a
//! client only — each naming the host's addresses (subject alternative names, RFC 5280
//! §4.2.1.6). `enforcer tls ca` and `enforcer tls cert` run it; `cargo xtask deploy` uses
//! them.
//!
//! Files in the directory: `ca.crt`, `ca.key`, `<name>.crt`, `<name>.key`; keys 0600. An
//! existing CA is never overwritten (every certificate signed by it would stop working).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Who a certificate is for, which decides what it may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// An agent (`enforcer run` on a hypervisor host): serves only.
    Agent,
    /// The coordinator: serves its API and is the agents' client.
    Coordinator,
    /// A person's client commands: client only.
    Operator,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} exists already: a new CA would invalidate every certificate it signed")]
    CaExists(PathBuf),
    #[error("no CA in {0} (make one with `enforcer tls ca`)")]
    NoCa(PathBuf),
    #[error("certificate name {0:?}: 1-64 of [A-Za-z0-9_.-], not starting with '.', not `ca`")]
    BadName(String),
    #[error("making the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

const CA_NAME: &str = "enforcer deployment CA";
const CA_YEARS: i64 = 10;
const CERT_DAYS: i64 = 825;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365 * CA_YEARS);
    params
}

/// Makes a CA in `dir` (`ca.crt`, `ca.key`); refuses if one is there. Returns the
/// certificate's path.
pub fn new_ca(dir: &Path) -> Result<PathBuf, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() || key.exists() {
        return Err(PkiError::CaExists(crt));
    }
    let pair = KeyPair::generate()?;
    let cert = ca_params().self_signed(&pair)?;
    write(&key, &pair.serialize_pem(), 0o600)?;
    write(&crt, &cert.pem(), 0o644)?;
    Ok(crt)
}

/// Signs a certificate for `name` in `role`, valid for `addresses` (IP addresses or DNS
/// names), with the CA in `dir`; writes `<name>.crt` and `<name>.key` (0600) there, replacing
/// older ones. Returns their paths.
pub fn issue(
    dir: &Path,
    name: &str,
    role: Role,
    addresses: &[String],
) -> Result<(PathBuf, PathBuf), PkiError> {
    // `ca` is the CA's own file name: a certificate of that name would overwrite it.
    let valid = !name.is_empty()
        && name.len() <= 64
        && name != "ca"
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(PkiError::BadName(name.to_owned()));
    }
    let ca_key_path = dir.join("ca.key");
    let ca_pem = match fs::read_to_string(&ca_key_path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PkiError::NoCa(dir.to_owned()));
        }
        Err(e) => return Err(io_err(&ca_key_path)(e)),
    };
    let ca_key = KeyPair::from_pem(&ca_pem)?;
    // The issuer as it signs: the CA's name and key (what a certificate records of it).
    let ca = ca_params().self_signed(&ca_key)?;

    let mut params = CertificateParams::new(addresses.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Coordinator => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CERT_DAYS);
    let pair = KeyPair::generate()?;
    let cert = params.signed_by(&pair, &ca, &ca_key)?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    for old in [&crt, &key] {
        match fs::remove_file(old) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(old)(e)),
        }
    }
    write(&key, &pair.serialize_pem(), 0o600)?;
    write(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key))
}
