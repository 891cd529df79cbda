//! Per-request endpoint choice and outlier detection, shared by every client connection.
//!
//! - Default: power of two choices over a peak-EWMA latency weighted by in-flight requests
//!   (Linkerd's balancer). `ROUND_ROBIN`, `LEAST_REQUEST` (p2c on in-flight) and `RANDOM` as
//!   DestinationRules ask; `consistentHash` on a ring of 64 points per endpoint.
//! - Outlier detection (only with a DestinationRule's `outlierDetection`): consecutive 5xx or
//!   gateway errors eject an endpoint for `baseEjectionTime` × times ejected, never more than
//!   `maxEjectionPercent` of the endpoints at once. Checked when a request picks, so no timer.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use isthmus_model::traffic::{self, LoadBalancerSettings, OutlierDetection};
use isthmus_xds::client::{Health, Workload};
use rand::Rng;
use smallvec::SmallVec;

/// Counters are dropped once this many are held and none is in use.
const PRUNE_ABOVE: usize = 4096;
/// Weight of the newest sample in the latency average (peaks are taken whole).
const EWMA_ALPHA: f64 = 0.3;
/// An endpoint's latency estimate fades with this time constant while it gets no requests,
/// so one slow answer (a new connection's first) cannot starve it for good: it is tried again
/// within seconds and its estimate refreshed (Finagle's peak EWMA decays the same way).
const DECAY_TAU_SECS: f64 = 1.0;

/// Nanoseconds since the first use, for timestamps in atomics.
fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Default)]
pub struct EndpointStats {
    in_flight: AtomicUsize,
    /// Peak-EWMA of response latency, in nanoseconds (0: no sample yet).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated ([`now_ns`]).
    stamp_ns: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejections: AtomicU32,
    state: Mutex<EjectState>,
}

#[derive(Debug, Default)]
struct EjectState {
    ejected_until: Option<Instant>,
    /// When the consecutive counters started; past `interval` they start again.
    window_start: Option<Instant>,
}

impl EndpointStats {
    fn cost(&self) -> f64 {
        let rtt = match self.ewma_ns.load(Ordering::Relaxed) {
            // Never measured: tried first, so that every endpoint gets an estimate (its
            // in-flight requests still count, so a new endpoint is not flooded).
            0 => 1.0,
            n => {
                let idle =
                    now_ns().saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64 / 1e9;
                n as f64 * (-idle / DECAY_TAU_SECS).exp()
            }
        };
        rtt * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    fn ejected(&self, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.ejected_until.is_some_and(|t| t > now)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts one request to an endpoint while it lives.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How an attempt ended, for outlier detection and the latency average.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Result5xx {
    Ok,
    /// A 5xx other than 502/503/504.
    ServerError,
    /// 502, 503, 504, or no connection / reset.
    GatewayError,
}

/// Maps looked up on every request: a fast hash (the default SipHash showed in profiles).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct Balancer {
    stats: Mutex<FastMap<String, Arc<EndpointStats>>>,
    round_robin: Mutex<FastMap<String, usize>>,
}

impl Balancer {
    pub fn stats(&self, uid: &str) -> Arc<EndpointStats> {
        let mut m = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked up several times per request: the key is copied only for a new endpoint.
        if let Some(s) = m.get(uid) {
            return s.clone();
        }
        if m.len() > PRUNE_ABOVE {
            m.retain(|_, s| Arc::strong_count(s) > 1 || s.ejected(Instant::now()));
        }
        m.entry(uid.to_owned()).or_default().clone()
    }

    pub fn start(&self, uid: &str) -> InFlight {
        let s = self.stats(uid);
        s.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(s)
    }

    /// Picks an endpoint for one request among `candidates` (already the subset's): healthy
    /// and not ejected ones first, not those in `tried` when others remain. `key` is the
    /// pool's name for round robin; `hash` the request's consistent-hash value, if the policy
    /// hashes.
    #[allow(clippy::too_many_arguments)]
    pub fn pick<R: Rng + ?Sized>(
        &self,
        key: &str,
        candidates: &[Arc<Workload>],
        tried: &[&str],
        lb: Option<&LoadBalancerSettings>,
        hash: Option<u64>,
        now: Instant,
        rng: &mut R,
    ) -> Option<Arc<Workload>> {
        // On the stack for the usual few endpoints: three of these per request.
        type Pool<'w> = SmallVec<[&'w Arc<Workload>; 8]>;
        let mut pool: Pool = candidates
            .iter()
            .filter(|w| w.health == Health::Healthy)
            .collect();
        if pool.is_empty() {
            pool = candidates.iter().collect();
        }
        let not_ejected: Pool = pool
            .iter()
            .copied()
            .filter(|w| !self.stats(&w.uid).ejected(now))
            .collect();
        // All ejected: Envoy's panic mode, use them all rather than fail everything.
        if !not_ejected.is_empty() {
            pool = not_ejected;
        }
        let untried: Pool = pool
            .iter()
            .copied()
            .filter(|w| !tried.contains(&w.uid.as_str()))
            .collect();
        if !untried.is_empty() {
            pool = untried;
        }
        if pool.is_empty() {
            return None;
        }
        if pool.len() == 1 {
            return Some(pool[0].clone());
        }
        let simple = lb
            .and_then(|l| l.simple.as_deref())
            .unwrap_or("UNSPECIFIED");
        if let (Some(h), Some(_)) = (hash, lb.and_then(|l| l.consistent_hash.as_ref())) {
            return Some(ring_pick(&pool, h).clone());
        }
        let n = pool.len();
        let chosen = match simple {
            "RANDOM" => pool[rng.gen_range(0..n)],
            "ROUND_ROBIN" => {
                let mut rr = self
                    .round_robin
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let i = rr.entry(key.to_owned()).or_insert(0);
                *i = i.wrapping_add(1);
                // Ordered by uid, so every request walks the same cycle.
                let mut sorted = pool.clone();
                sorted.sort_by(|a, b| a.uid.cmp(&b.uid));
                sorted[*i % n]
            }
            _ => {
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let (sa, sb) = (self.stats(&pool[a].uid), self.stats(&pool[b].uid));
                let better_b = if simple == "LEAST_REQUEST" || simple == "LEAST_CONN" {
                    sb.in_flight() < sa.in_flight()
                } else {
                    sb.cost() < sa.cost()
                };
                if better_b {
                    pool[b]
                } else {
                    pool[a]
                }
            }
        };
        Some(chosen.clone())
    }

    /// Records one attempt's end: latency into the average (`None`: not a fair sample, e.g.
    /// it paid for a new connection), the result into outlier detection (when the
    /// destination has it; `endpoints` is how many it has, for the ejection cap). Returns
    /// whether this ejected the endpoint.
    pub fn record(
        &self,
        uid: &str,
        latency: Option<Duration>,
        result: Result5xx,
        od: Option<&OutlierDetection>,
        endpoints: &[Arc<Workload>],
        now: Instant,
    ) -> bool {
        let s = self.stats(uid);
        if let Some(latency) = latency {
            let sample = latency.as_nanos().min(u64::MAX as u128) as u64;
            let old = s.ewma_ns.load(Ordering::Relaxed);
            let next = if old == 0 || sample > old {
                sample
            } else {
                (old as f64 * (1.0 - EWMA_ALPHA) + sample as f64 * EWMA_ALPHA) as u64
            };
            s.ewma_ns.store(next.max(1), Ordering::Relaxed);
            s.stamp_ns.store(now_ns(), Ordering::Relaxed);
        }
        let Some(od) = od else { return false };
        let interval = od
            .interval
            .as_deref()
            .and_then(|d| traffic::parse_duration(d).ok())
            .unwrap_or(Duration::from_secs(10));
        {
            let mut st = s.state.lock().unwrap_or_else(PoisonError::into_inner);
            if st
                .window_start
                .is_none_or(|t| now.duration_since(t) > interval)
            {
                st.window_start = Some(now);
                s.consecutive_5xx.store(0, Ordering::Relaxed);
                s.consecutive_gateway.store(0, Ordering::Relaxed);
            }
        }
        let (c5, cg) = match result {
            Result5xx::Ok => {
                s.consecutive_5xx.store(0, Ordering::Relaxed);
                s.consecutive_gateway.store(0, Ordering::Relaxed);
                return false;
            }
            Result5xx::ServerError => (s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1, 0),
            Result5xx::GatewayError => (
                s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
                s.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
            ),
        };
        // Istio's defaults once outlierDetection is set: 5 consecutive 5xx; gateway errors
        // only when asked.
        let over_5xx =
            c5 >= od.consecutive_5xx_errors.unwrap_or(5) && od.consecutive_5xx_errors != Some(0);
        let over_gw = od
            .consecutive_gateway_errors
            .is_some_and(|n| n > 0 && cg >= n);
        if !(over_5xx || over_gw) {
            return false;
        }
        let max_pct = od.max_ejection_percent.unwrap_or(10) as usize;
        let ejected_now = endpoints
            .iter()
            .filter(|w| w.uid != uid && self.stats(&w.uid).ejected(now))
            .count();
        // At least one may always be ejected when the cap allows any, as Envoy rounds.
        let cap = (endpoints.len() * max_pct).div_ceil(100);
        if ejected_now + 1 > cap {
            return false;
        }
        let base = od
            .base_ejection_time
            .as_deref()
            .and_then(|d| traffic::parse_duration(d).ok())
            .unwrap_or(Duration::from_secs(30));
        let times = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let mut st = s.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.ejected_until = Some(now + base * times.min(10));
        s.consecutive_5xx.store(0, Ordering::Relaxed);
        s.consecutive_gateway.store(0, Ordering::Relaxed);
        tracing::info!(
            endpoint = uid,
            for_ms = (base * times.min(10)).as_millis() as u64,
            "outlier detection ejected an endpoint"
        );
        true
    }

    pub fn is_ejected(&self, uid: &str, now: Instant) -> bool {
        self.stats(uid).ejected(now)
    }
}

/// The endpoint owning the first of its ring points at or after `h`.
fn ring_pick<'a>(pool: &[&'a Arc<Workload>], h: u64) -> &'a Arc<Workload> {
    let mut best: Option<(u64, &'a Arc<Workload>)> = None;
    let mut lowest: Option<(u64, &'a Arc<Workload>)> = None;
    for w in pool {
        for i in 0..64u32 {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (&w.uid, i).hash(&mut hasher);
            let p = hasher.finish();
            if p >= h && best.is_none_or(|(b, _)| p < b) {
                best = Some((p, w));
            }
            if lowest.is_none_or(|(l, _)| p < l) {
                lowest = Some((p, w));
            }
        }
    }
    best.or(lowest).map(|(_, w)| w).unwrap_or(pool[0])
}

/// The consistent-hash value of a request under `lb`, if it hashes.
pub fn request_hash(
    lb: Option<&LoadBalancerSettings>,
    headers: super::authz::Headers<'_>,
    query: Option<&str>,
    source: std::net::IpAddr,
) -> Option<u64> {
    let ch = lb?.consistent_hash.as_ref()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    if let Some(h) = &ch.http_header_name {
        headers.first(h.as_str())?.as_bytes().hash(&mut hasher);
    } else if let Some(q) = &ch.http_query_parameter_name {
        let v = query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == q).then_some(v)
        })?;
        v.hash(&mut hasher);
    } else if ch.use_source_ip == Some(true) {
        source.hash(&mut hasher);
    } else {
        return None;
    }
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_xds::client::Tunnel;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    pub(crate) fn wl(uid: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![],
            hostname: String::new(),
            network: String::new(),
            tunnel: Tunnel::None,
            trust_domain: String::new(),
            service_account: String::new(),
            services: BTreeMap::new(),
            health: Health::Healthy,
            cluster_id: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            locality: None,
            authorization_policies: vec![],
        })
    }

    fn od(n: u32, base: &str, pct: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: Some(n),
            consecutive_gateway_errors: None,
            interval: Some("10s".into()),
            base_ejection_time: Some(base.into()),
            max_ejection_percent: Some(pct),
        }
    }

    #[test]
    fn outlier_detection_ejects_a_failing_endpoint_and_returns_it_after_base_ejection_time() {
        let b = Balancer::default();
        let eps = vec![wl("a"), wl("b"), wl("c")];
        let od = od(3, "1s", 50);
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        assert!(!b.record("a", Some(ms), Result5xx::ServerError, Some(&od), &eps, t0));
        assert!(!b.record("a", Some(ms), Result5xx::GatewayError, Some(&od), &eps, t0));
        assert!(b.record("a", Some(ms), Result5xx::ServerError, Some(&od), &eps, t0));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let w = b.pick("svc", &eps, &[], None, None, t0, &mut rng).unwrap();
            assert_ne!(w.uid, "a", "an ejected endpoint was picked");
        }
        // Back after baseEjectionTime.
        let later = t0 + Duration::from_millis(1100);
        assert!(!b.is_ejected("a", later));
        let random = LoadBalancerSettings {
            simple: Some("RANDOM".into()),
            consistent_hash: None,
        };
        let picked: std::collections::HashSet<String> = (0..100)
            .map(|_| {
                b.pick("svc", &eps, &[], Some(&random), None, later, &mut rng)
                    .unwrap()
                    .uid
                    .clone()
            })
            .collect();
        assert!(picked.contains("a"));
        // A success resets the count: two more failures do not eject.
        b.record(
            "b",
            Some(ms),
            Result5xx::ServerError,
            Some(&od),
            &eps,
            later,
        );
        b.record(
            "b",
            Some(ms),
            Result5xx::ServerError,
            Some(&od),
            &eps,
            later,
        );
        b.record("b", Some(ms), Result5xx::Ok, Some(&od), &eps, later);
        assert!(!b.record(
            "b",
            Some(ms),
            Result5xx::ServerError,
            Some(&od),
            &eps,
            later
        ));
    }

    #[test]
    fn max_ejection_percent_caps_ejections() {
        let b = Balancer::default();
        let eps = vec![wl("a"), wl("b"), wl("c"), wl("d")];
        let od = od(1, "30s", 25);
        let t = Instant::now();
        let ms = Duration::from_millis(1);
        assert!(b.record("a", Some(ms), Result5xx::ServerError, Some(&od), &eps, t));
        assert!(
            !b.record("b", Some(ms), Result5xx::ServerError, Some(&od), &eps, t),
            "25% of 4 is one"
        );
        // Without outlierDetection nothing is ever ejected.
        for _ in 0..20 {
            assert!(!b.record("c", Some(ms), Result5xx::ServerError, None, &eps, t));
        }
    }

    #[test]
    fn default_balancing_prefers_the_faster_endpoint() {
        let b = Balancer::default();
        let eps = vec![wl("slow"), wl("fast")];
        let t = Instant::now();
        b.record(
            "slow",
            Some(Duration::from_millis(50)),
            Result5xx::Ok,
            None,
            &eps,
            t,
        );
        b.record(
            "fast",
            Some(Duration::from_millis(1)),
            Result5xx::Ok,
            None,
            &eps,
            t,
        );
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..50 {
            let w = b.pick("svc", &eps, &[], None, None, t, &mut rng).unwrap();
            assert_eq!(w.uid, "fast");
        }
    }

    #[test]
    fn round_robin_cycles_and_retries_avoid_the_tried_endpoint() {
        let b = Balancer::default();
        let eps = vec![wl("a"), wl("b"), wl("c")];
        let lb = LoadBalancerSettings {
            simple: Some("ROUND_ROBIN".into()),
            consistent_hash: None,
        };
        let mut rng = StdRng::seed_from_u64(2);
        let t = Instant::now();
        let seq: Vec<String> = (0..6)
            .map(|_| {
                b.pick("svc", &eps, &[], Some(&lb), None, t, &mut rng)
                    .unwrap()
                    .uid
                    .clone()
            })
            .collect();
        assert_eq!(
            seq[0..3]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
        assert_eq!(seq[0], seq[3]);
        let w = b
            .pick("svc", &eps, &["a", "b"], None, None, t, &mut rng)
            .unwrap();
        assert_eq!(w.uid, "c");
    }

    #[test]
    fn consistent_hash_sends_one_key_to_one_endpoint() {
        let b = Balancer::default();
        let eps: Vec<_> = (0..5).map(|i| wl(&format!("ep{i}"))).collect();
        let lb = LoadBalancerSettings {
            simple: None,
            consistent_hash: Some(traffic::ConsistentHash {
                http_header_name: Some("x-user".into()),
                ..Default::default()
            }),
        };
        let mut rng = StdRng::seed_from_u64(5);
        let t = Instant::now();
        let mut spread = std::collections::HashSet::new();
        for user in ["ann", "bob", "cy", "dee", "ed", "flo", "gus", "hal"] {
            let mut h = http::HeaderMap::new();
            h.insert("x-user", user.parse().unwrap());
            let key = request_hash(
                Some(&lb),
                crate::proxy::l7::authz::Headers::Map(&h),
                None,
                [127, 0, 0, 1].into(),
            );
            let first = b
                .pick("svc", &eps, &[], Some(&lb), key, t, &mut rng)
                .unwrap()
                .uid
                .clone();
            for _ in 0..10 {
                let again = b
                    .pick("svc", &eps, &[], Some(&lb), key, t, &mut rng)
                    .unwrap();
                assert_eq!(again.uid, first);
            }
            spread.insert(first);
        }
        assert!(spread.len() >= 3, "8 users landed on {spread:?}");
    }
}
