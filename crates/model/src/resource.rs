use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "isthmus.io/v1";

pub type Labels = BTreeMap<String, String>;

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    WorkloadEntry,
    WorkloadGroup,
    AuthorizationPolicy,
    PeerAuthentication,
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Service,
        Kind::WorkloadEntry,
        Kind::WorkloadGroup,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// The lower-case plural used in URLs and store keys.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::WorkloadEntry => "workloadentries",
            Kind::WorkloadGroup => "workloadgroups",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::PeerAuthentication => "peerauthentications",
            Kind::VirtualService => "virtualservices",
            Kind::DestinationRule => "destinationrules",
            Kind::HttpRoute => "httproutes",
            Kind::GrpcRoute => "grpcroutes",
        }
    }

    /// The other names the CLI and the API's URLs take for this kind, case-insensitively.
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &["service", "svc"],
            Kind::WorkloadEntry => &["workloadentry", "workload", "workloads", "we"],
            Kind::WorkloadGroup => &["workloadgroup", "group", "groups", "wg"],
            Kind::AuthorizationPolicy => &["authorizationpolicy", "policy", "policies", "ap"],
            Kind::PeerAuthentication => &["peerauthentication", "pa"],
            Kind::VirtualService => &["virtualservice", "vs"],
            Kind::DestinationRule => &["destinationrule", "dr"],
            Kind::HttpRoute => &["httproute"],
            Kind::GrpcRoute => &["grpcroute"],
        }
    }

    /// Every kind with its aliases, for messages: `services (service, svc), ...`.
    pub fn all_names() -> String {
        let each: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{} ({})", k.plural(), k.aliases().join(", ")))
            .collect();
        each.join(", ")
    }

    /// Every kind as written in a document's `kind:` field.
    pub fn all_document_names() -> String {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        names.join(", ")
    }

    /// The store key prefix of this kind (`/registry/services/`).
    pub fn key_prefix(self) -> String {
        format!("/registry/{}/", self.plural())
    }

    pub fn key(self, namespace: &str, name: &str) -> String {
        format!("/registry/{}/{namespace}/{name}", self.plural())
    }

    /// The apiVersions accepted on input for this kind.
    pub fn accepted_api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &[API_VERSION, "v1"],
            Kind::WorkloadEntry
            | Kind::WorkloadGroup
            | Kind::VirtualService
            | Kind::DestinationRule => &[
                API_VERSION,
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ],
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => &[
                API_VERSION,
                "security.istio.io/v1",
                "security.istio.io/v1beta1",
            ],
            Kind::HttpRoute | Kind::GrpcRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
                "gateway.networking.k8s.io/v1alpha2",
            ],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown kind {0:?}; the kinds are {names}", names = Kind::all_names())]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the kind, its plural and the CLI's short names, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.plural() == lower || k.aliases().contains(&lower.as_str()))
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// Kubernetes-style object metadata. `resourceVersion`, `uid` and `creationTimestamp` are set by
/// the server; a `resourceVersion` sent by a client is a compare-and-swap precondition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Labels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// One object of a kind: `apiVersion`, `kind`, `metadata`, `spec`, `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[serde(bound(
    serialize = "S: Serialize, St: Serialize + Default + PartialEq",
    deserialize = "S: Deserialize<'de>, St: Deserialize<'de> + Default"
))]
pub struct Object<S, St> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing_if = "is_default")]
    pub status: St,
}

pub type Service = Object<ServiceSpec, ServiceStatus>;
pub type WorkloadEntry = Object<WorkloadEntrySpec, WorkloadEntryStatus>;
pub type WorkloadGroup = Object<WorkloadGroupSpec, WorkloadGroupStatus>;
pub type AuthorizationPolicy = Object<AuthorizationPolicySpec, WorkloadGroupStatus>;
pub type PeerAuthentication = Object<PeerAuthenticationSpec, WorkloadGroupStatus>;
pub type VirtualService = Object<crate::traffic::VirtualServiceSpec, WorkloadGroupStatus>;
pub type DestinationRule = Object<crate::traffic::DestinationRuleSpec, WorkloadGroupStatus>;
pub type HttpRoute = Object<crate::gateway::HttpRouteSpec, WorkloadGroupStatus>;
pub type GrpcRoute = Object<crate::gateway::GrpcRouteSpec, WorkloadGroupStatus>;

/// Istio's PeerAuthentication: whether the selected workloads (or the namespace, or with the
/// root namespace the mesh) accept plaintext. STRICT refuses it; PERMISSIVE (default) takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PolicySelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// `STRICT`, `PERMISSIVE` or `UNSET` (inherit; PERMISSIVE at the top).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl PeerAuthenticationSpec {
    pub fn mode(&self) -> &str {
        self.mtls
            .as_ref()
            .and_then(|m| m.mode.as_deref())
            .unwrap_or("UNSET")
    }
}

/// Istio's AuthorizationPolicy, the parts a host's proxy enforces (L4): who may connect to
/// which ports of the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; none = every workload of the namespace (of every
    /// namespace when the policy is in the root namespace, istio-system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PolicySelector>,
    /// `ALLOW` (default) or `DENY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PolicyRule>,
}

impl AuthorizationPolicySpec {
    pub fn action(&self) -> &str {
        self.action.as_deref().unwrap_or("ALLOW")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySelector {
    #[serde(default)]
    pub match_labels: Labels,
}

/// A rule matches when one of its `from` and one of its `to` entries match (an absent list
/// matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PolicyFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyTo>,
    /// Conditions that must all hold (`request.headers[x-user]`, `source.principal`,
    /// `source.namespace`, `source.ip`, `destination.port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<PolicyCondition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyCondition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

impl PolicyRule {
    /// Whether the rule needs the request (HTTP attributes or conditions on headers): such a
    /// rule is enforced per request on HTTP ports, and at L4 the way Istio's ztunnel does.
    pub fn is_http(&self) -> bool {
        self.to.iter().any(|t| t.operation.is_http())
            || self.when.iter().any(|c| c.key.starts_with("request."))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFrom {
    pub source: PolicySource,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySource {
    /// `<trust-domain>/ns/<ns>/sa/<sa>`, with a `*` prefix or suffix allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTo {
    pub operation: PolicyOperation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyOperation {
    /// Port numbers, as strings (Istio's form).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods (`GET`), hosts (`reviews`, `*.example.com`) and paths (`/api/*`,
    /// `*/info`, `/exact`, `*`): enforced per request on HTTP ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

impl PolicyOperation {
    pub fn is_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Workload entries whose labels match are endpoints. Without a selector the service only has
    /// the entries attached to it explicitly (`register`), like the seeds' selector-less services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub name: String,
    /// The port clients connect to on the service's VIP.
    pub port: u32,
    /// `TCP` (default), `HTTP`, `HTTP2`, `GRPC`, `HTTPS`, `TLS`, `MYSQL`, `MONGO`, `REDIS`, `UDP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The port on the endpoints; a workload entry's `ports` map may override it by port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

impl ServicePort {
    pub fn target(&self) -> u32 {
        self.target_port.unwrap_or(self.port)
    }

    pub fn protocol(&self) -> &str {
        self.protocol.as_deref().unwrap_or("TCP")
    }
}

pub const PROTOCOLS: &[&str] = &[
    "TCP", "UDP", "HTTP", "HTTP2", "GRPC", "HTTPS", "TLS", "MYSQL", "MONGO", "REDIS",
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceStatus {
    /// The virtual IP allocated from the service CIDR; stable for the service's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
}

/// Istio's WorkloadEntry: a VM or host workload, and the endpoint of the services that select it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    pub address: String,
    /// Port name → the port this workload listens on for the service port of that name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// Labels services select on (Istio keeps them in the spec); merged over `metadata.labels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    /// Services of the same namespace this entry is attached to explicitly (what `register` does),
    /// besides those whose selector matches it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntryStatus {
    #[serde(default, skip_serializing_if = "is_default")]
    pub health: Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 time the entry's agent was last heard from (auto-registered entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// Istio's WorkloadGroup: the template for entries of hosts that join by themselves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadGroupSpec {
    #[serde(default, skip_serializing_if = "is_default")]
    pub metadata: GroupMetadata,
    #[serde(default)]
    pub template: WorkloadTemplate,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Labels,
}

/// A workload entry's spec without the address, which each joining host supplies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// Istio's ReadinessProbe, restricted to what a host agent can run: HTTP GET or TCP connect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpProbe>,
}

impl Probe {
    pub fn period(&self) -> u32 {
        self.period_seconds.unwrap_or(10)
    }
    pub fn timeout(&self) -> u32 {
        self.timeout_seconds.unwrap_or(1)
    }
    pub fn success(&self) -> u32 {
        self.success_threshold.unwrap_or(1)
    }
    pub fn failure(&self) -> u32 {
        self.failure_threshold.unwrap_or(3)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetProbe {
    #[serde(default)]
    pub path: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scheme: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpProbe {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub port: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadGroupStatus {}

/// Any resource.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(Service),
    WorkloadEntry(WorkloadEntry),
    WorkloadGroup(WorkloadGroup),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::WorkloadEntry(_) => Kind::WorkloadEntry,
            Resource::WorkloadGroup(_) => Kind::WorkloadGroup,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Resource::Service(o) => &o.metadata,
            Resource::WorkloadEntry(o) => &o.metadata,
            Resource::WorkloadGroup(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
            Resource::PeerAuthentication(o) => &o.metadata,
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::GrpcRoute(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::Service(o) => &mut o.metadata,
            Resource::WorkloadEntry(o) => &mut o.metadata,
            Resource::WorkloadGroup(o) => &mut o.metadata,
            Resource::AuthorizationPolicy(o) => &mut o.metadata,
            Resource::PeerAuthentication(o) => &mut o.metadata,
            Resource::VirtualService(o) => &mut o.metadata,
            Resource::DestinationRule(o) => &mut o.metadata,
            Resource::HttpRoute(o) => &mut o.metadata,
            Resource::GrpcRoute(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> String {
        let m = self.meta();
        self.kind().key(&m.namespace, &m.name)
    }

    /// `Kind namespace/name`, for messages.
    pub fn id(&self) -> String {
        let m = self.meta();
        format!("{} {}/{}", self.kind(), m.namespace, m.name)
    }

    /// Whether `other` asks for the same thing: same spec, labels and annotations. Server-set
    /// fields (status, resourceVersion, uid, timestamps) and the accepted apiVersion alias don't
    /// count, so re-applying a file reports "unchanged".
    pub fn same_intent(&self, other: &Resource) -> bool {
        let (a, b) = (self.meta(), other.meta());
        if a.labels != b.labels || a.annotations != b.annotations {
            return false;
        }
        match (self, other) {
            (Resource::Service(x), Resource::Service(y)) => x.spec == y.spec,
            (Resource::WorkloadEntry(x), Resource::WorkloadEntry(y)) => x.spec == y.spec,
            (Resource::WorkloadGroup(x), Resource::WorkloadGroup(y)) => x.spec == y.spec,
            (Resource::AuthorizationPolicy(x), Resource::AuthorizationPolicy(y)) => {
                x.spec == y.spec
            }
            (Resource::PeerAuthentication(x), Resource::PeerAuthentication(y)) => x.spec == y.spec,
            (Resource::VirtualService(x), Resource::VirtualService(y)) => x.spec == y.spec,
            (Resource::DestinationRule(x), Resource::DestinationRule(y)) => x.spec == y.spec,
            (Resource::HttpRoute(x), Resource::HttpRoute(y)) => x.spec == y.spec,
            (Resource::GrpcRoute(x), Resource::GrpcRoute(y)) => x.spec == y.spec,
            _ => false,
        }
    }

    /// Labels that selectors and `-l` filters match: for workload entries `spec.labels` merged
    /// over `metadata.labels`, as Istio selects on the spec's.
    pub fn effective_labels(&self) -> Labels {
        match self {
            Resource::WorkloadEntry(w) => {
                let mut l = w.metadata.labels.clone();
                l.extend(w.spec.labels.clone());
                l
            }
            other => other.meta().labels.clone(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs (string keys, no non-finite floats) cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Service {
    /// `<name>.<namespace>.svc.<domain>`
    pub fn hostname(&self, domain: &str) -> String {
        format!(
            "{}.{}.svc.{domain}",
            self.metadata.name, self.metadata.namespace
        )
    }
}

impl WorkloadEntry {
    pub fn ip(&self) -> Option<IpAddr> {
        self.spec.address.parse().ok()
    }

    /// Whether this entry is an endpoint of `svc`: attached explicitly, or selected by labels.
    pub fn serves(&self, svc: &Service) -> bool {
        if self.metadata.namespace != svc.metadata.namespace {
            return false;
        }
        if self.spec.services.contains(&svc.metadata.name) {
            return true;
        }
        match &svc.spec.selector {
            Some(sel) if !sel.is_empty() => sel.iter().all(|(k, v)| {
                self.spec
                    .labels
                    .get(k)
                    .or_else(|| self.metadata.labels.get(k))
                    == Some(v)
            }),
            _ => false,
        }
    }
}

/// Decoding without validation (for objects the server already accepted); input from users goes
/// through [`crate::parse_documents`] / [`crate::parse_json`], which validate.
impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "unknown kind {kind:?} (expected {})",
                    Kind::all_document_names()
                ))
            })?;
        Ok(match kind {
            Kind::Service => {
                Resource::Service(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::WorkloadEntry => {
                Resource::WorkloadEntry(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::WorkloadGroup => {
                Resource::WorkloadGroup(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::AuthorizationPolicy => {
                Resource::AuthorizationPolicy(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::PeerAuthentication => {
                Resource::PeerAuthentication(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::VirtualService => {
                Resource::VirtualService(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::DestinationRule => {
                Resource::DestinationRule(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::HttpRoute => {
                Resource::HttpRoute(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
            Kind::GrpcRoute => {
                Resource::GrpcRoute(serde_json::from_value(v).map_err(D::Error::custom)?)
            }
        })
    }
}
