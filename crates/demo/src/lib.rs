//! `isthmus demo` (root): the seeds' scenario built on this machine in network namespaces — a
//! control plane, two mesh hosts serving a small bookinfo (productpage calls reviews), and a VM
//! host with its own agent, `cluster.env` and `sidecar.env` — then the calls both ways, then
//! everything removed. Every process is this same binary; nothing leaves the namespaces.
#![forbid(unsafe_code)]

pub mod app;
pub mod lab;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::{Lab, SERVICE_CIDR};

const PREFIX: &str = "isthmus-demo";
const WAIT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    #[command(subcommand)]
    pub tool: Option<Tool>,
    /// Keep the mesh running after the calls, to explore it, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// The demo hosts' /24, as its first three octets (it exists only inside the demo's
    /// namespaces).
    #[arg(long, default_value = "10.213.0", value_parser = parse_subnet)]
    pub subnet: [u8; 3],
}

/// The demo's own workloads, run inside its namespaces.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Tool {
    /// A tiny HTTP app that names itself (and what its upstream answered).
    #[command(hide = true)]
    App {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: Option<String>,
    },
    /// GET a URL through the host's resolver and print the body (a curl for hosts without one).
    Fetch { url: String },
}

fn parse_subnet(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = s.split('.').collect();
    let bad = || format!("{s:?} is not the first three octets of a /24, e.g. 10.213.0");
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut out = [0u8; 3];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p.parse().map_err(|_| bad())?;
    }
    Ok(out)
}

/// `until_stopped` resolves when the user wants a kept mesh (`--keep`) removed: SIGINT or
/// SIGTERM in the binary.
pub async fn run(
    args: DemoArgs,
    out: &mut dyn Write,
    until_stopped: impl std::future::Future<Output = ()>,
) -> Result<()> {
    match args.tool {
        Some(Tool::App {
            name,
            listen,
            upstream,
        }) => app::serve(name, listen, upstream).await,
        Some(Tool::Fetch { url }) => {
            let body = app::fetch(&url).await?;
            write!(out, "{body}")?;
            Ok(())
        }
        None => {
            let work = tempfile::Builder::new()
                .prefix("isthmus-demo-")
                .tempdir()
                .context("cannot create a work directory")?;
            let result = scenario(&args, work.path(), out, until_stopped).await;
            if result.is_err() {
                let kept = work.keep();
                writeln!(out, "logs kept in {}", kept.join("logs").display())?;
            }
            result
        }
    }
}

struct Demo {
    lab: Lab,
    exe: String,
    work: PathBuf,
    admin: String,
    token: String,
}

impl Demo {
    /// `isthmus <args>` against the demo's control plane, from its namespace.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let mut full = vec![self.exe.clone()];
        full.extend(args.iter().map(|s| s.to_string()));
        full.extend([
            "--server".into(),
            self.admin.clone(),
            "--token".into(),
            self.token.clone(),
        ]);
        let o = self.lab.exec("cp", &full)?;
        if !o.status.success() {
            bail!(
                "isthmus {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `isthmus demo fetch url` on `host` once: the body, or what went wrong (the status).
    fn fetch_once(&mut self, host: &str, url: &str) -> Result<String> {
        let o = self.lab.exec(
            host,
            &[self.exe.clone(), "demo".into(), "fetch".into(), url.into()],
        )?;
        let out = if o.status.success() {
            &o.stdout
        } else {
            &o.stderr
        };
        Ok(String::from_utf8_lossy(out).trim().to_string())
    }

    /// The agent's Prometheus text, from its metrics endpoint on `host`.
    async fn agent_metrics(&mut self, endpoints: &Path, host: &str) -> Result<String> {
        let ep = self.wait_json(endpoints).await?;
        let url = format!("{}/metrics", ep["metrics"].as_str().unwrap_or_default());
        self.fetch(host, &url).await
    }

    /// `isthmus demo fetch url` on `host`, retried until it answers or `WAIT` passes.
    async fn fetch(&mut self, host: &str, url: &str) -> Result<String> {
        let start = Instant::now();
        loop {
            let o = self.lab.exec(
                host,
                &[self.exe.clone(), "demo".into(), "fetch".into(), url.into()],
            )?;
            if o.status.success() {
                return Ok(String::from_utf8_lossy(&o.stdout).trim().to_string());
            }
            self.lab.check_alive()?;
            if start.elapsed() > WAIT {
                bail!(
                    "{url} from {host}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_json(&mut self, path: &Path) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            if let Some(v) = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                return Ok(v);
            }
            self.lab.check_alive()?;
            if start.elapsed() > WAIT {
                bail!("{} did not appear within {WAIT:?}", path.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts an agent on `host` (a member of `group` when given), capturing `inbound` ports.
    fn agent(
        &mut self,
        host: &str,
        ip: Ipv4Addr,
        cp: Ipv4Addr,
        ns_sa: (&str, &str),
        group: Option<&str>,
        inbound: &str,
    ) -> Result<PathBuf> {
        let dir = self.work.join(host);
        let certs = dir.join("certs");
        std::fs::create_dir_all(&dir)?;
        self.cli(&["vm", "certs", "-o", &certs.display().to_string()])?;
        let token = self.cli(&[
            "token", "create", "-n", ns_sa.0, "-s", ns_sa.1, "--ttl", "1h",
        ])?;
        std::fs::write(dir.join("token"), token.trim())?;
        std::fs::write(
            dir.join("cluster.env"),
            format!("ISTIO_SERVICE_CIDR={SERVICE_CIDR}\nISTIO_META_DNS_CAPTURE=true\n"),
        )?;
        std::fs::write(
            dir.join("sidecar.env"),
            format!("ISTIO_INBOUND_PORTS={inbound}\n"),
        )?;
        let p = |f: &str| dir.join(f).display().to_string();
        let mut args: Vec<String> = vec![
            self.exe.clone(),
            "agent".into(),
            "--ca-addr".into(),
            format!("https://{cp}:15012"),
            "--ip".into(),
            ip.to_string(),
            "--proxy".into(),
            "--capture".into(),
            "--dns-upstream".into(),
            format!("{cp}:15054"),
            "--cert-dir".into(),
            p("certs"),
            "--state-dir".into(),
            p("state"),
            "--join-token-file".into(),
            p("token"),
            "--cluster-env".into(),
            p("cluster.env"),
            "--sidecar-env".into(),
            p("sidecar.env"),
        ];
        if let Some(g) = group {
            args.extend(["--group".into(), g.into()]);
        }
        self.lab.spawn(host, &format!("agent-{host}"), &args)?;
        Ok(dir.join("state").join("agent-endpoints.json"))
    }
}

async fn scenario(
    args: &DemoArgs,
    work: &Path,
    out: &mut dyn Write,
    until_stopped: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("isthmus demo needs root: it creates network namespaces and iptables rules (try: sudo isthmus demo)");
    }
    for tool in ["ip", "iptables-restore"] {
        if which(tool).is_none() {
            bail!("isthmus demo needs `{tool}` (Debian: apt-get install iproute2 iptables)");
        }
    }
    let exe = std::env::current_exe()
        .context("cannot find this program's path")?
        .display()
        .to_string();
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut say = |msg: String| -> Result<()> {
        writeln!(out, "{msg}")?;
        out.flush()?;
        Ok(())
    };

    let mut lab = Lab::new(PREFIX, args.subnet, &logs)?;
    let cp = lab.ip_of(1);
    let hosts = [
        ("cp", 1u8),
        ("productpage", 2),
        ("reviews", 3),
        ("vm", 4),
        ("reviews-v2", 5),
    ];
    for (name, i) in hosts {
        lab.add_host(name, i, cp)?;
    }
    let (pp_ip, rv_ip, vm_ip, rv2_ip) = (lab.ip_of(2), lab.ip_of(3), lab.ip_of(4), lab.ip_of(5));
    say(format!(
        "==> network namespaces {PREFIX}-{{cp,productpage,reviews,reviews-v2,vm}} on one bridge: control plane {cp}, productpage {pp_ip}, reviews {rv_ip} (v1) and {rv2_ip} (v2), VM {vm_ip}"
    ))?;

    let cp_dir = work.join("cp");
    let server: Vec<String> = [
        exe.as_str(),
        "server",
        "--data-dir",
        &cp_dir.display().to_string(),
        "--grpc-addr",
        &format!("{cp}:15012"),
        "--dns-addr",
        &format!("{cp}:15054"),
        "--server-ip",
        &cp.to_string(),
        "--no-client-config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    lab.spawn("cp", "server", &server)?;
    let mut demo = Demo {
        lab,
        exe: exe.clone(),
        work: work.to_path_buf(),
        admin: String::new(),
        token: String::new(),
    };
    let ep = demo.wait_json(&cp_dir.join("endpoints.json")).await?;
    demo.admin = ep["admin"].as_str().unwrap_or_default().to_string();
    demo.token = std::fs::read_to_string(cp_dir.join("admin-token"))
        .context("the control plane wrote no admin token")?
        .trim()
        .to_string();
    say(format!(
        "==> isthmus server running in {PREFIX}-cp (CA and discovery on {cp}:15012)"
    ))?;

    let bookinfo = work.join("bookinfo.yaml");
    std::fs::write(&bookinfo, BOOKINFO)?;
    demo.cli(&["apply", "-f", &bookinfo.display().to_string()])?;
    say("==> applied bookinfo: services productpage and reviews, a WorkloadGroup for each".into())?;

    for (host, port, upstream) in [
        ("reviews", 9080, None),
        (
            "productpage",
            9080,
            Some("http://reviews.bookinfo.svc.cluster.local:9080/"),
        ),
        ("vm", 3306, None),
    ] {
        let name = if host == "vm" { "mysql" } else { host };
        let mut a = vec![
            exe.clone(),
            "demo".into(),
            "app".into(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            format!("0.0.0.0:{port}"),
        ];
        if let Some(u) = upstream {
            a.extend(["--upstream".into(), u.into()]);
        }
        demo.lab.spawn(host, &format!("app-{host}"), &a)?;
    }
    let ready = [
        demo.agent(
            "productpage",
            pp_ip,
            cp,
            ("bookinfo", "productpage"),
            Some("productpage"),
            "9080",
        )?,
        demo.agent(
            "reviews",
            rv_ip,
            cp,
            ("bookinfo", "reviews"),
            Some("reviews"),
            "9080",
        )?,
        demo.agent("vm", vm_ip, cp, ("onprem", "mysql"), None, "3306")?,
    ];
    for (file, host) in ready.iter().zip(["productpage", "reviews", "vm"]) {
        let ep = demo.wait_json(file).await?;
        let url = format!(
            "{}/healthz/ready",
            ep["readiness"].as_str().unwrap_or_default()
        );
        demo.fetch(host, &url).await?;
    }
    say("==> agents ready on productpage, reviews and the VM: certificates issued, registry received, interception rules installed".into())?;

    let url = "http://productpage.bookinfo.svc.cluster.local:9080/";
    // The agents are ready with the registry they received; reviews' own entry (registered
    // when its agent connected, healthy once probed) reaches productpage's agent within a
    // second or so after.
    let start = Instant::now();
    let mut body = demo.fetch("vm", url).await?;
    while body.contains("upstream failed") && start.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = demo.fetch("vm", url).await?;
    }
    say(format!("\nVM -> {url}\n   {body}"))?;
    say("   (resolved by the VM agent's DNS, captured by iptables, carried over HBONE mTLS; productpage called reviews the same way)".into())?;

    demo.cli(&[
        "register",
        "mysql",
        &vm_ip.to_string(),
        "3306",
        "-n",
        "onprem",
    ])?;
    let url = "http://mysql.onprem.svc.cluster.local:3306/";
    say(format!("\n$ isthmus register mysql {vm_ip} 3306 -n onprem"))?;
    let body = demo.fetch("productpage", url).await?;
    say(format!("productpage host -> {url}\n   {body}"))?;

    let table = demo.cli(&["get", "workloads", "-A"])?;
    say(format!("\n$ isthmus get workloads -A\n{table}"))?;

    // HTTP-aware routing: 10% of reviews to v2 with retries, and an L7 policy.
    let traffic = work.join("reviews-traffic.yaml");
    std::fs::write(&traffic, REVIEWS_TRAFFIC)?;
    demo.cli(&["apply", "-f", &traffic.display().to_string()])?;
    say(format!(
        "\n$ isthmus apply -f reviews-traffic.yaml   # DestinationRule v1/v2, VirtualService 90/10 with retries, DENY /admin*\n{}",
        REVIEWS_TRAFFIC.trim_end()
    ))?;
    // Reviews v2 is deployed on its own host after the rules, so it gets only its 10%.
    demo.lab.spawn(
        "reviews-v2",
        "app-reviews-v2",
        &[
            exe.clone(),
            "demo".into(),
            "app".into(),
            "--name".into(),
            "reviews-v2".into(),
            "--listen".into(),
            "0.0.0.0:9080".into(),
        ],
    )?;
    let v2_ready = demo.agent(
        "reviews-v2",
        rv2_ip,
        cp,
        ("bookinfo", "reviews"),
        Some("reviews-v2"),
        "9080",
    )?;
    let ep = demo.wait_json(&v2_ready).await?;
    let url = format!(
        "{}/healthz/ready",
        ep["readiness"].as_str().unwrap_or_default()
    );
    demo.fetch("reviews-v2", &url).await?;
    say(format!(
        "==> reviews v2 deployed on {rv2_ip} (WorkloadGroup reviews-v2, version: v2)"
    ))?;
    let url = "http://reviews.bookinfo.svc.cluster.local:9080/";
    // v2's registration reaches productpage's agent within a second or so.
    let start = Instant::now();
    while !demo
        .fetch("productpage", url)
        .await?
        .starts_with("reviews-v2 ")
        && start.elapsed() < WAIT
    {}
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..100 {
        if demo
            .fetch("productpage", url)
            .await?
            .starts_with("reviews-v2 ")
        {
            v2 += 1;
        } else {
            v1 += 1;
        }
    }
    say(format!(
        "productpage host -> {url} x100\n   {v1} answered by reviews v1, {v2} by reviews v2 (weights 90/10, chosen per request)"
    ))?;
    let admin = "http://reviews.bookinfo.svc.cluster.local:9080/admin/users";
    let denied = demo.fetch_once("productpage", admin)?;
    say(format!(
        "productpage host -> {admin}\n   {denied}   (AuthorizationPolicy reviews-admin, checked per request by the reviews agents)"
    ))?;
    let source = demo.agent_metrics(&ready[0], "productpage").await?;
    let dest = demo.agent_metrics(&ready[1], "reviews").await?;
    let dest_v2 = demo.agent_metrics(&v2_ready, "reviews-v2").await?;
    let lines = |text: &str, reporter: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains("destination_service=\"reviews.bookinfo.svc.cluster.local\"")
            })
            .map(str::to_owned)
            .collect()
    };
    let mut shown = Vec::new();
    for (who, reporter, text) in [
        ("productpage", "source", &source),
        ("reviews v1", "destination", &dest),
        ("reviews v2", "destination", &dest_v2),
    ] {
        shown.push(format!(
            "\n{who} agent /metrics (reporter={reporter}), requests to reviews by version and code:"
        ));
        shown.extend(lines(text, reporter));
    }
    for l in shown {
        if !l.starts_with("istio_requests_total") {
            say(l)?;
            continue;
        }
        let label = |name: &str| {
            l.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("-")
                .to_string()
        };
        let count = l.rsplit(' ').next().unwrap_or("0");
        say(format!(
            "   istio_requests_total reporter={} destination_version={} response_code={} response_flags={}  {count}",
            label("reporter"),
            label("destination_version"),
            label("response_code"),
            label("response_flags")
        ))?;
    }

    if args.keep {
        say(format!(
            "The mesh keeps running. Try:\n  sudo ip netns exec {PREFIX}-vm {exe} demo fetch http://productpage.bookinfo.svc.cluster.local:9080/\n  sudo ip netns exec {PREFIX}-cp {exe} get services -A --server {} --token {}\nLogs: {}\nCtrl-C removes everything.",
            demo.admin,
            demo.token,
            logs.display()
        ))?;
        until_stopped.await;
    }
    drop(demo);
    say("==> removed the namespaces, processes and rules".into())?;
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

const BOOKINFO: &str = "\
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo}
spec:
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: productpage, namespace: bookinfo}
spec:
  metadata: {labels: {app: productpage}}
  template: {serviceAccount: productpage, ports: {http: 9080}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: reviews, namespace: bookinfo}
spec:
  metadata: {labels: {app: reviews, version: v1}}
  template: {serviceAccount: reviews, ports: {http: 9080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  metadata: {labels: {app: reviews, version: v2}}
  template: {serviceAccount: reviews, ports: {http: 9080}}
";

const REVIEWS_TRAFFIC: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
    retries: {attempts: 2, perTryTimeout: 2s, retryOn: '5xx,connect-failure'}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-admin, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin*]}}]
";
