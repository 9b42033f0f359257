//! The outcomes of one frame on a VM port, in one list: each has a verdict, a stable name (the
//! API's, the CLI's and `/metrics`'), and a counter of its own in `PortCounters` (cilium's
//! `drop_reasons.h` rule: one list, compiled into the kernel programs and userspace alike).

/// What happened to one frame; each outcome has its own counter in `PortCounters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Type1,
    Type2,
    Type3Held,
    Type3Dropped,
    Type3Unbuffered,
    Type3Monitored,
    OutsideGroup,
    Unregistered,
    ForeignSource,
    Malformed,
    HeldForOrder,
    /// A VM on another host's frame with a wire color above what it may carry
    /// ([`crate::VmEpoch::may_carry`]): forged, dropped.
    ForgedColor,
}

/// The action the program takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Hand to the buffer daemon (AF_XDP), to be re-injected after the receiver advances.
    Hold,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Type1,
        Outcome::Type2,
        Outcome::Type3Held,
        Outcome::Type3Dropped,
        Outcome::Type3Unbuffered,
        Outcome::Type3Monitored,
        Outcome::OutsideGroup,
        Outcome::Unregistered,
        Outcome::ForeignSource,
        Outcome::Malformed,
        Outcome::HeldForOrder,
        Outcome::ForgedColor,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Outcome::Type1
            | Outcome::Type2
            | Outcome::Type3Monitored
            | Outcome::OutsideGroup
            | Outcome::Unregistered => Verdict::Pass,
            Outcome::Type3Held | Outcome::HeldForOrder => Verdict::Hold,
            Outcome::Type3Dropped
            | Outcome::Type3Unbuffered
            | Outcome::ForeignSource
            | Outcome::Malformed
            | Outcome::ForgedColor => Verdict::Drop,
        }
    }

    /// Stable snake_case name, used in the API, the CLI and `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Type1 => "type1",
            Outcome::Type2 => "type2",
            Outcome::Type3Held => "type3_held",
            Outcome::Type3Dropped => "type3_dropped",
            Outcome::Type3Unbuffered => "type3_unbuffered",
            Outcome::Type3Monitored => "type3_monitored",
            Outcome::OutsideGroup => "outside_group",
            Outcome::Unregistered => "unregistered",
            Outcome::ForeignSource => "foreign_source",
            Outcome::Malformed => "malformed",
            Outcome::HeldForOrder => "held_for_order",
            Outcome::ForgedColor => "forged_color",
        }
    }
}
