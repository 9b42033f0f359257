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

/// Copies `from` into the store at `to` (0600, synced): a disk at the snapshot point.
pub(crate) fn copy_private(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = fs::File::open(from)?;
    let mut dst = private_file(to)?;
    // std's copy uses copy_file_range (and reflinks where the filesystem shares extents).
    io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}
