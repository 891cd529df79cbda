//! How many discovery streams one credential holds open: per identity over all hosts, and per
//! identity from one address. Checked when a stream is accepted; the slot is given back when
//! its task ends, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::Status;

use super::Identity;

#[derive(Default)]
pub(crate) struct StreamSlots {
    open: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_identity: HashMap<String, usize>,
    by_identity_ip: HashMap<(String, Option<IpAddr>), usize>,
}

/// One open stream's share of the counts.
pub(crate) struct Slot {
    slots: Arc<StreamSlots>,
    identity: String,
    ip: Option<IpAddr>,
}

impl StreamSlots {
    /// Takes a slot for a stream of `identity` from `ip`, or says which bound it is over.
    pub fn take(
        self: &Arc<Self>,
        identity: &Identity,
        ip: Option<IpAddr>,
        per_identity: usize,
        per_identity_ip: usize,
    ) -> Result<Slot, Status> {
        let key = identity.to_string();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let total = open.by_identity.get(&key).copied().unwrap_or(0);
        if total >= per_identity {
            return Err(Status::resource_exhausted(format!(
                "{key} already has {total} discovery streams open, the limit per identity \
                 (`isthmus server --max-streams-per-identity`); close unused agents or give hosts \
                 their own service accounts"
            )));
        }
        let from_ip = open
            .by_identity_ip
            .get(&(key.clone(), ip))
            .copied()
            .unwrap_or(0);
        if from_ip >= per_identity_ip {
            let from = ip.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string());
            return Err(Status::resource_exhausted(format!(
                "{key} already has {from_ip} discovery streams open from {from}, the limit per \
                 identity and address (`isthmus server --max-streams-per-identity-and-address`); one agent \
                 needs one stream: is a client reconnecting without closing its old streams?"
            )));
        }
        *open.by_identity.entry(key.clone()).or_default() += 1;
        *open.by_identity_ip.entry((key.clone(), ip)).or_default() += 1;
        Ok(Slot {
            slots: self.clone(),
            identity: key,
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.by_identity.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.by_identity.remove(&self.identity);
            }
        }
        let key = (std::mem::take(&mut self.identity), self.ip);
        if let Some(n) = open.by_identity_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.by_identity_ip.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_identity_and_address_and_given_back() {
        let slots = Arc::<StreamSlots>::default();
        let a = Identity::new("cluster.local", "prod", "web");
        let b = Identity::new("cluster.local", "prod", "db");
        let ip1 = Some("10.0.0.1".parse().unwrap());
        let ip2 = Some("10.0.0.2".parse().unwrap());
        let s1 = slots.take(&a, ip1, 3, 2).unwrap();
        let _s2 = slots.take(&a, ip1, 3, 2).unwrap();
        let err = slots.take(&a, ip1, 3, 2).err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("--max-streams-per-identity-and-address"),
            "{}",
            err.message()
        );
        let _s3 = slots.take(&a, ip2, 3, 2).unwrap();
        let err = slots.take(&a, ip2, 3, 2).err().unwrap();
        assert!(
            err.message().contains("limit per identity"),
            "{}",
            err.message()
        );
        // Another identity is not affected; a closed stream frees its slot.
        let _other = slots.take(&b, ip1, 3, 2).unwrap();
        drop(s1);
        let _again = slots.take(&a, ip2, 3, 2).unwrap();
        drop((_s2, _s3, _again, _other));
        let open = slots.open.lock().unwrap();
        assert!(open.by_identity.is_empty() && open.by_identity_ip.is_empty());
    }
}
