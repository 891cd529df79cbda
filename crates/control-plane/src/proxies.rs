//! `GET /api/v1/proxies`: every host connected to the discovery stream, as `isthmus status`
//! shows it (Istio's `istioctl proxy-status`). Read from the discovery server's in-memory list
//! of open streams: per server process, gone when a stream closes.

use std::time::SystemTime;

use isthmus_xds::server::{StreamStatus, SyncState, TypeStatus};
pub use isthmus_xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One connected host. Times are RFC 3339 (UTC); versions are registry generations.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// Istio's node id, `<role>~<ip>~<name>.<namespace>~<namespace>.svc.<domain>`.
    pub node: String,
    /// `<name>.<namespace>` from the node id (the whole id if it has another form).
    pub name: String,
    /// The SPIFFE id the stream authenticated as.
    pub identity: String,
    /// The host's mesh IP: the node id's address when something vouches for it (see
    /// `ipVerifiedBy`), else the address the stream connects from. Never an unverified claim.
    pub ip: Option<String>,
    /// What vouched for `ip`: `peer` (the connection comes from it), `certificate` (an IP SAN
    /// of the client certificate) or `registered entry` (a WorkloadEntry of the identity).
    #[serde(default)]
    pub ip_verified_by: Option<String>,
    /// An address the node id claims that nothing vouches for: ignored, shown here only.
    #[serde(default)]
    pub claimed_ip: Option<String>,
    /// Why `claimedIp` is not believed, and how to fix it.
    #[serde(default)]
    pub claim_problem: Option<String>,
    /// The TCP peer of the stream (`ip:port`), which NAT may make differ from `ip`.
    pub peer: Option<String>,
    /// The agent's version (node metadata `ISTIO_VERSION`).
    pub version: Option<String>,
    pub connected_at: String,
    /// Expiry of the client certificate the stream was opened with; none with a join token.
    pub cert_expires: Option<String>,
    /// The last health report on the stream (`istio.io/health`), if any.
    pub health: Option<ProxyHealth>,
    /// `<namespace>/<name>` of the WorkloadEntry the host auto-registered, if it did.
    pub workload_entry: Option<String>,
    /// Freshness per subscribed type.
    pub config: Vec<ConfigStatus>,
    /// The control-plane replica the stream is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHealth {
    pub healthy: bool,
    pub message: Option<String>,
    pub reported_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    pub type_url: String,
    /// `SYNCED`, `NOT SENT`, `STALE` or `NACKED`.
    pub state: String,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    pub last_sent: Option<String>,
    /// Version of the last response ACKed.
    pub acked_version: Option<String>,
    pub last_ack: Option<String>,
    /// Set while the host holds a rejected response's resources instead of them.
    pub nack: Option<Nack>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: String,
    pub message: String,
    pub at: String,
}

/// RFC 3339 in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

impl From<&TypeStatus> for ConfigStatus {
    fn from(t: &TypeStatus) -> Self {
        ConfigStatus {
            type_url: t.type_url.clone(),
            state: t.state.as_str().to_owned(),
            sent_version: t.sent_version.map(|v| v.to_string()),
            last_sent: t.last_sent.map(rfc3339),
            acked_version: t.acked_version.map(|v| v.to_string()),
            last_ack: t.last_ack.map(rfc3339),
            nack: t.nack.as_ref().map(|n| Nack {
                version: n.version.to_string(),
                message: n.message.clone(),
                at: rfc3339(n.at),
            }),
        }
    }
}

impl From<&StreamStatus> for ProxyStatus {
    fn from(s: &StreamStatus) -> Self {
        ProxyStatus {
            node: s.node_id.clone(),
            name: s.name.clone(),
            identity: s.identity.to_string(),
            ip: s.address.ip().map(|ip| ip.to_string()),
            ip_verified_by: s.address.source().map(|b| b.as_str().to_owned()),
            claimed_ip: s.address.unverified_claim().map(|ip| ip.to_string()),
            claim_problem: s.address.problem(&s.identity),
            peer: s.peer.map(|p| p.to_string()),
            version: s.version.clone(),
            connected_at: rfc3339(s.connected_at),
            cert_expires: s.cert_expires.map(rfc3339),
            health: s.health.as_ref().map(|h| ProxyHealth {
                healthy: h.healthy,
                message: h.message.clone(),
                reported_at: rfc3339(h.at),
            }),
            workload_entry: s.registered.clone(),
            config: s.types.iter().map(ConfigStatus::from).collect(),
            replica: None,
        }
    }
}

impl ProxyStatus {
    /// The state of one type (`NOT SENT` if the host did not subscribe to it).
    pub fn state_of(&self, type_url: &str) -> &str {
        self.config
            .iter()
            .find(|c| c.type_url == type_url)
            .map_or(SyncState::NotSent.as_str(), |c| c.state.as_str())
    }
}

/// Every host connected to this server's discovery stream, by node id.
pub fn list(xds: &isthmus_xds::XdsServer) -> Vec<ProxyStatus> {
    xds.streams().iter().map(ProxyStatus::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_xds::server::{AddressSource, HealthStatus, HostAddress, Identity, NackStatus};
    use std::time::Duration;

    #[test]
    fn a_stream_maps_to_the_api_shape() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = StreamStatus {
            stream_id: 3,
            node_id: "sidecar~10.0.0.9~vm-1.onprem~onprem.svc.cluster.local".into(),
            name: "vm-1.onprem".into(),
            identity: Identity::new("cluster.local", "onprem", "db"),
            peer: Some("192.168.1.4:50000".parse().unwrap()),
            address: HostAddress::Verified {
                ip: "10.0.0.9".parse().unwrap(),
                by: AddressSource::Registered,
            },
            version: Some("0.1.0".into()),
            connected_at: at,
            cert_expires: Some(at + Duration::from_secs(86_400)),
            health: Some(HealthStatus {
                healthy: false,
                message: Some("refused".into()),
                at,
            }),
            registered: Some("onprem/mysql-10-0-0-9".into()),
            types: vec![TypeStatus {
                type_url: isthmus_xds::ADDRESS_TYPE_URL.into(),
                state: SyncState::Nacked,
                sent_version: Some(5),
                last_sent: Some(at),
                acked_version: Some(4),
                last_ack: Some(at),
                nack: Some(NackStatus {
                    version: 5,
                    message: "bad".into(),
                    at,
                }),
            }],
        };
        let p = ProxyStatus::from(&s);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["name"], "vm-1.onprem");
        assert_eq!(v["ip"], "10.0.0.9");
        assert_eq!(v["ipVerifiedBy"], "registered entry");
        assert!(v["claimedIp"].is_null());
        assert_eq!(v["peer"], "192.168.1.4:50000");
        assert_eq!(v["identity"], "spiffe://cluster.local/ns/onprem/sa/db");
        assert_eq!(v["connectedAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v["certExpires"], "2023-11-15T22:13:20Z");
        assert_eq!(v["health"]["healthy"], false);
        assert_eq!(v["workloadEntry"], "onprem/mysql-10-0-0-9");
        assert_eq!(v["config"][0]["state"], "NACKED");
        assert_eq!(v["config"][0]["nack"]["message"], "bad");
        assert_eq!(v["config"][0]["ackedVersion"], "4");
        assert_eq!(p.state_of(isthmus_xds::ADDRESS_TYPE_URL), "NACKED");
        assert_eq!(p.state_of(isthmus_xds::AUTHORIZATION_TYPE_URL), "NOT SENT");
        let back: ProxyStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);

        // A claim nothing vouched for is never the host's IP.
        let spoof = ProxyStatus::from(&StreamStatus {
            address: HostAddress::Unverified {
                claimed: "10.0.0.9".parse().unwrap(),
                peer: Some("192.168.1.4".parse().unwrap()),
            },
            ..s.clone()
        });
        assert_eq!(spoof.ip, None);
        assert_eq!(spoof.ip_verified_by, None);
        assert_eq!(spoof.claimed_ip.as_deref(), Some("10.0.0.9"));
        assert!(spoof
            .claim_problem
            .as_deref()
            .unwrap()
            .contains("the connection comes from 192.168.1.4"));

        let opaque = ProxyStatus::from(&StreamStatus {
            node_id: "opaque".into(),
            name: "opaque".into(),
            address: HostAddress::Unknown,
            ..s
        });
        assert_eq!((opaque.name.as_str(), opaque.ip), ("opaque", None));
    }
}
