//! Tier 2: frames as guests really send them, held across a skew and delivered as the bridge
//! would have delivered them (issue 12; cases F2-F4 of the datapath review): VLAN and QinQ
//! tags (at tc the kernel has taken the outer tag out of the frame's bytes), jumbo datagrams,
//! and encapsulated traffic whose inner checksum is left to offload. Each compares the held
//! frames with a control: the same frames sent while nothing is held.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread,
    time::Duration,
};

use enforcer::{
    agent::PortStats,
    api::client::Client,
    daemon::{self, Running},
    datapath::AttachMode,
    hold::HoldOptions,
};
use enforcer_common::{HoldTotal, Outcome, Type3Mode};
use enforcer_lab::netns::Lab;
use enforcer_tests::{
    PinRoot, Undo, assert_no_hold_losses, daemon_config, datagram, lab_prefix, receive_all,
    register_all, require_root, run,
};

struct Setup {
    lab: Lab,
    _pins: PinRoot,
    running: Option<Running>,
    client: Client,
}

/// Two VMs in group 1 at epoch 0, a daemon with its buffer on their bridge.
async fn setup(tag: char, attach: AttachMode, mtu: Option<u32>) -> Setup {
    setup_lab(tag, 2, 2, attach, mtu).await
}

/// `vms` VMs, the first `members` of them in group 1 at epoch 0, a daemon with its buffer on
/// their bridge.
async fn setup_lab(
    tag: char,
    vms: usize,
    members: usize,
    attach: AttachMode,
    mtu: Option<u32>,
) -> Setup {
    require_root();
    let lab = Lab::create(&lab_prefix(tag), vms).unwrap();
    if let Some(mtu) = mtu {
        lab.set_mtu(mtu).unwrap();
    }
    let pins = PinRoot::new("frames");
    let mut config = daemon_config(&lab.bridge, &pins);
    config.attach = attach;
    config.type3_mode = Some(Type3Mode::Buffer);
    config.hold = Some(HoldOptions {
        device: format!("{}h", lab.prefix),
        ..HoldOptions::default()
    });
    let running = daemon::start(config).await.expect("starting the daemon");
    let client = Client::new(running.addr.to_string(), None);
    register_all(&client, &lab.vms[..members]).await;
    Setup {
        lab,
        _pins: pins,
        running: Some(running),
        client,
    }
}

impl Setup {
    /// vm1 takes its snapshot: its frames to vm2 are Type-3 until vm2 does.
    async fn skew(&self) {
        self.client.advance(self.lab.vms[0].mac).await.unwrap();
    }

    async fn catch_up(&self) {
        self.client.advance(self.lab.vms[1].mac).await.unwrap();
    }

    async fn sender_port(&self) -> PortStats {
        self.client
            .stats()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.vm == Some(self.lab.vms[0].mac))
            .expect("vm1's port")
    }

    async fn stop(mut self) {
        let report = self.client.holds().await.unwrap();
        assert_eq!(report.held_frames, 0, "nothing left held: {report:?}");
        assert_no_hold_losses(&report);
        self.running.take().unwrap().stop().await.unwrap();
    }
}

/// An Ethernet frame from `src` to `dst` behind `tags` (TPID, TCI), of EtherType 0x88b6
/// (local experimental 2), carrying `payload`.
fn tagged(dst: [u8; 6], src: [u8; 6], tags: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&0x88b6u16.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// Case F3: an 802.1Q frame (VID 100, priority 1) and a QinQ frame (802.1ad VID 200 outside,
/// 802.1Q VID 100 inside), held across the skew, reach the receiver byte for byte as the
/// controls do, tags included.
async fn vlan_tags_survive(attach: AttachMode, tag: char) {
    let s = setup(tag, attach, None).await;
    let (from, to) = (s.lab.vms[0].mac.0, s.lab.vms[1].mac.0);
    let tx = s.lab.raw_socket(0).unwrap();
    let rx = s.lab.raw_socket(1).unwrap();
    let frames = [
        tagged(to, from, &[(0x8100, 0x2064)], b"dot1q"),
        tagged(to, from, &[(0x88a8, 0x00c8), (0x8100, 0x2064)], b"qinq"),
    ];
    let ours = move |f: &[u8]| f.len() >= 12 && f[6..12] == from;
    for f in &frames {
        tx.send(f).unwrap();
    }
    let controls = rx.receive(Duration::from_millis(300), ours);
    assert_eq!(controls, frames, "the controls arrive as sent");

    s.skew().await;
    for f in &frames {
        tx.send(f).unwrap();
    }
    let early = rx.receive(Duration::from_millis(300), ours);
    assert!(early.is_empty(), "nothing before the receiver advances");
    assert_eq!(s.sender_port().await.frames(Outcome::Type3Held), 2);
    s.catch_up().await;
    let held = rx.receive(Duration::from_millis(500), ours);
    assert_eq!(
        held, controls,
        "held frames arrive exactly as the controls did"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlan_and_qinq_frames_keep_their_tags_when_held() {
    vlan_tags_survive(AttachMode::Tc, 'v').await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlan_and_qinq_frames_keep_their_tags_when_held_xdp() {
    vlan_tags_survive(AttachMode::Xdp, 'w').await;
}

/// Case F2: at MTU 9000 on every link, 8900-byte UDP datagrams (one 8942-byte frame each, no
/// fragmentation) are held across the skew and delivered whole and in order. Before, the hold
/// device stayed at a page's MTU and they were lost there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_datagrams_are_held_and_delivered_whole() {
    let s = setup('m', AttachMode::Tc, Some(9000)).await;
    let tx = s.lab.udp_socket(0, 47_500).unwrap();
    let rx = s.lab.udp_socket(1, 47_500).unwrap();
    enforcer_lab::netns::force_rcvbuf(&rx, 16 << 20).unwrap();
    let to = SocketAddrV4::new(s.lab.vms[1].ip, 47_500);
    s.skew().await;
    let sent: Vec<Vec<u8>> = (0..30).map(|i| datagram(i, 8900)).collect();
    for d in &sent {
        tx.send_to(d, to).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        receive_all(&rx, Duration::from_millis(300)).is_empty(),
        "nothing before the receiver advances"
    );
    let port = s.sender_port().await;
    assert_eq!(port.frames(Outcome::Type3Held), 30);
    assert_eq!(port.bytes(Outcome::Type3Held), 30 * 8942);
    assert_eq!(port.frames(Outcome::Type3Unbuffered), 0);
    s.catch_up().await;
    let got = receive_all(&rx, Duration::from_millis(500));
    assert_eq!(got.len(), sent.len(), "every datagram");
    assert!(got == sent, "whole, and in order");
    s.stop().await;
}

/// Case F1 with nothing to hide a loss: UDP sent with segmentation offload (`UDP_SEGMENT`,
/// 10 datagrams of 1400 bytes per send) reaches vm2's port as GSO super-frames. Held across
/// the skew, they are held whole and re-injected whole, and every datagram arrives, in order
/// (UDP does not retransmit: a super-frame lost on the way would show). The hold path counts
/// no loss and nothing refused on the way back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_gso_super_frames_are_held_whole_and_every_datagram_arrives() {
    let s = setup('g', AttachMode::Tc, None).await;
    let tx = s.lab.udp_socket(0, 47_700).unwrap();
    let rx = s.lab.udp_socket(1, 47_700).unwrap();
    enforcer_lab::netns::force_rcvbuf(&rx, 16 << 20).unwrap();
    enforcer_lab::netns::udp_segment(&tx, 1400).unwrap();
    let to = SocketAddrV4::new(s.lab.vms[1].ip, 47_700);
    // One send: 10 datagrams, each numbered.
    let send = |round: u32| {
        let mut buf = Vec::new();
        for i in 0..10 {
            buf.extend(datagram(round * 10 + i, 1400));
        }
        tx.send_to(&buf, to).unwrap();
    };
    let want = |rounds: std::ops::Range<u32>| -> Vec<Vec<u8>> {
        rounds
            .flat_map(|r| (0..10).map(move |i| datagram(r * 10 + i, 1400)))
            .collect()
    };
    send(0);
    assert_eq!(
        receive_all(&rx, Duration::from_millis(300)),
        want(0..1),
        "the control"
    );

    s.skew().await;
    for round in 1..21 {
        send(round);
    }
    assert!(receive_all(&rx, Duration::from_millis(300)).is_empty());
    let port = s.sender_port().await;
    let held = port.frames(Outcome::Type3Held);
    assert!(
        held > 0 && port.bytes(Outcome::Type3Held) / held > 1514,
        "held as super-frames: {held} frames, {} bytes",
        port.bytes(Outcome::Type3Held)
    );
    s.catch_up().await;
    assert_eq!(
        receive_all(&rx, Duration::from_millis(500)),
        want(1..21),
        "every datagram of every super-frame, in order"
    );
    // `stop` checks that the buffer lost nothing.
    s.stop().await;
}

/// Runs `ip` with `args` inside VM `vm`'s namespace.
fn ip_in(lab: &Lab, vm: usize, args: &[&str]) {
    let out = lab.command(vm, "ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `UdpInCsumErrors` of VM `vm`'s namespace.
fn udp_checksum_errors(lab: &Lab, vm: usize) -> u64 {
    let out = lab
        .command(vm, "cat")
        .arg("/proc/net/snmp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Case F4: VXLAN between the two VMs, checksum offload on (the default): the inner UDP
/// checksum is left to offload when the outer frame leaves vm1. Held across the skew, every
/// inner datagram still arrives (the frame keeps its offload state), and the receiver counts
/// no checksum error. Before, the buffer finished only the outer checksum: 0 of 20 arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encapsulated_traffic_keeps_its_inner_checksum_when_held() {
    let s = setup('e', AttachMode::Tc, None).await;
    let lab = &s.lab;
    let inner = |vm: usize| Ipv4Addr::new(10, 214, 0, vm as u8 + 1);
    for (vm, peer) in [(0, 1), (1, 0)] {
        let remote = lab.vms[peer].ip.to_string();
        ip_in(
            lab,
            vm,
            &[
                "link", "add", "vx0", "type", "vxlan", "id", "42", "dev", "eth0", "remote",
                &remote, "dstport", "4789",
            ],
        );
        ip_in(
            lab,
            vm,
            &["addr", "add", &format!("{}/24", inner(vm)), "dev", "vx0"],
        );
        ip_in(lab, vm, &["link", "set", "vx0", "up"]);
    }
    let tx = lab
        .in_vm(0, move || UdpSocket::bind((inner(0), 47_600)).unwrap())
        .unwrap();
    let rx = lab
        .in_vm(1, move || UdpSocket::bind((inner(1), 47_600)).unwrap())
        .unwrap();
    let to = SocketAddrV4::new(inner(1), 47_600);
    // The control (and the inner ARP exchange, so nothing else is held later).
    let control: Vec<Vec<u8>> = (0..20).map(|i| datagram(i, 200)).collect();
    for d in &control {
        tx.send_to(d, to).unwrap();
    }
    assert_eq!(receive_all(&rx, Duration::from_millis(300)), control);
    let errors_before = udp_checksum_errors(lab, 1);

    s.skew().await;
    let sent: Vec<Vec<u8>> = (100..120).map(|i| datagram(i, 200)).collect();
    for d in &sent {
        tx.send_to(d, to).unwrap();
    }
    assert!(receive_all(&rx, Duration::from_millis(300)).is_empty());
    assert_eq!(s.sender_port().await.frames(Outcome::Type3Held), 20);
    s.catch_up().await;
    assert_eq!(
        receive_all(&rx, Duration::from_millis(500)),
        sent,
        "every inner datagram, in order"
    );
    assert_eq!(
        udp_checksum_errors(lab, 1),
        errors_before,
        "no checksum error"
    );
    s.stop().await;
}

/// Who got a frame: each VM (by index) and the host (the bridge's own interface).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Got {
    Vm(usize),
    Host,
}

/// Cases R2 and R3 of the datapath review: a held frame reaches exactly the ports the bridge
/// would have delivered it to, under the bridge's rules. `rule` sets a rule up on the lab (and
/// returns what removes it); `vms` VMs, the first `members` of them in the group; vm1 sends
/// `frame` (from its own MAC) once at equal epochs — the control — and once across a skew
/// (vm1 advanced, the other members not). Held, it reaches nobody; once every member has
/// advanced, it reaches exactly whoever got the control, byte for byte.
async fn held_frames_go_where_the_bridge_sends_them<G>(
    tag: char,
    vms: usize,
    members: usize,
    rule: impl FnOnce(&Lab) -> G,
    frame: impl Fn(&Lab) -> Vec<u8>,
) -> Vec<Got> {
    let s = setup_lab(tag, vms, members, AttachMode::Tc, None).await;
    let (lab, client) = (&s.lab, &s.client);
    let _rule = rule(lab);
    let sockets: Vec<(Got, enforcer_lab::raw::RawSocket)> = (1..vms)
        .map(|i| (Got::Vm(i), lab.raw_socket(i).unwrap()))
        .chain([(
            Got::Host,
            enforcer_lab::raw::RawSocket::on(&lab.bridge).unwrap(),
        )])
        .collect();
    let tx = lab.raw_socket(0).unwrap();
    let sent = frame(lab);
    let from = lab.vms[0].mac.0;
    let ours = move |f: &[u8]| f.len() >= 14 && f[6..12] == from && f[12..14] == [0x88, 0xb6];
    let receive = |window: Duration| {
        let mut got = Vec::new();
        for (who, socket) in &sockets {
            for f in socket.receive(window, ours) {
                assert_eq!(f, sent, "{who:?} got the frame as sent");
                got.push(*who);
            }
        }
        got.sort();
        got
    };
    tx.send(&sent).unwrap();
    let control = receive(Duration::from_millis(200));

    client.advance(lab.vms[0].mac).await.unwrap();
    tx.send(&sent).unwrap();
    assert_eq!(
        receive(Duration::from_millis(200)),
        vec![],
        "held: nobody gets it yet"
    );
    for vm in &lab.vms[1..members] {
        client.advance(vm.mac).await.unwrap();
    }
    let held = receive(Duration::from_millis(400));
    assert_eq!(held, control, "the held frame goes where the control went");
    let report = client.holds().await.unwrap();
    assert_eq!(
        (report.held_frames, report.total(HoldTotal::Reinjected)),
        (0, 1),
        "held once, put back once: {report:?}"
    );
    s.stop().await;
    control
}

/// A frame from vm1 to `dst`, of EtherType 0x88b6.
fn from_vm1(lab: &Lab, dst: [u8; 6]) -> Vec<u8> {
    tagged(dst, lab.vms[0].mac.0, &[], b"held or not")
}

/// Isolated ports may not talk to each other: nor may their held frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_frame_does_not_cross_isolated_ports() {
    let got = held_frames_go_where_the_bridge_sends_them(
        'i',
        2,
        2,
        |lab| {
            for vm in &lab.vms {
                run(&["bridge", "link", "set", "dev", &vm.port, "isolated", "on"]);
            }
        },
        |lab| from_vm1(lab, lab.vms[1].mac.0),
    )
    .await;
    assert_eq!(got, vec![], "the control did not cross either");
}

/// An nft bridge rule dropping vm1's frames drops its held ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_frame_meets_the_bridges_nft_rules() {
    let got = held_frames_go_where_the_bridge_sends_them(
        'n',
        2,
        2,
        |lab| {
            let table = format!("{}t", lab.prefix);
            run(&["nft", "add", "table", "bridge", &table]);
            let undo = Undo(vec![
                "nft".into(),
                "delete".into(),
                "table".into(),
                "bridge".into(),
                table.clone(),
            ]);
            run(&[
                "nft",
                "add chain bridge",
                &table,
                "enf { type filter hook forward priority 0 ; }",
            ]);
            run(&[
                "nft",
                "add rule bridge",
                &table,
                "enf ether saddr",
                &lab.vms[0].mac.to_string(),
                "drop",
            ]);
            undo
        },
        |lab| from_vm1(lab, lab.vms[1].mac.0),
    )
    .await;
    assert_eq!(got, vec![], "the control was dropped too");
}

/// An LLDP frame (a link-local group address) is not forwarded by the bridge: nor is it when
/// it was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_link_local_frame_is_not_forwarded() {
    let got = held_frames_go_where_the_bridge_sends_them(
        'l',
        2,
        2,
        |_| (),
        |lab| from_vm1(lab, [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e]),
    )
    .await;
    assert!(!got.contains(&Got::Vm(1)), "not forwarded: {got:?}");
}

/// A held broadcast reaches every port the bridge floods it to once the group has advanced:
/// the other member, the VM outside the group, and the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_broadcast_reaches_the_host_and_the_vms_outside_the_group() {
    let got = held_frames_go_where_the_bridge_sends_them(
        'b',
        3,
        2,
        |_| (),
        |lab| from_vm1(lab, [0xff; 6]),
    )
    .await;
    assert_eq!(got, vec![Got::Vm(1), Got::Vm(2), Got::Host]);
}
