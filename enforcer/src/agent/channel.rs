//! Channel state on this host (invariant 7 in docs/design.md): recording, while a group
//! snapshot runs, the frames delivered to its members after their cut that were sent before
//! their sender's (`enforcer_record` on each member's port, the buffer keeping the copies:
//! `hold::record`), and replaying them into restored VMs before they run.

use std::{collections::BTreeMap, time::Duration};

use enforcer_common::receiver_queue;

use super::{
    datapath::AgentDatapath,
    service::{Agent, AgentError},
};
use crate::{
    datapath::{DatapathError, epochs::EpochError},
    hold::{RecordedFrame, Recording, Replayed, replay_into},
    model::MacAddr,
};

impl<D: AgentDatapath> Agent<D> {
    /// The hold queue (`receiver_queue`) and port of a VM registered on this host; `None` for
    /// a VM on another host (its own host records it).
    fn record_target(&self, mac: MacAddr) -> Result<Option<(u32, u32)>, AgentError> {
        let vm = self
            .datapath()
            .vm(&mac.key())?
            .ok_or(EpochError::UnknownVm(mac))?;
        Ok((!vm.is_remote()).then_some((receiver_queue(vm.slot), vm.ifindex)))
    }

    /// Starts recording the channel state of these VMs (those of this host): their buffer
    /// recordings are armed, then `enforcer_record` is attached to their ports. A VM already
    /// recording keeps what it has. Nothing is left attached when it fails.
    pub fn record_begin(&self, macs: &[MacAddr]) -> Result<(), AgentError> {
        let buffer = self.buffer_handle()?;
        let mut targets = Vec::new();
        for mac in macs {
            if let Some((queue, ifindex)) = self.record_target(*mac)? {
                targets.push((*mac, queue, ifindex));
            }
        }
        // Armed first: a copy that comes for no recording is dropped.
        if !buffer.record_arm(targets.iter().map(|(_, q, _)| *q).collect()) {
            return Err(AgentError::BufferSilent);
        }
        let mut links = Vec::new();
        for (mac, _, ifindex) in &targets {
            match self.datapath().attach_record(*ifindex) {
                Ok(link) => links.push((*mac, link)),
                Err(e) => {
                    // The links made so far are dropped (detached), the recordings taken back.
                    drop(links);
                    let queues = targets.iter().map(|(_, q, _)| *q).collect();
                    let _ = buffer.record_take(queues, Duration::from_secs(10));
                    return Err(e.into());
                }
            }
        }
        self.recording.lock().expect("recording lock").extend(links);
        Ok(())
    }

    /// Stops recording for these VMs (those of this host) and hands over what was recorded for
    /// each: `enforcer_record` is detached first, then the buffer answers once every copy
    /// handed over before has come (or is known lost). `timeout`: how long the buffer may take.
    pub fn record_end(
        &self,
        macs: &[MacAddr],
        timeout: Duration,
    ) -> Result<BTreeMap<MacAddr, Recording>, AgentError> {
        {
            let mut links = self.recording.lock().expect("recording lock");
            for mac in macs {
                links.remove(mac);
            }
        }
        let buffer = self.buffer_handle()?;
        // Every member still registered here: one gone meanwhile (its recording is dropped
        // when a later snapshot arms its slot again) does not keep the others armed.
        let mut queues = BTreeMap::new();
        for mac in macs {
            if let Ok(Some((queue, _))) = self.record_target(*mac) {
                queues.insert(queue, *mac);
            }
        }
        let taken = buffer
            .record_take(queues.keys().copied().collect(), timeout)
            .ok_or(AgentError::BufferSilent)?;
        Ok(taken
            .into_iter()
            .filter_map(|(queue, recording)| Some((*queues.get(&queue)?, recording)))
            .collect())
    }

    /// Replays recorded frames into the VM behind `port` (restored and not yet running): out of
    /// the port toward the VM, in order, into the queue it reads once it runs. The port's
    /// queue is made long enough for them first.
    pub fn replay(&self, port: &str, frames: &[RecordedFrame]) -> Result<Replayed, AgentError> {
        let ifindex = self.datapath().ifindex(port)?;
        let io = |e: std::io::Error| {
            AgentError::Datapath(DatapathError::Link {
                port: port.to_owned(),
                detail: format!("replaying channel state: {e}"),
            })
        };
        ensure_queue_len(port, frames.len() as u32 + 64).map_err(io)?;
        let dropped_before = tx_dropped(port);
        let sent = replay_into(ifindex, frames).map_err(|(sent, e)| {
            io(std::io::Error::new(
                e.kind(),
                format!("{sent} of {} frames sent, then: {e}", frames.len()),
            ))
        })? as u64;
        Ok(Replayed {
            sent,
            dropped: tx_dropped(port).saturating_sub(dropped_before),
        })
    }
}

/// The port's transmit-side drops so far (`/sys/class/net/<port>/statistics/tx_dropped`).
fn tx_dropped(port: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{port}/statistics/tx_dropped"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes `port`'s transmit queue (for a tap: its ring of frames toward the VM) at least `len`
/// frames long (`SIOCSIFTXQLEN`).
fn ensure_queue_len(port: &str, len: u32) -> std::io::Result<()> {
    let now: u32 = std::fs::read_to_string(format!("/sys/class/net/{port}/tx_queue_len"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other("unreadable tx_queue_len"))?;
    if now >= len {
        return Ok(());
    }
    // SAFETY: a plain datagram socket for the ioctl, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid starting value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(port.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_metric = len as libc::c_int;
    // SAFETY: SIOCSIFTXQLEN reads the name and the length from `req`, which outlives the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCSIFTXQLEN,
            &req as *const libc::ifreq,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
