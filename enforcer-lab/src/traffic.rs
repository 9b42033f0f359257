//! Sequence-numbered UDP traffic between lab VMs, and the phased scenario the demo runs: every
//! VM sends to every peer, then one VM advances, and so on, and each receiver checks that it
//! never got a frame coloured above its own epoch (invariant 1, checked at the receiver).

use std::{
    future::Future,
    io::ErrorKind,
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use crate::netns::{Lab, LabError};

pub const MESH_PORT: u16 = 47_000;
const MAGIC: u32 = 0x454e_4643; // "ENFC"

/// One numbered message; `color` is the sender's epoch when it sent it, as the sender knew it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: u16,
    pub to: u16,
    pub seq: u32,
    pub color: u32,
}

impl Message {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.from.to_be_bytes());
        b[6..8].copy_from_slice(&self.to.to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..16].copy_from_slice(&self.color.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN || b[0..4] != MAGIC.to_be_bytes() {
            return None;
        }
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Self {
            from: u16_at(4),
            to: u16_at(6),
            seq: u32_at(8),
            color: u32_at(12),
        })
    }
}

/// A UDP socket in every VM of a lab.
pub struct Mesh {
    sockets: Vec<UdpSocket>,
    addrs: Vec<SocketAddrV4>,
}

impl Mesh {
    pub fn new(lab: &Lab) -> Result<Self, LabError> {
        let mut sockets = Vec::new();
        for i in 0..lab.vms.len() {
            let socket = lab.udp_socket(i, MESH_PORT)?;
            socket
                .set_nonblocking(true)
                .map_err(|source| LabError::Socket {
                    netns: lab.vms[i].netns.clone(),
                    source,
                })?;
            sockets.push(socket);
        }
        let addrs = lab
            .vms
            .iter()
            .map(|vm| SocketAddrV4::new(vm.ip, MESH_PORT))
            .collect();
        Ok(Self { sockets, addrs })
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Sends one message; a frame dropped by the datapath is still "sent" (UDP does not know).
    pub fn send(&self, msg: Message) -> std::io::Result<()> {
        loop {
            match self.sockets[msg.from as usize]
                .send_to(&msg.encode(), self.addrs[msg.to as usize])
            {
                Ok(_) => return Ok(()),
                // The socket buffer is full: wait for the stack to drain it, never lose a send.
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Every message waiting at `vm` now.
    pub fn drain(&self, vm: usize) -> Vec<Message> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = self.sockets[vm].recv_from(&mut buf) {
            if let Some(msg) = Message::decode(&buf[..n]) {
                out.push(msg);
            }
        }
        out
    }

    /// Collects what arrives at every VM until `quiet` passes with nothing new (or `max`).
    pub fn collect(&self, quiet: Duration, max: Duration) -> Vec<Vec<Message>> {
        let mut got: Vec<Vec<Message>> = vec![Vec::new(); self.len()];
        let start = Instant::now();
        let mut last_new = Instant::now();
        while last_new.elapsed() < quiet && start.elapsed() < max {
            let mut any = false;
            for (vm, inbox) in got.iter_mut().enumerate() {
                let batch = self.drain(vm);
                any |= !batch.is_empty();
                inbox.extend(batch);
            }
            if any {
                last_new = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        got
    }
}

/// What one sender→receiver pair did in one phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairResult {
    pub from: usize,
    pub to: usize,
    pub color: u32,
    pub receiver_epoch: u32,
    pub sent: u32,
    pub delivered: u32,
    /// Delivered frames coloured above the receiver's epoch: must always be 0.
    pub type3_delivered: u32,
    /// Delivered out of order or twice.
    pub reordered: u32,
}

#[derive(Clone, Debug)]
pub struct PhaseResult {
    pub title: String,
    pub epochs: Vec<u32>,
    pub pairs: Vec<PairResult>,
}

/// Sends `per_pair` numbered messages between every ordered pair, with every VM at the epoch
/// in `epochs`, and reports what each receiver got.
pub fn exchange(
    mesh: &Mesh,
    epochs: &[u32],
    per_pair: u32,
    title: &str,
) -> std::io::Result<PhaseResult> {
    let n = mesh.len();
    for seq in 0..per_pair {
        for (from, color) in epochs.iter().copied().enumerate().take(n) {
            for to in (0..n).filter(|to| *to != from) {
                mesh.send(Message {
                    from: from as u16,
                    to: to as u16,
                    seq,
                    color,
                })?;
            }
        }
    }
    let inboxes = mesh.collect(Duration::from_millis(150), Duration::from_secs(5));
    let mut pairs = Vec::new();
    for from in 0..n {
        for to in (0..n).filter(|to| *to != from) {
            let got: Vec<&Message> = inboxes[to]
                .iter()
                .filter(|m| m.from as usize == from)
                .collect();
            let mut reordered = 0;
            let mut next = None::<u32>;
            for m in &got {
                if next.is_some_and(|n| m.seq < n) {
                    reordered += 1;
                }
                next = Some(m.seq + 1);
            }
            pairs.push(PairResult {
                from,
                to,
                color: epochs[from],
                receiver_epoch: epochs[to],
                sent: per_pair,
                delivered: got.len() as u32,
                type3_delivered: got.iter().filter(|m| m.color > epochs[to]).count() as u32,
                reordered,
            });
        }
    }
    Ok(PhaseResult {
        title: title.to_owned(),
        epochs: epochs.to_vec(),
        pairs,
    })
}

/// The phased scenario: all VMs at epoch 0, then each VM of `order` advances in turn, with an
/// exchange in every phase. `advance(vm)` moves a VM's epoch in the datapath.
pub async fn run_phases<F, Fut, E>(
    mesh: &Mesh,
    order: &[usize],
    per_pair: u32,
    names: &[String],
    mut advance: F,
) -> Result<Vec<PhaseResult>, E>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<std::io::Error>,
{
    let mut epochs = vec![0u32; mesh.len()];
    let mut phases = vec![exchange(mesh, &epochs, per_pair, "every VM at epoch 0")?];
    for &vm in order {
        advance(vm).await?;
        epochs[vm] += 1;
        let title = format!("{} advanced to epoch {}", names[vm], epochs[vm]);
        phases.push(exchange(mesh, &epochs, per_pair, &title)?);
    }
    Ok(phases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_roundtrip_and_rejects_foreign_bytes() {
        let m = Message {
            from: 2,
            to: 0,
            seq: 77,
            color: 3,
        };
        assert_eq!(Message::decode(&m.encode()), Some(m));
        assert_eq!(Message::decode(&[0u8; 16]), None);
        assert_eq!(Message::decode(&m.encode()[..15]), None);
    }
}
