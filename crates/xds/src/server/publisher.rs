//! Numbers each resource set the server is given and records what changed from the previous
//! one, once for all clients: a client that has generation G then only looks at the names
//! changed after G instead of comparing every resource.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::watch;

use crate::resources::{ResourceSet, TypeResources};

/// Names changed (added, modified or removed) in one generation, by type URL.
type Changes = BTreeMap<String, Arc<Vec<Arc<str>>>>;

/// A numbered resource set with the changes of recent generations.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub generation: u64,
    pub set: Arc<ResourceSet>,
    log: Arc<VecDeque<(u64, Changes)>>,
}

impl Snapshot {
    pub fn first(set: Arc<ResourceSet>) -> Self {
        Self {
            generation: 1,
            set,
            log: Arc::new(VecDeque::new()),
        }
    }

    /// The next generation, or `None` when `set` serves exactly what this one does.
    pub fn next(&self, set: Arc<ResourceSet>, history: usize) -> Option<Self> {
        let mut changes = Changes::new();
        let urls: HashSet<&str> = self.set.type_urls().chain(set.type_urls()).collect();
        let mut types_changed = false;
        for url in urls {
            let names = match (self.set.of_type(url), set.of_type(url)) {
                (Some(old), Some(new)) => diff(old, new),
                (Some(only), None) | (None, Some(only)) => {
                    types_changed = true;
                    only.keys().cloned().collect()
                }
                (None, None) => continue,
            };
            if !names.is_empty() {
                changes.insert(url.to_owned(), Arc::new(names));
            }
        }
        if changes.is_empty() && !types_changed {
            return None;
        }
        let generation = self.generation + 1;
        let mut log = (*self.log).clone();
        log.push_back((generation, changes));
        while log.len() > history {
            log.pop_front();
        }
        Some(Self {
            generation,
            set,
            log: Arc::new(log),
        })
    }

    /// Names of `type_url` changed after generation `since` (up to this one); `None` when
    /// the log does not reach back that far (compare everything then).
    pub fn changed_since(&self, since: u64, type_url: &str) -> Option<HashSet<Arc<str>>> {
        if since == self.generation {
            return Some(HashSet::new());
        }
        let oldest = self.log.front()?.0;
        if since + 1 < oldest || since > self.generation {
            return None;
        }
        let mut names = HashSet::new();
        for (generation, changes) in self.log.iter() {
            if *generation > since {
                if let Some(c) = changes.get(type_url) {
                    names.extend(c.iter().cloned());
                }
            }
        }
        Some(names)
    }
}

fn diff(old: &TypeResources, new: &TypeResources) -> Vec<Arc<str>> {
    let mut names: Vec<Arc<str>> = new
        .iter()
        .filter(|(name, r)| old.get(*name).is_none_or(|o| o.version != r.version))
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(old.keys().filter(|name| !new.contains_key(*name)).cloned());
    names
}

/// Turns the caller's resource sets into numbered snapshots until the caller's sender or
/// every snapshot receiver is gone. The last snapshot stays served after the caller leaves.
pub(crate) async fn run(
    mut source: watch::Receiver<Arc<ResourceSet>>,
    out: watch::Sender<Arc<Snapshot>>,
    history: usize,
) {
    loop {
        tokio::select! {
            changed = source.changed() => if changed.is_err() { return },
            () = out.closed() => return,
        }
        let set = source.borrow_and_update().clone();
        let current = out.borrow().clone();
        if Arc::ptr_eq(&set, &current.set) {
            continue;
        }
        if let Some(next) = current.next(set, history) {
            tracing::debug!(generation = next.generation, "new discovery snapshot");
            out.send_replace(Arc::new(next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ADDRESS_TYPE_URL;

    fn set(items: &[(&str, &str)]) -> Arc<ResourceSet> {
        let mut s = ResourceSet::new();
        for (name, body) in items {
            s.insert_any(
                ADDRESS_TYPE_URL,
                name,
                prost_types::Any {
                    type_url: ADDRESS_TYPE_URL.into(),
                    value: body.as_bytes().to_vec(),
                },
            );
        }
        Arc::new(s)
    }

    fn sorted(names: HashSet<Arc<str>>) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn records_changes_and_forgets_old_generations() {
        let s1 = Snapshot::first(set(&[("a", "1"), ("b", "1")]));
        assert!(s1.next(set(&[("a", "1"), ("b", "1")]), 2).is_none());
        let s2 = s1.next(set(&[("a", "2"), ("b", "1")]), 2).unwrap();
        let s3 = s2.next(set(&[("a", "2"), ("c", "1")]), 2).unwrap();
        assert_eq!(
            sorted(s3.changed_since(1, ADDRESS_TYPE_URL).unwrap()),
            ["a", "b", "c"]
        );
        assert_eq!(
            sorted(s3.changed_since(2, ADDRESS_TYPE_URL).unwrap()),
            ["b", "c"]
        );
        assert!(s3.changed_since(3, ADDRESS_TYPE_URL).unwrap().is_empty());
        let s4 = s3.next(set(&[("a", "3"), ("c", "1")]), 2).unwrap();
        assert!(
            s4.changed_since(1, ADDRESS_TYPE_URL).is_none(),
            "log keeps 2"
        );
        assert_eq!(
            sorted(s4.changed_since(2, ADDRESS_TYPE_URL).unwrap()),
            ["a", "b", "c"]
        );
    }
}
