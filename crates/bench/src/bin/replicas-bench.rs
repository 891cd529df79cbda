//! `replicas-bench`: three `isthmus server` replicas on a three-member etcd, on loopback.
//! Measures, in one run: how fast simulated agents (real discovery clients: gRPC over TLS with
//! a join token, CA_ADDR listing every replica) converge when spread over the replicas; how
//! long the agents of a SIGKILLed replica take to have a discovery stream on another; and each
//! replica's memory with many workloads registered. Bounded in count and time.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use isthmus_bench::procfs::{self, ServerProcess};
use isthmus_bench::server::{self, Admin};
use isthmus_bench::stats::Percentiles;
use isthmus_xds::client::{ClientStatus, Connect, ConnectError, EndpointConnector};
use isthmus_xds::{ClientConfig, XdsClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "replicas-bench",
    about = "Agents converging over three replicas, failover when one is killed, replica memory"
)]
struct Args {
    #[arg(long, default_value = "target/release/isthmus")]
    isthmus_bin: PathBuf,
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Simulated agents, spread over the replicas.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Workloads registered before the agents connect (each a service with one address).
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// Then this many more, for the memory figure (agents disconnected first).
    #[arg(long, default_value_t = 10_000)]
    memory_workloads: usize,
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// CA_ADDR with every replica: starts at `next`, keeps the one that answers.
struct ListConnector {
    endpoints: Vec<EndpointConnector>,
    next: AtomicUsize,
    meta: EndpointConnector,
}

#[tonic::async_trait]
impl Connect for ListConnector {
    async fn connect(&self) -> Result<Channel, ConnectError> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match self.endpoints[i].connect().await {
                Ok(c) => {
                    self.next.store(i, Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e) => last = Some(e),
            }
        }
        self.next.store((start + 1) % n, Ordering::Relaxed);
        Err(last.unwrap_or_else(|| ConnectError::Credentials("no endpoint".into())))
    }
    fn metadata(&self) -> Result<tonic::metadata::MetadataMap, ConnectError> {
        self.meta.metadata()
    }
}

struct Replica {
    admin: Admin,
    grpc: String,
    process: Option<ServerProcess>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn rss_mib(pid: u32) -> String {
    procfs::memory(pid)
        .map(|m| isthmus_bench::format::mib(&m))
        .unwrap_or_else(|_| "—".into())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let work = match &args.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("replicas-bench-")
            .tempdir_in(d),
        None => tempfile::Builder::new().prefix("replicas-bench-").tempdir(),
    }?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let etcd_dir = work.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let cluster = isthmus_bench::etcd::start_cluster(&args.etcd_bin, &etcd_dir, &http, 3).await?;
    let endpoints = cluster.bases.join(",");
    let seal = work.path().join("seal.key");
    std::fs::write(&seal, "c4".repeat(32))?;
    std::fs::set_permissions(&seal, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let limit = (args.agents * 2).to_string();
    let mut replicas = Vec::new();
    for k in 0..3 {
        let dir = work.path().join(format!("r{k}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let token = data.join("admin-token");
        std::fs::write(&token, "replicas-bench-admin-token")?;
        let extra: Vec<String> = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--seal-key-file",
            &seal.display().to_string(),
            "--admin-token-file",
            &token.display().to_string(),
            "--replica-name",
            &format!("r{k}"),
            "--max-streams-per-identity",
            &limit,
            "--max-streams-per-identity-and-address",
            &limit,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let started = server::start_with(&args.isthmus_bin, &dir, http.clone(), &extra).await?;
        replicas.push(Replica {
            admin: started.admin,
            grpc: started.endpoints.grpc.clone(),
            process: Some(started.process),
        });
    }
    let root = std::fs::read_to_string(work.path().join("r0/data/ca/root-cert.pem"))
        .context("the mesh root")?;

    // Workloads, round-robin over the replicas.
    let register = |k: usize, i: usize| {
        let admin = &replicas[k % 3].admin;
        let body = serde_json::json!({
            "service": format!("svc-{i}"), "namespace": "bench",
            "ip": format!("10.{}.{}.{}", 40 + i / 65536, (i / 256) % 256, i % 256), "ports": ["http:8080"]
        });
        async move {
            let _: serde_json::Value = admin.post_json("/api/v1/register", &body).await?;
            anyhow::Ok(())
        }
    };
    for i in 0..args.workloads {
        register(i, i).await?;
    }
    let token: serde_json::Value = replicas[0]
        .admin
        .post_json(
            "/api/v1/tokens",
            &serde_json::json!({"namespace": "bench", "serviceAccount": "agent", "ttl": "2h"}),
        )
        .await?;
    let token = token["token"].as_str().context("no token")?.to_string();

    // The agents: replica k%3 first, then the others.
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut tasks = Vec::new();
    let mut ready_at: Vec<tokio::task::JoinHandle<Option<Duration>>> = Vec::new();
    for a in 0..args.agents {
        let endpoints = replicas
            .iter()
            .map(|r| {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&root))
                    .domain_name("istiod.istio-system.svc");
                let endpoint = Endpoint::from_shared(r.grpc.clone())?
                    .tls_config(tls)?
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                anyhow::Ok(EndpointConnector::new(endpoint).with_bearer_token(token.clone()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let meta = EndpointConnector::new(Endpoint::from_static("https://unused"))
            .with_bearer_token(token.clone());
        let connector = ListConnector {
            endpoints,
            next: AtomicUsize::new(a % 3),
            meta,
        };
        let mut config = ClientConfig::new(format!("bench-agent-{a}"));
        config
            .node_metadata
            .insert("NAMESPACE".into(), "bench".into());
        let client = XdsClient::new(config, Arc::new(connector));
        statuses.push(client.status());
        let mut ready = client.ready();
        ready_at.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(120), ready.wait())
                .await
                .ok()
                .map(|_| started.elapsed())
        }));
        tasks.push(tokio::spawn(client.run()));
    }
    let mut converge = Vec::new();
    for r in ready_at {
        if let Some(d) = r.await? {
            converge.push(d);
        }
    }
    let converged = converge.len();
    let converge = Percentiles::of(&mut converge);
    let rss_agents: Vec<String> = replicas
        .iter()
        .map(|r| rss_mib(r.process.as_ref().map_or(0, |p| p.pid())))
        .collect();

    // Failover: SIGKILL replica 0; its agents (those whose first replica it was) must have a
    // discovery stream on another replica.
    let victims: Vec<usize> = (0..args.agents).filter(|a| a % 3 == 0).collect();
    let mut watchers = Vec::new();
    for &a in &victims {
        let mut status = statuses[a].clone();
        watchers.push(tokio::spawn(async move {
            // Wait for the stream to break, then to be connected again.
            let broke = tokio::time::timeout(Duration::from_secs(60), async {
                status
                    .wait_for(|s| !matches!(s, ClientStatus::Connected))
                    .await
                    .map(|_| ())
            })
            .await;
            broke.ok()?.ok()?;
            tokio::time::timeout(Duration::from_secs(60), async {
                status
                    .wait_for(|s| matches!(s, ClientStatus::Connected))
                    .await
                    .map(|_| ())
            })
            .await
            .ok()?
            .ok()?;
            Some(Instant::now())
        }));
    }
    let killed_at = Instant::now();
    // Dropping the process handle SIGKILLs it.
    drop(replicas[0].process.take());
    let mut failover = Vec::new();
    for w in watchers {
        if let Some(t) = w.await? {
            failover.push(t.duration_since(killed_at));
        }
    }
    let moved = failover.len();
    let failover = Percentiles::of(&mut failover);
    for t in &tasks {
        t.abort();
    }

    // Memory with many workloads, through the two live replicas.
    let mem_start = Instant::now();
    let base = args.workloads;
    let next = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..16 {
        let next = next.clone();
        let admin = replicas[1 + w % 2].admin.clone();
        let total = args.memory_workloads;
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let i = base + i;
                let body = serde_json::json!({
                    "service": format!("svc-{i}"), "namespace": "bench",
                    "ip": format!("10.{}.{}.{}", 40 + i / 65536, (i / 256) % 256, i % 256), "ports": ["http:8080"]
                });
                let _: serde_json::Value = admin.post_json("/api/v1/register", &body).await?;
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    let mem_secs = mem_start.elapsed().as_secs_f64();
    // Let the informers and discovery catch up before reading memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_workloads: Vec<String> = replicas[1..]
        .iter()
        .map(|r| rss_mib(r.process.as_ref().map_or(0, |p| p.pid())))
        .collect();

    println!("| | 3 replicas on a 3-member etcd |");
    println!("|---|---:|");
    println!(
        "| {} agents spread over the replicas: all with their first full state, p50 / p99 / max ms from the start | {} / {} / {} ({} of {}) |",
        args.agents,
        isthmus_bench::format::ms(converge.p50_ms),
        isthmus_bench::format::ms(converge.p99_ms),
        isthmus_bench::format::ms(converge.max_ms),
        converged,
        args.agents
    );
    println!(
        "| replica RSS with {} agents and {} workloads, MiB | {} |",
        args.agents,
        args.workloads,
        rss_agents.join(" / ")
    );
    println!(
        "| replica SIGKILLed: its {} agents' streams on another replica, p50 / p99 / max ms | {} / {} / {} ({} moved) |",
        victims.len(),
        isthmus_bench::format::ms(failover.p50_ms),
        isthmus_bench::format::ms(failover.p99_ms),
        isthmus_bench::format::ms(failover.max_ms),
        moved
    );
    println!(
        "| {} more workloads through the 2 survivors (16 writers): registrations/s | {:.0} |",
        args.memory_workloads,
        args.memory_workloads as f64 / mem_secs
    );
    println!(
        "| survivors' RSS with {} workloads (and services), MiB | {} |",
        args.workloads + args.memory_workloads,
        rss_workloads.join(" / ")
    );
    drop(cluster);
    Ok(())
}
