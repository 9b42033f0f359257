//! One daemon per pin root: an exclusive `flock` on `/run/enforcer/pins/<pin root>.lock`, taken
//! before anything is touched and held for the daemon's life. A second `enforcer run` on the
//! same pins would otherwise reset the first one's hold device, remove its link pins and serve
//! a stale view of epochs (case P3 of the datapath review); it is refused instead, and the
//! first keeps enforcing. The kernel drops the lock with the process, so a daemon that died
//! leaves nothing to clean up.

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// Where the locks live.
const LOCK_DIR: &str = "/run/enforcer/pins";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another daemon runs on the pin root {pin_root} (it holds {lock}): stop it first, or use another --pin-root"
    )]
    Held { pin_root: PathBuf, lock: PathBuf },
    #[error("locking the pin root ({lock}): {source}")]
    Io {
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
pub struct PinRootLock {
    _lock: Flock<File>,
}

/// A pin root as one name however it is written: absolute, with `//`, `.` and a trailing `/`
/// gone and symlinks followed where it (or its parent) exists.
fn canonical(pin_root: &Path) -> PathBuf {
    let abs = if pin_root.is_absolute() {
        pin_root.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(pin_root)
    };
    if let Ok(path) = abs.canonicalize() {
        return path;
    }
    let lexical: PathBuf = abs.components().collect();
    match (
        lexical.parent().and_then(|p| p.canonicalize().ok()),
        lexical.file_name(),
    ) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => lexical,
    }
}

/// The lock file of a pin root: its canonical path with `%` and `/` escaped, so one root
/// however written has one lock, and distinct roots never share one.
pub fn lock_path(pin_root: &Path) -> PathBuf {
    let escaped: String = canonical(pin_root)
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            '%' => "%25".to_owned(),
            '/' => "%2f".to_owned(),
            c => c.to_string(),
        })
        .collect();
    Path::new(LOCK_DIR).join(format!("{escaped}.lock"))
}

impl PinRootLock {
    pub fn acquire(pin_root: &Path) -> Result<Self, LockError> {
        let lock = lock_path(pin_root);
        let io = |source| LockError::Io {
            lock: lock.clone(),
            source,
        };
        std::fs::create_dir_all(LOCK_DIR).map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Self { _lock: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held {
                pin_root: pin_root.to_owned(),
                lock,
            }),
            Err((_, errno)) => Err(io(errno.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pin_root_has_one_lock_and_distinct_ones_distinct_locks() {
        let lock = Path::new("/run/enforcer/pins/%2fsys%2ffs%2fbpf%2fenforcer.lock");
        for written in [
            "/sys/fs/bpf/enforcer",
            "/sys/fs/bpf/enforcer/",
            "//sys/fs/bpf/./enforcer",
        ] {
            assert_eq!(lock_path(Path::new(written)), lock, "{written}");
        }
        assert_ne!(lock_path(Path::new("/a/b")), lock_path(Path::new("/a%2fb")));
    }
}
