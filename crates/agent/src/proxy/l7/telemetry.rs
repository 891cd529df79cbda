//! Istio's standard request metrics, by their names and labels: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`.
//! Every label value comes from the registry, this agent's identity or a fixed set, so
//! cardinality is bounded by the mesh's size, never by what clients send.

use std::fmt::Write;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::proxy::metrics::Known;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        })
    }
}

/// A label from a fixed set of values.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Fixed(pub &'static str);

impl EncodeLabelValue for Fixed {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.0)
    }
}

/// A number label (status codes), written as digits.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Num(pub u32);

impl EncodeLabelValue for Num {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(e, "{}", self.0)
    }
}

/// The gRPC status of a response; empty for plain HTTP, as Istio writes it.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Grpc(pub Option<u32>);

impl EncodeLabelValue for Grpc {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(n) => write!(e, "{n}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: Known,
    pub source_workload_namespace: Known,
    pub source_principal: Known,
    pub source_app: Known,
    pub source_version: Known,
    pub source_cluster: Known,
    pub destination_workload: Known,
    pub destination_workload_namespace: Known,
    pub destination_principal: Known,
    pub destination_app: Known,
    pub destination_version: Known,
    pub destination_service: Known,
    pub destination_service_name: Known,
    pub destination_service_namespace: Known,
    pub destination_cluster: Known,
    pub request_protocol: Fixed,
    pub response_code: Num,
    pub grpc_response_status: Grpc,
    /// Envoy's response flags (`-`, `UH`, `UF`, `UO`, `UT`, `URX`, `NR`, `FI`, `DI`, `UC`,
    /// `DENY` ...), a fixed set.
    pub response_flags: Fixed,
    pub connection_security_policy: Fixed,
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // Istio's default buckets for istio_request_duration_milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 9,
    ))
}

#[derive(Debug)]
pub struct IstioMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
    /// Retries not made because the destination's retry budget was spent.
    pub budget_exhausted: Counter,
}

impl Default for IstioMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            budget_exhausted: Counter::default(),
        }
    }
}

impl IstioMetrics {
    /// Registers Istio's names; `registry` must have no prefix.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "istio_requests",
            "Requests by source, destination, response code and flags",
            self.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations",
            self.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            self.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            self.response_bytes.clone(),
        );
        registry.register(
            "isthmus_retry_budget_exhausted",
            "Retries not made because the destination's retry budget was spent",
            self.budget_exhausted.clone(),
        );
    }

    /// The four series of one label set, to keep and record into without hashing the labels
    /// again.
    pub fn handles(&self, labels: &RequestLabels) -> Handles {
        Handles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    pub fn record(&self, labels: &RequestLabels, millis: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
        self.request_bytes
            .get_or_create(labels)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(labels)
            .observe(resp_bytes as f64);
    }

    /// Requests counted so far with this response code and flags (any other labels).
    pub fn count(&self, code: u32, flags: &str) -> u64 {
        let mut text = String::new();
        let mut r = Registry::default();
        r.register("x", "", self.requests.clone());
        let _ = prometheus_client::encoding::text::encode(&mut text, &r);
        text.lines()
            .filter(|l| {
                l.contains(&format!("response_code=\"{code}\""))
                    && l.contains(&format!("response_flags=\"{flags}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// One label set's series.
#[derive(Clone, Debug)]
pub struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Handles {
    pub fn record(&self, millis: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.inc();
        self.duration.observe(millis);
        self.request_bytes.observe(req_bytes as f64);
        self.response_bytes.observe(resp_bytes as f64);
    }
}

/// A connection's series by what varies between its requests (endpoint, code, flags...):
/// the label sets of a connection repeat, and hashing twenty labels four times per request
/// showed in profiles. A handful of entries; past `SeriesCache::MAX` it starts over.
#[derive(Debug)]
pub struct SeriesCache<K> {
    entries: std::sync::Mutex<Vec<(K, Handles)>>,
}

impl<K> Default for SeriesCache<K> {
    fn default() -> Self {
        Self {
            entries: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<K: PartialEq> SeriesCache<K> {
    const MAX: usize = 32;

    pub fn get(&self, key: K, make: impl FnOnce() -> Handles) -> Handles {
        let mut e = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, h)) = e.iter().find(|(k, _)| *k == key) {
            return h.clone();
        }
        if e.len() >= Self::MAX {
            e.clear();
        }
        let h = make();
        e.push((key, h.clone()));
        h
    }
}

/// A status code as a label: 0 outside 100–599.
pub fn code_label(code: u16) -> Num {
    Num(if (100..=599).contains(&code) {
        code as u32
    } else {
        0
    })
}

pub fn known(s: &str) -> Known {
    Known((!s.is_empty()).then(|| Arc::from(s)))
}
