//! The coordinator: the snapshot store it runs over, its named groups, the claims that keep a
//! group to one transaction at a time, and the snapshots in progress. The transaction itself
//! ([`super::transaction`]), restores ([`super::restore`]), groups ([`super::groups`]) and the
//! store's files ([`super::store`]) are its methods, each in its own file.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    backends::{EpochControl, EpochControlError, HvError, Hypervisor},
    manifest::{Live, SnapshotOutcome},
};
use crate::model::{GroupName, GroupSpec, NameError, SnapshotId};

#[derive(Clone, Debug)]
pub struct Timeouts {
    /// From `begin` to the VM stopped at its snapshot point.
    pub pause: Duration,
    /// From the advance to the image complete.
    pub complete: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            pause: Duration::from_secs(120),
            complete: Duration::from_secs(60),
        }
    }
}

/// Why a group cannot be defined (or restored) as asked.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("a domain is listed twice")]
    ListedTwice,
    #[error("domain {domain} already belongs to group {group}")]
    DomainTaken { domain: String, group: GroupName },
    #[error("group id {0} is taken")]
    IdTaken(u32),
    #[error("datapath group id {id} now belongs to group {group}")]
    IdNowBelongsTo { id: u32, group: GroupName },
    #[error("group id {0} is out of range: group ids go from 0 to {max}", max = enforcer_common::MAX_GROUPS - 1)]
    IdOutOfRange(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("snapshot store {path}: {source}")]
    Store { path: PathBuf, source: io::Error },
    #[error("group {0} has no VMs")]
    EmptyGroup(GroupName),
    #[error("no group {0}")]
    UnknownGroup(GroupName),
    #[error("group {0} already exists")]
    GroupExists(GroupName),
    #[error("bad group: {0}")]
    BadGroup(#[from] GroupError),
    #[error("group {group} is busy with {by}")]
    Busy { group: GroupName, by: String },
    #[error("no snapshot {0}")]
    UnknownSnapshot(String),
    #[error("snapshot {id} was {outcome}: only committed snapshots can be restored")]
    NotRestorable {
        id: SnapshotId,
        outcome: SnapshotOutcome,
    },
    #[error(
        "the VMs of group {group} are not at one epoch ({epochs:?}): finish or abort the last snapshot first"
    )]
    Inconsistent { group: GroupName, epochs: Vec<u32> },
    #[error("datapath: {vm}: {source}", vm = .vm.as_deref().unwrap_or("the group"))]
    Epochs {
        vm: Option<String>,
        source: EpochControlError,
    },
    #[error("{0}")]
    Hypervisor(#[from] HvError),
}

impl CoordinatorError {
    /// A datapath failure about one VM.
    pub(crate) fn epochs(vm: &str, source: EpochControlError) -> Self {
        Self::Epochs {
            vm: Some(vm.to_owned()),
            source,
        }
    }
}

impl From<EpochControlError> for CoordinatorError {
    fn from(source: EpochControlError) -> Self {
        Self::Epochs { vm: None, source }
    }
}

/// Runs snapshot transactions over a hypervisor and a datapath, and keeps their manifests,
/// journals and the named groups (`groups.json`) under `store`. `H` and `E` may be trait
/// objects ([`super::Snapshots`]).
pub struct Coordinator<H: Hypervisor + ?Sized, E: EpochControl + ?Sized> {
    pub(crate) hypervisor: Arc<H>,
    pub(crate) epochs: Arc<E>,
    pub(crate) store: PathBuf,
    pub(crate) timeouts: Timeouts,
    /// Group → what keeps it busy (a snapshot id, a restore, its definition).
    busy: Mutex<HashMap<GroupName, String>>,
    pub(crate) live: Mutex<HashMap<SnapshotId, Live>>,
    pub(crate) groups: Mutex<Vec<GroupSpec>>,
}

impl<H: Hypervisor + ?Sized + 'static, E: EpochControl + ?Sized + 'static> Coordinator<H, E> {
    /// Opens the store; a transaction a previous coordinator left unfinished is aborted first
    /// (its VMs resumed, epochs rolled back, images discarded) and recorded as aborted.
    pub fn open(
        hypervisor: Arc<H>,
        epochs: Arc<E>,
        store: &Path,
        timeouts: Timeouts,
    ) -> Result<Self, CoordinatorError> {
        super::private::private_dir(store).map_err(|source| CoordinatorError::Store {
            path: store.into(),
            source,
        })?;
        let groups = match fs::read_to_string(store.join("groups.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CoordinatorError::Store {
                path: store.join("groups.json"),
                source: io::Error::other(e),
            })?,
            Err(_) => Vec::new(),
        };
        let c = Self {
            hypervisor,
            epochs,
            store: store.into(),
            timeouts,
            busy: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            groups: Mutex::new(groups),
        };
        c.recover()?;
        c.recover_restores();
        Ok(c)
    }

    pub fn hypervisor(&self) -> &H {
        &self.hypervisor
    }

    pub fn epochs(&self) -> &E {
        &self.epochs
    }

    /// Where snapshots (images, manifests), the journals and the groups live.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Claims a group for one piece of work (`what`, shown to whoever finds it busy);
    /// [`CoordinatorError::Busy`] when it is claimed already. Freed when the claim drops.
    pub(crate) fn claim(
        &self,
        group: &GroupName,
        what: &str,
    ) -> Result<Claim<'_, H, E>, CoordinatorError> {
        let mut busy = self.busy.lock().expect("busy lock");
        if let Some(by) = busy.get(group) {
            return Err(CoordinatorError::Busy {
                group: group.clone(),
                by: by.clone(),
            });
        }
        busy.insert(group.clone(), what.into());
        Ok(Claim(self, group.clone()))
    }

    /// What holds `group` now (a snapshot, a restore, its definition), if anything.
    pub fn busy_with(&self, group: &GroupName) -> Option<String> {
        self.busy.lock().expect("busy lock").get(group).cloned()
    }

    /// Says what a claimed group is busy with now.
    pub(crate) fn relabel_claim(&self, group: &GroupName, what: &str) {
        if let Some(by) = self.busy.lock().expect("busy lock").get_mut(group) {
            *by = what.into();
        }
    }
}

/// A group claimed by [`Coordinator::claim`]; freed when dropped.
pub(crate) struct Claim<'a, H: Hypervisor + ?Sized, E: EpochControl + ?Sized>(
    &'a Coordinator<H, E>,
    GroupName,
);

impl<H: Hypervisor + ?Sized, E: EpochControl + ?Sized> Claim<'_, H, E> {
    /// Keeps the group claimed past this guard: a prepared snapshot holds its group until
    /// [`Coordinator::resume_claim`] takes the claim over when it runs.
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

impl<H: Hypervisor + ?Sized, E: EpochControl + ?Sized> Coordinator<H, E> {
    /// The guard of a claim kept by [`Claim::keep`].
    pub(crate) fn resume_claim(&self, group: &GroupName) -> Claim<'_, H, E> {
        Claim(self, group.clone())
    }
}

impl<H: Hypervisor + ?Sized, E: EpochControl + ?Sized> Drop for Claim<'_, H, E> {
    fn drop(&mut self) {
        self.0.busy.lock().expect("busy lock").remove(&self.1);
    }
}
