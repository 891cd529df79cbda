//! `isthmus server`: opens the store, binds the listeners, serves until told to stop.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_store::{MemStore, RedbStore, Store};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::api::{self, ApiState};
use crate::config::{self, ServerArgs, StoreKind};
use crate::identity;
use crate::legacy;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// How long an HTTP/2 ping on the gRPC port may go unanswered before the connection is closed.
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Streams one gRPC connection may have open at once (an agent uses two or three: discovery,
/// certificates, onboarding).
const GRPC_MAX_CONCURRENT_STREAMS: u32 = 64;

/// Where each listener ended up (ports may be 0 in the flags), written to
/// `<data-dir>/endpoints.json` once all are bound, so scripts and tests can find them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Certificate API (and discovery): gRPC over TLS.
    pub grpc: String,
    /// Mesh DNS, `ip:port` (UDP and TCP).
    pub dns: String,
    pub admin: String,
    pub registration: String,
    pub metrics: String,
    pub pid: u32,
}

/// Writes `contents` to `path` atomically (temp file in the same directory, fsync, rename), with
/// `mode`, so a crash never leaves a half-written file.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn ensure_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create the data directory {}", path.display()))
}

/// Reads the admin token, creating it (32 random bytes, hex, owner-only) on first start.
pub(crate) fn admin_token(dir: &Path) -> anyhow::Result<(String, bool)> {
    let path = dir.join(config::ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), false)),
        Ok(_) => anyhow::bail!(
            "{} is empty; delete it to have a new admin token generated",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the admin token {}", path.display()))
        }
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("cannot write the admin token {}", path.display()))?;
    Ok((token, true))
}

async fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(" (is another isthmus server running? pick another address with {flag}, or port 0 for any)")
        } else {
            String::new()
        };
        anyhow::anyhow!("cannot listen on {addr} for the {what}: {e}{hint}")
    })
}

/// Resolves on SIGTERM or SIGINT.
///
/// A thread of signal-hook's waits for them, not tokio's signal driver: that driver (and the
/// process driver that comes with tokio's `process` feature) runs at every wake-up of every
/// runtime in the process, the data plane's included, to look for signals that almost never
/// come (BENCHMARKS.md, issue 18 run 21).
pub async fn shutdown_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "cannot watch for SIGTERM and SIGINT ({e}); stop the process with SIGKILL"
            );
            return std::future::pending().await;
        }
    };
    // Closing the iterator ends the thread when this future is dropped before a signal.
    struct Close(signal_hook::iterator::Handle);
    impl Drop for Close {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = Close(signals.handle());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiter = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(());
            }
        });
    if let Err(e) = waiter {
        tracing::warn!(
            "cannot start the thread that waits for SIGTERM ({e}); stop the process with SIGKILL"
        );
        return std::future::pending().await;
    }
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub async fn run(
    args: ServerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate()?;
    // Under systemd the soft limit is 1024 unless the unit sets LimitNOFILE; every TLS client,
    // discovery stream and watch holds a descriptor.
    let nofile =
        isthmus_socket::nofile::raise_nofile().context("cannot read the open-files limit")?;
    // Every listener's caps come out of the descriptors the process may hold, so together they
    // never take the last one (the store, DNS sockets and forwards keep theirs).
    let bounds = args.listener_bounds(nofile.soft);
    tracing::info!(?bounds, "listener bounds");
    // A --dev data dir lives as long as the server and is removed at exit.
    let mut _temp_dir = None;
    let data_dir: PathBuf = match (&args.data_dir, args.dev) {
        (Some(d), _) => d.clone(),
        (None, true) => {
            let t = tempfile::Builder::new()
                .prefix("isthmus-dev-")
                .tempdir()
                .context("cannot create a temporary data directory")?;
            let p = t.path().to_path_buf();
            _temp_dir = Some(t);
            p
        }
        (None, false) => PathBuf::from(config::DEFAULT_DATA_DIR),
    };
    ensure_dir(&data_dir)?;

    let store: Arc<dyn Store> =
        match args.store {
            StoreKind::Embedded => {
                let path = data_dir.join(config::REGISTRY_FILE);
                let opts = isthmus_store::StoreOptions {
                    history: args.history,
                    ..Default::default()
                };
                Arc::new(RedbStore::open(&path, opts).with_context(|| {
                    format!("cannot open the registry store {}", path.display())
                })?)
            }
            StoreKind::Memory => Arc::new(MemStore::new()),
            StoreKind::Etcd => {
                let mut options = isthmus_store::EtcdOptions::new(
                    args.etcd_endpoints.clone(),
                    args.etcd_prefix.clone(),
                );
                options.request_timeout = args.etcd_request_timeout.into();
                options.max_txn_ops = args.etcd_max_txn_ops;
                options.tls = args.etcd_cacert.clone().map(|ca| isthmus_store::EtcdTls {
                    ca,
                    cert: args.etcd_cert.clone(),
                    key: args.etcd_key.clone(),
                });
                Arc::new(
                    isthmus_store::EtcdStore::open(options)
                        .await
                        .context("cannot open the registry store on etcd")?,
                )
            }
        };
    // Every store request timed, for isthmus_store_request_duration_seconds.
    let timed = Arc::new(crate::metrics::TimedStore::new(store));
    let store: Arc<dyn Store> = timed.clone();
    // On a shared store the replicas agree on the mesh settings, the admin token and the CA
    // through it (see mesh_state).
    let shared = args.store == StoreKind::Etcd;
    let (token, created) = if shared {
        crate::mesh_state::agree_on_settings(
            store.as_ref(),
            &crate::mesh_state::Settings {
                trust_domain: args.trust_domain.clone(),
                domain: args.domain.clone(),
                service_cidr: args.service_cidr.to_string(),
                cluster_id: args.cluster_id.clone(),
                network: args.network.clone(),
            },
        )
        .await?;
        crate::mesh_state::admin_token(store.as_ref(), args.admin_token_file.as_ref(), &data_dir)
            .await?
    } else if let Some(file) = &args.admin_token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the admin token {}", file.display()))?;
        anyhow::ensure!(
            !token.trim().is_empty(),
            "the admin token file {} is empty",
            file.display()
        );
        (token.trim().to_string(), false)
    } else {
        admin_token(&data_dir)?
    };
    let registry = Registry::new(store.clone(), args.service_cidr, args.domain.clone())
        .with_max_watchers(args.max_watchers);

    let ca_dir = args.ca_dir.clone().unwrap_or_else(|| data_dir.join("ca"));
    if shared {
        // Validated: --store etcd requires it.
        let seal_path = args
            .seal_key_file
            .as_ref()
            .context("--store etcd needs --seal-key-file")?;
        let seal = crate::mesh_state::SealKey::load(seal_path, &args.etcd_prefix)?;
        crate::mesh_state::share_ca(
            store.as_ref(),
            &seal,
            &ca_dir,
            args.ca_cert.is_some(),
            || identity::load_ca(&args, &ca_dir).map(|_| ()),
        )
        .await?;
    }
    let (ca, tokens) = identity::load_ca(&args, &ca_dir)?;
    let ledger = Arc::new(identity::StoreLedger::new(store.clone()));
    let auth = isthmus_ca::Authenticator::new(ca.clone(), tokens.clone(), ledger.clone());
    let cert_service = isthmus_ca::CertificateService::new(ca.clone(), auth.clone());

    // Discovery: registry view → Istio workload resources → delta ADS; agents in a
    // WorkloadGroup auto-register through their stream.
    let view = crate::informer::start(registry.clone())
        .await
        .context("cannot read the registry")?;
    let advertised = args.advertised(config::default_route_ip);
    let dns_tables = crate::dns::tables(view.clone(), args.domain.clone(), vec![advertised.ip])
        .context("cannot build the DNS name table")?;
    let mapping = isthmus_xds::MappingOptions {
        domain: args.domain.clone(),
        trust_domain: args.trust_domain.clone(),
        network: args.network.clone(),
        cluster_id: args.cluster_id.clone(),
    };
    let replica = args.replica();
    let session = crate::replicas::Session::start(
        store.clone(),
        replica.clone(),
        args.lease_ttl.into(),
        crate::replicas::ReplicaRecord {
            name: replica.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: crate::registry::now_rfc3339(),
            ..Default::default()
        },
    )
    .await
    .context("cannot join the other replicas through the store")?;
    crate::replicas::Sweeper::spawn(
        session.clone(),
        registry.clone(),
        view.clone(),
        args.autoreg_grace.into(),
    );
    let autoreg = crate::autoreg::AutoRegistrar::new(registry.clone(), session.clone());
    let adopted = autoreg
        .adopt_existing()
        .await
        .context("cannot read auto-registered workloads")?;
    if adopted > 0 {
        tracing::info!(adopted, grace = %args.autoreg_grace, "auto-registered workloads found; each is removed unless its agent reconnects in time");
    }
    let mesh_hosts = crate::discovery::persisted_mesh_hosts(store.as_ref())
        .await
        .context("cannot read the recorded agent hosts")?;
    let (hosts_tx, hosts_rx) = tokio::sync::watch::channel(Arc::new(mesh_hosts.clone()));
    let xds = isthmus_xds::server::XdsServer::start_observed(
        crate::discovery::resources(view.clone(), hosts_rx, mapping),
        Arc::new(crate::discovery::XdsAuth {
            auth: auth.clone(),
            ledger: ledger.clone(),
        }),
        Some(Arc::new(crate::discovery::Observer { autoreg })),
        isthmus_xds::server::ServerConfig {
            max_names_per_type: args.max_subscriptions,
            max_streams_per_identity: args.max_streams_per_identity,
            max_streams_per_identity_and_ip: args.max_streams_per_identity_and_address,
            max_stream_age: Some(args.max_stream_age.into()).filter(|a: &Duration| !a.is_zero()),
            ..Default::default()
        },
    );
    crate::discovery::follow_mesh_hosts(
        xds.clone(),
        hosts_tx,
        session.clone(),
        store.clone(),
        mesh_hosts,
    );
    let onboarding_metrics = crate::onboarding::OnboardingMetrics::default();
    let listener_metrics = crate::metrics::ListenerMetrics::default();
    let dns_metrics = isthmus_dns::DnsMetrics::new();
    let metrics = Metrics::new(|reg| {
        listener_metrics.register(reg.sub_registry_with_prefix("listener"));
        dns_metrics.register_in(reg.sub_registry_with_prefix("dns"));
        cert_service
            .metrics()
            .register(reg.sub_registry_with_prefix("ca"));
        onboarding_metrics.register(reg.sub_registry_with_prefix("onboarding"));
        xds.metrics().register(reg.sub_registry_with_prefix("xds"));
        session
            .metrics
            .register(reg.sub_registry_with_prefix("replica"));
        let store_reg = reg.sub_registry_with_prefix("store");
        store_reg.register_collector(Box::new(crate::metrics::StoreCollector(store.clone())));
        timed.register(store_reg);
    });
    let mut serving = isthmus_ca::ServingCertOptions::default();
    serving
        .dns_names
        .extend(args.server_dns_names.iter().cloned());
    serving.ips.extend(args.server_ips.iter().copied());
    let grpc_tls = isthmus_ca::server_tls_config(ca.clone(), serving)
        .context("cannot set up TLS for the gRPC port")?;
    // Watch streams never end by themselves; they are cut when shutdown begins so the graceful
    // shutdown of the HTTP servers does not wait on them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(ApiState {
        registry,
        metrics,
        admin_token: token.clone(),
        ready: false.into(),
        stopping: stop_rx.clone(),
        identity: crate::api::IdentityState {
            ca: ca.clone(),
            tokens,
            ledger,
        },
        xds: xds.clone(),
        mesh: Default::default(),
        session: session.clone(),
        view: view.clone(),
    });

    let admin = bind(args.admin_addr, "admin API", "--admin-addr").await?;
    let registration = bind(
        args.registration_addr,
        "registration API",
        "--registration-addr",
    )
    .await?;
    let metrics_l = bind(args.metrics_addr, "metrics endpoint", "--metrics-addr").await?;
    let grpc = bind(
        args.grpc_addr,
        "certificate and discovery API",
        "--grpc-addr",
    )
    .await?;
    let dns_addr = args.dns_addr();
    let guard = |name: &'static str, config| {
        isthmus_socket::ConnGuard::new(name, config).with_observer(listener_metrics.observer())
    };
    let mut dns_cfg = isthmus_dns::DnsServerConfig::new(dns_addr);
    if !args.dns_upstreams.is_empty() {
        dns_cfg.forward = isthmus_dns::Forward::Upstreams(args.dns_upstreams.clone());
    }
    dns_cfg.max_in_flight_forwards = bounds.dns_forwards;
    dns_cfg.tcp_guard = Some(guard("dns_tcp", bounds.dns_tcp));
    let dns = isthmus_dns::DnsServer::bind_with_metrics(dns_cfg, dns_tables, Some(dns_metrics))
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot serve DNS on {dns_addr} (change it with --dns-addr): {e}")
        })?;
    let endpoints = Endpoints {
        grpc: format!("https://{}", grpc.local_addr()?),
        dns: dns.local_addr().to_string(),
        admin: format!("http://{}", admin.local_addr()?),
        registration: format!("http://{}", registration.local_addr()?),
        metrics: format!("http://{}", metrics_l.local_addr()?),
        pid: std::process::id(),
    };
    {
        let (grpc_addr, admin_addr) = (endpoints.grpc.clone(), endpoints.admin.clone());
        session
            .update_record(|r| {
                r.grpc_addr = grpc_addr;
                r.admin_addr = admin_addr;
            })
            .await;
    }
    let mesh = api::MeshInfo {
        trust_domain: ca.trust_domain().to_string(),
        domain: args.domain.clone(),
        service_cidr: args.service_cidr.to_string(),
        advertised_ips: vec![advertised.ip],
        public_addrs: args.public_addrs.clone(),
        grpc_addr: grpc.local_addr()?,
        dns_addr: dns.local_addr(),
        ca_server_name: api::CA_SERVER_NAME.to_string(),
    };
    let onboarding = crate::onboarding::OnboardingService::new(
        auth.clone(),
        ca.clone(),
        state.registry.clone(),
        mesh.clone(),
        onboarding_metrics,
    );
    let _ = state.mesh.set(mesh);
    write_atomic(
        &data_dir.join(config::ENDPOINTS_FILE),
        &serde_json::to_vec_pretty(&endpoints)?,
        0o644,
    )?;

    tracing::info!(
        data_dir = %data_dir.display(),
        admin = %endpoints.admin,
        grpc = %endpoints.grpc,
        trust_domain = %ca.trust_domain(),
        registration = %endpoints.registration,
        metrics = %endpoints.metrics,
        revision = store.revision(),
        "isthmus server started"
    );
    if created && !args.dev {
        tracing::info!(path = %data_dir.join(config::ADMIN_TOKEN_FILE).display(), "generated a new admin token");
    }
    let reached_at = reached_at(advertised, grpc.local_addr()?);
    if advertised.source == config::AdvertiseSource::Loopback {
        tracing::warn!("{reached_at}");
    } else {
        tracing::info!("{reached_at}");
    }
    let record = record_server(&endpoints, &data_dir);
    if args.dev {
        dev_banner(&args, &endpoints, &token, &data_dir, &reached_at);
    }

    let serve = |listener: TcpListener, app: axum::Router, guard| {
        tokio::spawn(crate::http::serve(listener, app, guard, stop_rx.clone()))
    };
    let app = api::router(state.clone());
    let metrics_app = axum::Router::new()
        .route("/metrics", axum::routing::get(crate::api::metrics))
        .with_state(state.clone());
    let tasks = vec![
        serve(admin, app, guard("admin", bounds.admin)),
        serve(
            registration,
            legacy::router(state.clone()),
            guard("registration", bounds.registration),
        ),
        serve(metrics_l, metrics_app, guard("metrics", bounds.metrics)),
    ];
    let mut dns_stop = stop_rx.clone();
    let dns_task = tokio::spawn(dns.serve(async move {
        let _ = dns_stop.wait_for(|s| *s).await;
    }));
    let mut grpc_stop = stop_rx.clone();
    let grpc_incoming =
        isthmus_ca::tls_incoming_guarded(grpc, grpc_tls, guard("grpc", bounds.grpc));
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(1 << 20)
            // Pings keep bytes flowing on a live agent's quiet discovery stream, well inside the
            // idle deadline, and find dead peers.
            .http2_keepalive_interval(Some(bounds.grpc.idle_timeout / 3))
            .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(GRPC_MAX_CONCURRENT_STREAMS))
            .add_service(cert_service.into_server())
            .add_service(onboarding.into_server())
            .add_service(xds.clone().into_service())
            .serve_with_incoming_shutdown(grpc_incoming, async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            }),
    );
    state.ready.store(true, Ordering::Release);

    shutdown.await;
    tracing::info!("shutting down: no new requests, closing watches");
    state.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    // Discovery streams never end by themselves: end them so the gRPC server can stop.
    xds.close_streams();
    let drain = futures::future::join3(futures::future::join_all(tasks), grpc_task, dns_task);
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 10s; closing them");
    }
    // Hand the leadership and this replica's hosts to the others now, not a lease TTL later.
    session.stop().await;
    drop(timed);
    drop(store);
    if let Some(path) = record {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The line that says where hosts reach this control plane, and how to change it.
pub fn reached_at(advertised: config::Advertised, grpc: SocketAddr) -> String {
    let at = SocketAddr::new(advertised.ip, grpc.port());
    match advertised.source {
        config::AdvertiseSource::Loopback => format!(
            "no default route: hosts reach this control plane at {at} only, which is this machine; pass --advertise-ip with an address other hosts reach"
        ),
        _ => format!("hosts reach this control plane at {at} (--advertise-ip to change)"),
    }
}

/// Records this server for the CLI of the same user (`ServerRecord`), so `isthmus` finds its
/// admin token whatever `--data-dir` says; records of servers that are gone are removed.
/// Best effort: a user without a writable config directory gets the CLI's hint instead.
fn record_server(ep: &Endpoints, data_dir: &Path) -> Option<PathBuf> {
    use isthmus_model::client_config::{servers_dir, ServerRecord};
    let dir = servers_dir()?;
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    if let Err(e) = made {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot record this server for the CLI");
        return None;
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_suffix(".json")
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let record = ServerRecord {
        admin: ep.admin.clone(),
        data_dir: std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()),
        pid: ep.pid,
    };
    let path = dir.join(format!("{}.json", ep.pid));
    let bytes = serde_json::to_vec_pretty(&record).ok()?;
    match write_atomic(&path, &bytes, 0o600) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot record this server for the CLI");
            None
        }
    }
}

fn dev_banner(args: &ServerArgs, ep: &Endpoints, token: &str, data_dir: &Path, reached_at: &str) {
    let cfg_note = if args.no_client_config {
        String::new()
    } else {
        match write_client_config(&ep.admin, token) {
            Ok(path) => format!(
                "CLI config written to {} (the commands below use it)\n",
                path.display()
            ),
            Err(e) => format!("could not write the CLI config ({e}); export the variables below\n"),
        }
    };
    println!(
        "\nIsthmus control plane (dev mode, data in {dir}, deleted at exit)\n\
         {reached_at}\n\n\
         admin API         {admin}\n\
         certificate API   {grpc}  (gRPC/TLS: Istio's CA and workload discovery)\n\
         mesh DNS          {dns}\n\
         registration API  {reg}/v1/registration\n\
         metrics           {met}/metrics\n\
         admin token       {token}\n\n\
         {cfg_note}\
         export ISTHMUS_SERVER={admin} ISTHMUS_TOKEN={token}\n\n\
         Next, in another terminal:\n\
         \x20 isthmus register mysql 10.0.0.5 3306 -n onprem\n\
         \x20 isthmus get services -A\n\
         \x20 curl -s {reg}/v1/registration\n\
         \x20 isthmus get services -A --watch\n\
         \x20 isthmus token create -n onprem -s mysql --ttl 1h\n\
         \x20 dig @{dns_ip} -p {dns_port} mysql.onprem.svc.cluster.local\n\n\
         Press Ctrl-C to stop.\n",
        dir = data_dir.display(),
        admin = ep.admin,
        grpc = ep.grpc,
        dns = ep.dns,
        dns_ip = ep
            .dns
            .rsplit_once(':')
            .map(|(ip, _)| ip)
            .filter(|ip| *ip != "0.0.0.0" && *ip != "[::]")
            .unwrap_or("127.0.0.1"),
        dns_port = ep.dns.rsplit_once(':').map_or("53", |(_, p)| p),
        reg = ep.registration,
        met = ep.metrics,
    );
}

fn write_client_config(server: &str, token: &str) -> anyhow::Result<PathBuf> {
    let path = isthmus_model::client_config::default_path()
        .context("no HOME to write the config under")?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let cfg = isthmus_model::client_config::ClientConfig {
        server: server.into(),
        token: token.into(),
    };
    write_atomic(&path, &serde_json::to_vec_pretty(&cfg)?, 0o600)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use signal_hook::consts::{SIGINT, SIGTERM};

    /// The future ends on each of the two signals, and not before one comes. Each signal goes to
    /// this test process only (nextest runs a test per process).
    #[tokio::test]
    async fn shutdown_signal_ends_on_sigterm_and_on_sigint() {
        for sig in [SIGTERM, SIGINT] {
            let stop = tokio::spawn(super::shutdown_signal());
            // Let it register before the signal is raised.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!stop.is_finished(), "ended before signal {sig}");
            signal_hook::low_level::raise(sig).expect("raise");
            tokio::time::timeout(Duration::from_secs(5), stop)
                .await
                .unwrap_or_else(|_| panic!("signal {sig} did not end shutdown_signal within 5 s"))
                .expect("task");
        }
    }
}
