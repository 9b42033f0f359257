//! The color on the wire between hosts.
//!
//! Hosts are joined by a VXLAN overlay with Group Based Policy (`gbp`): the kernel fills the
//! header's 16-bit Group Policy ID from `skb->mark` when it encapsulates, and sets `skb->mark`
//! from it when it decapsulates. The port program marks each delivered frame of a local group
//! member with its color; the program on the overlay port of the receiving host reads it back.
//!
//! Encoding: bit 15 says a color is present, bits 0–14 are the color modulo 2^15. The receiving
//! host restores the full 32-bit color from its view of the sender with serial-number
//! arithmetic (RFC 1982): sound while the color is within 2^14 of the view, and the members of
//! a group are never more than one epoch apart.

/// Bit 15 of the Group Policy ID: a color is present.
pub const WIRE_PRESENT: u32 = 0x8000;
/// Bits 0–14: the color modulo 2^15.
pub const WIRE_COLOR: u32 = 0x7fff;
const HALF: u32 = 0x4000;

/// The mark that carries `color`.
#[inline(always)]
pub const fn encode(color: u32) -> u32 {
    WIRE_PRESENT | (color & WIRE_COLOR)
}

/// The color a received `mark` carries, restored next to `reference` (this host's view of the
/// sender); `None` when the mark carries no color, or one that would fall below zero.
#[inline(always)]
pub const fn decode(mark: u32, reference: u32) -> Option<u32> {
    if mark & WIRE_PRESENT == 0 {
        return None;
    }
    let diff = (mark & WIRE_COLOR).wrapping_sub(reference) & WIRE_COLOR;
    if diff < HALF {
        reference.checked_add(diff)
    } else {
        reference.checked_sub(WIRE_COLOR + 1 - diff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colors_survive_the_wire_near_the_view() {
        for view in [
            0u32,
            1,
            7,
            0x7ffe,
            0x7fff,
            0x8000,
            0x1_0000,
            123_456,
            u32::MAX - 3,
        ] {
            for delta in [-3i64, -1, 0, 1, 2, 100] {
                let color = view as i64 + delta;
                if color < 0 || color > u32::MAX as i64 {
                    continue;
                }
                let color = color as u32;
                assert_eq!(
                    decode(encode(color), view),
                    Some(color),
                    "view {view} color {color}"
                );
            }
        }
    }

    #[test]
    fn no_color_without_the_present_bit() {
        assert_eq!(decode(0, 5), None);
        assert_eq!(decode(0x7fff, 5), None);
        // A color below zero is not a color.
        assert_eq!(decode(encode(u32::MAX), 0), None);
    }

    #[test]
    fn other_mark_bits_do_not_disturb_the_color() {
        // GBP's "don't learn" and "policy applied" flags live in bits 22 and 19.
        assert_eq!(decode(encode(9) | 1 << 22 | 1 << 19, 8), Some(9));
    }

    /// Any mark and any view (fuzzing the overlay's color decoding, issue 11 item 6): never a
    /// panic; a color, when there is one, within 2^14 of the view; and every color within
    /// 2^14 of the view comes back exactly.
    #[test]
    fn decoding_any_mark_next_to_any_view_stays_near_the_view() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(2000), |(mark: u32, view: u32, delta in -0x3fffi64..0x4000)| {
            if let Some(color) = decode(mark, view) {
                prop_assert!((i64::from(color) - i64::from(view)).abs() <= i64::from(HALF));
                prop_assert!(mark & WIRE_PRESENT != 0);
                prop_assert_eq!(color & WIRE_COLOR, mark & WIRE_COLOR);
            }
            let color = i64::from(view) + delta;
            if (0..=i64::from(u32::MAX)).contains(&color) {
                prop_assert_eq!(decode(encode(color as u32), view), Some(color as u32));
            }
        });
    }
}
