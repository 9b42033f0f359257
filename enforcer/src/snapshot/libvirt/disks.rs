//! A snapshot's disks, by method. Pre-copy: the disk files are copied while the VM is held at
//! its snapshot point (cost grows with the disks). Instant: a disk-only external snapshot
//! freezes each disk file as it is at the stop and the VM goes on in a new qcow2 overlay on top
//! of it (libvirt's own mechanism; O(1) whatever the disk's size, sparse files stay sparse). A
//! restore never writes over a frozen file: it boots the VM on a new overlay of it, so any
//! snapshot of a chain can be restored, in any order, as often as wanted. The list of disks is
//! kept beside the memory image (`<vm>.disks.json`, `<vm>.overlays.json`). Calls `qemu-img`.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

use super::xml::{DiskFormat, FileDisk};
use crate::snapshot::private::write_private;

/// A pre-copy snapshot's copy of a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// The file the domain uses.
    pub source: PathBuf,
    /// The copy taken at the snapshot point.
    pub copy: PathBuf,
}

/// An instant snapshot's disk: frozen at the stop, never written again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCapture {
    pub target: String,
    /// The disk as it was at the stop: the file the domain used until then.
    pub frozen: PathBuf,
    pub format: DiskFormat,
    /// The new file the domain went on in (a qcow2 overlay of `frozen`).
    pub overlay: PathBuf,
}

pub(super) const COPIES: &str = "disks.json";
pub(super) const CAPTURES: &str = "overlays.json";

/// Where a new overlay of a VM's disk goes: beside the disk it sits on, named after the VM,
/// the disk and `tag` (the snapshot's id, or the restore's time).
pub(super) fn overlay_path(below: &Path, vm: &str, target: &str, tag: &str) -> PathBuf {
    below
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{vm}.{target}.{tag}.qcow2"))
}

/// The overlays an instant snapshot will put the VM's disks on.
pub(super) fn plan_captures(vm: &str, disks: &[FileDisk], tag: &str) -> Vec<DiskCapture> {
    disks
        .iter()
        .map(|d| DiskCapture {
            target: d.target.clone(),
            frozen: d.file.clone(),
            format: d.format,
            overlay: overlay_path(&d.file, vm, &d.target, tag),
        })
        .collect()
}

/// Creates the overlays an instant snapshot will put the disks on, before the stop (so the
/// stop only switches files): each a qcow2 file over its frozen disk, of the disk's size.
/// The disks are in use: their size is read without taking their locks, and the overlay is
/// created without opening them. Nothing is left behind when one fails.
pub(super) fn prepare_overlays(captures: &[DiskCapture]) -> Result<(), String> {
    let mut made: Vec<&Path> = Vec::new();
    for c in captures {
        let created = virtual_size(&c.frozen, c.format).and_then(|size| {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-F",
                c.format.name(),
                "-b",
                path_str(&c.frozen)?,
                path_str(&c.overlay)?,
                &size.to_string(),
            ])
        });
        if let Err(e) = created {
            remove_all(made);
            return Err(format!("disk {}: {e}", c.target));
        }
        made.push(&c.overlay);
    }
    Ok(())
}

fn remove_all<'a>(files: impl IntoIterator<Item = &'a Path>) {
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

/// Removes the prepared overlays a domain did not go on (`in_use`: the files its XML names).
pub(super) fn remove_unused(captures: &[DiskCapture], in_use: &[PathBuf]) {
    remove_all(
        captures
            .iter()
            .map(|c| c.overlay.as_path())
            .filter(|o| !in_use.iter().any(|u| u == o)),
    );
}

/// What `qemu-img info` says of a file in use (its locks left alone).
fn info(file: &Path) -> Result<serde_json::Value, String> {
    let text = qemu_img(&["info", "-U", "--output=json", path_str(file)?])?;
    serde_json::from_str(&text).map_err(|e| format!("qemu-img info {}: {e}", file.display()))
}

/// The file a qcow2 file is backed by (absolute), if any.
pub(super) fn backing_of(file: &Path) -> Result<Option<PathBuf>, String> {
    let info = info(file)?;
    let name = info
        .get("full-backing-filename")
        .or_else(|| info.get("backing-filename"))
        .and_then(|v| v.as_str());
    Ok(name.map(|n| {
        let n = Path::new(n);
        if n.is_absolute() {
            n.to_owned()
        } else {
            file.parent().unwrap_or(Path::new("/")).join(n)
        }
    }))
}

/// A file's format as QEMU probes it (raw or qcow2).
pub(super) fn format_of(file: &Path) -> Result<DiskFormat, String> {
    match info(file)?.get("format").and_then(|v| v.as_str()) {
        Some("qcow2") => Ok(DiskFormat::Qcow2),
        Some("raw") => Ok(DiskFormat::Raw),
        other => Err(format!("{} is {other:?}, not raw or qcow2", file.display())),
    }
}

/// A disk's size as the guest sees it (bytes).
fn virtual_size(file: &Path, format: DiskFormat) -> Result<u64, String> {
    let info = qemu_img(&[
        "info",
        "-U",
        "--output=json",
        "-f",
        format.name(),
        path_str(file)?,
    ])?;
    serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v.get("virtual-size")?.as_u64())
        .ok_or_else(|| format!("no virtual size for {}: {info}", file.display()))
}

/// libvirt's disk-only snapshot XML for `captures`: every disk external, on its new overlay.
pub(super) fn snapshot_xml(captures: &[DiskCapture]) -> String {
    format!(
        "<domainsnapshot>{}</domainsnapshot>",
        snapshot_disks_xml(captures)
    )
}

/// The `<disks>` element of a libvirt snapshot moving each of `captures` onto its overlay
/// (qcow2, external).
pub fn snapshot_disks_xml(captures: &[DiskCapture]) -> String {
    let disks: String = captures
        .iter()
        .map(|c| {
            format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                c.target,
                c.overlay.display()
            )
        })
        .collect();
    format!("<disks>{disks}</disks>")
}

/// Writes a list of disks beside the memory image, durably; returns its path.
pub(super) fn write_list<T: Serialize>(
    dir: &Path,
    vm: &str,
    name: &str,
    list: &[T],
) -> Result<PathBuf, String> {
    let path = dir.join(format!("{vm}.{name}"));
    write_list_at(&path, list)?;
    Ok(path)
}

/// Writes a list of disks to `path` atomically (temporary file, fsync, rename, fsync of the
/// directory): a crash leaves the old list or the new one.
pub(super) fn write_list_at<T: Serialize>(path: &Path, list: &[T]) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(list).expect("disk list serializes");
    write_private(path, &text).map_err(|e| format!("writing {}: {e}", path.display()))
}

pub(super) fn read_list<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, String> {
    std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_slice(&t).map_err(|e| e.to_string()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub(super) fn qemu_img(args: &[&str]) -> Result<String, String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| format!("running qemu-img: {e} (is QEMU installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that a frozen disk and every file below it can be opened (`qemu-img info` over its
/// backing chain), without changing anything.
pub(super) fn check_chain(capture: &DiskCapture) -> Result<(), String> {
    let frozen = path_str(&capture.frozen)?;
    qemu_img(&[
        "info",
        "-U",
        "--backing-chain",
        "-f",
        capture.format.name(),
        frozen,
    ])
    .map(|_| ())
    .map_err(|e| format!("disk {} of the snapshot: {e}", capture.target))
}

/// A disk a restored VM boots on: (target, file, format).
pub(super) type RestoredDisk = (String, PathBuf, DiskFormat);

/// Creates a new qcow2 overlay of each frozen disk for a restored VM (after checking every
/// chain); returns the disks to boot on. Nothing is left behind when one fails.
pub(super) fn restore_overlays(
    vm: &str,
    captures: &[DiskCapture],
    tag: &str,
) -> Result<Vec<RestoredDisk>, String> {
    for c in captures {
        check_chain(c)?;
    }
    let mut made: Vec<RestoredDisk> = Vec::new();
    for c in captures {
        let overlay = overlay_path(&c.frozen, vm, &c.target, tag);
        let created = path_str(&c.frozen).and_then(|frozen| {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                c.format.name(),
                "-b",
                frozen,
                path_str(&overlay)?,
            ])
        });
        if let Err(e) = created {
            remove_made(&made);
            return Err(format!("disk {}: {e}", c.target));
        }
        made.push((c.target.clone(), overlay, DiskFormat::Qcow2));
    }
    Ok(made)
}

/// Removes the files a restore made for its disks.
pub(super) fn remove_made(made: &[RestoredDisk]) {
    for (_, file, _) in made {
        let _ = std::fs::remove_file(file);
    }
}

/// Copies a pre-copy snapshot's disk copies into new files beside the domain's disks, for the
/// restored VM to boot on, after checking that every copy is there. Never writes over a disk:
/// the file a copy was taken of may be another snapshot's frozen disk by now. Nothing is left
/// behind when one fails.
pub(super) fn restore_copies(
    vm: &str,
    copies: &[DiskCopy],
    tag: &str,
) -> Result<Vec<RestoredDisk>, String> {
    if let Some(missing) = copies.iter().find(|d| !d.copy.is_file()) {
        return Err(format!(
            "disk {}: the copy {} is missing",
            missing.target,
            missing.copy.display()
        ));
    }
    let mut made: Vec<RestoredDisk> = Vec::new();
    for d in copies {
        let copied = format_of(&d.copy).and_then(|format| {
            let dir = d.source.parent().unwrap_or(Path::new("/"));
            let ext = match format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "img",
            };
            let file = dir.join(format!("{vm}.{}.{tag}.{ext}", d.target));
            std::fs::copy(&d.copy, &file)
                // The store's copy is private; the VM's new disk gets its old disk's mode.
                .and_then(|_| match std::fs::metadata(&d.source) {
                    Ok(meta) => std::fs::set_permissions(&file, meta.permissions()),
                    Err(_) => Ok(()),
                })
                .and_then(|()| File::open(&file)?.sync_all())
                .map_err(|e| format!("copying {} to {}: {e}", d.copy.display(), file.display()))?;
            Ok((d.target.clone(), file, format))
        });
        match copied {
            Ok(disk) => made.push(disk),
            Err(e) => {
                remove_made(&made);
                return Err(format!("disk {}: {e}", d.target));
            }
        }
    }
    Ok(made)
}

pub(super) fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists and disk copies in the store are its owner's only, like its images.
    #[test]
    fn lists_and_copies_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("enforcer-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, b"data").unwrap();
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o644)).unwrap();
        let list = dir.join("vm.disks.json");
        write_list_at(&list, &[1, 2]).unwrap();
        let copy = dir.join("vm.vda.disk");
        crate::snapshot::private::copy_private(&disk, &copy).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"data");
        for file in [&list, &copy] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlays_go_beside_their_disk() {
        let disks = [FileDisk {
            target: "vda".into(),
            file: "/var/lib/libvirt/images/web1.img".into(),
            format: DiskFormat::Raw,
        }];
        let plan = plan_captures("web1", &disks, "g-1-2");
        assert_eq!(
            plan[0].overlay,
            PathBuf::from("/var/lib/libvirt/images/web1.vda.g-1-2.qcow2")
        );
        assert_eq!(plan[0].frozen, disks[0].file);
        let xml = snapshot_xml(&plan);
        assert!(
            xml.contains("<disk name='vda' snapshot='external'><driver type='qcow2'/><source file='/var/lib/libvirt/images/web1.vda.g-1-2.qcow2'/>"),
            "{xml}"
        );
    }

    /// A real chain with qemu-img: raw base (sparse) → overlay; restore overlays on the frozen
    /// raw file and on the overlay, both readable; a missing file refuses before creating any.
    #[test]
    fn restore_overlays_sit_on_frozen_files_and_refuse_broken_chains() {
        let dir = std::env::temp_dir().join(format!("enforcer-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("vm.img");
        File::create(&base).unwrap().set_len(1 << 30).unwrap();
        let first = DiskCapture {
            target: "vda".into(),
            frozen: base.clone(),
            format: DiskFormat::Raw,
            overlay: dir.join("vm.vda.s1.qcow2"),
        };
        let made = restore_overlays("vm", std::slice::from_ref(&first), "r1").unwrap();
        assert_eq!(made[0].1, dir.join("vm.vda.r1.qcow2"));
        let info = qemu_img(&["info", "--backing-chain", path_str(&made[0].1).unwrap()]).unwrap();
        assert!(info.contains("vm.img"), "{info}");
        // The frozen base stayed sparse (nothing was copied).
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&base).unwrap().blocks(), 0);
        // A chain whose frozen file is gone is refused before anything is created.
        let gone = DiskCapture {
            target: "vdb".into(),
            frozen: dir.join("nothing.qcow2"),
            format: DiskFormat::Qcow2,
            overlay: dir.join("x.qcow2"),
        };
        let err = restore_overlays("vm", &[first, gone], "r2").unwrap_err();
        assert!(err.contains("vdb"), "{err}");
        assert!(!dir.join("vm.vda.r2.qcow2").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
