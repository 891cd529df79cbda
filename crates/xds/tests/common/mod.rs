//! Shared by the gRPC tests: a throwaway PKI (rcgen), the real discovery server over TLS on
//! 127.0.0.1, and a raw delta-xDS client that can ACK, NACK or stop reading at will.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use isthmus_model::{
    ObjectMeta, Service, ServicePort, ServiceSpec, ServiceStatus, WorkloadEntry, WorkloadEntrySpec,
};
use isthmus_xds::pb::envoy::config::core::v3::Node;
use isthmus_xds::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use isthmus_xds::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use isthmus_xds::pb::google::rpc;
use isthmus_xds::{
    build_resources, Identity, MappingOptions, ResourceSet, ServerConfig, StaticAuthenticator,
    XdsServer,
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, SanType,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};
use tonic::{Request, Status, Streaming};

pub const TOKEN: &str = "good-token";
pub const NS: &str = "prod";
pub const SA: &str = "web";
pub const WAIT: Duration = Duration::from_secs(20);

pub fn identity() -> Identity {
    Identity::new("cluster.local", NS, SA)
}

pub fn node_id() -> String {
    format!("sidecar~10.0.0.99~vm.{NS}~{NS}.svc.cluster.local")
}

/// A root, a serving certificate for localhost, and client certificates on demand.
pub struct Pki {
    pub root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl Pki {
    pub fn new() -> Result<Self> {
        let root_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "isthmus-xds-test-root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&root_key)?;
        let issuer = Issuer::new(params, root_key);
        let key = KeyPair::generate()?;
        let mut sp = CertificateParams::new(vec!["localhost".to_owned()])?;
        sp.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&key, &issuer)?;
        Ok(Self {
            root_pem: root.pem(),
            issuer,
            server_cert_pem: server.pem(),
            server_key_pem: key.serialize_pem(),
        })
    }

    /// A workload certificate (`spiffe://...` URI SAN) and its key, PEM.
    pub fn client_cert(&self, spiffe: &str) -> Result<(String, String)> {
        self.client_cert_with_ips(spiffe, &[])
    }

    /// Like [`Pki::client_cert`], with IP SANs (an address issued at enrolment).
    pub fn client_cert_with_ips(
        &self,
        spiffe: &str,
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.root_pem))
            .domain_name("localhost")
    }
}

/// The discovery server over TLS, with the resources it serves in a watch.
pub struct TestServer {
    pub pki: Arc<Pki>,
    pub addr: SocketAddr,
    pub resources: watch::Sender<Arc<ResourceSet>>,
    pub xds: XdsServer,
    stop: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestServer {
    pub async fn start(set: ResourceSet) -> Result<Self> {
        Self::start_with(Arc::new(Pki::new()?), set, ServerConfig::default(), None).await
    }

    pub async fn start_with(
        pki: Arc<Pki>,
        set: ResourceSet,
        config: ServerConfig,
        addr: Option<SocketAddr>,
    ) -> Result<Self> {
        Self::start_authed(pki, set, config, addr, Self::auth()).await
    }

    /// The test's authenticator: [`TOKEN`] as [`identity`], and client certificates.
    pub fn auth() -> StaticAuthenticator {
        StaticAuthenticator::new()
            .with_token(TOKEN, identity())
            .trust_peer_certificates()
    }

    pub async fn start_authed(
        pki: Arc<Pki>,
        set: ResourceSet,
        config: ServerConfig,
        addr: Option<SocketAddr>,
        auth: StaticAuthenticator,
    ) -> Result<Self> {
        let (tx, rx) = watch::channel(Arc::new(set));
        let xds = XdsServer::start(rx, Arc::new(auth), config);
        let mut this = Self {
            pki,
            addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            resources: tx,
            xds,
            stop: None,
        };
        this.serve().await?;
        Ok(this)
    }

    /// (Re)starts the listener, on the same port as before if there was one.
    pub async fn serve(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other?,
            }
        };
        self.addr = listener.local_addr()?;
        self.xds.reopen();
        let tls = ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.pki.server_cert_pem,
                &self.pki.server_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.pki.root_pem))
            .client_auth_optional(true);
        let router = tonic::transport::Server::builder()
            .tls_config(tls)?
            .add_service(self.xds.clone().into_service());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            // Without NODELAY, Nagle and delayed ACKs add ~40 ms to every small response.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        self.stop = Some((tx, task));
        Ok(())
    }

    /// Stops listening and cuts open streams. Keeps the `XdsServer` (its metrics and
    /// resources) for a later [`TestServer::serve`], as a restarted control plane would
    /// start with the same registry.
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            // Ends the endless streams so the graceful shutdown does not wait for them.
            self.xds.close_streams();
            let _ = tx.send(());
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    pub fn publish(&self, set: ResourceSet) {
        self.resources.send_replace(Arc::new(set));
    }

    pub fn current(&self) -> ResourceSet {
        (**self.resources.borrow()).clone()
    }

    pub fn endpoint(&self) -> Result<Endpoint> {
        Ok(Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(self.pki.client_tls())?
            .connect_timeout(Duration::from_secs(5)))
    }

    pub async fn channel(&self) -> Result<Channel> {
        Ok(self.endpoint()?.connect().await?)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}

/// A delta-xDS stream driven by hand.
pub struct RawClient {
    pub tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: Streaming<DeltaDiscoveryResponse>,
}

pub enum Auth<'a> {
    None,
    Token(&'a str),
}

impl RawClient {
    /// Opens a stream and subscribes (wildcard) to `types` with `initial` versions.
    pub async fn open(
        channel: Channel,
        auth: Auth<'_>,
        node_id: &str,
        types: &[&str],
        initial: &HashMap<String, HashMap<String, String>>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(64);
        for (i, t) in types.iter().enumerate() {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: (i == 0).then(|| Node {
                        id: node_id.to_owned(),
                        ..Default::default()
                    }),
                    type_url: (*t).to_owned(),
                    initial_resource_versions: initial
                        .get(*t)
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                    ..Default::default()
                })
                .await;
        }
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Auth::Token(t) = auth {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        let stream = client
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Self { tx, rx: stream })
    }

    pub async fn subscribe(channel: Channel, types: &[&str]) -> Result<Self> {
        Ok(Self::open(
            channel,
            Auth::Token(TOKEN),
            &node_id(),
            types,
            &HashMap::new(),
        )
        .await?)
    }

    /// The next response (error if none within [`WAIT`]).
    pub async fn recv(&mut self) -> Result<DeltaDiscoveryResponse> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(status)) => Err(status).context("stream failed"),
            Err(_) => bail!("no response within {WAIT:?}"),
        }
    }

    /// The next response's status error, if the stream ends with one.
    pub async fn recv_error(&mut self) -> Result<Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(status)) => Ok(status),
            Ok(Ok(other)) => bail!("expected an error, got {other:?}"),
            Err(_) => bail!("no error within {WAIT:?}"),
        }
    }

    pub async fn ack(&self, r: &DeltaDiscoveryResponse) -> Result<()> {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    pub async fn nack(&self, r: &DeltaDiscoveryResponse, message: &str) -> Result<()> {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail: Some(rpc::Status {
                    code: 3,
                    message: message.to_owned(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Receives and ACKs one response per type in `types` (any order); returns them by type.
    pub async fn recv_each(
        &mut self,
        types: &[&str],
    ) -> Result<HashMap<String, DeltaDiscoveryResponse>> {
        let mut out = HashMap::new();
        while out.len() < types.len() {
            let r = self.recv().await?;
            self.ack(&r).await?;
            if out.insert(r.type_url.clone(), r).is_some() {
                bail!("two responses for one type before the others were answered");
            }
        }
        Ok(out)
    }
}

/// name → version of a response's resources.
pub fn versions(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect()
}

pub fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
    n.sort();
    n
}

pub fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        ..Default::default()
    }
}

pub fn service(ns: &str, name: &str, vip: &str, port: u32) -> Service {
    Service {
        api_version: "isthmus.io/v1".into(),
        kind: "Service".into(),
        metadata: meta(ns, name),
        spec: ServiceSpec {
            ports: vec![ServicePort {
                name: "http".into(),
                port,
                protocol: Some("HTTP".into()),
                target_port: Some(8080),
            }],
            selector: Some([("app".to_owned(), name.to_owned())].into()),
        },
        status: ServiceStatus {
            vip: Some(vip.parse().unwrap()),
        },
    }
}

pub fn entry(ns: &str, name: &str, ip: &str, app: &str) -> WorkloadEntry {
    WorkloadEntry {
        api_version: "isthmus.io/v1".into(),
        kind: "WorkloadEntry".into(),
        metadata: meta(ns, name),
        spec: WorkloadEntrySpec {
            address: ip.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            service_account: "sa".into(),
            ..Default::default()
        },
        status: Default::default(),
    }
}

/// A registry: `services` services with `per_service` entries each.
pub struct Registry {
    pub services: Vec<Service>,
    pub entries: Vec<WorkloadEntry>,
}

impl Registry {
    pub fn new(services: usize, per_service: usize) -> Self {
        let mut r = Self {
            services: Vec::new(),
            entries: Vec::new(),
        };
        for s in 0..services {
            let name = format!("svc{s}");
            r.services.push(service(
                NS,
                &name,
                &format!("10.96.{}.{}", s / 250, s % 250 + 1),
                80,
            ));
            for e in 0..per_service {
                let i = s * per_service + e;
                r.entries.push(entry(
                    NS,
                    &format!("{name}-{e}"),
                    &format!("10.{}.{}.{}", 1 + i / 62500, (i / 250) % 250, i % 250 + 1),
                    &name,
                ));
            }
        }
        r
    }

    pub fn build(&self) -> ResourceSet {
        build_resources(&self.services, &self.entries, &MappingOptions::default())
    }
}

pub fn uid(name: &str) -> String {
    MappingOptions::default().workload_uid(NS, name)
}

/// Polls `f` until it holds or [`WAIT`] passes.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
