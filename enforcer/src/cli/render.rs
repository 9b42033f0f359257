//! What the client commands print: tables and summaries for people (`--json` prints the API's
//! own JSON instead). Pure: values in, text out.

use std::fmt::Write as _;

use enforcer_common::Outcome;

use crate::{
    agent::{GroupView, PortStats},
    datapath::{AttachedPort, epochs::VmRecord},
    hold::HoldReport,
    snapshot::{Manifest, RestoreReport, channel::ChannelState},
};

/// One line of a snapshot's progress: each VM's last step (`vm1 advanced | vm2 paused`).
pub fn progress(m: &Manifest) -> String {
    let steps: Vec<String> = m
        .vms
        .iter()
        .map(|v| format!("{} {}", v.name, v.step))
        .collect();
    steps.join(" | ")
}

/// A manifest for people: outcome, then one line per VM with its timeline (ms from the start).
pub fn manifest(m: &Manifest) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapshot {}: {:?}, {} cut{}, group {} (id {}) at epoch {}{}{}",
        m.id,
        m.outcome,
        m.method,
        m.stop_spread_ms
            .map(|s| format!(" (VMs stopped within {s:.1} ms)"))
            .unwrap_or_default(),
        m.group.name,
        m.group.id,
        m.epoch,
        m.held_frames
            .map(|h| format!(", {h} frames held"))
            .unwrap_or_default(),
        m.released_ms
            .map(|r| format!(", all re-injected at {r:.1} ms"))
            .unwrap_or_default()
    );
    if let Some(reason) = &m.reason {
        let _ = writeln!(out, "  reason: {reason}");
    }
    if !m.held_lost.is_empty() {
        let lost: Vec<String> = m
            .held_lost
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        let _ = writeln!(
            out,
            "  held frames lost while it ran (on its hosts' buffers): {}",
            lost.join(", ")
        );
    }
    if let Some(c) = &m.channel_state {
        out.push_str(&channel_state(c));
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let _ = writeln!(
        out,
        "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>13} {:>12} {:>6}",
        "VM",
        "begin",
        "paused",
        "advanced",
        "image",
        "resumed",
        "downtime",
        "pause→advance",
        "seen→advance",
        "held"
    );
    for v in &m.vms {
        let t = &v.timeline;
        let _ = writeln!(
            out,
            "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>13} {:>12} {:>6}{}",
            v.name,
            f(t.begin_ms),
            f(t.paused_ms),
            f(t.advanced_ms),
            f(t.image_complete_ms),
            f(t.resumed_ms),
            f(t.downtime_ms()),
            t.pause_to_advance_ms()
                .map_or("-".into(), |v| format!("{:.3}", v)),
            t.seen_to_advance_ms()
                .map_or("-".into(), |v| format!("{:.3}", v)),
            v.held_frames.map_or("-".into(), |h| h.to_string()),
            v.error
                .as_ref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    out
}

pub(crate) fn vms(vms: &[VmRecord]) -> String {
    let mut out = format!(
        "{:<19} {:>6} {:>6} {:>8}\n",
        "MAC", "GROUP", "EPOCH", "IFINDEX"
    );
    for vm in vms {
        let _ = writeln!(
            out,
            "{:<19} {:>6} {:>6} {:>8}",
            vm.mac, vm.group, vm.epoch, vm.ifindex
        );
    }
    out
}

pub(crate) fn groups(groups: &[GroupView]) -> String {
    let mut out = format!(
        "{:>6} {:<12} {:>8} {:>10} {:>10}  DOMAINS\n",
        "GROUP", "NAME", "MEMBERS", "MIN_EPOCH", "MAX_EPOCH"
    );
    for g in groups {
        let _ = writeln!(
            out,
            "{:>6} {:<12} {:>8} {:>10} {:>10}  {}",
            g.record.group,
            g.name.as_deref().unwrap_or("-"),
            g.record.members,
            g.record.min_epoch,
            g.record.max_epoch,
            g.domains.join(" ")
        );
    }
    out
}

pub(crate) fn snapshots(list: &[Manifest]) -> String {
    let mut out = format!(
        "{:<36} {:<10} {:>6} {:>4}\n",
        "ID", "OUTCOME", "EPOCH", "VMS"
    );
    for m in list {
        let _ = writeln!(
            out,
            "{:<36} {:<10} {:>6} {:>4}",
            m.id,
            m.outcome,
            m.epoch,
            m.vms.len()
        );
    }
    out
}

/// The channel state's lines of a manifest: frames in flight at the cut, per receiver and
/// sender, and anything missing.
fn channel_state(c: &ChannelState) -> String {
    if !c.recorded {
        return format!(
            "  channel state: not recorded ({})\n",
            c.reason.as_deref().unwrap_or("no reason given")
        );
    }
    let mut out = format!(
        "  channel state: {} frames in flight at the cut, recorded{}\n",
        c.frames(),
        if c.complete() { "" } else { " (INCOMPLETE)" }
    );
    if let Some(why) = &c.reason {
        let _ = writeln!(out, "    {why}");
    }
    for (vm, r) in c.receivers.iter().filter(|(_, r)| {
        r.frames > 0 || r.dropped_bound > 0 || r.lost_at_most > 0 || r.problem.is_some()
    }) {
        let from: Vec<String> = r
            .from
            .iter()
            .map(|(s, n)| format!("{n} from {s}"))
            .collect();
        let _ = write!(out, "    to {vm}: {} ({} bytes)", from.join(", "), r.bytes);
        if r.dropped_bound > 0 {
            let _ = write!(out, ", {} not kept (memory bound)", r.dropped_bound);
        }
        if r.lost_at_most > 0 {
            let _ = write!(out, ", up to {} more may be missing", r.lost_at_most);
        }
        if let Some(p) = &r.problem {
            let _ = write!(out, ", {p}");
        }
        out.push('\n');
    }
    out
}

pub(crate) fn restored(r: &RestoreReport) -> String {
    let mut out = format!(
        "restored {} (group {}, epoch {}):\n",
        r.snapshot, r.group, r.epoch
    );
    for vm in &r.vms {
        let _ = writeln!(
            out,
            "  {:<20} {} on {:<8} restored at {:>8.1} ms, resumed at {:>8.1} ms{}{}",
            vm.name,
            vm.mac,
            vm.port,
            vm.restored_ms,
            vm.resumed_ms,
            vm.replayed
                .filter(|n| *n > 0)
                .map(|n| format!(", {n} in-flight frames replayed"))
                .unwrap_or_default(),
            vm.replay_error
                .as_deref()
                .map(|e| format!(", channel state NOT replayed: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "  all resumed within {:.1} ms", r.resume_spread_ms);
    out
}

pub(crate) fn ports(ports: &[AttachedPort]) -> String {
    let mut out = String::new();
    for p in ports {
        let _ = writeln!(out, "{:>8} {}", p.ifindex, p.name);
    }
    out
}

/// The counters table, and what the buffer holds now when one runs.
pub(crate) fn stats(stats: &[PortStats], holds: Option<&HoldReport>) -> String {
    let mut out = format!("{:<12} {:<19}", "PORT", "VM");
    for o in Outcome::ALL {
        let _ = write!(out, " {:>16}", o.name());
    }
    out.push('\n');
    for s in stats {
        let _ = write!(
            out,
            "{:<12} {:<19}",
            s.port.clone().unwrap_or_else(|| format!("#{}", s.ifindex)),
            s.vm.map(|m| m.to_string()).unwrap_or_else(|| "-".into())
        );
        for o in Outcome::ALL {
            let _ = write!(out, " {:>16}", s.frames(o));
        }
        out.push('\n');
    }
    if let Some(report) = holds {
        let _ = writeln!(
            out,
            "\nheld now: {} frames, {} bytes",
            report.held_frames, report.held_bytes
        );
        for q in &report.queues {
            let _ = writeln!(
                out,
                "  {:<28} {:>8} frames {:>10} bytes  oldest {} ms",
                q.queue.to_string(),
                q.frames,
                q.bytes,
                q.oldest_ms
            );
        }
    }
    out
}

pub(crate) fn holds(report: &HoldReport) -> String {
    let mut out = format!(
        "held now: {} frames, {} bytes (bound {} bytes)\n",
        report.held_frames, report.held_bytes, report.max_bytes
    );
    for q in &report.queues {
        let _ = writeln!(
            out,
            "  {:<28} {:>8} frames {:>10} bytes  oldest {:>6} ms  dropped(bound) {}{}",
            q.queue.to_string(),
            q.frames,
            q.bytes,
            q.oldest_ms,
            q.dropped_bound,
            if q.draining { "  draining" } else { "" }
        );
    }
    let totals: Vec<String> = report
        .totals
        .iter()
        .map(|(k, v)| format!("{} {v}", k.name()))
        .collect();
    let _ = writeln!(out, "totals: {}", totals.join(", "));
    let kernel: Vec<String> = report
        .kernel
        .iter()
        .map(|(k, v)| format!("{} {v}", k.name()))
        .collect();
    let _ = writeln!(out, "lost in the kernel: {}", kernel.join(", "));
    if report.hold_time_count > 0 {
        let _ = writeln!(
            out,
            "mean hold time: {:.1} ms over {} frames",
            1000.0 * report.hold_time_sum_seconds / report.hold_time_count as f64,
            report.hold_time_count
        );
    }
    out
}
