//! Counters of the discovery server (`isthmus_xds_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: String,
}

impl TypeLabels {
    /// The type URLs this server serves by name, any other as `other`: a label's values must
    /// not be what clients choose, or each new one is a series kept for ever.
    fn of(type_url: &str) -> Self {
        let known = [
            crate::resources::ADDRESS_TYPE_URL,
            crate::resources::AUTHORIZATION_TYPE_URL,
            crate::resources::TRAFFIC_TYPE_URL,
            crate::resources::HTTP_POLICY_TYPE_URL,
        ];
        Self {
            type_url: if known.contains(&type_url) {
                type_url.to_owned()
            } else {
                "other".to_owned()
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

/// Discovery server metrics; register them with [`XdsMetrics::register`].
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    connected: Gauge,
    pushes: Family<TypeLabels, Counter>,
    resources_sent: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    refused: Family<CodeLabels, Counter>,
    unverified: Counter,
}

impl XdsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connected_clients",
            "Discovery streams open now",
            self.connected.clone(),
        );
        registry.register(
            "pushes",
            "Discovery responses sent, by type",
            self.pushes.clone(),
        );
        registry.register(
            "resources_sent",
            "Resources sent in discovery responses, by type",
            self.resources_sent.clone(),
        );
        registry.register(
            "nacks",
            "Discovery responses a client rejected, by type",
            self.nacks.clone(),
        );
        registry.register(
            "refused_streams",
            "Discovery streams refused or closed with an error, by gRPC code",
            self.refused.clone(),
        );
        registry.register(
            "unverified_address_claims",
            "Discovery streams whose node id claimed an address nothing vouched for (served, the claim ignored)",
            self.unverified.clone(),
        );
    }

    pub(crate) fn connected(&self) -> &Gauge {
        &self.connected
    }

    pub(crate) fn pushed(&self, type_url: &str, resources: usize) {
        let labels = TypeLabels::of(type_url);
        self.pushes.get_or_create(&labels).inc();
        self.resources_sent
            .get_or_create(&labels)
            .inc_by(resources as u64);
    }

    pub(crate) fn nacked(&self, type_url: &str) {
        self.nacks.get_or_create(&TypeLabels::of(type_url)).inc();
    }

    pub(crate) fn refused(&self, code: tonic::Code) {
        self.refused
            .get_or_create(&CodeLabels {
                code: format!("{code:?}"),
            })
            .inc();
    }

    pub(crate) fn unverified_claim(&self) {
        self.unverified.inc();
    }

    /// Streams whose node id claimed an address nothing vouched for, so far.
    pub fn unverified_address_claims(&self) -> u64 {
        self.unverified.get()
    }

    /// Streams open now.
    pub fn connected_clients(&self) -> i64 {
        self.connected.get()
    }

    /// Responses sent so far for `type_url`.
    pub fn pushes(&self, type_url: &str) -> u64 {
        self.pushes.get_or_create(&TypeLabels::of(type_url)).get()
    }

    /// NACKs received so far for `type_url`.
    pub fn nacks(&self, type_url: &str) -> u64 {
        self.nacks.get_or_create(&TypeLabels::of(type_url)).get()
    }

    /// Resources sent so far for `type_url`.
    pub fn resources_sent(&self, type_url: &str) -> u64 {
        self.resources_sent
            .get_or_create(&TypeLabels::of(type_url))
            .get()
    }
}
