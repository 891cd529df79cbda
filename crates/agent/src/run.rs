//! `isthmus agent`: starts the agent's parts and runs until told to stop. Identity comes first
//! (discovery connects with the workload certificate); discovery, the DNS proxy, the prober and
//! the admin endpoints run beside it, and the last good state keeps serving when the control
//! plane is away.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use axum::Json;
use isthmus_intercept::{InterceptConfig, SystemNetfilter, SystemRouting};
use isthmus_socket::{SocketFactory, SocketOptions};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;

use crate::args::AgentArgs;
use crate::discovery::CertConnector;
use crate::identity::IdentityManager;
use crate::resources::FdReserve;

/// Attempts at removing the interception rules at stop, and the pause between them.
const CLEANUP_ATTEMPTS: u32 = 5;
const CLEANUP_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Where each listener ended up, written to `<state-dir>/agent-endpoints.json`.
#[derive(serde::Serialize)]
struct Endpoints {
    admin: String,
    readiness: String,
    metrics: String,
    dns: String,
    pid: u32,
}

async fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            in_use_message(addr, what, flag, port_owner(addr.port()))
        )),
        Err(e) => Err(e).with_context(|| {
            format!("cannot listen on {addr} for the {what} (change it with {flag})")
        }),
    }
}

/// What to say when a listener's address is taken: by another agent (the usual case: a second
/// `isthmus agent` next to the running service), or by another program.
fn in_use_message(
    addr: SocketAddr,
    what: &str,
    flag: &str,
    owner: Option<(u32, String)>,
) -> String {
    match owner {
        Some((pid, cmd)) if cmd.contains("isthmus") && cmd.contains("agent") => format!(
            "another isthmus agent is already running on this host (pid {pid}: {cmd}), listening on {addr}: stop it first (`sudo systemctl stop isthmus-agent`, or `kill {pid}`); one agent serves the whole host"
        ),
        Some((pid, cmd)) => format!(
            "cannot listen on {addr} for the {what}: pid {pid} ({cmd}) listens there; stop it or change this address with {flag}"
        ),
        None => format!(
            "cannot listen on {addr} for the {what}: the address is in use (is another isthmus agent running? `ss -ltnp 'sport = :{}'` shows who); stop it or change this address with {flag}",
            addr.port()
        ),
    }
}

/// The process listening on a TCP port, from /proc (best effort: other users' processes are
/// visible only to root): pid and command line.
fn port_owner(port: u16) -> Option<(u32, String)> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit(':').next()?;
            let listening = cols.get(3) == Some(&"0A");
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| cols.get(9).map(|s| s.to_string()))
                .flatten()
        })
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target));
        if holds {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .trim()
                .to_string();
            return Some((pid, cmd));
        }
    }
    None
}

/// The proxy's own runtimes, apart from discovery, identity, DNS and the admin endpoints
/// (which run on the caller's), so control work never delays a forwarded byte.
///
/// Each is a current-thread runtime on its own `isthmus-proxy` thread, as linkerd2-proxy's
/// default of one worker: with two workers of a multi-thread runtime shared with control work,
/// a profile of `bench/dataplane.sh` put a fifth of the agent's CPU in workers parking and
/// waking each other (BENCHMARKS.md, issue 5, run 3), and a two-worker runtime of the proxy's
/// own was slower again (issue 18). `ISTHMUS_WORKER_THREADS` above one gives that many,
/// each running a shard of the proxy (Envoy's workers): its own listeners on the shared ports
/// (`SO_REUSEPORT`), HBONE and upstream pools, so a connection never leaves its thread once a
/// shard has it. Which shard gets it is not left to the kernel's hash: each accepted connection
/// goes to the shard serving the fewest of that port's connections (Envoy's exact balance,
/// [`isthmus_socket::Balance`]), which matters for the few long-lived HBONE connections.
struct DataPlane {
    handles: Vec<tokio::runtime::Handle>,
    /// Dropped with `DataPlane`, which stops the runtimes' threads.
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl DataPlane {
    /// `spun` counts the seconds the threads spent busy polling ([`crate::busy_poll`]),
    /// `moved` their moves off a CPU shared with another busy thread; `slice` is the scheduler
    /// slice each thread asks for ([`crate::sched`]; zero: the kernel's default).
    fn new(
        threads: usize,
        busy_poll: crate::busy_poll::BusyPoll,
        spun: crate::busy_poll::Seconds,
        moved: prometheus_client::metrics::counter::Counter,
        slice: std::time::Duration,
    ) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        // The shards poll in turn beyond half the host's CPUs.
        let spinners = crate::busy_poll::Spinners::for_host();
        for _ in 0..threads.max(1) {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_all();
            crate::busy_poll::install(&mut builder, busy_poll, &spinners);
            let runtime = builder.build()?;
            runtime.spawn(crate::busy_poll::spinner(
                busy_poll,
                spun.clone(),
                moved.clone(),
                spinners.clone(),
            ));
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name("isthmus-proxy".into())
                .spawn(move || {
                    if !slice.is_zero() {
                        // Not fatal: the proxy works with the kernel's default slice.
                        if let Err(e) = crate::sched::set_current_thread_slice(slice) {
                            tracing::warn!(error = %e, slice = ?slice, "cannot set the data-plane thread's scheduler slice; it runs with the kernel's default (allow sched_setattr in the agent's seccomp filter, or set ISTHMUS_SCHED_SLICE=0 to stop asking)");
                        }
                    }
                    // Tasks spawned through the handle run while this thread is in `block_on`.
                    let _ = runtime.block_on(stopped);
                    // The proxy has been drained by now; whatever is left is stopped without
                    // waiting.
                    runtime.shutdown_background();
                })?;
        }
        Ok(Self {
            handles,
            _stop: stops,
        })
    }

    fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }
}

/// Every shard of the proxy, one per data-plane thread.
struct Proxies(Vec<crate::proxy::Proxy>);

impl Proxies {
    /// Stops every shard at once (each drains for up to `deadline`).
    async fn shutdown(self, deadline: std::time::Duration) {
        let mut all = tokio::task::JoinSet::new();
        for p in self.0 {
            all.spawn(p.shutdown(deadline));
        }
        while all.join_next().await.is_some() {}
    }
}

/// `host:port` of CA_ADDR (its first address), with or without a scheme and path.
fn ca_authority(ca_addr: &str) -> Option<&str> {
    ca_addr
        .split(',')
        .next()?
        .trim()
        .split("://")
        .nth(1)
        .unwrap_or(ca_addr)
        .split('/')
        .next()
}

/// The local address the kernel would use towards the control plane (no packet is sent).
fn detect_ip(ca_addr: &str) -> Option<IpAddr> {
    let authority = ca_authority(ca_addr)?;
    let target: SocketAddr = authority.parse().ok().or_else(|| {
        use std::net::ToSocketAddrs;
        authority.to_socket_addrs().ok()?.next()
    })?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

/// The control-plane address (any the name resolves to) that a VIP network would swallow.
fn control_plane_in_vip_cidr(
    ca_addr: &str,
    icfg: &isthmus_intercept::InterceptConfig,
) -> Option<(IpAddr, String)> {
    if icfg.vip_cidrs.is_empty() {
        return None;
    }
    let authority = ca_authority(ca_addr)?;
    use std::net::ToSocketAddrs;
    authority.to_socket_addrs().ok()?.find_map(|a| {
        icfg.vip_cidr_holding(a.ip())
            .map(|n| (a.ip(), n.to_string()))
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// The registries' metrics as one OpenMetrics text (one `# EOF`, at the end).
fn metrics_text(registries: &[Registry]) -> String {
    let mut out = String::new();
    for r in registries {
        let mut one = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut one, r);
        out.push_str(one.strip_suffix("# EOF\n").unwrap_or(&one));
    }
    out.push_str("# EOF\n");
    out
}

/// The interception settings for `--capture`, checked before the agent opens any socket: the
/// seed files must name what to capture, and the rules must exempt this very process.
fn capture_config(args: &AgentArgs) -> anyhow::Result<(InterceptConfig, Arc<SocketFactory>)> {
    let read = |p: &std::path::Path| {
        isthmus_intercept::EnvFile::read_optional(p).map_err(anyhow::Error::new)
    };
    let cluster = read(&args.cluster_env)?;
    let icfg = InterceptConfig::from_env(&cluster, &read(&args.sidecar_env)?, &[])
        .context("invalid interception settings")?;
    icfg.check_capture(&cluster)?;
    if let Some((addr, net)) = control_plane_in_vip_cidr(&args.ca_addr, &icfg) {
        anyhow::bail!(
            "the control plane ({addr}) lies inside ISTHMUS_VIP_CIDR's {net}: the agent's \
             own connections there are not captured and would be dropped; take it out of \
             ISTHMUS_VIP_CIDR"
        );
    }
    let sockets = Arc::new(SocketFactory::new(SocketOptions {
        mark: icfg.proxy_mark,
        ..SocketOptions::default()
    }));
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let how = crate::sockets::self_exemption(&icfg, &sockets, uid, gid)?;
    tracing::info!(
        exempt_by = how,
        uid,
        gid,
        mark = ?sockets.mark().map(|m| format!("{m:#x}")),
        "the agent's own traffic is exempt from capture"
    );
    Ok((icfg, sockets))
}

/// Installed rules and routes: removed on drop, so a start that fails after installing them
/// (a port taken, say) does not leave the host's connections sent to a proxy that is gone. A
/// normal stop disarms it and removes them itself, with retries.
struct Installed(Option<(SystemNetfilter, SystemRouting)>);

impl Installed {
    fn disarm(mut self) -> Option<(SystemNetfilter, SystemRouting)> {
        self.0.take()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some((nf, rt)) = self.0.take() {
            match remove_capture(&nf, &rt) {
                Ok(()) => tracing::info!("interception rules removed"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot remove the interception rules; run `isthmus iptables --cleanup`")
                }
            }
        }
    }
}

/// Removes the rules and routes; `Ok` when both are gone.
fn remove_capture(nf: &SystemNetfilter, rt: &SystemRouting) -> Result<(), String> {
    // Routes first: a VIP network routed to lo without its rules goes nowhere. Each is tried
    // even when the other fails.
    let routes = isthmus_intercept::cleanup_routes(rt);
    let rules = isthmus_intercept::cleanup(nf);
    match (rules, routes) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), Ok(_)) => Err(format!("the interception rules: {e}")),
        (Ok(_), Err(e)) => Err(format!("the ISTHMUS_VIP_CIDR routes: {e}")),
        (Err(a), Err(b)) => Err(format!("the interception rules: {a}; the routes: {b}")),
    }
}

pub async fn run(
    args: AgentArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let nofile = crate::resources::raise_nofile().context("cannot read the open-files limit")?;
    let (intercept, sockets) = if args.proxy && args.capture {
        let (icfg, sockets) = capture_config(&args)?;
        (Some(icfg), sockets)
    } else {
        (None, SocketFactory::unmarked())
    };
    // Held until the rules come off, so removing them works even with every other descriptor
    // taken.
    let mut reserve = intercept.as_ref().map(|_| FdReserve::take());
    let mut identity = args.identity_config();
    identity.sockets = sockets.clone();
    let keeper = args.workload_token_file.clone().map(|path| {
        crate::identity::WorkloadTokenKeeper::new(identity.clone(), path)
            .with_ttl(args.workload_token_lifetime.into())
    });
    let manager = Arc::new(IdentityManager::new(identity).context("invalid agent configuration")?);
    let probe = args.probe().context("invalid probe")?;
    let mut registry = Registry::default();
    manager.register_metrics(&mut registry);
    let mut dns_metrics = None;
    if !args.identity_only {
        let m = isthmus_dns::DnsMetrics::new();
        m.register(registry.sub_registry_with_prefix("isthmus_agent"));
        dns_metrics = Some(m);
    }
    // A list behind a lock: the proxy adds its registry once it starts.
    let registry = Arc::new(std::sync::RwLock::new(vec![registry]));
    let metrics_l = bind(args.metrics_addr, "metrics", "--metrics-addr").await?;
    let reg = registry.clone();
    let metrics_app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let reg = reg.clone();
                async move { metrics_text(&reg.read().unwrap_or_else(|e| e.into_inner())) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let metrics_addr = metrics_l.local_addr()?;
    tokio::spawn(async move { axum::serve(metrics_l, metrics_app).await });

    let certs = manager.subscribe();
    let m = manager.clone();
    let mut identity_task = tokio::spawn(async move { m.run().await });
    if let Some(keeper) = keeper {
        tokio::spawn(keeper.run(certs.clone()));
    }
    tokio::pin!(shutdown);

    if args.identity_only {
        return tokio::select! {
            r = &mut identity_task => match r {
                Ok(Err(e)) => Err(anyhow::Error::new(e)),
                Ok(Ok(never)) => match never {},
                Err(e) => Err(anyhow::anyhow!("the identity manager stopped: {e}")),
            },
            _ = &mut shutdown => {
                tracing::info!("stopping; the certificate on disk stays valid until it expires");
                Ok(())
            }
        };
    }

    std::fs::create_dir_all(&args.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            args.state_dir.display()
        )
    })?;
    // Discovery needs the workload certificate: wait for the first one.
    let mut cert_rx = certs.clone();
    let cert = tokio::select! {
        c = cert_rx.wait_for(|c| c.is_some()) => c.map_err(|_| anyhow::anyhow!("the identity manager stopped"))?.clone(),
        r = &mut identity_task => return match r {
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Ok(Ok(never)) => match never {},
            Err(e) => Err(anyhow::anyhow!("the identity manager stopped: {e}")),
        },
        _ = &mut shutdown => return Ok(()),
    };
    let cert = cert.context("no certificate")?;
    let (ns, sa) = (
        cert.identity.namespace().to_string(),
        cert.identity.service_account().to_string(),
    );
    let ip = match args.ip.or_else(|| detect_ip(&args.ca_addr)) {
        Some(ip) => ip,
        None => anyhow::bail!("cannot tell this host's mesh IP: pass --ip (or set ISTIO_SVC_IP)"),
    };
    let node = isthmus_xds::node_id(&ip.to_string(), &hostname(), &ns, &args.domain);
    let mut cfg = isthmus_xds::ClientConfig::new(node);
    cfg.node_metadata.insert("NAMESPACE".into(), ns.clone());
    cfg.node_metadata
        .insert("SERVICE_ACCOUNT".into(), sa.clone());
    // Shown by `isthmus status` on the control plane (Istio's agents send the same key).
    cfg.node_metadata.insert(
        isthmus_xds::server::VERSION_METADATA.into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    if let Some(g) = &args.group {
        cfg.node_metadata
            .insert("AUTO_REGISTER_GROUP".into(), g.clone());
    }
    cfg.cache_path = Some(args.state_dir.join("discovery.cache"));
    let client = isthmus_xds::XdsClient::new(
        cfg,
        Arc::new(CertConnector {
            address: args.ca_addr.clone(),
            server_name: args.ca_server_name.clone(),
            cert: certs.clone(),
            sockets: sockets.clone(),
            source: Some(ip),
        }),
    );
    let state = client.state();
    let ready = client.ready();
    let status = client.status();
    if let Some(p) = probe {
        tokio::spawn(crate::probe::run(p, client.health(), sockets.clone()));
    }

    // The proxy, and the rules that send traffic to it (only once it listens).
    let mut proxy = None;
    let mut capture = None;
    let mut data_plane = None;
    if args.proxy {
        let mut cfg = crate::proxy::ProxyConfig::new(ip);
        cfg.sockets = sockets.clone();
        cfg.max_connections_per_listener = args
            .max_connections
            .unwrap_or_else(|| crate::resources::default_max_connections(nofile.soft));
        tracing::info!(
            max_connections_per_listener = cfg.max_connections_per_listener,
            "proxy connection bound"
        );
        cfg.plaintext_mode = match args.inbound_mode {
            crate::args::InboundMode::Permissive => crate::proxy::PlaintextMode::Permissive,
            crate::args::InboundMode::Strict => crate::proxy::PlaintextMode::Strict,
        };
        cfg.outbound.unknown = match args.outbound_unknown {
            crate::args::OutboundUnknown::Passthrough => {
                crate::proxy::UnknownDestination::Passthrough
            }
            crate::args::OutboundUnknown::Refuse => crate::proxy::UnknownDestination::Refuse,
        };
        cfg.outbound.hbone_requests = args.hbone_requests;
        cfg.hbone_client.max_streams_per_connection = args.pool_max_streams_per_connection as usize;
        let busy_poll = crate::busy_poll::BusyPoll {
            spin: args.busy_poll,
            min_load: crate::busy_poll::BusyPoll::DEFAULT_MIN_LOAD,
        };
        let spun = crate::busy_poll::Seconds::default();
        let moved = prometheus_client::metrics::counter::Counter::default();
        let dp = DataPlane::new(
            args.worker_threads.into(),
            busy_poll,
            spun.clone(),
            moved.clone(),
            args.sched_slice,
        )
        .context("cannot start the data-plane runtime")?;
        let mut proxy_registry = Registry::with_prefix("isthmus_agent");
        proxy_registry.register_with_unit(
            "busy_poll",
            "Wall time the data-plane threads spent busy polling their sockets instead of sleeping, under load (ISTHMUS_BUSY_POLL); includes the time other threads ran when a poll gave them the CPU",
            prometheus_client::registry::Unit::Seconds,
            spun.clone(),
        );
        proxy_registry.register(
            "busy_poll_moves",
            "Times a busy-polling data-plane thread moved itself to another CPU because 16 sched_yields in a row each gave its CPU to another thread (two busy threads stuck on one CPU)",
            moved,
        );
        let shared = Arc::new(
            crate::proxy::Shared::new(cfg.max_connections_per_listener, &mut proxy_registry)
                .sharded(dp.handles().len()),
        );
        let mut shards = Vec::new();
        for (shard, handle) in dp.handles().iter().enumerate() {
            cfg.shard = shard;
            // Started from inside its data-plane runtime: its listeners, connections and HBONE
            // pool tasks all land there.
            let (st, ce, sh, c) = (state.clone(), certs.clone(), shared.clone(), cfg.clone());
            let shard = handle
                .spawn(async move { crate::proxy::start_shard(c, st, ce, &sh).await })
                .await
                .context("the data-plane runtime stopped")?
                .context("cannot start the proxy")?;
            // The others listen on the ports the first was given (they may have been 0).
            cfg.outbound_addr = shard.outbound_addr();
            cfg.inbound_plaintext_addr = shard.inbound_plaintext_addr();
            cfg.hbone_addr = shard.hbone_addr();
            shards.push(shard);
        }
        let mut istio_registry = Registry::default();
        shared.istio_metrics().register(&mut istio_registry);
        let started = Proxies(shards);
        proxy = Some(started);
        data_plane = Some(dp);
        {
            let mut list = registry.write().unwrap_or_else(|e| e.into_inner());
            list.push(proxy_registry);
            list.push(istio_registry);
        }
        if let Some(icfg) = &intercept {
            let nf = isthmus_intercept::SystemNetfilter::new();
            isthmus_intercept::install(&nf, icfg)
                .context("cannot install the interception rules")?;
            let rt = isthmus_intercept::SystemRouting::new();
            if let Err(e) = isthmus_intercept::install_routes(&rt, icfg) {
                // Without the routes the VIP networks' rules sit behind nothing: take them out.
                let _ = isthmus_intercept::cleanup(&nf);
                let _ = isthmus_intercept::cleanup_routes(&rt);
                return Err(
                    anyhow::Error::new(e).context("cannot install the ISTHMUS_VIP_CIDR routes")
                );
            }
            tracing::info!(
                vip_routes = icfg.vip_cidrs.len(),
                "interception rules installed"
            );
            capture = Some(Installed(Some((nf, rt))));
        }
    }

    // DNS proxy from the local state.
    let upstreams = crate::dnsproxy::upstreams(&args.dns_upstreams, args.dns_addr);
    let search = isthmus_dns::search_domains(&ns, &args.domain);
    let mut dns_cfg = isthmus_dns::DnsServerConfig::agent(args.dns_addr, search, upstreams.clone());
    if upstreams.is_empty() {
        dns_cfg.forward = isthmus_dns::Forward::Refuse;
    }
    dns_cfg.sockets = sockets.clone();
    let tables = crate::dnsproxy::tables(state.clone(), args.domain.clone())
        .context("cannot build the DNS table")?;
    let dns = isthmus_dns::DnsServer::bind_with_metrics(dns_cfg, tables, dns_metrics)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot serve DNS on {} (change it with --dns-addr): {e}",
                args.dns_addr
            )
        })?;
    let dns_addr = dns.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut dns_stop = stop_rx.clone();
    tokio::spawn(dns.serve(async move {
        let _ = dns_stop.wait_for(|s| *s).await;
    }));

    // Admin (config dump) and readiness.
    let is_ready = {
        let (certs, ready) = (certs.clone(), ready.clone());
        move || {
            certs
                .borrow()
                .as_ref()
                .is_some_and(|c| c.is_valid_at(std::time::SystemTime::now()))
                && ready.is_ready()
        }
    };
    let dump = {
        let (state, status, certs, is_ready) = (
            state.clone(),
            status.clone(),
            certs.clone(),
            is_ready.clone(),
        );
        move || {
            let st = state.borrow().clone();
            let cert = certs.borrow().clone();
            json!({
                "ready": is_ready(),
                "identity": cert.as_ref().map(|c| json!({
                    "spiffeId": c.identity.to_string(),
                    "expires": humantime::format_rfc3339_seconds(c.not_after).to_string(),
                    "renewAt": humantime::format_rfc3339_seconds(c.renew_at()).to_string(),
                })),
                "discovery": {
                    "status": format!("{:?}", *status.borrow()),
                    "origin": format!("{:?}", st.origin()),
                    "services": st.services().map(|s| json!({
                        "hostname": s.hostname, "namespace": s.namespace,
                        "vips": s.vips.iter().map(|(_, ip)| ip.to_string()).collect::<Vec<_>>(),
                        "ports": s.ports.iter().map(|p| json!({"port": p.service_port, "targetPort": p.target_port, "appProtocol": format!("{:?}", p.app_protocol)})).collect::<Vec<_>>(),
                        "subjectAltNames": s.subject_alt_names,
                    })).collect::<Vec<_>>(),
                    "workloads": st.workloads().map(|w| json!({
                        "uid": w.uid, "name": w.name, "namespace": w.namespace,
                        "addresses": w.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "serviceAccount": w.service_account, "tunnel": format!("{:?}", w.tunnel),
                        "health": format!("{:?}", w.health), "services": w.services.keys().collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                },
            })
        }
    };
    let ready_route = {
        let is_ready = is_ready.clone();
        move || {
            let r = is_ready();
            async move {
                if r {
                    (axum::http::StatusCode::OK, "ready\n")
                } else {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for a certificate and the first discovery state\n",
                    )
                }
            }
        }
    };
    let admin_l = bind(args.admin_addr, "admin endpoint", "--admin-addr").await?;
    let readiness_l = bind(
        args.readiness_addr,
        "readiness endpoint",
        "--readiness-addr",
    )
    .await?;
    let admin_app = axum::Router::new()
        .route(
            "/config_dump",
            get({
                let dump = dump.clone();
                move || {
                    let v = dump();
                    async move { Json(v) }
                }
            }),
        )
        .route("/healthz/ready", get(ready_route.clone()));
    let readiness_app = axum::Router::new().route("/healthz/ready", get(ready_route));
    let endpoints = Endpoints {
        admin: format!("http://{}", admin_l.local_addr()?),
        readiness: format!("http://{}", readiness_l.local_addr()?),
        metrics: format!("http://{metrics_addr}"),
        dns: dns_addr.to_string(),
        pid: std::process::id(),
    };
    tokio::spawn(async move { axum::serve(admin_l, admin_app).await });
    tokio::spawn(async move { axum::serve(readiness_l, readiness_app).await });
    let ep_path = args.state_dir.join("agent-endpoints.json");
    let tmp = args.state_dir.join(".agent-endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)
        .and_then(|()| std::fs::rename(&tmp, &ep_path))
        .with_context(|| format!("cannot write {}", ep_path.display()))?;
    tracing::info!(identity = %cert.identity, %ip, dns = %endpoints.dns, admin = %endpoints.admin, group = ?args.group, "agent started");

    let result = tokio::select! {
        r = client.run() => r.map_err(|e| anyhow::anyhow!("discovery stopped: {e}")),
        r = &mut identity_task => match r {
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Ok(Ok(never)) => match never {},
            Err(e) => Err(anyhow::anyhow!("the identity manager stopped: {e}")),
        },
        _ = &mut shutdown => {
            tracing::info!("stopping");
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    if let Some((nf, rt)) = capture.and_then(Installed::disarm) {
        // The rules come off first, so new connections stop being sent to a proxy that is going
        // away; the reserve gives the programs that do it descriptors even when the agent ran
        // out of them.
        if let Some(r) = reserve.as_mut() {
            r.release();
        }
        let mut removed = remove_capture(&nf, &rt);
        if let Err(e) = &removed {
            // Most likely out of descriptors: close every connection at once, then retry.
            tracing::warn!(error = %e, "cannot remove the interception rules yet; closing the proxy's connections and retrying");
            if let Some(p) = proxy.take() {
                p.shutdown(std::time::Duration::ZERO).await;
            }
            drop(data_plane.take());
            for _ in 1..CLEANUP_ATTEMPTS {
                tokio::time::sleep(CLEANUP_RETRY).await;
                removed = remove_capture(&nf, &rt);
                if removed.is_ok() {
                    break;
                }
            }
        }
        match removed {
            Ok(()) => tracing::info!("interception rules removed"),
            Err(e) => {
                tracing::error!(error = %e, "cannot remove the interception rules; run `isthmus iptables --cleanup`")
            }
        }
    }
    if let Some(p) = proxy {
        // Stop accepting; let open streams finish for a while.
        p.shutdown(args.drain_duration.into()).await;
    }
    drop(data_plane);
    // The periodic cache write may be up to a second behind: save the newest state now, so
    // a restart without the control plane starts from it.
    let cache = args.state_dir.join("discovery.cache");
    let latest = state.borrow().clone();
    if latest.origin() == isthmus_xds::client::Origin::Empty {
        // Never connected and nothing on disk: keep whatever file is there.
    } else if let Err(e) =
        isthmus_xds::client::write_cache(&cache, &isthmus_xds::client::encode_cache(&latest))
    {
        tracing::warn!(error = %e, "cannot save the discovery state");
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_agent_is_told_another_agent_runs() {
        let addr: std::net::SocketAddr = "127.0.0.1:15020".parse().unwrap();
        let m = super::in_use_message(
            addr,
            "metrics",
            "--metrics-addr",
            Some((4242, "/usr/bin/isthmus agent".into())),
        );
        assert_eq!(m, "another isthmus agent is already running on this host (pid 4242: /usr/bin/isthmus agent), listening on 127.0.0.1:15020: stop it first (`sudo systemctl stop isthmus-agent`, or `kill 4242`); one agent serves the whole host");
        let m = super::in_use_message(addr, "metrics", "--metrics-addr", Some((7, "nginx".into())));
        assert!(
            m.contains(
                "pid 7 (nginx) listens there; stop it or change this address with --metrics-addr"
            ),
            "{m}"
        );
    }

    #[tokio::test]
    async fn the_owner_of_a_taken_port_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (pid, cmd) = super::port_owner(addr.port()).expect("our own listener");
        assert_eq!(pid, std::process::id());
        assert!(!cmd.is_empty());
        let e = super::bind(addr, "metrics", "--metrics-addr")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("pid {pid}")), "{e}");
    }

    use super::*;

    #[test]
    fn a_control_plane_inside_a_vip_network_is_found() {
        let icfg = isthmus_intercept::InterceptConfig::from_env(
            &isthmus_intercept::EnvFile::parse(
                "cluster.env",
                "ISTIO_SERVICE_CIDR=10.96.0.0/12\nISTHMUS_VIP_CIDR=10.96.0.0/16\n",
            )
            .unwrap(),
            &isthmus_intercept::EnvFile::empty("sidecar.env"),
            &[],
        )
        .unwrap();
        assert_eq!(
            control_plane_in_vip_cidr("https://10.96.0.5:15012", &icfg),
            Some(("10.96.0.5".parse().unwrap(), "10.96.0.0/16".to_string()))
        );
        assert_eq!(
            control_plane_in_vip_cidr("10.96.0.5:15012", &icfg).map(|x| x.1),
            Some("10.96.0.0/16".into())
        );
        assert_eq!(control_plane_in_vip_cidr("10.97.0.5:15012", &icfg), None);
        assert_eq!(control_plane_in_vip_cidr("localhost:15012", &icfg), None);
        let none = isthmus_intercept::InterceptConfig::default();
        assert_eq!(control_plane_in_vip_cidr("10.96.0.5:15012", &none), None);
    }
}
