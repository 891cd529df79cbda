//! The agent's DNS proxy: mesh names from the local discovery state (so it keeps answering
//! when the control plane is away), search domains of the host's namespace, everything else
//! forwarded to the host's resolvers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_dns::NameTable;
use isthmus_xds::State;
use tokio::sync::watch;

pub fn table(state: &State, domain: &str) -> Result<NameTable, isthmus_dns::TableError> {
    let mut b = NameTable::builder(domain)?;
    for svc in state.services() {
        let vips: Vec<IpAddr> = svc.vips.iter().map(|(_, ip)| *ip).collect();
        b.host(&svc.hostname, vips)?;
    }
    Ok(b.build())
}

/// A name table that follows the discovery state; never emptied when the control plane goes.
pub fn tables(
    mut state: watch::Receiver<Arc<State>>,
    domain: String,
) -> Result<watch::Receiver<Arc<NameTable>>, isthmus_dns::TableError> {
    let first = table(&state.borrow_and_update(), &domain)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let s = state.borrow_and_update().clone();
            match table(&s, &domain) {
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

/// The host's resolvers (from /etc/resolv.conf) unless given; the proxy's own address removed.
pub fn upstreams(given: &[SocketAddr], listen: SocketAddr) -> Vec<SocketAddr> {
    let mut ups = if given.is_empty() {
        match isthmus_dns::read_resolv_conf(std::path::Path::new(isthmus_dns::resolv::RESOLV_CONF))
        {
            Ok(r) => r.upstreams(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the host's resolvers; names outside the mesh will be refused");
                Vec::new()
            }
        }
    } else {
        given.to_vec()
    };
    ups.retain(|u| *u != listen);
    ups
}
