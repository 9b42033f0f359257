//! Colors learned from other hosts' frames, applied without a buffer: a small thread reads the
//! `learned` ring and raises the views through the agent's one epoch-change path. (With a
//! buffer, the buffer thread consumes the ring itself: it must know a held frame's color
//! before it queues it.)

use std::{
    sync::{Weak, atomic::Ordering},
    thread,
};

use tracing::{debug, warn};

use super::{datapath::AgentDatapath, service::Agent};
use crate::hold::learn::LearnedRing;

/// Raises the views from a thread of the agent, through the same path as every epoch change.
/// Ends when the agent is dropped.
pub fn spawn_without_buffer<D: AgentDatapath>(mut ring: LearnedRing, agent: Weak<Agent<D>>) {
    thread::Builder::new()
        .name("learned-epochs".into())
        .spawn(move || {
            loop {
                let mut pfd = libc::pollfd {
                    fd: ring.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 200) };
                let Some(agent) = agent.upgrade() else {
                    return;
                };
                for (mac, epoch) in ring.drain() {
                    match agent.change_epoch_reporting(mac.into(), Some(epoch), true) {
                        Ok(c) if c.changed => {
                            ring.applied.fetch_add(1, Ordering::Relaxed);
                            debug!(mac = %c.vm.mac, epoch, "view raised from a frame's color");
                        }
                        Ok(_) => {}
                        Err(err) => warn!(%err, "raising a learned view"),
                    }
                }
            }
        })
        .expect("spawning the learned-epochs thread");
}
