//! `bench tcp-skew`: TCP through a snapshot whose receiver advances `skew` seconds after its
//! sender, with Type-3 frames dropped and held (GENI-VIOLIN's Figure 6).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::Type3Mode;

use super::hold::BufferedLab;
use crate::netns::Lab;

/// One run of `bench tcp-skew`: bytes received over time.
struct SkewRun {
    mode: &'static str,
    skew: f64,
    /// (seconds since start, bytes received so far), one sample per read.
    progress: Vec<(f64, u64)>,
    /// Longest time after the sender's snapshot with no byte received.
    no_progress: f64,
}

/// `bench tcp-skew`: a TCP bulk stream vm1 → vm2; 2 s in, vm1 takes its snapshot (advances) and
/// vm2 follows `skew` seconds later; the no-progress period at the receiver, with Type-3 frames
/// dropped and with them held. GENI-VIOLIN's Figure 6, drawn to `figure` (SVG).
pub async fn tcp_skew(skews: &[f64], figure: &std::path::Path) -> anyhow::Result<String> {
    let bench = BufferedLab::start("enfs", "enfsbh").await?;
    let result = async {
        let (lab, client) = (&bench.lab, &bench.client);
        // The kernel's default offloads (TSO/GSO on, as on virtio-net with tap): the sender's
        // segments reach its port as GSO super-frames, and those are held whole.
        let mut runs = Vec::new();
        for (mode, name) in [(Type3Mode::Drop, "drop"), (Type3Mode::Buffer, "buffer")] {
            client.set_mode(mode).await?;
            for &skew in skews {
                eprintln!("[bench] tcp-skew: {name}, skew {skew} s");
                runs.push(skew_run(lab, client, name, skew).await?);
            }
        }
        std::fs::write(figure, skew_svg(&runs, skews))
            .with_context(|| format!("writing {}", figure.display()))?;
        let mut out = String::from(
            "tcp-skew: TCP bulk vm1 -> vm2, sender snapshot at 2 s, receiver `skew` s later\n",
        );
        out.push_str(&format!(
            "{:<8} {:>8} {:>16} {:>14}\n",
            "mode", "skew s", "no-progress s", "target"
        ));
        let mut worst: f64 = f64::NEG_INFINITY;
        for r in &runs {
            let target = if r.mode == "buffer" {
                format!("<= {:.3}", r.skew + 0.05)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<8} {:>8.1} {:>16.3} {:>14}\n",
                r.mode, r.skew, r.no_progress, target
            ));
            if r.mode == "buffer" {
                worst = worst.max(r.no_progress - r.skew);
            }
        }
        out.push_str(&format!("figure: {}\n", figure.display()));
        let (mut unbuffered, mut held, mut held_bytes) = (0, 0, 0);
        for port in client.stats().await? {
            unbuffered += port.frames(enforcer_common::Outcome::Type3Unbuffered);
            held += port.frames(enforcer_common::Outcome::Type3Held);
            held_bytes += port.bytes(enforcer_common::Outcome::Type3Held);
        }
        out.push_str(&format!(
            "held: {held} frames, {} bytes on average (wire frames are at most 1514)\n",
            held_bytes.checked_div(held).unwrap_or(0)
        ));
        out.push_str(&format!(
            "tcp-skew (offloads on): buffer no-progress beyond the skew at most {:.0} ms, \
             unbuffered {unbuffered}",
            worst * 1000.0
        ));
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    bench.stop().await?;
    result
}

async fn skew_run(
    lab: &Lab,
    client: &enforcer::api::client::Client,
    mode: &'static str,
    skew: f64,
) -> anyhow::Result<SkewRun> {
    use std::io::{Read as _, Write as _};
    let server_ip = lab.vms[1].ip;
    let listener = lab.in_vm(1, move || std::net::TcpListener::bind((server_ip, 47_600)))??;
    let start = Instant::now();
    let server = thread::spawn(move || -> std::io::Result<Vec<(f64, u64)>> {
        let (mut conn, _) = listener.accept()?;
        let (mut buf, mut total, mut progress) = (vec![0u8; 1 << 16], 0u64, Vec::new());
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(progress);
            }
            total += n as u64;
            progress.push((start.elapsed().as_secs_f64(), total));
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = lab.in_vm(0, move || std::net::TcpStream::connect((server_ip, 47_600)))??;
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 14];
            while !stop.load(Ordering::Relaxed) {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        })
    };
    let at = |secs: f64| {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs_f64(secs),
        ))
    };
    at(2.0).await;
    client.advance(lab.vms[0].mac).await?;
    at(2.0 + skew).await;
    client.advance(lab.vms[1].mac).await?;
    at(2.0 + skew + 3.0).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let progress = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let after: Vec<f64> = progress
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t >= 2.0)
        .collect();
    let mut no_progress: f64 = 0.0;
    let mut last = 2.0;
    for t in after {
        no_progress = no_progress.max(t - last);
        last = t;
    }
    Ok(SkewRun {
        mode,
        skew,
        progress,
        no_progress,
    })
}

/// The figure: bytes received over time, one panel per mode, one line per skew.
fn skew_svg(runs: &[SkewRun], skews: &[f64]) -> String {
    const COLORS: [&str; 4] = ["#d62728", "#2ca02c", "#1f77b4", "#9467bd"];
    let (w, h, pad) = (460.0, 300.0, 50.0);
    let t_max = runs
        .iter()
        .flat_map(|r| r.progress.last())
        .map(|(t, _)| *t)
        .fold(1.0, f64::max);
    let y_max = runs
        .iter()
        .flat_map(|r| r.progress.last())
        .map(|(_, b)| *b as f64)
        .fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * w,
        h + 30.0
    );
    for (panel, mode) in ["drop", "buffer"].iter().enumerate() {
        let x0 = panel as f64 * w;
        let (px, py, pw, ph) = (x0 + pad, 30.0, w - pad - 15.0, h - pad - 10.0);
        svg += &format!(
            "<text x=\"{}\" y=\"18\" font-weight=\"bold\">({}) Type-3 frames {}</text>\n",
            px,
            if panel == 0 { 'a' } else { 'b' },
            if *mode == "drop" {
                "dropped"
            } else {
                "held and re-injected"
            }
        );
        svg += &format!(
            "<rect x=\"{px}\" y=\"{py}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>\n"
        );
        for tick in 0..=(t_max as u32) {
            let x = px + pw * f64::from(tick) / t_max;
            svg += &format!(
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"black\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>\n",
                py + ph,
                py + ph + 4.0,
                py + ph + 16.0
            );
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>\n",
            px + pw / 2.0,
            py + ph + 32.0
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" transform=\"rotate(-90 {} {})\" text-anchor=\"middle\">MB received</text>\n",
            x0 + 14.0,
            py + ph / 2.0,
            x0 + 14.0,
            py + ph / 2.0
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            px - 4.0,
            py + 10.0,
            y_max / 1e6
        );
        for (i, skew) in skews.iter().enumerate() {
            let Some(run) = runs.iter().find(|r| r.mode == *mode && r.skew == *skew) else {
                continue;
            };
            let color = COLORS[i % COLORS.len()];
            let step = (run.progress.len() / 1500).max(1);
            let points: Vec<String> = run
                .progress
                .iter()
                .step_by(step)
                .map(|(t, b)| {
                    format!(
                        "{:.1},{:.1}",
                        px + pw * t / t_max,
                        py + ph - ph * (*b as f64) / y_max
                    )
                })
                .collect();
            svg += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                points.join(" ")
            );
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">skew {skew} s: no progress {:.2} s</text>\n",
                px + 8.0,
                py + 16.0 + 14.0 * i as f64,
                run.no_progress
            );
        }
    }
    svg += "</svg>\n";
    svg
}
