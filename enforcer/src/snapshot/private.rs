//! The snapshot store's files are private: memory images hold everything a VM had in memory
//! (keys, passwords), so every directory of the store is made 0700 and every file 0600 —
//! images, disk copies, manifests, journals and lists alike, on the coordinator and on the
//! agents. Files are written atomically (temporary file, fsync, rename, fsync of the
//! directory).

use std::{fs, io, path::Path};

/// Mode of the store's directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the store's files.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Makes `dir` and any missing parents, 0700; an existing `dir` is made 0700 too.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// Opens a new file of the store for writing, 0600 from its creation (never over an existing
/// one).
pub(crate) fn private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    #[cfg(test)]
    full::check(path)?;
    fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the
/// directory), 0600: a crash leaves the old file or the new one.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    // A temporary file a crash left behind is ours to replace.
    let _ = fs::remove_file(&tmp);
    let mut file = private_file(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Removes `path` durably: the unlink, then an fsync of its directory, so a power loss after
/// this returns cannot bring the file back (a journal that reappears would abort a snapshot
/// that committed). Missing is no error.
pub(crate) fn remove_durably(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Copies `from` into the store at `to` (0600, synced): a disk at the snapshot point.
pub(crate) fn copy_private(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = fs::File::open(from)?;
    let mut dst = private_file(to)?;
    // std's copy uses copy_file_range (and reflinks where the filesystem shares extents).
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

/// Fault injection for tests: the store under a directory is full from its `n`th new file on
/// (ENOSPC), as a disk that fills up would be; other stores are not affected.
#[cfg(test)]
pub(crate) mod full {
    use std::{
        io,
        path::{Path, PathBuf},
        sync::Mutex,
    };

    static FULL: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// From the `n`th file made under `dir` on (1: the first), every one fails.
    pub(crate) fn from_nth_file(dir: &Path, n: usize) {
        let mut full = FULL.lock().expect("full lock");
        full.retain(|(d, _)| d != dir);
        full.push((dir.to_owned(), n));
    }

    /// Space again under `dir`.
    pub(crate) fn freed(dir: &Path) {
        FULL.lock().expect("full lock").retain(|(d, _)| d != dir);
    }

    pub(super) fn check(path: &Path) -> io::Result<()> {
        let mut full = FULL.lock().expect("full lock");
        if let Some((_, n)) = full.iter_mut().find(|(d, _)| path.starts_with(d)) {
            if *n <= 1 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            *n -= 1;
        }
        Ok(())
    }
}
