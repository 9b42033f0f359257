//! Tier 1: the real programs (tc and xdp) run through BPF_PROG_TEST_RUN on crafted frames.
//! Each case checks the verdict and that exactly the right per-port counter moved.

use enforcer::{
    datapath::{AttachMode, Datapath, epochs},
    model::MacAddr,
};
use enforcer_common::{
    GroupState, MacKey, Outcome, PortCounters, Type3Mode, VmEpoch,
    classify::{DatapathView, decide},
};
use enforcer_tests::{PinRoot, frame, require_root, test_run};

/// Without a context, BPF_PROG_TEST_RUN runs the program as if on the loopback device.
const LO_IFINDEX: u32 = 1;
const ALICE: [u8; 6] = [0x02, 0, 0, 0, 0xa1, 0x01]; // registered on lo: the sender
const BOB: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x02]; // same group, another port
const CAROL: [u8; 6] = [0x02, 0, 0, 0, 0xca, 0x03]; // another group
const STRANGER: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x99]; // never registered
const BROADCAST: [u8; 6] = [0xff; 6];
const IPV4: u16 = 0x0800;

/// The tc program passes a frame on to the next program or filter on the port (`TCX_NEXT`,
/// -1), never ending tc processing there (case R1).
const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Harness {
    dp: Datapath,
    _pins: PinRoot,
}

impl Harness {
    fn new(name: &str) -> Self {
        require_root();
        let pins = PinRoot::new(name);
        let mut dp = Datapath::open(pins.path(), AttachMode::Tc).expect("loading the datapath");
        // Counter slots, as attaching would give; lo is where the test runner delivers frames.
        for ifindex in [LO_IFINDEX, 900_001, 900_002] {
            dp.ensure_port_slot(ifindex).unwrap();
        }
        epochs::register(&mut dp, MacAddr(ALICE), 1, LO_IFINDEX, Some(0)).unwrap();
        epochs::register(&mut dp, MacAddr(BOB), 1, 900_001, Some(0)).unwrap();
        epochs::register(&mut dp, MacAddr(CAROL), 2, 900_002, Some(0)).unwrap();
        Self { dp, _pins: pins }
    }

    fn lo_counters(&mut self) -> PortCounters {
        self.dp
            .port_stats()
            .unwrap()
            .get(&LO_IFINDEX)
            .copied()
            .unwrap_or_default()
    }

    /// Runs `frame` through both programs; asserts the verdict and that each run moved only
    /// the counter of `outcome`, by one frame and the frame's length in bytes.
    fn expect(&mut self, frame: &[u8], outcome: Outcome, what: &str) {
        let pass = outcome.verdict() == enforcer_common::Verdict::Pass;
        for (mode, want) in [
            (AttachMode::Tc, if pass { TCX_NEXT } else { TC_ACT_SHOT }),
            (AttachMode::Xdp, if pass { XDP_PASS } else { XDP_DROP }),
        ] {
            let before = self.lo_counters();
            let fd = self.dp.program_fd(mode).unwrap();
            let got =
                test_run(fd, frame).unwrap_or_else(|e| panic!("{what} ({mode:?}): test run: {e}"));
            assert_eq!(got, want, "{what} ({mode:?}): verdict");
            let after = self.lo_counters();
            for o in Outcome::ALL {
                let (b, a) = (before.counter(o), after.counter(o));
                if o == outcome {
                    assert_eq!(
                        a.frames - b.frames,
                        1,
                        "{what} ({mode:?}): {} frames",
                        o.name()
                    );
                    assert_eq!(
                        a.bytes - b.bytes,
                        frame.len() as u64,
                        "{what} ({mode:?}): {} bytes",
                        o.name()
                    );
                } else {
                    assert_eq!(
                        a,
                        b,
                        "{what} ({mode:?}): counter {} must not move",
                        o.name()
                    );
                }
            }
        }
    }

    fn set_epoch(&mut self, mac: [u8; 6], epoch: u32) {
        epochs::set_epoch(&mut self.dp, MacAddr(mac), epoch, false).unwrap();
    }
}

#[test]
fn type1_and_type2_pass() {
    let mut h = Harness::new("t1pass");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.expect(&frame(BOB, ALICE, IPV4, 86), Outcome::Type1, "same epoch");
    h.set_epoch(BOB, 1);
    h.expect(
        &frame(BOB, ALICE, IPV4, 86),
        Outcome::Type2,
        "receiver ahead",
    );
}

#[test]
fn type3_follows_the_mode_and_never_passes_in_buffer_or_drop() {
    let mut h = Harness::new("t1type3");
    h.set_epoch(ALICE, 1);
    let f = frame(BOB, ALICE, IPV4, 86);
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.expect(&f, Outcome::Type3Dropped, "drop mode");
    h.dp.set_type3_mode(Type3Mode::Buffer).unwrap();
    h.expect(
        &f,
        Outcome::Type3Unbuffered,
        "buffer mode without a buffer socket",
    );
    h.dp.set_type3_mode(Type3Mode::Monitor).unwrap();
    h.expect(&f, Outcome::Type3Monitored, "monitor mode");
    // Once the receiver advances the same frame is Type-1.
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.set_epoch(BOB, 1);
    h.expect(&f, Outcome::Type1, "after the receiver advanced");
}

#[test]
fn vlan_tagged_frames_are_classified_by_mac() {
    let mut h = Harness::new("t1vlan");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    // 802.1Q tag (TCI 0x0064 = VLAN 100) then IPv4.
    let mut tagged = frame(BOB, ALICE, 0x8100, 0);
    tagged.extend_from_slice(&[0x00, 0x64, 0x08, 0x00]);
    tagged.extend_from_slice(&[0u8; 60]);
    h.expect(&tagged, Outcome::Type1, "802.1Q Type-1");
    let mut qinq = frame(BOB, ALICE, 0x88a8, 0);
    qinq.extend_from_slice(&[0x00, 0x0a, 0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
    qinq.extend_from_slice(&[0u8; 60]);
    h.set_epoch(ALICE, 1);
    h.expect(&tagged, Outcome::Type3Dropped, "802.1Q Type-3");
    h.expect(&qinq, Outcome::Type3Dropped, "802.1ad Type-3");
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut h = Harness::new("t1malf");
    // A VLAN ethertype with the tag cut short: 14 + 2 bytes.
    let mut truncated = frame(BOB, ALICE, 0x8100, 0);
    truncated.extend_from_slice(&[0x00, 0x64]);
    h.expect(&truncated, Outcome::Malformed, "truncated VLAN tag");
    // Shorter than an Ethernet header: the kernel refuses to even run it (so a real port
    // cannot hand the program one either); the program's own bound check is what the
    // truncated-tag case exercises.
    let runt = &frame(BOB, ALICE, IPV4, 0)[..10];
    let fd = h.dp.program_fd(AttachMode::Tc).unwrap();
    assert!(
        test_run(fd, runt).is_err(),
        "the kernel runs no program on a 10-byte frame"
    );
}

#[test]
fn non_ip_and_large_frames() {
    let mut h = Harness::new("t1jumbo");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.expect(
        &frame(BOB, ALICE, 0x88b5, 46),
        Outcome::Type1,
        "non-IP ethertype",
    );
    h.set_epoch(ALICE, 1);
    h.expect(
        &frame(BOB, ALICE, 0x88b5, 46),
        Outcome::Type3Dropped,
        "non-IP Type-3",
    );
    // A large frame: the kernel's test runner takes at most about a page of linear data for
    // either hook (9000-byte jumbo frames are exercised on real ports in tier 2).
    h.set_epoch(BOB, 1);
    h.expect(
        &frame(BOB, ALICE, IPV4, 3000 - 14),
        Outcome::Type1,
        "3000-byte frame",
    );
}

#[test]
fn broadcast_is_held_back_until_every_member_advanced() {
    let mut h = Harness::new("t1bcast");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    let arp = frame(BROADCAST, ALICE, 0x0806, 28);
    h.expect(&arp, Outcome::Type1, "broadcast, all at epoch 0");
    h.set_epoch(ALICE, 1);
    h.expect(
        &arp,
        Outcome::Type3Dropped,
        "broadcast from a post-snapshot sender, BOB behind",
    );
    // CAROL is in another group and still at 0: she must not hold group 1 back.
    h.set_epoch(BOB, 1);
    h.expect(&arp, Outcome::Type1, "broadcast once every member advanced");
    let multicast = frame([0x01, 0x00, 0x5e, 0, 0, 0xfb], ALICE, IPV4, 60);
    h.expect(&multicast, Outcome::Type1, "multicast");
}

#[test]
fn foreign_unregistered_and_outside_group() {
    let mut h = Harness::new("t1src");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.expect(
        &frame(BOB, STRANGER, IPV4, 60),
        Outcome::ForeignSource,
        "unknown MAC from ALICE's port",
    );
    h.expect(
        &frame(ALICE, BOB, IPV4, 60),
        Outcome::ForeignSource,
        "BOB's MAC from ALICE's port",
    );
    h.expect(
        &frame(CAROL, ALICE, IPV4, 60),
        Outcome::OutsideGroup,
        "to another group",
    );
    h.expect(
        &frame(STRANGER, ALICE, IPV4, 60),
        Outcome::OutsideGroup,
        "to an unknown MAC",
    );
    epochs::unregister(&mut h.dp, MacAddr(ALICE)).unwrap();
    h.expect(
        &frame(BOB, STRANGER, IPV4, 60),
        Outcome::Unregistered,
        "port without a VM",
    );
}

/// VMs whose MACs share an `epoch_cache` index: the one not in the cache is found through the
/// `epochs` hash, and removing the cached one promotes the other.
#[test]
fn colliding_cache_entries_fall_back_to_the_hash() {
    use enforcer_common::{CACHE_OCCUPIED, CACHE_OVERFLOW, CachedVm, MacKey, cache_index};
    const BOB_TWIN: [u8; 6] = [0x02, 0, 0xb0, 0x02, 0, 0];
    let index = cache_index(&MacKey::new(BOB));
    assert_eq!(
        cache_index(&MacKey::new(BOB_TWIN)),
        index,
        "the test needs a real collision"
    );
    let mut h = Harness::new("t1cache");
    h.dp.set_type3_mode(Type3Mode::Drop).unwrap();
    h.dp.ensure_port_slot(900_003).unwrap();
    epochs::register(&mut h.dp, MacAddr(BOB_TWIN), 1, 900_003, Some(0)).unwrap();
    let cached = |h: &Harness| -> CachedVm {
        let data = aya::maps::MapData::from_pin(h._pins.path().join("epoch_cache")).unwrap();
        let map = aya::maps::Map::Array(data);
        let array: aya::maps::Array<_, CachedVm> = aya::maps::Array::try_from(map).unwrap();
        array.get(&index, 0).unwrap()
    };
    let entry = cached(&h);
    assert_eq!(
        (entry.mac.addr, entry.state),
        (BOB, CACHE_OCCUPIED | CACHE_OVERFLOW)
    );

    h.expect(
        &frame(BOB_TWIN, ALICE, IPV4, 60),
        Outcome::Type1,
        "to the VM in the hash only",
    );
    h.set_epoch(ALICE, 1);
    h.expect(
        &frame(BOB_TWIN, ALICE, IPV4, 60),
        Outcome::Type3Dropped,
        "Type-3 to it",
    );
    h.set_epoch(BOB_TWIN, 1);
    h.expect(
        &frame(BOB_TWIN, ALICE, IPV4, 60),
        Outcome::Type1,
        "after it advanced",
    );
    h.expect(
        &frame(BOB, ALICE, IPV4, 60),
        Outcome::Type3Dropped,
        "the cached VM is still behind",
    );

    epochs::unregister(&mut h.dp, MacAddr(BOB)).unwrap();
    let entry = cached(&h);
    assert_eq!(
        (entry.mac.addr, entry.vm.epoch, entry.state),
        (BOB_TWIN, 1, CACHE_OCCUPIED),
        "promoted"
    );
    h.expect(
        &frame(BOB_TWIN, ALICE, IPV4, 60),
        Outcome::Type1,
        "after the promotion",
    );
    h.expect(
        &frame(BOB, ALICE, IPV4, 60),
        Outcome::OutsideGroup,
        "the removed VM is gone",
    );
    epochs::unregister(&mut h.dp, MacAddr(BOB_TWIN)).unwrap();
    assert_eq!(cached(&h), CachedVm::default(), "the index is empty again");
}

/// Maps pinned by a build with another layout are refused with a clear error, not misread.
#[test]
fn pinned_maps_of_another_layout_are_refused() {
    require_root();
    let pins = PinRoot::new("t1layout");
    std::fs::create_dir_all(pins.path()).unwrap();
    // `epochs` as an older build had it: 16-byte values.
    enforcer_tests::pin_hash_map(&pins.path().join("epochs"), 8, 16, 4096).unwrap();
    let err = Datapath::open(pins.path(), AttachMode::Tc)
        .err()
        .expect("an incompatible pin is refused");
    let text = err.to_string();
    assert!(
        text.contains("epochs") && text.contains("teardown"),
        "{text}"
    );
    // The same root with a fitting layout opens.
    std::fs::remove_file(pins.path().join("epochs")).unwrap();
    enforcer_tests::pin_hash_map(&pins.path().join("epochs"), 8, 24, 4096).unwrap();
    Datapath::open(pins.path(), AttachMode::Tc).expect("a fitting pin is adopted");
}

/// The pure classification's view of what `Harness` registers, for the differential test.
struct Model {
    /// (MAC, group, port, epoch) of ALICE, BOB and CAROL.
    vms: [([u8; 6], u32, u32, u32); 3],
    mode: Type3Mode,
}

impl DatapathView for Model {
    fn vm(&self, mac: &MacKey) -> Option<VmEpoch> {
        self.vms
            .iter()
            .find(|(m, ..)| *m == mac.addr)
            .map(|&(_, group, ifindex, epoch)| VmEpoch {
                epoch,
                group,
                ifindex,
                ..VmEpoch::default()
            })
    }
    fn port_has_vm(&self, ifindex: u32) -> bool {
        self.vms.iter().any(|v| v.2 == ifindex)
    }
    fn group(&self, group: u32) -> Option<GroupState> {
        let epochs = self.vms.iter().filter(|v| v.1 == group).map(|v| v.3);
        Some(GroupState {
            min_epoch: epochs.clone().min()?,
            members: epochs.count() as u32,
            ..GroupState::default()
        })
    }
    fn type3_mode(&self) -> Type3Mode {
        self.mode
    }
    fn hold_ready(&self, _ifindex: u32) -> bool {
        false
    }
    fn order_pending(&self, _queue: u32) -> bool {
        false
    }
}

impl Model {
    /// What the programs must do with `frame` arriving on lo: the frame's own checks, then
    /// `decide`.
    fn outcome(&self, frame: &[u8]) -> Outcome {
        let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
        if matches!(ether_type, 0x8100 | 0x88a8) && frame.len() < 18 {
            return Outcome::Malformed;
        }
        let mac = |at: usize| MacKey::new(frame[at..at + 6].try_into().expect("6 bytes"));
        decide(self, LO_IFINDEX, &mac(6), &mac(0))
    }
}

/// Issue 11, item 6 (fuzzing the classifier): both real programs against the pure
/// classification (`enforcer_common::classify::decide`) on arbitrary frames — any of the
/// registered, unknown, broadcast or random addresses on either side, any ethertype (VLAN and
/// QinQ tags whole or cut short), any bytes after the header — under any epochs and Type-3
/// mode. Each gives `decide`'s verdict and moves exactly that outcome's counter. Failures are
/// kept as seeds in `tests/proptest-regressions/` and run first.
#[test]
fn arbitrary_frames_get_the_pure_classifications_verdict() {
    use proptest::prelude::*;
    use std::cell::RefCell;
    let h = RefCell::new(Harness::new("t1fuzz"));
    // Weighted towards the registered VMs, so every outcome is reached in every run (the
    // check at the end), the rest still any address at all.
    let mac = prop_oneof![
        4 => Just(ALICE),
        2 => Just(BOB),
        1 => Just(CAROL),
        1 => Just(STRANGER),
        2 => Just(BROADCAST),
        1 => any::<[u8; 6]>(),
    ];
    // The kernel's test runner parses an IP header itself (and refuses a frame without one),
    // so IPv4 and IPv6 frames carry at least 40 bytes after the Ethernet header; every other
    // ethertype may end anywhere, a VLAN tag included.
    let ether_type_and_tail = prop_oneof![
        Just(IPV4),
        Just(0x86dd),
        Just(0x8100u16),
        Just(0x88a8),
        any::<u16>()
    ]
    .prop_flat_map(|t| {
        let len = if matches!(t, IPV4 | 0x86dd) {
            40..80
        } else {
            0..40
        };
        (Just(t), proptest::collection::vec(any::<u8>(), len))
    });
    let strategy = (
        mac.clone(),
        mac,
        ether_type_and_tail,
        (0u32..3, 0u32..3, 0u32..3),
        prop_oneof![
            Just(Type3Mode::Buffer),
            Just(Type3Mode::Drop),
            Just(Type3Mode::Monitor)
        ],
    );
    let config = ProptestConfig {
        cases: 1000,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // Which outcomes the cases reached: a fuzzer that only ever makes malformed frames tests
    // nothing.
    let seen = RefCell::new(std::collections::BTreeMap::<&str, usize>::new());
    let result = runner.run(
        &strategy,
        |(dst, src, (ether_type, tail), (a, b, c), mode)| {
            let model = Model {
                vms: [
                    (ALICE, 1, LO_IFINDEX, a),
                    (BOB, 1, 900_001, b),
                    (CAROL, 2, 900_002, c),
                ],
                mode,
            };
            let mut h = h.borrow_mut();
            for (mac, group, port, epoch) in model.vms {
                epochs::unregister(&mut h.dp, MacAddr(mac)).unwrap();
                epochs::register(&mut h.dp, MacAddr(mac), group, port, Some(epoch)).unwrap();
            }
            h.dp.set_type3_mode(mode).unwrap();
            let mut f = frame(dst, src, ether_type, 0);
            f.extend_from_slice(&tail);
            let want = model.outcome(&f);
            *seen.borrow_mut().entry(want.name()).or_default() += 1;
            h.expect(
                &f,
                want,
                &format!("{f:02x?} at epochs {a}/{b}/{c}, {mode:?}"),
            );
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    eprintln!("fuzzing the programs reached: {seen:?}");
    assert!(seen.len() >= 8, "outcomes reached: {seen:?}");
}
