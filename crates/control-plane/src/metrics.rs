//! The control plane's Prometheus metrics: one sub-registry per component.

use std::sync::Arc;

use isthmus_store::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub api: &'static str,
    pub method: String,
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub api: &'static str,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    op: String,
    kind: String,
}

/// The store's own health, read from it at each scrape: `errors_total{op,kind}` (storage errors
/// by operation and cause) and `write_failing` (1 while writes fail). The store counts, so that
/// failures nobody asked for (a reopen, a probe) are counted too.
pub struct StoreCollector(pub Arc<dyn Store>);

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let health = self.0.health();
        {
            let mut errors = encoder.encode_descriptor(
                "errors",
                "Storage errors of the registry store, by operation (read, write, reopen, probe) and kind (disk_full, io, corrupt, unavailable)",
                None,
                MetricType::Counter,
            )?;
            for e in &health.errors {
                let labels = StoreErrorLabels {
                    op: e.op.into(),
                    kind: e.kind.into(),
                };
                ConstCounter::new(e.count).encode(errors.encode_family(&labels)?)?;
            }
        }
        let failing = encoder.encode_descriptor(
            "write_failing",
            "1 while writes to the registry store fail (the server is then unready), else 0",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(health.write_failure.is_some())).encode(failing)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
    event: &'static str,
    stage: &'static str,
}

/// What the listeners' guards did: connections refused, evicted and timed out, by listener
/// (`grpc`, `admin`, `registration`, `metrics`, `dns_tcp`) and stage.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    events: Family<ListenerLabels, Counter>,
}

impl ListenerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_closed",
            "Connections the server closed to bound what clients hold, by listener, event (refused, evicted, timed_out) and stage (total_cap, source_cap, handshake, first_bytes, idle)",
            self.events.clone(),
        );
    }

    /// The guard's observer that counts here.
    pub fn observer(&self) -> isthmus_socket::guard::Observer {
        let events = self.events.clone();
        Arc::new(move |listener, event: isthmus_socket::Event| {
            let (event, stage) = event.labels();
            events
                .get_or_create(&ListenerLabels {
                    listener,
                    event,
                    stage,
                })
                .inc();
        })
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub store_revision: Gauge,
    pub resources: Family<KindLabels, Gauge>,
    pub watchers: Gauge,
}

impl Metrics {
    /// `more` registers the metrics of other components (each in its own sub-registry).
    pub fn new(more: impl FnOnce(&mut Registry)) -> Arc<Self> {
        let mut registry = Registry::with_prefix("isthmus");
        more(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let store_revision = Gauge::default();
        let resources = Family::<KindLabels, Gauge>::default();
        let watchers = Gauge::default();
        {
            let http = registry.sub_registry_with_prefix("http");
            http.register(
                "requests",
                "HTTP requests served, by API, route and status code",
                requests.clone(),
            );
            http.register(
                "request_duration_seconds",
                "HTTP request latency by API and route",
                latency.clone(),
            );
            http.register("watchers", "Open watch streams", watchers.clone());
        }
        {
            let store = registry.sub_registry_with_prefix("registry");
            store.register(
                "revision",
                "Current revision of the registry store",
                store_revision.clone(),
            );
            store.register(
                "resources",
                "Resources in the registry, by kind",
                resources.clone(),
            );
        }
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            store_revision,
            resources,
            watchers,
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// The store with every request timed: `isthmus_store_request_duration_seconds{op,outcome}`
/// (op: get, range, txn, watch, lease; outcome: ok, error). On etcd this is the round trip to
/// the cluster, so it shows a slow or distant etcd before writes start failing.
pub struct TimedStore {
    inner: Arc<dyn Store>,
    pub latency: Family<StoreOpLabels, Histogram>,
}

impl TimedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        TimedStore {
            inner,
            latency: Family::new_with_constructor(|| {
                // 50 µs to ~26 s.
                Histogram::new(exponential_buckets(0.00005, 2.0, 20))
            }),
        }
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "request_duration_seconds",
            "Registry store requests by operation and outcome (on etcd: the round trip to the cluster)",
            self.latency.clone(),
        );
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, isthmus_store::StoreError>>,
    ) -> Result<T, isthmus_store::StoreError> {
        let started = std::time::Instant::now();
        let result = f.await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.latency
            .get_or_create(&StoreOpLabels { op, outcome })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

#[async_trait::async_trait]
impl Store for TimedStore {
    fn revision(&self) -> isthmus_store::Revision {
        self.inner.revision()
    }
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<isthmus_store::KeyValue>, isthmus_store::StoreError> {
        self.timed("get", self.inner.get(key)).await
    }
    async fn get_serializable(
        &self,
        key: &str,
    ) -> Result<Option<isthmus_store::KeyValue>, isthmus_store::StoreError> {
        self.timed("get", self.inner.get_serializable(key)).await
    }
    async fn range(
        &self,
        prefix: &str,
    ) -> Result<(Vec<isthmus_store::KeyValue>, isthmus_store::Revision), isthmus_store::StoreError>
    {
        self.timed("range", self.inner.range(prefix)).await
    }
    async fn txn(
        &self,
        txn: isthmus_store::Txn,
    ) -> Result<isthmus_store::TxnOutcome, isthmus_store::StoreError> {
        self.timed("txn", self.inner.txn(txn)).await
    }
    async fn watch(
        &self,
        prefix: &str,
        from: isthmus_store::Revision,
    ) -> Result<isthmus_store::WatchStream, isthmus_store::StoreError> {
        self.timed("watch", self.inner.watch(prefix, from)).await
    }
    async fn compact(
        &self,
        revision: isthmus_store::Revision,
    ) -> Result<(), isthmus_store::StoreError> {
        self.timed("compact", self.inner.compact(revision)).await
    }
    fn oldest_revision(&self) -> isthmus_store::Revision {
        self.inner.oldest_revision()
    }
    fn health(&self) -> isthmus_store::Health {
        self.inner.health()
    }
    async fn grant_lease(
        &self,
        ttl: std::time::Duration,
    ) -> Result<Option<isthmus_store::LeaseId>, isthmus_store::StoreError> {
        self.timed("lease", self.inner.grant_lease(ttl)).await
    }
    async fn keep_alive(
        &self,
        lease: isthmus_store::LeaseId,
    ) -> Result<bool, isthmus_store::StoreError> {
        self.timed("lease", self.inner.keep_alive(lease)).await
    }
    async fn revoke_lease(
        &self,
        lease: isthmus_store::LeaseId,
    ) -> Result<(), isthmus_store::StoreError> {
        self.timed("lease", self.inner.revoke_lease(lease)).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> Result<isthmus_store::Revision, isthmus_store::StoreError> {
        self.timed("txn", self.inner.put(key, value)).await
    }
    async fn delete(
        &self,
        key: &str,
    ) -> Result<Option<isthmus_store::Revision>, isthmus_store::StoreError> {
        self.timed("txn", self.inner.delete(key)).await
    }
}
