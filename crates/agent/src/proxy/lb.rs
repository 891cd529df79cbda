//! Endpoint choice: healthy endpoints first, then the less loaded of two picked at random
//! (power of two choices) by outstanding connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use isthmus_xds::client::{Health, Workload};
use rand::Rng;

/// Counters are dropped once this many are held and none is in use.
const PRUNE_ABOVE: usize = 1024;

/// Outstanding connections per endpoint (by workload uid), shared by all listeners.
#[derive(Debug, Default)]
pub struct LoadTracker {
    counts: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// Counts one connection to an endpoint until dropped.
#[derive(Debug)]
pub struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LoadTracker {
    pub fn outstanding(&self, uid: &str) -> usize {
        self.lock()
            .get(uid)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Counts a connection to `uid` for as long as the guard lives.
    pub fn acquire(&self, uid: &str) -> ConnGuard {
        let mut counts = self.lock();
        if counts.len() > PRUNE_ABOVE {
            counts.retain(|_, c| Arc::strong_count(c) > 1);
        }
        let c = counts.entry(uid.to_owned()).or_default().clone();
        c.fetch_add(1, Ordering::AcqRel);
        ConnGuard(c)
    }

    /// Picks among healthy `candidates` (all of them when none is healthy) the less loaded of
    /// two chosen at random.
    pub fn pick<'a, R: Rng + ?Sized>(
        &self,
        candidates: &'a [Arc<Workload>],
        rng: &mut R,
    ) -> Option<&'a Arc<Workload>> {
        let healthy: Vec<&Arc<Workload>> = candidates
            .iter()
            .filter(|w| w.health == Health::Healthy)
            .collect();
        let pool: Vec<&Arc<Workload>> = if healthy.is_empty() {
            candidates.iter().collect()
        } else {
            healthy
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let a = rng.gen_range(0..n);
                // A second index distinct from the first.
                let b = (a + rng.gen_range(1..n)) % n;
                let (wa, wb) = (pool[a], pool[b]);
                if self.outstanding(&wb.uid) < self.outstanding(&wa.uid) {
                    Some(wb)
                } else {
                    Some(wa)
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicUsize>>> {
        // The map holds only counters; a panic elsewhere cannot leave it inconsistent.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_xds::client::Tunnel;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    fn wl(uid: &str, health: Health) -> Arc<Workload> {
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
            health,
            cluster_id: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            locality: None,
            authorization_policies: vec![],
        })
    }

    #[test]
    fn guard_counts_outstanding() {
        let lb = LoadTracker::default();
        let g1 = lb.acquire("a");
        let g2 = lb.acquire("a");
        assert_eq!(lb.outstanding("a"), 2);
        drop(g1);
        assert_eq!(lb.outstanding("a"), 1);
        drop(g2);
        assert_eq!(lb.outstanding("a"), 0);
        assert_eq!(lb.outstanding("unknown"), 0);
    }

    #[test]
    fn never_picks_unhealthy_while_a_healthy_one_exists() {
        let lb = LoadTracker::default();
        let eps = vec![
            wl("bad1", Health::Unhealthy),
            wl("good", Health::Healthy),
            wl("bad2", Health::Unhealthy),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        let mut guards = Vec::new();
        for _ in 0..200 {
            let w = lb.pick(&eps, &mut rng).map(|w| w.uid.clone());
            assert_eq!(w.as_deref(), Some("good"));
            guards.push(lb.acquire("good"));
        }
    }

    #[test]
    fn falls_back_to_unhealthy_when_none_is_healthy() {
        let lb = LoadTracker::default();
        let eps = vec![wl("bad1", Health::Unhealthy)];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            lb.pick(&eps, &mut rng).map(|w| w.uid.as_str()),
            Some("bad1")
        );
        assert!(lb.pick(&[], &mut rng).is_none());
    }

    #[test]
    fn spreads_load_over_long_lived_connections() {
        let lb = LoadTracker::default();
        let eps: Vec<_> = (0..4)
            .map(|i| wl(&format!("ep{i}"), Health::Healthy))
            .collect();
        let mut rng = StdRng::seed_from_u64(42);
        let mut guards = Vec::new();
        for _ in 0..400 {
            let uid = lb.pick(&eps, &mut rng).map(|w| w.uid.clone());
            guards.push(lb.acquire(&uid.unwrap_or_default()));
        }
        let loads: Vec<usize> = eps.iter().map(|w| lb.outstanding(&w.uid)).collect();
        assert_eq!(loads.iter().sum::<usize>(), 400);
        let (min, max) = (
            loads.iter().min().copied().unwrap_or(0),
            loads.iter().max().copied().unwrap_or(0),
        );
        // Two choices keep the spread within a couple of connections of even.
        assert!(max - min <= 3, "uneven load: {loads:?}");
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let lb = LoadTracker::default();
        let eps = vec![wl("busy", Health::Healthy), wl("idle", Health::Healthy)];
        let _busy: Vec<_> = (0..5).map(|_| lb.acquire("busy")).collect();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(
                lb.pick(&eps, &mut rng).map(|w| w.uid.as_str()),
                Some("idle")
            );
        }
    }
}
