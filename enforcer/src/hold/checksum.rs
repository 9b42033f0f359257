//! Completing TCP/UDP checksums of held frames before re-injection.
//!
//! A frame a VM (or a local socket on a veth) sends usually carries only the pseudo-header
//! part of its L4 checksum: the rest is left to checksum offload (CHECKSUM_PARTIAL), which the
//! host would have finished on the way out. A frame held by the XDP port program reaches the
//! buffer as raw bytes, that state lost ([`enforcer_common::HOLD_FROM_XDP`]), so the buffer
//! finishes the checksum itself before sending it on. (At tc the state travels with the frame
//! in its virtio-net header, so nothing is recomputed.) Encapsulated traffic's inner checksum
//! is not reached: a limit of the `xdp` attach mode.

/// Recomputes the TCP or UDP checksum of an Ethernet frame (optionally VLAN-tagged) carrying
/// IPv4 or IPv6. Returns whether it wrote one; other frames (ARP, fragments, extension
/// headers, UDP over IPv4 with the checksum switched off) are left as they are.
pub fn complete_l4_checksum(frame: &mut [u8]) -> bool {
    let mut l3 = 14;
    let mut ether_type = match frame.get(12..14) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => return false,
    };
    while ether_type == 0x8100 || ether_type == 0x88a8 {
        match frame.get(l3 + 2..l3 + 4) {
            Some(b) => ether_type = u16::from_be_bytes([b[0], b[1]]),
            None => return false,
        }
        l3 += 4;
    }
    let (proto, l4, l4_len, pseudo) = match ether_type {
        0x0800 => {
            let Some(ip) = frame.get(l3..l3 + 20) else {
                return false;
            };
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || fragmented || frame.len() < l3 + total
            {
                return false;
            }
            let proto = ip[9];
            let l4_len = total - ihl;
            let mut sum = sum_words(&ip[12..20]);
            sum += u32::from(proto) + l4_len as u32;
            (proto, l3 + ihl, l4_len, sum)
        }
        0x86dd => {
            let Some(ip) = frame.get(l3..l3 + 40) else {
                return false;
            };
            let l4_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip[0] >> 4 != 6 || frame.len() < l3 + 40 + l4_len {
                return false;
            }
            let proto = ip[6];
            let mut sum = sum_words(&ip[8..40]);
            sum += u32::from(proto) + l4_len as u32;
            (proto, l3 + 40, l4_len, sum)
        }
        _ => return false,
    };
    let offset = match proto {
        6 if l4_len >= 20 => 16,
        17 if l4_len >= 8 => {
            // Over IPv4 a zero UDP checksum means "none"; keep it so.
            if ether_type == 0x0800 && frame[l4 + 6..l4 + 8] == [0, 0] {
                return false;
            }
            6
        }
        _ => return false,
    };
    let segment = &mut frame[l4..l4 + l4_len];
    segment[offset] = 0;
    segment[offset + 1] = 0;
    let mut checksum = fold(pseudo + sum_words(segment));
    if proto == 17 && checksum == 0 {
        checksum = 0xffff;
    }
    segment[offset..offset + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

fn sum_words(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame captured from a real stack (IPv4/UDP, port 47300 → 47300, 16-byte payload), with
    /// its correct checksum 0x1d44 as computed by the sender's kernel.
    fn udp_v4() -> Vec<u8> {
        let mut f = vec![
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x02, 0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, 0x08,
            0x00, // eth
            0x45, 0x00, 0x00, 0x2c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x00,
            0x00, // ip (csum 0)
            10, 213, 0, 1, 10, 213, 0, 2, // addresses
            0xb8, 0xc4, 0xb8, 0xc4, 0x00, 0x18, 0xab, 0xcd, // udp, checksum to be fixed
        ];
        f.extend_from_slice(b"ENFC\0\0\0\x01\0\0\0\x07\0\0\0\x01");
        f
    }

    /// Independent check: the ones' complement sum over pseudo-header and segment of a frame
    /// with a correct checksum is 0xffff.
    fn verifies_v4(f: &[u8]) -> bool {
        let ip = &f[14..34];
        let seg = &f[34..];
        let sum = sum_words(&ip[12..20]) + u32::from(ip[9]) + seg.len() as u32 + sum_words(seg);
        fold(sum) == 0
    }

    #[test]
    fn completes_udp_over_ipv4() {
        let mut f = udp_v4();
        assert!(!verifies_v4(&f));
        assert!(complete_l4_checksum(&mut f));
        assert!(verifies_v4(&f), "checksum {:02x}{:02x}", f[40], f[41]);
    }

    #[test]
    fn completes_tcp_over_ipv4_behind_a_vlan_tag() {
        let mut f = vec![
            0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x81, 0x00, 0x00, 0x64, 0x08, 0x00,
        ];
        f.extend_from_slice(&[
            0x45,
            0,
            0,
            40 + 5,
            0,
            0,
            0x40,
            0,
            64,
            6,
            0,
            0,
            10,
            0,
            0,
            1,
            10,
            0,
            0,
            2,
        ]);
        f.extend_from_slice(&[
            0x1f, 0x90, 0xc0, 0x01, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0x12, 0x34, 0,
            0,
        ]);
        f.extend_from_slice(b"hello");
        assert!(complete_l4_checksum(&mut f));
        let untagged: Vec<u8> = f[..12].iter().chain(&f[16..]).copied().collect();
        assert!(verifies_v4(&untagged));
    }

    #[test]
    fn completes_udp_over_ipv6() {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 12, 17, 64]);
        f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 12, 0xde, 0xad, 1, 2, 3, 4]);
        assert!(complete_l4_checksum(&mut f));
        let seg = &f[54..];
        let sum = sum_words(&f[22..54]) + 17 + 12 + sum_words(seg);
        assert_eq!(fold(sum), 0);
    }

    #[test]
    fn leaves_other_frames_alone() {
        let arp = vec![0xffu8; 42];
        let mut a = arp.clone();
        assert!(!complete_l4_checksum(&mut a));
        assert_eq!(a, arp);
        let mut no_csum = udp_v4();
        no_csum[40] = 0;
        no_csum[41] = 0;
        assert!(
            !complete_l4_checksum(&mut no_csum),
            "IPv4 UDP without checksum stays without"
        );
        let mut fragment = udp_v4();
        fragment[20] = 0x20; // more fragments
        assert!(!complete_l4_checksum(&mut fragment));
        let mut truncated = udp_v4();
        truncated.truncate(30);
        assert!(!complete_l4_checksum(&mut truncated));
        assert!(!complete_l4_checksum(&mut [0u8; 5]));
    }
}
