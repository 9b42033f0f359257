//! A real application's own check of a restored group: Redis primary/replica replication on the
//! lab's guests (`VmLabOptions::redis`; Debian's Redis 7 in the guest image). Redis was not
//! written here, and its protocol notices an inconsistent cut by itself:
//!
//! - every replica's replication offset (bytes of the primary's stream it has applied) must not
//!   exceed the primary's restored offset: a replica ahead remembers writes the primary's image
//!   never made (DESIGN.md invariant 1);
//! - a replica that reconnects asks to continue where it is (`PSYNC <replid> <offset+1>`); the
//!   primary accepts that partial resync only from a replica not ahead of it, and otherwise
//!   counts a refusal (`sync_partial_err`) and sends its whole dataset again (Redis
//!   documentation, "Redis replication", partial resynchronization).
//!
//! The host writes to the primary during the snapshot ([`Writer`]) and stops before the kill, so
//! after the restore the offsets are the images' own until the check is done.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::vms::VmLab;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("the lab's guests do not run Redis")]
    NotRunning,
    #[error("redis on {ip}: {source}")]
    Redis {
        ip: Ipv4Addr,
        source: redis::RedisError,
    },
    #[error("redis on {ip}: INFO has no {field}")]
    Info { ip: Ipv4Addr, field: &'static str },
    #[error("redis replication not up after {0:?}: {1}")]
    NotReplicating(Duration, String),
}

fn connect(ip: Ipv4Addr) -> Result<redis::Connection, RedisError> {
    let err = |source| RedisError::Redis { ip, source };
    let client = redis::Client::open(format!("redis://{ip}:6379/")).map_err(err)?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(err)?;
    con.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(err)?;
    Ok(con)
}

/// `INFO <section>` as field → value.
fn info(ip: Ipv4Addr, section: &str) -> Result<HashMap<String, String>, RedisError> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut connect(ip)?)
        .map_err(|source| RedisError::Redis { ip, source })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

fn number(
    info: &HashMap<String, String>,
    ip: Ipv4Addr,
    field: &'static str,
) -> Result<u64, RedisError> {
    info.get(field)
        .and_then(|v| v.parse().ok())
        .ok_or(RedisError::Info { ip, field })
}

/// The primary's resynchronization counters (`INFO stats`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SyncCounts {
    pub full: u64,
    pub partial_ok: u64,
    pub partial_err: u64,
}

impl SyncCounts {
    pub fn read(ip: Ipv4Addr) -> Result<Self, RedisError> {
        let stats = info(ip, "stats")?;
        Ok(Self {
            full: number(&stats, ip, "sync_full")?,
            partial_ok: number(&stats, ip, "sync_partial_ok")?,
            partial_err: number(&stats, ip, "sync_partial_err")?,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            full: self.full.saturating_sub(before.full),
            partial_ok: self.partial_ok.saturating_sub(before.partial_ok),
            partial_err: self.partial_err.saturating_sub(before.partial_err),
        }
    }
}

/// Waits until every replica's link to the primary is up and in step; returns the primary's
/// counters then (the baseline of [`check_after_restore`]).
pub fn wait_replicating(lab: &VmLab, timeout: Duration) -> Result<SyncCounts, RedisError> {
    let (primary, replicas) = lab.redis().ok_or(RedisError::NotRunning)?;
    let deadline = Instant::now() + timeout;
    loop {
        let state = replicas
            .iter()
            .map(|r| {
                let i = info(r.ip, "replication")?;
                Ok(format!(
                    "{} link {}",
                    r.name,
                    i.get("master_link_status").map_or("?", String::as_str)
                ))
            })
            .collect::<Result<Vec<String>, RedisError>>();
        match state {
            Ok(s) if s.iter().all(|l| l.ends_with("link up")) => {
                return SyncCounts::read(primary.ip);
            }
            _ if Instant::now() > deadline => {
                return Err(RedisError::NotReplicating(
                    timeout,
                    match state {
                        Ok(s) => s.join(", "),
                        Err(e) => e.to_string(),
                    },
                ));
            }
            _ => thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// The host writing to the primary from a thread: 10 `SET`s (100-byte values over 1000 keys)
/// every 10 ms, so replication carries a steady stream.
pub struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(lab: &VmLab) -> Result<Self, RedisError> {
        let (primary, _) = lab.redis().ok_or(RedisError::NotRunning)?;
        let ip = primary.ip;
        let mut con = connect(ip)?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), written.clone());
        let thread = thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let mut pipe = redis::pipe();
                for _ in 0..10 {
                    n += 1;
                    pipe.cmd("SET")
                        .arg(format!("key:{}", n % 1000))
                        .arg(format!("{n:0100}"))
                        .ignore();
                }
                // The primary stops for the snapshot and dies at the kill: errors end nothing,
                // a new connection is tried until told to stop.
                match pipe.exec(&mut con) {
                    Ok(()) => {
                        w.fetch_add(10, Ordering::Relaxed);
                    }
                    Err(_) => {
                        if let Ok(c) = connect(ip) {
                            con = c;
                        }
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(Self {
            stop,
            written,
            thread: Some(thread),
        })
    }

    /// Stops writing; returns how many writes the primary acknowledged.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.written.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One replica after the restore.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaCheck {
    pub vm: String,
    /// Its replication offset as restored (bytes of the primary's stream applied).
    pub offset: u64,
    /// It remembers more of the primary's stream than the primary's image wrote.
    pub ahead: bool,
    /// After it was made to reconnect, it was in step with the primary again (a key written
    /// then reached it).
    pub in_step: bool,
}

/// Redis's own verdict on a restored group.
#[derive(Clone, Debug, Serialize)]
pub struct RedisCheck {
    pub primary: String,
    /// The primary's replication offset as restored.
    pub primary_offset: u64,
    pub writes: u64,
    pub replicas: Vec<ReplicaCheck>,
    /// The primary's resynchronizations since before the snapshot: partial ones accepted and
    /// refused, and full ones.
    pub resyncs: SyncCounts,
}

impl RedisCheck {
    /// Replicas ahead of the primary, partial resyncs refused, and replicas never back in step.
    pub fn violations(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| u64::from(r.ahead) + u64::from(!r.in_step))
            .sum::<u64>()
            + self.resyncs.partial_err
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "  redis: {} writes to {} (primary), restored at replication offset {}; resyncs \
             since: {} partial accepted, {} partial refused, {} full\n",
            self.writes,
            self.primary,
            self.primary_offset,
            self.resyncs.partial_ok,
            self.resyncs.partial_err,
            self.resyncs.full
        );
        for r in &self.replicas {
            out.push_str(&format!(
                "  redis: {} (replica) restored at offset {}{}, {}\n",
                r.vm,
                r.offset,
                if r.ahead {
                    " AHEAD of the primary"
                } else {
                    " (not ahead)"
                },
                if r.in_step {
                    "in step after reconnecting"
                } else {
                    "NOT in step after reconnecting"
                }
            ));
        }
        out
    }
}

/// Right after the group was restored and resumed (nothing written since): reads every
/// replica's offset, then the primary's, makes every replica reconnect (`CLIENT KILL TYPE
/// master`), waits for the primary to answer each (partial resync or refusal), and checks that
/// a key written then reaches every replica. `before`: the primary's counters before the
/// snapshot ([`wait_replicating`]).
pub fn check_after_restore(
    lab: &VmLab,
    before: SyncCounts,
    writes: u64,
) -> Result<RedisCheck, RedisError> {
    let (primary, replicas) = lab.redis().ok_or(RedisError::NotRunning)?;
    // Replicas first: a replica's offset only grows towards the primary's, which only grows.
    let offsets = replicas
        .iter()
        .map(|r| number(&info(r.ip, "replication")?, r.ip, "master_repl_offset"))
        .collect::<Result<Vec<u64>, RedisError>>()?;
    let primary_offset = number(
        &info(primary.ip, "replication")?,
        primary.ip,
        "master_repl_offset",
    )?;
    let answered = SyncCounts::read(primary.ip)?.since(before);
    let answered = answered.partial_ok + answered.partial_err;
    for r in replicas {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("master")
            .exec(&mut connect(r.ip)?)
            .map_err(|source| RedisError::Redis { ip: r.ip, source })?;
    }
    // Replicas reconnect from their once-a-second cron.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut resyncs = SyncCounts::read(primary.ip)?.since(before);
    while resyncs.partial_ok + resyncs.partial_err < answered + replicas.len() as u64
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(200));
        resyncs = SyncCounts::read(primary.ip)?.since(before);
    }
    let marker = format!("{:x}", rand_marker());
    redis::cmd("SET")
        .arg("enforcer:marker")
        .arg(&marker)
        .exec(&mut connect(primary.ip)?)
        .map_err(|source| RedisError::Redis {
            ip: primary.ip,
            source,
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut checks = Vec::new();
    for (r, offset) in replicas.iter().zip(offsets) {
        let in_step = loop {
            let got: Option<String> = redis::cmd("GET")
                .arg("enforcer:marker")
                .query(&mut connect(r.ip)?)
                .map_err(|source| RedisError::Redis { ip: r.ip, source })?;
            if got.as_deref() == Some(marker.as_str()) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            thread::sleep(Duration::from_millis(200));
        };
        checks.push(ReplicaCheck {
            vm: r.name.clone(),
            offset,
            ahead: offset > primary_offset,
            in_step,
        });
    }
    Ok(RedisCheck {
        primary: primary.name.clone(),
        primary_offset,
        writes,
        replicas: checks,
        resyncs: SyncCounts::read(primary.ip)?.since(before),
    })
}

/// A value no earlier run wrote (the clock's nanoseconds).
fn rand_marker() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
