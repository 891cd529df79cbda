//! The run's figures as one markdown table: the server per caller mode and concurrency, and
//! beside it the in-process and openssl rates on the same CSRs.

use std::fmt::Write;

use isthmus_bench::format::{mib, ms};

use crate::driver::RunResult;

const NONE: &str = "—";

pub fn markdown(r: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} certificates per caller mode and concurrency level, each level against a fresh \
         server, over up to {} pooled HTTP/2 connections (TLS handshakes, one checked request and a \
         warm-up of 20 requests or 2 per worker before timing). The {} CSRs (ECDSA P-256) were made before any \
         timing ({:.2} s); the same CSRs go to every system. Phase limit {} s.",
        r.requests, r.connections, r.requests, r.csr_generation_s, r.phase_timeout_s
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| system | caller | concurrency | certs/s | latency p50 / p99 / max ms | server CPU ms/cert | bench process CPU ms/cert | server RSS after, MiB | failed |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for l in &r.levels {
        let mark = if l.stopped_at_deadline {
            format!(
                " ({} of {}, stopped at the phase limit)",
                l.completed, l.requested
            )
        } else {
            String::new()
        };
        let (server_cpu, process_cpu) = match l.server_cpu_ms_per_cert {
            Some(s) => (ms(s), ms(l.process_cpu_ms_per_cert)),
            None => (
                "(in the bench process)".to_string(),
                format!("{} (client + server)", ms(l.process_cpu_ms_per_cert)),
            ),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0}{mark} | {} / {} / {} | {server_cpu} | {process_cpu} | {} | {} |",
            l.system,
            l.caller,
            l.concurrency,
            l.per_s,
            ms(l.latency.p50_ms),
            ms(l.latency.p99_ms),
            ms(l.latency.max_ms),
            l.memory_after.as_ref().map_or_else(|| NONE.to_string(), mib),
            l.errors
        );
    }
    for p in &r.inprocess {
        let threads = if p.threads == 1 {
            "1 thread".to_string()
        } else {
            format!("{} threads", p.threads)
        };
        let _ = writeln!(
            out,
            "| {} | direct call | {threads} | {:.0} | {} / {} / {} | {NONE} | {} | {NONE} | 0 |",
            p.what,
            p.per_s,
            ms(p.latency.p50_ms),
            ms(p.latency.p99_ms),
            ms(p.latency.max_ms),
            ms(p.cpu_ms_per_cert),
        );
    }
    if let Some(o) = &r.openssl {
        let _ = writeln!(
            out,
            "| `openssl x509 -req` ({}), a process per cert, {} certs | command line | 1 | {:.0} | {} / {} / {} | {NONE} | {} (the openssl processes) | {NONE} | 0 |",
            o.version,
            o.certs,
            o.per_s,
            ms(o.latency.p50_ms),
            ms(o.latency.p99_ms),
            ms(o.latency.max_ms),
            ms(o.cpu_ms_per_cert),
        );
    }
    let _ = writeln!(out);
    if let Some(o) = &r.openssl {
        if let (Some(s), Some(v)) = (o.speed_sign_per_s, o.speed_verify_per_s) {
            let _ = writeln!(
                out,
                "Raw P-256 on one core, `openssl speed -seconds 1 ecdsap256`: {s:.0} signatures/s, \
                 {v:.0} verifications/s (a CSR costs the CA one verification and one signature)."
            );
        }
    }
    for l in &r.levels {
        if let Some(u) = l.token_uses_recorded {
            if u != l.completed as u64 {
                let _ = writeln!(
                    out,
                    "- {}, {} c={}: the ledger recorded {u} token uses for {} certificates.",
                    l.system, l.caller, l.concurrency, l.completed
                );
            }
        }
        if let Some(e) = &l.first_error {
            let _ = writeln!(
                out,
                "- {}, {} c={}: {} failed; first: {e}",
                l.system, l.caller, l.concurrency, l.errors
            );
        }
    }
    for p in &r.problems {
        let _ = writeln!(out, "- {p}");
    }
    if let Some(p) = &r.openssl_problem {
        let _ = writeln!(out, "- openssl: {p}");
    }
    out
}
