//! The workload's health probe (Istio's WorkloadGroup probe, from the host's config): an HTTP
//! GET or a TCP connect against the local app, with success/failure thresholds. Changes are
//! reported to the control plane on the discovery stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_socket::SocketFactory;
use isthmus_xds::HealthReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp(SocketAddr),
    /// HTTP/1.1 GET `path`; 2xx and 3xx are healthy (as Kubernetes probes).
    Http {
        addr: SocketAddr,
        path: String,
    },
}

#[derive(Clone, Debug)]
pub struct Probe {
    pub check: Check,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("probe {0:?} is not PORT (TCP) or PORT/PATH (HTTP GET), e.g. 3306 or 8080/healthz")]
pub struct ProbeSpecError(pub String);

/// `3306` (TCP) or `8080/healthz` (HTTP GET), against 127.0.0.1.
pub fn parse_spec(spec: &str, http: bool) -> Result<Check, ProbeSpecError> {
    let bad = || ProbeSpecError(spec.to_string());
    let (port, path) = match spec.split_once('/') {
        Some((p, rest)) => (p, format!("/{rest}")),
        None => (spec, "/".to_string()),
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(if http {
        Check::Http { addr, path }
    } else {
        Check::Tcp(addr)
    })
}

async fn check_once(
    check: &Check,
    timeout: Duration,
    sockets: &SocketFactory,
) -> Result<(), String> {
    let attempt = async {
        match check {
            Check::Tcp(addr) => sockets
                .connect(*addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect to {addr}: {e}")),
            Check::Http { addr, path } => {
                let mut s = sockets
                    .connect(*addr)
                    .await
                    .map_err(|e| format!("connect to {addr}: {e}"))?;
                let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: isthmus-probe\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("send to {addr}: {e}"))?;
                let mut buf = vec![0u8; 64];
                let n = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("read from {addr}: {e}"))?;
                let status_line = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = status_line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("GET http://{addr}{path}: not an HTTP answer"))?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("GET http://{addr}{path} answered {code}"))
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Probes forever, publishing a report whenever the health flips (and the first verdict).
pub async fn run(
    probe: Probe,
    report: watch::Sender<Option<HealthReport>>,
    sockets: Arc<SocketFactory>,
) {
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    let mut healthy: Option<bool> = None;
    let mut ticker = tokio::time::interval(probe.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match check_once(&probe.check, probe.timeout, &sockets).await {
            Ok(()) => {
                ok_streak += 1;
                fail_streak = 0;
                if healthy != Some(true) && ok_streak >= probe.success_threshold.max(1) {
                    healthy = Some(true);
                    tracing::info!(check = ?probe.check, "workload healthy");
                    report.send_replace(Some(HealthReport {
                        healthy: true,
                        message: None,
                    }));
                }
            }
            Err(why) => {
                fail_streak += 1;
                ok_streak = 0;
                if healthy != Some(false) && fail_streak >= probe.failure_threshold.max(1) {
                    healthy = Some(false);
                    tracing::warn!(check = ?probe.check, reason = %why, "workload unhealthy");
                    report.send_replace(Some(HealthReport {
                        healthy: false,
                        message: Some(why),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("3306", false),
            Ok(Check::Tcp("127.0.0.1:3306".parse().unwrap()))
        );
        assert_eq!(
            parse_spec("8080/healthz/ready", true),
            Ok(Check::Http {
                addr: "127.0.0.1:8080".parse().unwrap(),
                path: "/healthz/ready".into()
            })
        );
        assert!(parse_spec("http", false)
            .unwrap_err()
            .to_string()
            .contains("\"http\""));
        assert!(parse_spec("0", false).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn thresholds_and_flips() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = watch::channel(None);
        let probe = Probe {
            check: Check::Tcp(addr),
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 2,
        };
        let task = tokio::spawn(run(probe, tx, SocketFactory::unmarked()));
        rx.wait_for(|r| r.as_ref().is_some_and(|r| r.healthy))
            .await
            .unwrap();
        drop(listener);
        let r = rx
            .wait_for(|r| r.as_ref().is_some_and(|r| !r.healthy))
            .await
            .unwrap()
            .clone()
            .unwrap();
        assert!(r.message.unwrap().contains(&addr.to_string()));
        task.abort();
    }
}
