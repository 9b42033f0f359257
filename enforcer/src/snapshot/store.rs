//! The snapshot store on disk: one directory per snapshot (`<id>/manifest.json` and the
//! images), `groups.json`, and a journal per snapshot in progress (`journals/<id>.json`), from
//! which a restarted coordinator aborts what the last one left unfinished. Every file is
//! written atomically (temporary file, fsync, rename, fsync of the directory).
//!
//! The store is private (see [`super::private`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{
    backends::{EpochControl, Hypervisor},
    coordinator::{Coordinator, CoordinatorError},
    manifest::{CutMethod, Manifest, SnapshotOutcome, SnapshotVm},
    private::{private_dir, remove_durably, write_private},
};
use crate::model::{GroupSpec, SnapshotId};

/// The journal of a transaction in progress (`<store>/journals/<id>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Journal {
    pub(crate) id: SnapshotId,
    pub(crate) group: GroupSpec,
    /// Each member's epoch before the snapshot: where an abort goes back to.
    pub(crate) epoch_before: u32,
    #[serde(default = "CutMethod::legacy")]
    pub(crate) method: CutMethod,
    /// An instant cut began: its VMs may have been stopped by it (see `Coordinator::abort`).
    #[serde(default)]
    pub(crate) cut_started: bool,
}

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// One journal per snapshot in progress: groups snapshot independently.
    pub(crate) fn journal_path(&self, id: &SnapshotId) -> PathBuf {
        self.store.join("journals").join(format!("{id}.json"))
    }

    /// Aborts every snapshot a previous coordinator left unfinished. A journal stays until its
    /// abort went through, so a failed clean-up is tried again at the next start (and before
    /// the group's next snapshot: [`Coordinator::finish_leftovers`]).
    pub(crate) fn recover(&self) -> Result<(), CoordinatorError> {
        for path in self.journal_paths() {
            self.finish_journal(&path);
        }
        Ok(())
    }

    fn journal_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(self.store.join("journals"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        // The single journal of earlier versions.
        paths.push(self.store.join("journal.json"));
        paths.retain(|p| p.is_file());
        paths
    }

    /// Before a snapshot of `group`: a journal of an earlier one of the same group that is not
    /// running here (its abort did not go through, or its manifest could not be written) is
    /// finished first; if it still cannot be, the new snapshot is refused (`Busy`) — aborting
    /// it later would roll the group back under newer snapshots.
    pub(crate) fn finish_leftovers(&self, group: &GroupSpec) -> Result<(), CoordinatorError> {
        for path in self.journal_paths() {
            let Some(journal) = fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<Journal>(&t).ok())
            else {
                continue;
            };
            let running = self
                .live
                .lock()
                .expect("live lock")
                .contains_key(&journal.id);
            if journal.group.name != group.name || running {
                continue;
            }
            if !self.finish_journal(&path) {
                return Err(CoordinatorError::Busy {
                    group: group.name.clone(),
                    by: format!(
                        "the unfinished abort of {} (tried again, not through yet)",
                        journal.id
                    ),
                });
            }
        }
        Ok(())
    }

    /// Finishes one journal: a committed snapshot's is dropped, anything else aborted.
    /// Returns whether the journal is gone.
    fn finish_journal(&self, path: &Path) -> bool {
        let Ok(text) = fs::read_to_string(path) else {
            return true;
        };
        let journal: Journal = match serde_json::from_str(&text) {
            Ok(j) => j,
            Err(err) => {
                warn!(%err, path = %path.display(), "unreadable snapshot journal; removing it");
                return remove_durably(path).is_ok();
            }
        };
        // Committed, and only the journal's removal was lost (a crash right after the
        // manifest, or a power loss before the unlink reached the disk): it stands.
        if self.committed(&journal.id) {
            warn!(id = %journal.id, "a committed snapshot's journal was left; removing it");
            return match remove_durably(path) {
                Ok(()) => true,
                Err(err) => {
                    warn!(%err, path = %path.display(), "removing a committed snapshot's journal");
                    false
                }
            };
        }
        warn!(
            id = %journal.id,
            group = %journal.group.name,
            "aborting a snapshot left unfinished by a previous coordinator"
        );
        let reason = "the coordinator stopped during the snapshot".to_owned();
        let vms = journal.group.vms.iter().map(SnapshotVm::pending).collect();
        let mut manifest = Manifest {
            id: journal.id.clone(),
            group: journal.group.clone(),
            epoch: journal.epoch_before + 1,
            outcome: SnapshotOutcome::Aborted,
            reason: Some(reason),
            method: journal.method,
            started_unix_ms: 0,
            stop_spread_ms: None,
            held_frames: None,
            released_ms: None,
            held_lost: Default::default(),
            channel_state: None,
            vms,
        };
        let clean = self.abort(&journal, &mut manifest);
        // A manifest that cannot be written (a full disk) must not keep the coordinator
        // from starting: the journal stays, and the next start tries again.
        match self.write_manifest(&manifest) {
            Ok(()) if clean => match remove_durably(path) {
                Ok(()) => true,
                Err(err) => {
                    warn!(%err, path = %path.display(), "removing an aborted snapshot's journal");
                    false
                }
            },
            Ok(()) => false,
            Err(err) => {
                warn!(
                    id = %journal.id,
                    %err,
                    "writing the aborted snapshot's manifest; its journal stays for the next start"
                );
                false
            }
        }
    }

    /// Whether the store holds a committed manifest for `id`.
    fn committed(&self, id: &SnapshotId) -> bool {
        fs::read_to_string(self.store.join(id).join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
            .is_some_and(|m| m.outcome == SnapshotOutcome::Committed)
    }

    pub(crate) fn write_manifest(&self, manifest: &Manifest) -> Result<(), CoordinatorError> {
        let dir = self.store.join(&manifest.id);
        private_dir(&dir).map_err(|source| CoordinatorError::Store {
            path: dir.clone(),
            source,
        })?;
        write_atomically(&dir.join("manifest.json"), manifest)
    }

    /// Manifests in the store and snapshots in progress, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>, CoordinatorError> {
        let entries = fs::read_dir(&self.store).map_err(|source| CoordinatorError::Store {
            path: self.store.clone(),
            source,
        })?;
        let mut out: Vec<Manifest> = entries
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("manifest.json")).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        out.extend(
            self.live
                .lock()
                .expect("live lock")
                .values()
                .map(|l| l.manifest()),
        );
        out.sort_by_key(|m| (m.started_unix_ms, m.id.clone()));
        Ok(out)
    }

    /// One snapshot: live while it runs, then its manifest.
    pub fn get(&self, id: &SnapshotId) -> Result<Manifest, CoordinatorError> {
        if let Some(live) = self.live.lock().expect("live lock").get(id) {
            return Ok(live.manifest());
        }
        let text = fs::read_to_string(self.store.join(id).join("manifest.json"))
            .map_err(|_| CoordinatorError::UnknownSnapshot(id.to_string()))?;
        serde_json::from_str(&text).map_err(|e| CoordinatorError::Store {
            path: self.store.join(id),
            source: io::Error::other(e),
        })
    }

    /// Deletes a finished snapshot (manifest and images).
    pub fn delete(&self, id: &SnapshotId) -> Result<Manifest, CoordinatorError> {
        let m = self.get(id)?;
        if !m.finished() {
            return Err(CoordinatorError::Busy {
                group: m.group.name,
                by: id.to_string(),
            });
        }
        // Not beside a snapshot or restore of the group: deleting merges disk chains the
        // group's VMs run on.
        let _claim = self.claim(&m.group.name, &format!("deleting {id}"))?;
        let dir = self.store.join(id);
        for vm in &m.group.vms {
            self.hypervisor.discard(vm, &dir)?;
        }
        fs::remove_dir_all(&dir).map_err(|source| CoordinatorError::Store { path: dir, source })?;
        Ok(m)
    }
}

/// Whether `file` is one a snapshot writes for VM `vm`: its memory image `<vm>.save`, its disk
/// lists `<vm>.disks.json` and `<vm>.overlays.json` (and their temporary `.tmp`), and its disk
/// copies `<vm>.<target>.disk` (a target has no dot). Exact names, not a prefix: another VM's
/// name may start with this one's and a dot (`a` and `a.b`), and the store's own files are
/// never a VM's (case S9 of the security review).
pub fn is_vm_file(vm: &str, file: &str) -> bool {
    let Some(rest) = file.strip_prefix(vm).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    matches!(
        rest,
        "save" | "disks.json" | "overlays.json" | "disks.tmp" | "overlays.tmp"
    ) || rest.strip_suffix(".disk").is_some_and(|target| {
        !target.is_empty() && target.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Deletes the files of one VM ([`is_vm_file`]) in a snapshot directory on this host.
pub fn discard_local(vm: &str, image_dir: &Path) -> io::Result<()> {
    let Ok(entries) = fs::read_dir(image_dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if is_vm_file(vm, &entry.file_name().to_string_lossy()) {
            fs::remove_file(entry.path()).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", entry.path().display()))
            })?;
        }
    }
    Ok(())
}

/// Writes `value` as JSON to `path` so that a crash leaves either the old file or the new one.
pub(crate) fn write_atomically<T: Serialize>(
    path: &Path,
    value: &T,
) -> Result<(), CoordinatorError> {
    let err = |source: io::Error| CoordinatorError::Store {
        path: path.into(),
        source,
    };
    let text = serde_json::to_vec_pretty(value).map_err(|e| err(io::Error::other(e)))?;
    write_private(path, &text).map_err(err)
}
