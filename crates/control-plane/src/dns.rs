//! The control plane's DNS server: mesh names from the live registry view, control-plane
//! aliases (the seeds' istio-pilot, istio-citadel, ...), other names forwarded or refused.

use std::net::IpAddr;
use std::sync::Arc;

use isthmus_dns::NameTable;
use tokio::sync::watch;

use crate::informer::RegistryView;

/// Builds the name table from a registry view: `<svc>.<ns>.svc.<domain>` → VIP, and the
/// control-plane aliases → `advertise` (when known).
pub fn table(
    view: &RegistryView,
    domain: &str,
    advertise: &[IpAddr],
) -> Result<NameTable, isthmus_dns::TableError> {
    let mut b = NameTable::builder(domain)?;
    for s in view.services.values() {
        b.service(&s.metadata.name, &s.metadata.namespace, s.status.vip)?;
    }
    if !advertise.is_empty() {
        b.control_plane_aliases(advertise)?;
    }
    // The SOA serial only has to move when the table does; the low bits of the revision do.
    b.serial(view.revision as u32);
    Ok(b.build())
}

/// Keeps a name table in step with the registry view. A table that fails to build (it cannot
/// for names the registry validated) leaves the previous one in place.
pub fn tables(
    mut view: watch::Receiver<Arc<RegistryView>>,
    domain: String,
    advertise: Vec<IpAddr>,
) -> Result<watch::Receiver<Arc<NameTable>>, isthmus_dns::TableError> {
    let first = table(&view.borrow_and_update(), &domain, &advertise)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while view.changed().await.is_ok() {
            let v = view.borrow_and_update().clone();
            match table(&v, &domain, &advertise) {
                Ok(t) => {
                    if tx.send(Arc::new(t)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "DNS table not updated"),
            }
        }
    });
    Ok(rx)
}
