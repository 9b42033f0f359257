//! Prometheus text exposition (format 0.0.4) of the port counters, the epochs and the
//! buffer's state. Pure rendering.

use std::fmt::Write as _;

use enforcer_common::Outcome;

use crate::{
    agent::{CounterJson, PortStats},
    datapath::epochs::VmRecord,
    hold::{HoldReport, Replayed},
};

/// Renders `GET /metrics` (text format 0.0.4). `replayed`: channel state replayed into
/// restored VMs on this host so far (the frames recorded are the buffer's `recorded` outcome).
pub fn render(
    ports: &[PortStats],
    vms: &[VmRecord],
    holds: Option<&HoldReport>,
    replayed: Replayed,
) -> String {
    let mut out = String::new();
    for (metric, help, pick) in [
        (
            "enforcer_port_frames_total",
            "Frames seen on a VM port, by outcome (type1, type3_dropped, malformed, ...).",
            (|c: &CounterJson| c.frames) as fn(&CounterJson) -> u64,
        ),
        (
            "enforcer_port_bytes_total",
            "Bytes seen on a VM port, by outcome.",
            |c| c.bytes,
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for port in ports {
            for outcome in Outcome::ALL {
                let value = port.counters.get(outcome.name()).map_or(0, pick);
                let _ = writeln!(
                    out,
                    "{metric}{{port=\"{}\",ifindex=\"{}\",outcome=\"{}\"}} {value}",
                    escape(port.port.as_deref().unwrap_or("")),
                    port.ifindex,
                    outcome.name()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP enforcer_vm_epoch Current epoch of a registered VM."
    );
    let _ = writeln!(out, "# TYPE enforcer_vm_epoch gauge");
    for vm in vms {
        let _ = writeln!(
            out,
            "enforcer_vm_epoch{{mac=\"{}\",group=\"{}\"}} {}",
            vm.mac, vm.group, vm.epoch
        );
    }
    if let Some(h) = holds {
        let _ = writeln!(
            out,
            "# HELP enforcer_held_frames Frames held now, by queue (receiver VM or group)."
        );
        let _ = writeln!(out, "# TYPE enforcer_held_frames gauge");
        let _ = writeln!(out, "# HELP enforcer_held_bytes Bytes held now, by queue.");
        let _ = writeln!(out, "# TYPE enforcer_held_bytes gauge");
        for q in &h.queues {
            let _ = writeln!(
                out,
                "enforcer_held_frames{{queue=\"{}\"}} {}",
                escape(&q.queue.to_string()),
                q.frames
            );
            let _ = writeln!(
                out,
                "enforcer_held_bytes{{queue=\"{}\"}} {}",
                escape(&q.queue.to_string()),
                q.bytes
            );
        }
        let _ = writeln!(
            out,
            "# HELP enforcer_hold_frames_total What the buffer did with the frames it was handed, by outcome."
        );
        let _ = writeln!(out, "# TYPE enforcer_hold_frames_total counter");
        for (total, value) in &h.totals {
            let _ = writeln!(
                out,
                "enforcer_hold_frames_total{{outcome=\"{}\"}} {value}",
                total.name()
            );
        }
        for (loss, value) in &h.kernel {
            let _ = writeln!(
                out,
                "enforcer_hold_frames_total{{outcome=\"kernel_{}\"}} {value}",
                loss.name()
            );
        }
        let _ = writeln!(
            out,
            "# HELP enforcer_hold_time_seconds How long re-injected frames were held."
        );
        let _ = writeln!(out, "# TYPE enforcer_hold_time_seconds histogram");
        for (le, count) in &h.hold_time_buckets {
            let _ = writeln!(
                out,
                "enforcer_hold_time_seconds_bucket{{le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "enforcer_hold_time_seconds_bucket{{le=\"+Inf\"}} {}",
            h.hold_time_count
        );
        let _ = writeln!(
            out,
            "enforcer_hold_time_seconds_sum {}",
            h.hold_time_sum_seconds
        );
        let _ = writeln!(
            out,
            "enforcer_hold_time_seconds_count {}",
            h.hold_time_count
        );
    }
    let _ = writeln!(
        out,
        "# HELP enforcer_channel_replayed_frames_total Recorded channel state replayed into \
         restored VMs' ports here since the daemon started.\n\
         # TYPE enforcer_channel_replayed_frames_total counter\n\
         enforcer_channel_replayed_frames_total {}\n\
         # HELP enforcer_channel_replay_port_dropped_frames_total Frames restored VMs' ports \
         dropped while channel state was replayed into them (their tx_dropped), since the \
         daemon started.\n\
         # TYPE enforcer_channel_replay_port_dropped_frames_total counter\n\
         enforcer_channel_replay_port_dropped_frames_total {}",
        replayed.sent, replayed.dropped
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use enforcer_common::HoldTotal;

    use super::*;
    use crate::model::MacAddr;

    #[test]
    fn renders_counters_and_epochs() {
        let mut counters = BTreeMap::new();
        counters.insert(
            "type3_dropped".to_owned(),
            CounterJson {
                frames: 3,
                bytes: 180,
            },
        );
        let ports = vec![PortStats {
            remote: false,
            ifindex: 7,
            port: Some("vnet\"0".into()),
            vm: None,
            counters,
        }];
        let vms = vec![VmRecord {
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            group: 1,
            epoch: 4,
            ifindex: 7,
            remote: false,
        }];
        let mut holds = HoldReport {
            hold_time_buckets: vec![(0.001, 2), (1.0, 5)],
            hold_time_count: 6,
            ..Default::default()
        };
        holds.totals.insert(HoldTotal::Reinjected, 6);
        let replayed = Replayed {
            sent: 12,
            dropped: 1,
        };
        let text = render(&ports, &vms, Some(&holds), replayed);
        assert!(
            text.contains("enforcer_channel_replayed_frames_total 12\n")
                && text.contains("enforcer_channel_replay_port_dropped_frames_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_hold_frames_total{outcome=\"reinjected\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_hold_time_seconds_bucket{le=\"1\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_hold_time_seconds_bucket{le=\"+Inf\"} 6\n"),
            "{text}"
        );
        assert!(text.contains(
            "enforcer_port_frames_total{port=\"vnet\\\"0\",ifindex=\"7\",outcome=\"type3_dropped\"} 3\n"
        ));
        assert!(text.contains("enforcer_port_bytes_total{port=\"vnet\\\"0\",ifindex=\"7\",outcome=\"type3_dropped\"} 180\n"));
        assert!(text.contains(
            "enforcer_port_frames_total{port=\"vnet\\\"0\",ifindex=\"7\",outcome=\"type1\"} 0\n"
        ));
        assert!(text.contains("enforcer_vm_epoch{mac=\"02:00:00:00:00:01\",group=\"1\"} 4\n"));
        assert!(text.contains("# TYPE enforcer_port_frames_total counter"));
    }
}
