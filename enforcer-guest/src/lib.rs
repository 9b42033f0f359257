//! What the guest test application and the host agree on: the message formats on the wire and
//! the counters the application reports on its control port.
//!
//! Every guest sends numbered messages to every peer, over UDP and over one TCP stream per
//! direction. A restored group is consistent when no VM remembers receiving a message its
//! sender's image never sent (DESIGN.md invariant 1). The guests detect a breach themselves, as
//! soon as the restored sender sends again:
//! - UDP: the sender numbers on from its own image's count, so a message the receiver already
//!   has arrives a second time (a `udp_rewinds` count: seq ≤ the highest seen);
//! - TCP: every message carries the sender's running checksum of the stream so far and a fresh
//!   nonce; a sender that re-sends what the receiver already has produces different bytes, so the
//!   receiver's running checksum stops matching (`tcp_checksum_errors`), or the stream stalls.

use serde::{Deserialize, Serialize};

/// Control port: a line `stats`, `quiet` or `talk` in, one JSON line out.
pub const CONTROL_PORT: u16 = 7000;
/// TCP data port: one stream per direction of every pair.
pub const TCP_PORT: u16 = 7100;
/// UDP data port.
pub const UDP_PORT: u16 = 7101;

pub const TCP_MESSAGE_LEN: usize = 64;
pub const UDP_MESSAGE_LEN: usize = 32;
const MAGIC_TCP: u32 = u32::from_be_bytes(*b"ENFT");
const MAGIC_UDP: u32 = u32::from_be_bytes(*b"ENFU");

/// One message of a TCP stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpMessage {
    pub seq: u64,
    /// Differs between two executions of the same program point (a restored VM re-sending).
    pub nonce: u64,
    /// The sender's running checksum of every message before this one.
    pub prev_checksum: u64,
}

impl TcpMessage {
    pub fn encode(&self) -> [u8; TCP_MESSAGE_LEN] {
        let mut b = [0u8; TCP_MESSAGE_LEN];
        b[0..4].copy_from_slice(&MAGIC_TCP.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.nonce.to_be_bytes());
        b[24..32].copy_from_slice(&self.prev_checksum.to_be_bytes());
        // The rest repeats the nonce, so the checksum covers more than the header.
        for chunk in b[32..].chunks_mut(8) {
            chunk.copy_from_slice(&self.nonce.rotate_left(13).to_be_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; TCP_MESSAGE_LEN]) -> Option<Self> {
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        (u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")) == MAGIC_TCP).then(|| Self {
            seq: u64_at(8),
            nonce: u64_at(16),
            prev_checksum: u64_at(24),
        })
    }
}

/// One UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpMessage {
    pub seq: u64,
    pub nonce: u64,
}

impl UdpMessage {
    pub fn encode(&self) -> [u8; UDP_MESSAGE_LEN] {
        let mut b = [0u8; UDP_MESSAGE_LEN];
        b[0..4].copy_from_slice(&MAGIC_UDP.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.nonce.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != UDP_MESSAGE_LEN
            || u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")) != MAGIC_UDP
        {
            return None;
        }
        Some(Self {
            seq: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            nonce: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// The record the guest keeps on its disk (first 512-byte sector): a generation the guest
/// increments with every write, so memory and disk can be compared after a restore.
pub const DISK_RECORD_LEN: usize = 512;
const MAGIC_DISK: u32 = u32::from_be_bytes(*b"ENFD");

pub fn encode_disk_record(generation: u64) -> [u8; DISK_RECORD_LEN] {
    let mut b = [0u8; DISK_RECORD_LEN];
    b[0..4].copy_from_slice(&MAGIC_DISK.to_be_bytes());
    b[8..16].copy_from_slice(&generation.to_be_bytes());
    b
}

/// The generation on disk; 0 for a blank disk.
pub fn decode_disk_record(b: &[u8]) -> Option<u64> {
    if b.len() < 16 {
        return None;
    }
    if b[..16].iter().all(|x| *x == 0) {
        return Some(0);
    }
    (u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")) == MAGIC_DISK)
        .then(|| u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")))
}

/// Whether the disk and the guest's memory are from one instant. The guest writes generation
/// g+1, syncs, and only then remembers g+1: stopped between the two, the disk may be one ahead
/// of memory, never more, and never behind. A disk captured after the memory (while the VM ran
/// on) is ahead by more; one captured before it is behind.
pub fn disk_matches_memory(on_disk: u64, in_memory: u64) -> bool {
    on_disk == in_memory || on_disk == in_memory + 1
}

/// FNV-1a, continued over a stream.
pub fn checksum(prev: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(prev, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The checksum of an empty stream.
pub const CHECKSUM_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Counters of one peer, as this guest sees them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStats {
    pub peer: String,
    pub udp_sent: u64,
    pub udp_received: u64,
    /// Highest seq received.
    pub udp_max_seq: u64,
    /// Datagrams whose seq was not above the highest already received: the sender forgot
    /// sending what this guest received (or the network reordered/duplicated it).
    pub udp_rewinds: u64,
    /// Messages written whole into the stream towards the peer.
    pub tcp_sent: u64,
    pub tcp_sent_checksum: u64,
    pub tcp_received: u64,
    pub tcp_received_checksum: u64,
    /// A message whose seq was not the next one.
    pub tcp_seq_errors: u64,
    /// A message whose sender's checksum differs from ours over the same stream.
    pub tcp_checksum_errors: u64,
    /// Outgoing streams this guest has opened to the peer (1 when it never broke).
    pub tcp_connects: u64,
}

/// What the control port answers to `stats`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestStats {
    pub ip: String,
    /// False after `quiet`: no new messages are sent.
    pub talking: bool,
    pub peers: Vec<PeerStats>,
    /// The disk record's generation as the guest remembers it (0 without a disk).
    #[serde(default)]
    pub disk_generation: u64,
    /// Times the disk held another generation than memory allowed (see
    /// [`disk_matches_memory`]).
    #[serde(default)]
    pub disk_mismatches: u64,
}

impl GuestStats {
    pub fn peer(&self, ip: &str) -> Option<&PeerStats> {
        self.peers.iter().find(|p| p.peer == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_foreign_bytes() {
        let m = TcpMessage {
            seq: 7,
            nonce: 0xdead_beef,
            prev_checksum: 42,
        };
        assert_eq!(TcpMessage::decode(&m.encode()), Some(m));
        assert_eq!(TcpMessage::decode(&[0u8; TCP_MESSAGE_LEN]), None);
        let u = UdpMessage { seq: 9, nonce: 1 };
        assert_eq!(UdpMessage::decode(&u.encode()), Some(u));
        assert_eq!(UdpMessage::decode(&u.encode()[..31]), None);
    }

    #[test]
    fn disk_records_round_trip_and_the_memory_check_tolerates_one_write_in_flight() {
        assert_eq!(decode_disk_record(&encode_disk_record(41)), Some(41));
        assert_eq!(decode_disk_record(&[0u8; DISK_RECORD_LEN]), Some(0));
        assert_eq!(decode_disk_record(&[7u8; DISK_RECORD_LEN]), None);
        assert!(disk_matches_memory(5, 5));
        assert!(
            disk_matches_memory(6, 5),
            "written and synced, not yet remembered"
        );
        assert!(!disk_matches_memory(8, 5), "disk captured after memory");
        assert!(!disk_matches_memory(4, 5), "disk captured before memory");
    }

    #[test]
    fn a_different_nonce_changes_the_running_checksum() {
        let a = TcpMessage {
            seq: 1,
            nonce: 1,
            prev_checksum: CHECKSUM_START,
        };
        let b = TcpMessage { nonce: 2, ..a };
        assert_ne!(
            checksum(CHECKSUM_START, &a.encode()),
            checksum(CHECKSUM_START, &b.encode())
        );
    }
}
