//! The guest test application (PID 1's child in enforcer's tiny guests).
//!
//! `enforcer-guest --ip 10.77.0.11 --peers 10.77.0.12,10.77.0.13 [--interval-ms 10] [--disk /dev/vda]`
//!
//! With a disk it also keeps a generation record in the disk's first sector and checks, before
//! every write, that the disk holds what memory says it wrote (see the library).
//!
//! Every interval it sends one UDP datagram and one TCP message to every peer, and it counts and
//! checks what arrives (see the library for the formats and checks). The control port answers
//! `stats` with JSON, and `quiet` / `talk` stop and restart sending.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use enforcer_guest::{
    CHECKSUM_START, CONTROL_PORT, DISK_RECORD_LEN, GuestStats, PeerStats, TCP_MESSAGE_LEN,
    TCP_PORT, TcpMessage, UDP_MESSAGE_LEN, UDP_PORT, UdpMessage, checksum, decode_disk_record,
    disk_matches_memory, encode_disk_record,
};

struct Guest {
    ip: Ipv4Addr,
    talking: AtomicBool,
    peers: HashMap<Ipv4Addr, Mutex<PeerStats>>,
    /// (generation remembered, mismatches seen).
    disk: Mutex<(u64, u64)>,
}

impl Guest {
    fn peer(&self, ip: IpAddr) -> Option<&Mutex<PeerStats>> {
        match ip {
            IpAddr::V4(v4) => self.peers.get(&v4),
            IpAddr::V6(_) => None,
        }
    }

    fn stats(&self) -> GuestStats {
        let mut peers: Vec<PeerStats> = self
            .peers
            .values()
            .map(|p| p.lock().expect("peer lock").clone())
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let (disk_generation, disk_mismatches) = *self.disk.lock().expect("disk lock");
        GuestStats {
            ip: self.ip.to_string(),
            talking: self.talking.load(Ordering::SeqCst),
            peers,
            disk_generation,
            disk_mismatches,
        }
    }
}

/// A value no other execution of the same instruction produces: the wall clock at nanosecond
/// resolution differs between a VM's first run and its restored run (mixed, so nearby times give
/// unrelated nonces).
fn nonce() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut z = nanos.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Numbered datagrams to one peer.
fn send_datagrams(guest: Arc<Guest>, peer: Ipv4Addr, udp: UdpSocket, interval: Duration) {
    let stats = &guest.peers[&peer];
    loop {
        thread::sleep(interval);
        if !guest.talking.load(Ordering::SeqCst) {
            continue;
        }
        let seq = stats.lock().expect("peer lock").udp_sent + 1;
        let datagram = UdpMessage {
            seq,
            nonce: nonce(),
        };
        if udp
            .send_to(&datagram.encode(), SocketAddr::from((peer, UDP_PORT)))
            .is_ok()
        {
            stats.lock().expect("peer lock").udp_sent = seq;
        }
    }
}

/// The TCP stream to one peer (its own thread: a write may block while the peer is paused).
fn send_stream(guest: Arc<Guest>, peer: Ipv4Addr, interval: Duration) {
    let stats = &guest.peers[&peer];
    let mut stream: Option<TcpStream> = None;
    loop {
        thread::sleep(interval);
        if !guest.talking.load(Ordering::SeqCst) {
            continue;
        }
        if stream.is_none() {
            match TcpStream::connect_timeout(
                &SocketAddr::from((peer, TCP_PORT)),
                Duration::from_millis(500),
            ) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stats.lock().expect("peer lock").tcp_connects += 1;
                    stream = Some(s);
                }
                Err(_) => continue,
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        let (seq, prev_checksum) = {
            let p = stats.lock().expect("peer lock");
            (p.tcp_sent + 1, p.tcp_sent_checksum)
        };
        let bytes = TcpMessage {
            seq,
            nonce: nonce(),
            prev_checksum,
        }
        .encode();
        // Blocks while the peer does not read (paused at its snapshot point): that is the
        // stream's flow control, not an error.
        match s.write_all(&bytes) {
            Ok(()) => {
                let mut p = stats.lock().expect("peer lock");
                p.tcp_sent = seq;
                p.tcp_sent_checksum = checksum(prev_checksum, &bytes);
            }
            Err(_) => stream = None,
        }
    }
}

fn read_stream(guest: Arc<Guest>, mut s: TcpStream, from: IpAddr) {
    let Some(stats) = guest.peer(from) else {
        return;
    };
    let mut buf = [0u8; TCP_MESSAGE_LEN];
    while s.read_exact(&mut buf).is_ok() {
        let mut p = stats.lock().expect("peer lock");
        match TcpMessage::decode(&buf) {
            Some(m) => {
                if m.seq != p.tcp_received + 1 {
                    p.tcp_seq_errors += 1;
                }
                if m.prev_checksum != p.tcp_received_checksum {
                    p.tcp_checksum_errors += 1;
                }
                p.tcp_received = m.seq;
            }
            None => p.tcp_seq_errors += 1,
        }
        p.tcp_received_checksum = checksum(p.tcp_received_checksum, &buf);
    }
}

fn receive_datagrams(guest: Arc<Guest>, udp: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let (Some(stats), Some(m)) = (
            guest.peer(from.ip()),
            UdpMessage::decode(&buf[..n.min(UDP_MESSAGE_LEN + 1)]),
        ) else {
            continue;
        };
        let mut p = stats.lock().expect("peer lock");
        if m.seq <= p.udp_max_seq {
            p.udp_rewinds += 1;
        } else {
            p.udp_received += 1;
            p.udp_max_seq = m.seq;
        }
    }
}

/// Every `interval`: read the disk record, check it against memory, write the next
/// generation, sync, and only then remember it.
fn keep_disk_record(guest: Arc<Guest>, path: String, interval: Duration) {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    /// O_DIRECT needs an aligned buffer.
    #[repr(C, align(4096))]
    struct Sector([u8; DISK_RECORD_LEN]);
    // O_DIRECT: past the guest's page cache, so a read sees the disk, not what this guest
    // remembers writing (a restored guest's cache is part of its memory image).
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("enforcer-guest: disk {path}: {e}");
            return;
        }
    };
    let mut sector = Box::new(Sector([0u8; DISK_RECORD_LEN]));
    loop {
        let buf = &mut sector.0;
        let remembered = guest.disk.lock().expect("disk lock").0;
        if file.read_exact_at(buf, 0).is_ok() {
            let on_disk = decode_disk_record(buf);
            // The first read of a fresh guest finds whatever the disk had: adopt it.
            if remembered != 0 && !on_disk.is_some_and(|d| disk_matches_memory(d, remembered)) {
                eprintln!(
                    "enforcer-guest: disk record {on_disk:?} does not match memory {remembered}"
                );
                guest.disk.lock().expect("disk lock").1 += 1;
            }
            let next = remembered.max(on_disk.unwrap_or(0)) + 1;
            buf.copy_from_slice(&encode_disk_record(next));
            if file.write_all_at(buf, 0).is_ok() && file.sync_data().is_ok() {
                guest.disk.lock().expect("disk lock").0 = next;
            }
        }
        thread::sleep(interval);
    }
}

fn serve_control(guest: Arc<Guest>, s: TcpStream) {
    let mut out = match s.try_clone() {
        Ok(o) => o,
        Err(_) => return,
    };
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        let reply = match line.trim() {
            "stats" => serde_json::to_string(&guest.stats()).expect("stats serialize"),
            "quiet" => {
                guest.talking.store(false, Ordering::SeqCst);
                "{\"ok\":true}".into()
            }
            "talk" => {
                guest.talking.store(true, Ordering::SeqCst);
                "{\"ok\":true}".into()
            }
            other => format!("{{\"error\":\"unknown command {other:?}: stats, quiet or talk\"}}"),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

fn spawn_acceptor(
    listener: TcpListener,
    guest: Arc<Guest>,
    serve: fn(Arc<Guest>, TcpStream, SocketAddr),
) {
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(from) = conn.peer_addr() else { continue };
            let guest = guest.clone();
            thread::spawn(move || serve(guest, conn, from));
        }
    });
}

struct Args {
    ip: Ipv4Addr,
    peers: Vec<Ipv4Addr>,
    interval: Duration,
    disk: Option<String>,
    /// Memory rewritten continuously (MiB), like a busy application's working set.
    dirty_mib: usize,
}

/// Keeps `mib` MiB of memory changing: every page gets a new value every [`DIRTY_SWEEP`], so
/// a live copy of the guest's memory (pre-copy) has pages to copy again and again.
fn dirty_memory(mib: usize) {
    const PAGE: usize = 4096;
    let mut buf = vec![0u8; mib << 20];
    let mut round: u8 = 0;
    loop {
        let start = std::time::Instant::now();
        round = round.wrapping_add(1);
        for page in buf.chunks_mut(PAGE) {
            page[0] = round;
        }
        std::hint::black_box(&buf);
        thread::sleep(DIRTY_SWEEP.saturating_sub(start.elapsed()));
    }
}

const DIRTY_SWEEP: Duration = Duration::from_millis(100);

fn parse_args() -> Result<Args, String> {
    let mut ip = None;
    let mut peers = Vec::new();
    let mut interval = Duration::from_millis(10);
    let mut disk = None;
    let mut dirty_mib = 0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--ip" => ip = Some(value.parse().map_err(|e| format!("--ip {value}: {e}"))?),
            "--peers" => {
                peers = value
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().map_err(|e| format!("--peers {p}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--disk" => disk = Some(value),
            "--dirty-mib" => {
                dirty_mib = value
                    .parse()
                    .map_err(|e| format!("--dirty-mib {value}: {e}"))?
            }
            "--interval-ms" => {
                interval = Duration::from_millis(
                    value
                        .parse()
                        .map_err(|e| format!("--interval-ms {value}: {e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        ip: ip.ok_or("--ip is required")?,
        peers,
        interval,
        disk,
        dirty_mib,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("enforcer-guest: {e}");
            eprintln!(
                "usage: enforcer-guest --ip A.B.C.D --peers IP,IP [--interval-ms N] [--disk DEV] [--dirty-mib N]"
            );
            return ExitCode::from(2);
        }
    };
    let peers: HashMap<Ipv4Addr, Mutex<PeerStats>> = args
        .peers
        .iter()
        .filter(|p| **p != args.ip)
        .map(|p| {
            let stats = PeerStats {
                peer: p.to_string(),
                tcp_sent_checksum: CHECKSUM_START,
                tcp_received_checksum: CHECKSUM_START,
                ..PeerStats::default()
            };
            (*p, Mutex::new(stats))
        })
        .collect();
    let guest = Arc::new(Guest {
        ip: args.ip,
        talking: AtomicBool::new(true),
        peers,
        disk: Mutex::new((0, 0)),
    });
    let bind = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let (control, data, udp) = match (
        TcpListener::bind(bind(CONTROL_PORT)),
        TcpListener::bind(bind(TCP_PORT)),
        UdpSocket::bind(bind(UDP_PORT)),
    ) {
        (Ok(c), Ok(d), Ok(u)) => (c, d, u),
        (c, d, u) => {
            eprintln!(
                "enforcer-guest: binding ports: control {:?} tcp {:?} udp {:?}",
                c.err(),
                d.err(),
                u.err()
            );
            return ExitCode::FAILURE;
        }
    };
    spawn_acceptor(control, guest.clone(), |g, s, _| serve_control(g, s));
    spawn_acceptor(data, guest.clone(), |g, s, from| {
        read_stream(g, s, from.ip())
    });
    {
        let (guest, udp) = (guest.clone(), udp.try_clone().expect("udp clone"));
        thread::spawn(move || receive_datagrams(guest, udp));
    }
    if let Some(path) = args.disk.clone() {
        let guest = guest.clone();
        thread::spawn(move || keep_disk_record(guest, path, Duration::from_millis(50)));
    }
    if args.dirty_mib > 0 {
        let mib = args.dirty_mib;
        thread::spawn(move || dirty_memory(mib));
    }
    eprintln!(
        "enforcer-guest: {} talking to {:?} every {:?}, rewriting {} MiB every {:?}",
        args.ip, args.peers, args.interval, args.dirty_mib, DIRTY_SWEEP
    );
    let mut talkers = Vec::new();
    for peer in guest.peers.keys().copied() {
        let (g, udp) = (guest.clone(), udp.try_clone().expect("udp clone"));
        talkers.push(thread::spawn(move || {
            send_datagrams(g, peer, udp, args.interval)
        }));
        let g = guest.clone();
        talkers.push(thread::spawn(move || send_stream(g, peer, args.interval)));
    }
    for t in talkers {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}
