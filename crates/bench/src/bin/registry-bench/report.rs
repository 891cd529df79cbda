//! The run's figures as a markdown table, the systems side by side.

use std::fmt::Write;

use isthmus_bench::format::{mib, ms};

use crate::driver::{LoadResult, RunResult, SystemResult, WatchResult};

const NONE: &str = "—";

fn header(s: &SystemResult) -> String {
    if s.version.is_empty() {
        s.name.clone()
    } else {
        format!("{} {}", s.name, s.version)
    }
}

/// A table row from the load at concurrency `c` of each system.
fn load_row(
    out: &mut String,
    label: &str,
    c: usize,
    systems: &[&SystemResult],
    f: impl Fn(&LoadResult) -> String,
) {
    let cells: Vec<String> = systems
        .iter()
        .map(|s| {
            s.loads
                .iter()
                .find(|l| l.concurrency == c)
                .map_or_else(|| NONE.to_string(), &f)
        })
        .collect();
    let _ = writeln!(out, "| {label}, c={c} | {} |", cells.join(" | "));
}

fn watch_row(
    out: &mut String,
    label: &str,
    systems: &[&SystemResult],
    f: impl Fn(&WatchResult) -> String,
) {
    let cells: Vec<String> = systems
        .iter()
        .map(|s| s.watch.as_ref().map_or_else(|| NONE.to_string(), &f))
        .collect();
    let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
}

pub fn markdown(r: &RunResult) -> String {
    let mut systems = vec![&r.isthmus];
    systems.extend(r.isthmus_etcd.as_ref());
    systems.extend(r.isthmus_cluster.as_ref());
    systems.push(&r.etcd);
    systems.extend(r.etcd_cluster.as_ref());
    let systems = systems.as_slice();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} registrations per concurrency level, each level against a fresh server with an empty data \
         directory; then {} sequential writes timed until one connected watcher has the event, on the \
         last level's server (still holding its registrations). Phase limit {} s.",
        r.registrations, r.watch_writes, r.phase_timeout_s
    );
    if let Some(p) = &r.fsync_probe {
        let _ = writeln!(
            out,
            "Disk under the data directories, 4 KiB + fdatasync ({} each): over a preallocated file p50 {} / p99 {} ms; \
             appending p50 {} / p99 {} ms.",
            p.count,
            ms(p.overwrite.p50_ms),
            ms(p.overwrite.p99_ms),
            ms(p.append.p50_ms),
            ms(p.append.p99_ms),
        );
    }
    let _ = writeln!(out);
    let headers: Vec<String> = systems.iter().map(|s| header(s)).collect();
    let _ = writeln!(out, "| | {} |", headers.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(systems.len()));
    let mut levels: Vec<usize> = systems
        .iter()
        .flat_map(|s| s.loads.iter().map(|l| l.concurrency))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    for &c in &levels {
        load_row(&mut out, "registrations/s", c, systems, |l| {
            let mark = if l.stopped_at_deadline {
                " (stopped at the phase limit)"
            } else {
                ""
            };
            format!("{:.0}{mark}", l.ops_per_s)
        });
        load_row(&mut out, "latency p50 / p99 ms", c, systems, |l| {
            format!("{} / {}", ms(l.latency.p50_ms), ms(l.latency.p99_ms))
        });
        load_row(&mut out, "p50 of first / last 10% ms", c, systems, |l| {
            format!("{} / {}", ms(l.first_tenth_p50_ms), ms(l.last_tenth_p50_ms))
        });
        load_row(
            &mut out,
            "server CPU ms per registration",
            c,
            systems,
            |l| ms(l.server_cpu_ms_per_op),
        );
        load_row(
            &mut out,
            "server RSS after the load, MiB",
            c,
            systems,
            |l| mib(&l.memory_after),
        );
    }
    watch_row(
        &mut out,
        "write→watch event p50 / p99 / max ms",
        systems,
        |w| {
            format!(
                "{} / {} / {}",
                ms(w.write_to_event.p50_ms),
                ms(w.write_to_event.p99_ms),
                ms(w.write_to_event.max_ms)
            )
        },
    );
    watch_row(
        &mut out,
        "write acknowledged p50 / p99 ms (same writes)",
        systems,
        |w| format!("{} / {}", ms(w.ack.p50_ms), ms(w.ack.p99_ms)),
    );
    watch_row(
        &mut out,
        "server RSS after the watch phase, MiB",
        systems,
        |w| mib(&w.memory_after),
    );
    let errors = |s: &SystemResult| {
        if s.loads.is_empty() && s.watch.is_none() {
            return NONE.to_string();
        }
        let n: usize = s.loads.iter().map(|l| l.errors).sum::<usize>()
            + s.watch.as_ref().map_or(0, |w| w.errors);
        n.to_string()
    };
    let cells: Vec<String> = systems.iter().map(|s| errors(s)).collect();
    let _ = writeln!(
        out,
        "| failed requests (all phases) | {} |",
        cells.join(" | ")
    );
    let _ = writeln!(out);
    for s in systems.iter() {
        if let Some(p) = &s.problem {
            let _ = writeln!(out, "- {}: {p}", s.name);
        }
        for l in &s.loads {
            if let Some(e) = &l.first_error {
                let _ = writeln!(
                    out,
                    "- {} c={}: {} failed; first: {e}",
                    s.name, l.concurrency, l.errors
                );
            }
        }
        if let Some(e) = s.watch.as_ref().and_then(|w| w.first_error.as_ref()) {
            let _ = writeln!(out, "- {} watch phase: first failure: {e}", s.name);
        }
    }
    out
}
