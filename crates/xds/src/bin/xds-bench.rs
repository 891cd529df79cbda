//! Discovery convergence benchmark: a registry of N workload entries and M services served to
//! C real delta-xDS streams over loopback; measures the time from a registry change to every
//! client having it, and the server's memory.
//!
//! `xds-bench run` spawns `xds-bench serve` as a child process (so its memory is the server's
//! alone) and drives it over stdin. Plaintext HTTP/2: 1,000 TLS handshakes would measure TLS,
//! not discovery (and TLS does not change the per-push work once connections are up).

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use isthmus_model::{
    Health, ObjectMeta, Service, ServicePort, ServiceSpec, ServiceStatus, WorkloadEntry,
    WorkloadEntrySpec,
};
use isthmus_xds::pb::envoy::config::core::v3::Node;
use isthmus_xds::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use isthmus_xds::{
    build_resources, Identity, MappingOptions, ServerConfig, StaticAuthenticator, XdsServer,
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

const TOKEN: &str = "bench-token";
const NAMESPACES: usize = 10;

#[derive(Parser)]
#[command(about = "Isthmus discovery convergence benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark (spawns the server as a child process).
    Run {
        #[arg(long, default_value_t = 10_000)]
        workloads: usize,
        #[arg(long, default_value_t = 1_000)]
        services: usize,
        #[arg(long, default_value_t = 1_000)]
        clients: usize,
        /// Single-entry changes measured one after the other.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Clients connecting at once during the initial sync.
        #[arg(long, default_value_t = 50)]
        connect_batch: usize,
    },
    /// The server side (internal: driven over stdin by `run`).
    Serve {
        #[arg(long)]
        workloads: usize,
        #[arg(long)]
        services: usize,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run {
            workloads,
            services,
            clients,
            rounds,
            connect_batch,
        } => runtime.block_on(run(workloads, services, clients, rounds, connect_batch)),
        Command::Serve {
            workloads,
            services,
        } => runtime.block_on(serve(workloads, services)),
    }
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        ..Default::default()
    }
}

/// `services` services spread over 10 namespaces, `workloads` entries selected by label,
/// half of them on hosts running the agent.
fn registry(workloads: usize, services: usize) -> (Vec<Service>, Vec<WorkloadEntry>) {
    let svcs: Vec<Service> = (0..services)
        .map(|s| Service {
            api_version: "isthmus.io/v1".into(),
            kind: "Service".into(),
            metadata: meta(&format!("ns{}", s % NAMESPACES), &format!("svc{s}")),
            spec: ServiceSpec {
                ports: vec![
                    ServicePort {
                        name: "http".into(),
                        port: 80,
                        protocol: Some("HTTP".into()),
                        target_port: Some(8080),
                    },
                    ServicePort {
                        name: "metrics".into(),
                        port: 9090,
                        protocol: None,
                        target_port: None,
                    },
                ],
                selector: Some([("app".to_owned(), format!("svc{s}"))].into()),
            },
            status: ServiceStatus {
                vip: Some(
                    format!("10.96.{}.{}", s / 250, s % 250 + 1)
                        .parse()
                        .unwrap_or(std::net::IpAddr::from([10, 96, 0, 1])),
                ),
            },
        })
        .collect();
    let entries = (0..workloads)
        .map(|i| {
            let s = i % services.max(1);
            let mut m = meta(&format!("ns{}", s % NAMESPACES), &format!("vm{i}"));
            if i % 2 == 0 {
                m.annotations
                    .insert("isthmus.io/agent".into(), "true".into());
            }
            WorkloadEntry {
                api_version: "isthmus.io/v1".into(),
                kind: "WorkloadEntry".into(),
                metadata: m,
                spec: WorkloadEntrySpec {
                    address: format!("10.{}.{}.{}", 1 + i / 62_500, (i / 250) % 250, i % 250 + 1),
                    labels: [("app".to_owned(), format!("svc{s}"))].into(),
                    service_account: format!("sa{}", s % 50),
                    ..Default::default()
                },
                status: Default::default(),
            }
        })
        .collect();
    (svcs, entries)
}

fn uid_of(i: usize, services: usize) -> String {
    let s = i % services.max(1);
    MappingOptions::default().workload_uid(&format!("ns{}", s % NAMESPACES), &format!("vm{i}"))
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in milliseconds (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14th and 15th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) * 10)
        })
        .unwrap_or(0)
}

async fn serve(workloads: usize, services: usize) -> Result<()> {
    let (svcs, mut entries) = registry(workloads, services);
    let opts = MappingOptions::default();
    let t = Instant::now();
    let set = build_resources(&svcs, &entries, &opts);
    let first_build = t.elapsed();
    let (tx, rx) = watch::channel(Arc::new(set));
    let auth = StaticAuthenticator::new()
        .with_token(TOKEN, Identity::new("cluster.local", "ns0", "bench"));
    let xds = XdsServer::start(rx, Arc::new(auth), ServerConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(1 << 20))
        .add_service(xds.clone().into_service());
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            eprintln!("server failed: {e}");
        }
    });
    let mut out = std::io::stdout();
    writeln!(
        out,
        "listening {addr} build_ms {:.1}",
        first_build.as_secs_f64() * 1e3
    )?;
    out.flush()?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["change", i] => {
                let i: usize = i.parse()?;
                let e = &mut entries[i];
                e.status.health = match e.status.health {
                    Health::Healthy => Health::Unhealthy,
                    Health::Unhealthy => Health::Healthy,
                };
                let t = Instant::now();
                let set = build_resources(&svcs, &entries, &opts);
                let build = t.elapsed();
                tx.send_replace(Arc::new(set));
                writeln!(
                    out,
                    "published {i} build_ms {:.1}",
                    build.as_secs_f64() * 1e3
                )?;
            }
            ["clients"] => writeln!(out, "clients {}", xds.metrics().connected_clients())?,
            ["quit"] => return Ok(()),
            _ => writeln!(out, "error unknown command {line:?}")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// What a light client reports to the driver.
enum Event {
    Synced,
    Saw { round: usize, at: Instant },
    Failed(String),
}

mod light {
    //! Decodes responses without the resource bodies: a thousand clients in one process
    //! must not cost more than the server they measure.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "3")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Response {
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<Resource>,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub nonce: String,
        #[prost(string, repeated, tag = "6")]
        pub removed_resources: Vec<String>,
    }
}

async fn light_client(
    channel: Channel,
    watched: Arc<HashMap<String, usize>>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(16);
    for (i, t) in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
        .iter()
        .enumerate()
    {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: "sidecar~10.0.0.1~bench.ns0~ns0.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: (*t).to_owned(),
            ..Default::default()
        })
        .await?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 << 20);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, light::Response>::default();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    );
    let mut stream = grpc.streaming(request, path, codec).await?.into_inner();
    let mut answered = 0;
    while let Some(r) = stream.message().await? {
        let at = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        answered += 1;
        if answered == 2 {
            let _ = events.send(Event::Synced);
        }
        if answered > 2 {
            for res in &r.resources {
                if let Some(&round) = watched.get(&res.name) {
                    let _ = events.send(Event::Saw { round, at });
                }
            }
        }
    }
    bail!("stream ended")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn run(
    workloads: usize,
    services: usize,
    clients: usize,
    rounds: usize,
    connect_batch: usize,
) -> Result<()> {
    let exe = std::env::current_exe()?;
    // std's Command with the pipes handed to tokio: the binary has no tokio `process` feature.
    let child = std::process::Command::new(exe)
        .args([
            "serve",
            "--workloads",
            &workloads.to_string(),
            "--services",
            &services.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning the server")?;
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let mut stdin = pipe::Sender::from_owned_fd(child.0.stdin.take().context("stdin")?.into())
        .context("server stdin")?;
    let mut lines = BufReader::new(
        pipe::Receiver::from_owned_fd(child.0.stdout.take().context("stdout")?.into())
            .context("server stdout")?,
    )
    .lines();
    let first = lines.next_line().await?.context("server exited")?;
    let words: Vec<&str> = first.split_whitespace().collect();
    let addr: SocketAddr = words.get(1).context("listening line")?.parse()?;
    println!("server: {first}");
    let rss_idle = status_kb(pid, "VmRSS:");

    // Entries changed in the rounds, spread over the registry.
    let step = (workloads / rounds.max(1)).max(1);
    let changed: Vec<usize> = (0..rounds).map(|r| (r * step + 7) % workloads).collect();
    let watched: Arc<HashMap<String, usize>> = Arc::new(
        changed
            .iter()
            .enumerate()
            .map(|(r, &i)| (uid_of(i, services), r))
            .collect(),
    );

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(1 << 20));
    let t_sync = Instant::now();
    let mut synced = 0;
    for batch in (0..clients)
        .collect::<Vec<_>>()
        .chunks(connect_batch.max(1))
    {
        for _ in batch {
            let channel = endpoint.connect().await?;
            let watched = watched.clone();
            let ev = ev_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = light_client(channel, watched, ev.clone()).await {
                    let _ = ev.send(Event::Failed(e.to_string()));
                }
            });
        }
        let target = (synced + batch.len()).min(clients);
        while synced < target {
            match ev_rx.recv().await.context("events")? {
                Event::Synced => synced += 1,
                Event::Failed(e) => bail!("client failed during sync: {e}"),
                Event::Saw { .. } => {}
            }
        }
    }
    let sync_time = t_sync.elapsed();
    println!(
        "initial sync of {clients} clients (full state each): {:.2} s",
        sync_time.as_secs_f64()
    );
    let rss_synced = status_kb(pid, "VmRSS:");
    let cpu_before = cpu_ms(pid);

    let mut samples = Vec::with_capacity(rounds * clients);
    let mut round_max = Vec::new();
    let mut builds = Vec::new();
    for (round, &i) in changed.iter().enumerate() {
        let t0 = Instant::now();
        stdin.write_all(format!("change {i}\n").as_bytes()).await?;
        stdin.flush().await?;
        let reply = lines.next_line().await?.context("server exited")?;
        if let Some(b) = reply
            .split_whitespace()
            .nth(3)
            .and_then(|b| b.parse::<f64>().ok())
        {
            builds.push(b);
        }
        let mut seen = 0;
        let mut worst = Duration::ZERO;
        while seen < clients {
            let ev = tokio::time::timeout(Duration::from_secs(60), ev_rx.recv())
                .await
                .context("round timed out")?
                .context("events")?;
            match ev {
                Event::Saw { round: r, at } if r == round => {
                    let d = at.duration_since(t0);
                    worst = worst.max(d);
                    samples.push(d);
                    seen += 1;
                }
                Event::Failed(e) => bail!("client failed: {e}"),
                _ => {}
            }
        }
        round_max.push(worst);
    }
    let rss_after = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    let round_cpu = cpu_ms(pid).saturating_sub(cpu_before);
    stdin.write_all(b"quit\n").await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && matches!(child.0.try_wait(), Ok(None)) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    samples.sort();
    builds.sort_by(f64::total_cmp);
    println!("\n## results");
    println!("workloads {workloads}, services {services}, clients {clients}, rounds {rounds}");
    println!(
        "convergence (change published -> every client has it), {} samples: p50 {}  p99 {}  max {}",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(samples.last().copied().unwrap_or_default())
    );
    round_max.sort();
    println!(
        "per-round time until the last client has it: median {}  max {}",
        ms(percentile(&round_max, 0.5)),
        ms(round_max.last().copied().unwrap_or_default())
    );
    if !builds.is_empty() {
        println!(
            "registry -> ResourceSet rebuild (included above): median {:.1} ms",
            builds[builds.len() / 2]
        );
    }
    println!(
        "server CPU during the rounds: {} ms per change (rebuild + pushes to {clients} clients)",
        round_cpu / rounds.max(1) as u64
    );
    println!(
        "server memory: VmRSS idle {} MB, after sync {} MB, after rounds {} MB, peak (VmHWM) {} MB",
        rss_idle / 1024,
        rss_synced / 1024,
        rss_after / 1024,
        hwm / 1024
    );
    println!(
        "driver (clients) memory: VmRSS {} MB",
        status_kb(std::process::id(), "VmRSS:") / 1024
    );
    Ok(())
}

/// The server child, killed (and reaped) if the run ends early.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
