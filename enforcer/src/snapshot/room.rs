//! Room in the store for a snapshot's images, checked before anything is written (case S8 of
//! the security review): a store that fills up mid-snapshot aborts it late, and usually shares
//! its filesystem with the VMs' disks, which then fail writes too. Each host's hypervisor
//! estimates a VM's image before `begin` goes further and keeps what it promised to snapshots
//! in progress, so two VMs on one host are not both given the same free space.
//!
//! The estimate: the VM's memory as configured (an image holds at most every page, plus
//! device state: [`IMAGE_MARGIN`]), and for pre-copy the space its disk copies take (what the
//! files have allocated). Instant snapshots put overlays beside the disks, not in the store.

/// Device state and the image's header, beyond the guest's memory.
pub const IMAGE_MARGIN: u64 = 16 << 20;

/// Why a snapshot does not fit, for people: the numbers the check used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the store has {} free, {} of it promised to snapshots in progress; this image needs about {} ({what})",
    gib(*free), gib(*promised), gib(*need)
)]
pub struct NoRoom {
    pub free: u64,
    pub promised: u64,
    pub need: u64,
    pub what: String,
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// Whether `need` more bytes fit in `free` beside `promised`, keeping a tenth of what is free
/// for everything else on the filesystem.
pub fn check(free: u64, promised: u64, need: u64, what: &str) -> Result<(), NoRoom> {
    let usable = free - free / 10;
    if promised.saturating_add(need) <= usable {
        Ok(())
    } else {
        Err(NoRoom {
            free,
            promised,
            need,
            what: what.to_owned(),
        })
    }
}

/// A VM's image estimate in bytes: `memory_kib` (as libvirt counts it) plus the margin, and
/// `disk_bytes` when its disks are copied into the store (pre-copy).
pub fn estimate(memory_kib: u64, disk_bytes: u64) -> u64 {
    memory_kib
        .saturating_mul(1024)
        .saturating_add(IMAGE_MARGIN)
        .saturating_add(disk_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn an_image_fits_only_beside_what_is_promised_with_a_tenth_kept() {
        assert!(check(10 * GIB, 0, 9 * GIB, "m").is_ok());
        assert!(check(10 * GIB, 0, 9 * GIB + 1, "m").is_err());
        // Two VMs of 5 GiB on a store with 10 GiB free: the second does not get the same space.
        assert!(check(10 * GIB, 5 * GIB, 4 * GIB, "m").is_ok());
        let err = check(10 * GIB, 5 * GIB, 5 * GIB, "memory 5 GiB").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the store has 10.00 GiB free, 5.00 GiB of it promised to snapshots in progress; \
             this image needs about 5.00 GiB (memory 5 GiB)"
        );
        assert!(check(0, 0, 1, "m").is_err());
        assert!(check(u64::MAX, u64::MAX, 1, "m").is_err(), "no overflow");
    }

    #[test]
    fn the_estimate_is_memory_and_margin_and_copied_disks() {
        assert_eq!(estimate(1024 * 1024, 0), GIB + IMAGE_MARGIN);
        assert_eq!(estimate(0, 3 * GIB), IMAGE_MARGIN + 3 * GIB);
        assert_eq!(estimate(u64::MAX, u64::MAX), u64::MAX);
    }
}
