//! A standalone mesh DNS server answering N generated service names, for the benchmark in
//! `bench/dns.sh` (which runs dnsmasq on the same names beside it).
//!
//! `cargo run --release -p isthmus-dns --example mesh_dns_server -- --listen 127.0.0.1:15353
//!  --services 1000 --write-hosts /tmp/hosts --write-queries /tmp/queries`

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use isthmus_dns::{DnsServer, DnsServerConfig, NameTable};

#[derive(Parser, Debug)]
struct Args {
    /// Address for UDP and TCP (port 0: any; the bound address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:15353")]
    listen: SocketAddr,
    /// How many services (`svc-<i>.ns-<i % namespaces>.svc.<domain>`).
    #[arg(long, default_value_t = 1000)]
    services: u32,
    #[arg(long, default_value_t = 10)]
    namespaces: u32,
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Tasks receiving on the UDP socket.
    #[arg(long, default_value_t = 1)]
    udp_workers: usize,
    /// Write the same names as a hosts file (`IP name` lines) for dnsmasq's --addn-hosts.
    #[arg(long)]
    write_hosts: Option<PathBuf>,
    /// Write a dnsperf query file (`name A` lines).
    #[arg(long)]
    write_queries: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let names: Vec<(String, IpAddr)> = (0..args.services)
        .map(|i| {
            let name = format!(
                "svc-{i}.ns-{}.svc.{}",
                i % args.namespaces.max(1),
                args.domain
            );
            // VIPs from 10.96.0.0/12 as Kubernetes allocates them.
            let ip = Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            (name, IpAddr::V4(ip))
        })
        .collect();
    if let Some(path) = &args.write_hosts {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for (name, ip) in &names {
            writeln!(f, "{ip} {name}")?;
        }
    }
    if let Some(path) = &args.write_queries {
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for (name, _) in &names {
            writeln!(f, "{name} A")?;
        }
    }
    let mut builder = NameTable::builder(&args.domain)?;
    for (name, ip) in &names {
        builder.host(name, [*ip])?;
    }
    let table = builder.build();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(table));
        let mut config = DnsServerConfig::new(args.listen);
        config.udp_workers = args.udp_workers;
        let server = DnsServer::bind(config, rx).await?;
        println!("listening on {}", server.local_addr());
        std::io::stdout().flush()?;
        server
            .serve(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async {
                        match term.as_mut() {
                            Some(t) => { t.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
            })
            .await?;
        Ok(())
    })
}
