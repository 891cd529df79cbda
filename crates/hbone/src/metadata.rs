//! The optional headers of an HBONE `CONNECT` (compat.md, "HBONE"): `baggage` (W3C Baggage)
//! describing the source workload with the keys ztunnel uses, `forwarded` (RFC 7239) carrying
//! the original source address, and `traceparent` (W3C Trace Context).
//!
//! The client builds them; the server parses whatever a peer sent defensively: every value is
//! bounded in size, a malformed header is dropped (with a debug log) and never fails the
//! stream. They are informational: authorization uses the verified certificate, never these.

use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

/// `baggage`: the source workload, as W3C Baggage members.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `traceparent`: W3C Trace Context, new per connection.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `forwarded`: `for=<original source ip>` (RFC 7239).
pub const FORWARDED: HeaderName = http::header::FORWARDED;

/// W3C Baggage's limit on the whole header (all values together); larger ones are ignored.
pub const MAX_BAGGAGE_BYTES: usize = 8192;
/// W3C Baggage's limit on list members; members past it are ignored.
pub const MAX_BAGGAGE_MEMBERS: usize = 64;
/// Longest decoded baggage value kept: the longest Kubernetes name (a DNS subdomain).
pub const MAX_BAGGAGE_VALUE: usize = 253;
/// `forwarded` values larger than this (all together) are ignored; one hop's `for=` with an
/// IPv6 address and port is under 60 bytes.
pub const MAX_FORWARDED_BYTES: usize = 512;
/// Trace Context allows future versions to append fields; anything longer is ignored.
pub const MAX_TRACEPARENT_BYTES: usize = 512;

/// Why a header was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("{header} is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        header: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{header} is not visible ASCII")]
    NotAscii { header: &'static str },
    #[error("{header} is malformed: {reason}")]
    Malformed {
        header: &'static str,
        reason: &'static str,
    },
}

/// The source workload as the `baggage` header describes it. Values are decoded and checked
/// (no control characters, at most [`MAX_BAGGAGE_VALUE`] bytes); unknown keys are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Baggage {
    /// `k8s.cluster.name`: the cluster id.
    pub cluster_id: Option<Arc<str>>,
    /// `k8s.namespace.name`.
    pub namespace: Option<Arc<str>>,
    /// The `<type>` of the `k8s.<type>.name` key (`pod`, `deployment`, ...).
    pub workload_type: Option<Arc<str>>,
    /// `k8s.<type>.name`: the workload's name.
    pub workload_name: Option<Arc<str>>,
    /// `service.name`: the canonical service.
    pub service_name: Option<Arc<str>>,
    /// `service.version`: the canonical revision.
    pub service_version: Option<Arc<str>>,
}

/// Kinds a `k8s.<type>.name` key may name (OpenTelemetry's Kubernetes resource attributes).
const WORKLOAD_TYPES: &[&str] = &[
    "pod",
    "deployment",
    "statefulset",
    "daemonset",
    "replicaset",
    "job",
    "cronjob",
];

impl Baggage {
    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        self == &Baggage::default()
    }

    /// The header value, members in ztunnel's order, values percent-encoded; `None` when
    /// there is nothing to say. Build it once per identity, not per connection.
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        let workload_key = self.workload_name.as_ref().map(|_| {
            let t = self.workload_type.as_deref().unwrap_or("pod");
            format!("k8s.{t}.name")
        });
        let members = [
            ("k8s.cluster.name", &self.cluster_id),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_deref().unwrap_or(""), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
        ];
        let mut out = String::new();
        for (key, value) in members {
            let Some(value) = value.as_deref().filter(|v| !v.is_empty()) else {
                continue;
            };
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            percent_encode(value, &mut out);
        }
        if out.is_empty() {
            return None;
        }
        // Keys are tokens and values percent-encoded to baggage-octets: always visible ASCII.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
    }

    /// Parses every `baggage` value of a request. Members that are malformed, unknown or
    /// carry an unacceptable value are skipped; a header over [`MAX_BAGGAGE_BYTES`] or not
    /// visible ASCII is refused whole.
    pub fn parse<'a>(
        values: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<Self, MetadataError> {
        const H: &str = "baggage";
        let values: Vec<&HeaderValue> = values.into_iter().collect();
        let len: usize = values.iter().map(|v| v.len()).sum();
        if len > MAX_BAGGAGE_BYTES {
            return Err(MetadataError::TooLarge {
                header: H,
                len,
                max: MAX_BAGGAGE_BYTES,
            });
        }
        let mut out = Baggage::default();
        let mut members = 0;
        for v in values {
            let v = v
                .to_str()
                .map_err(|_| MetadataError::NotAscii { header: H })?;
            for member in v.split(',') {
                if member.trim().is_empty() {
                    continue;
                }
                members += 1;
                if members > MAX_BAGGAGE_MEMBERS {
                    return Ok(out);
                }
                out.member(member);
            }
        }
        Ok(out)
    }

    /// Takes one `key=value[;properties]` member, the first occurrence of each key winning.
    fn member(&mut self, member: &str) {
        let member = member.split(';').next().unwrap_or("");
        let Some((key, value)) = member.split_once('=') else {
            tracing::debug!(member, "ignoring a baggage member without '='");
            return;
        };
        let (key, value) = (key.trim(), value.trim());
        let workload_type = key
            .strip_prefix("k8s.")
            .and_then(|k| k.strip_suffix(".name"))
            .and_then(|t| WORKLOAD_TYPES.iter().find(|w| **w == t).copied());
        let slot = match key {
            "k8s.cluster.name" => &mut self.cluster_id,
            "k8s.namespace.name" => &mut self.namespace,
            "service.name" => &mut self.service_name,
            "service.version" => &mut self.service_version,
            _ if workload_type.is_some() => &mut self.workload_name,
            _ => return,
        };
        if slot.is_some() {
            return;
        }
        match percent_decode(value) {
            Ok(v) if !v.is_empty() => {
                *slot = Some(v.into());
                if let Some(t) = workload_type {
                    self.workload_type = Some(t.into());
                }
            }
            Ok(_) => {}
            Err(reason) => tracing::debug!(key, reason, "ignoring a baggage member"),
        }
    }
}

/// W3C baggage-octet: visible ASCII but for `"`, `,`, `;` and `\`. `%` is encoded too, so
/// decoding gives back exactly what was encoded.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && b != b'%'
}

fn percent_encode(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if is_baggage_octet(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xF)] as char);
        }
    }
}

/// Decodes a baggage value. The result must be UTF-8 without control characters (it ends up
/// in log lines and metric labels) and at most [`MAX_BAGGAGE_VALUE`] bytes.
fn percent_decode(value: &str) -> Result<String, &'static str> {
    let raw = value.as_bytes();
    let mut out = Vec::with_capacity(raw.len().min(MAX_BAGGAGE_VALUE));
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("truncated percent-encoding")?;
            let hi = (hex[0] as char)
                .to_digit(16)
                .ok_or("bad percent-encoding")?;
            let lo = (hex[1] as char)
                .to_digit(16)
                .ok_or("bad percent-encoding")?;
            // Two hex digits: at most 255.
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else if is_baggage_octet(b) {
            out.push(b);
            i += 1;
        } else {
            return Err("character outside baggage-octet");
        }
        if out.len() > MAX_BAGGAGE_VALUE {
            return Err("value too long");
        }
    }
    let s = String::from_utf8(out).map_err(|_| "value is not UTF-8")?;
    if s.chars().any(char::is_control) {
        return Err("value has control characters");
    }
    Ok(s)
}

/// A W3C Trace Context `traceparent`: both ids non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: u64,
    pub flags: u8,
}

/// A 128-bit trace id, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// `trace-flags` bit 0.
pub const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// A context from ids the caller drew at random; `None` when either is zero (invalid).
    pub fn new(trace_id: u128, parent_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && parent_id != 0).then_some(Self {
            trace_id: TraceId(trace_id),
            parent_id,
            flags,
        })
    }

    /// Parses a `traceparent` value. Version `00` must be exactly 55 bytes; a later version
    /// may append fields after a `-`, which are ignored. Version `ff`, upper-case hex and
    /// all-zero ids are invalid.
    pub fn parse(value: &HeaderValue) -> Result<Self, MetadataError> {
        const H: &str = "traceparent";
        let bad = |reason| MetadataError::Malformed { header: H, reason };
        let v = value.as_bytes();
        if v.len() > MAX_TRACEPARENT_BYTES {
            return Err(MetadataError::TooLarge {
                header: H,
                len: v.len(),
                max: MAX_TRACEPARENT_BYTES,
            });
        }
        if v.len() < 55 {
            return Err(bad("shorter than 55 bytes"));
        }
        let version = hex(&v[0..2]).ok_or(bad("version is not two lower-case hex digits"))?;
        if version == 0xff {
            return Err(bad("version ff is invalid"));
        }
        if version == 0 && v.len() != 55 {
            return Err(bad("version 00 is exactly 55 bytes"));
        }
        if v.len() > 55 && v[55] != b'-' {
            return Err(bad("fields after the flags must follow a '-'"));
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(bad("fields are not separated by '-'"));
        }
        let trace_id = hex(&v[3..35]).ok_or(bad("trace-id is not 32 lower-case hex digits"))?;
        let parent_id = hex(&v[36..52]).ok_or(bad("parent-id is not 16 lower-case hex digits"))?;
        let flags = hex(&v[53..55]).ok_or(bad("trace-flags is not two lower-case hex digits"))?;
        // The slices' lengths bound the values: 16 hex digits fit u64, two fit u8.
        Self::new(trace_id, parent_id as u64, flags as u8).ok_or(bad("an all-zero id"))
    }

    /// The header value (`00-<trace id>-<parent id>-<flags>`), written digit by digit into a
    /// stack buffer: this runs for every HTTP request the agent forwards, and `write!`'s
    /// formatting machinery cost ten times as much (callgrind).
    pub fn to_header_value(&self) -> HeaderValue {
        let mut buf = [b'-'; 55];
        buf[..2].copy_from_slice(b"00");
        put_hex(&mut buf[3..35], self.trace_id.0);
        put_hex(&mut buf[36..52], u128::from(self.parent_id));
        put_hex(&mut buf[53..55], u128::from(self.flags));
        // Lower-case hex and dashes: always a valid header value.
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Writes the low `out.len()` hex digits of `v`, lower case, most significant first.
fn put_hex(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Lower-case hex digits (at most 32) as a number; `None` for anything else.
fn hex(digits: &[u8]) -> Option<u128> {
    if digits.is_empty() || digits.len() > 32 {
        return None;
    }
    digits.iter().try_fold(0u128, |acc, &d| {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(n))
    })
}

/// `for=<ip>` (RFC 7239): IPv6 quoted and bracketed, IPv4-mapped IPv6 shown as IPv4.
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    // "for=\"[" + 39 (longest IPv6 text) + "]\"" fits easily.
    let mut buf = [0u8; 64];
    let len = {
        let mut w = &mut buf[..];
        let r = match ip.to_canonical() {
            IpAddr::V4(v4) => write!(w, "for={v4}"),
            IpAddr::V6(v6) => write!(w, "for=\"[{v6}]\""),
        };
        let left = w.len();
        debug_assert!(r.is_ok());
        64 - left
    };
    // Digits, dots, colons, brackets and quotes: always a valid header value.
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// The original client's address: the `for` parameter of the first forwarded-element (the
/// first hop). `Ok(None)` when there is none, or it is `unknown` or an obfuscated identifier.
pub fn parse_forwarded_for<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Result<Option<IpAddr>, MetadataError> {
    const H: &str = "forwarded";
    let bad = |reason| MetadataError::Malformed { header: H, reason };
    let values: Vec<&HeaderValue> = values.into_iter().collect();
    let len: usize = values.iter().map(|v| v.len()).sum();
    if len > MAX_FORWARDED_BYTES {
        return Err(MetadataError::TooLarge {
            header: H,
            len,
            max: MAX_FORWARDED_BYTES,
        });
    }
    let Some(first) = values.first() else {
        return Ok(None);
    };
    let v = first
        .to_str()
        .map_err(|_| MetadataError::NotAscii { header: H })?;
    for pair in split_unquoted(first_element(v), b';') {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(bad("a parameter without '='"));
        };
        if !name.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(q) => q
                .strip_suffix('"')
                .ok_or(bad("unterminated quoted string"))?,
            None => value,
        };
        return node_ip(value).map_err(bad);
    }
    Ok(None)
}

/// The first forwarded-element of a list (up to the first comma outside quotes).
fn first_element(v: &str) -> &str {
    split_unquoted(v, b',').next().unwrap_or("")
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(v: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(v);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        for (i, b) in s.bytes().enumerate() {
            match b {
                b'"' => quoted = !quoted,
                b if b == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// RFC 7239 node: `ip`, `ip:port`, `[v6]`, `[v6]:port`, `unknown` or `_obfuscated`.
fn node_ip(node: &str) -> Result<Option<IpAddr>, &'static str> {
    if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
        return Ok(None);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (v6, _port) = rest
            .split_once(']')
            .ok_or("unterminated '[' in an IPv6 node")?;
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| "not an IPv6 address");
    }
    let host = match node.split_once(':') {
        Some((h, _port)) => h,
        None => node,
    };
    host.parse::<std::net::Ipv4Addr>()
        .map(|ip| Some(IpAddr::V4(ip)))
        .map_err(|_| "not an IP address (IPv6 must be quoted and bracketed)")
}

/// What a CONNECT request said about its origin, each part parsed on its own: a malformed
/// or oversized header is dropped (debug log) and the others kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamMetadata {
    pub baggage: Baggage,
    pub forwarded_for: Option<IpAddr>,
    pub traceparent: Option<TraceParent>,
}

impl StreamMetadata {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let baggage = if headers.contains_key(BAGGAGE) {
            Baggage::parse(headers.get_all(BAGGAGE)).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "ignoring the baggage header");
                Baggage::default()
            })
        } else {
            Baggage::default()
        };
        let forwarded_for = parse_forwarded_for(headers.get_all(FORWARDED)).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "ignoring the forwarded header");
            None
        });
        // A repeated traceparent is invalid: Trace Context says to ignore it then.
        let mut tps = headers.get_all(TRACEPARENT).iter();
        let traceparent = match (tps.next(), tps.next()) {
            (Some(v), None) => TraceParent::parse(v)
                .map_err(|e| tracing::debug!(error = %e, "ignoring the traceparent header"))
                .ok(),
            (Some(_), Some(_)) => {
                tracing::debug!("ignoring repeated traceparent headers");
                None
            }
            (None, _) => None,
        };
        Self {
            baggage,
            forwarded_for,
            traceparent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn full() -> Baggage {
        Baggage {
            cluster_id: Some("Kubernetes".into()),
            namespace: Some("vm-ns".into()),
            workload_type: Some("pod".into()),
            workload_name: Some("vm-1".into()),
            service_name: Some("ratings".into()),
            service_version: Some("v1".into()),
        }
    }

    #[test]
    fn baggage_is_built_with_ztunnels_keys_in_order() {
        let v = full().to_header_value().unwrap();
        assert_eq!(
            v,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=vm-ns,k8s.pod.name=vm-1,\
             service.name=ratings,service.version=v1"
        );
        assert_eq!(Baggage::parse([&v]).unwrap(), full());
        assert_eq!(Baggage::default().to_header_value(), None);
        let only_ns = Baggage {
            namespace: Some("a".into()),
            service_name: Some(String::new().into()),
            ..Baggage::default()
        };
        assert_eq!(only_ns.to_header_value().unwrap(), "k8s.namespace.name=a");
    }

    #[test]
    fn baggage_values_round_trip_through_percent_encoding() {
        for value in [
            "plain",
            "with space",
            "comma,semi;quote\"back\\slash",
            "percent%25literal%",
            "équipe/ünïcode ☃",
            "=equals=",
        ] {
            let b = Baggage {
                service_name: Some(value.into()),
                ..Baggage::default()
            };
            let header = b.to_header_value().unwrap();
            let text = header.to_str().unwrap();
            let encoded = text.strip_prefix("service.name=").unwrap();
            assert!(
                encoded.bytes().all(|c| is_baggage_octet(c) || c == b'%'),
                "{value:?} encoded as {text:?}"
            );
            assert_eq!(
                Baggage::parse([&header]).unwrap(),
                b,
                "{value:?} via {text}"
            );
        }
        let header = Baggage {
            service_name: Some("a b,c".into()),
            ..Baggage::default()
        }
        .to_header_value()
        .unwrap();
        assert_eq!(header, "service.name=a%20b%2Cc");
    }

    #[test]
    fn baggage_parsing_tolerates_whitespace_properties_and_unknown_keys() {
        let b = Baggage::parse([
            &hv(" k8s.namespace.name = ns1 ;prop=1, other=x,,k8s.deployment.name=web"),
            &hv("service.name=svc,service.name=ignored-second"),
        ])
        .unwrap();
        assert_eq!(b.namespace.as_deref(), Some("ns1"));
        assert_eq!(b.workload_type.as_deref(), Some("deployment"));
        assert_eq!(b.workload_name.as_deref(), Some("web"));
        assert_eq!(b.service_name.as_deref(), Some("svc"));
        assert_eq!(b.cluster_id, None);
    }

    #[test]
    fn malformed_baggage_members_are_skipped_and_the_rest_kept() {
        let b = Baggage::parse([&hv(
            "noequals,k8s.cluster.name=bad%zz,k8s.namespace.name=%0aforged-line,\
             service.name=%ff%fe,service.version=v\"2,k8s.node.name=n,k8s.pod.name=ok",
        )])
        .unwrap();
        assert_eq!(
            b,
            Baggage {
                workload_type: Some("pod".into()),
                workload_name: Some("ok".into()),
                ..Baggage::default()
            }
        );
        // A value longer than any Kubernetes name is dropped.
        let long = format!("service.name={}", "a".repeat(MAX_BAGGAGE_VALUE + 1));
        assert_eq!(Baggage::parse([&hv(&long)]).unwrap(), Baggage::default());
    }

    #[test]
    fn oversized_or_non_ascii_baggage_is_refused_whole() {
        let huge = format!("service.name=x,junk={}", "y".repeat(MAX_BAGGAGE_BYTES));
        assert!(matches!(
            Baggage::parse([&hv(&huge)]),
            Err(MetadataError::TooLarge { .. })
        ));
        // Split over several values, the limit is on the sum.
        let half = hv(&format!("a={}", "b".repeat(MAX_BAGGAGE_BYTES / 2)));
        assert!(Baggage::parse([&half, &half]).is_err());
        let latin1 = HeaderValue::from_bytes(b"service.name=caf\xe9").unwrap();
        assert_eq!(
            Baggage::parse([&latin1]),
            Err(MetadataError::NotAscii { header: "baggage" })
        );
        // Members past the 64th are ignored.
        let mut many: Vec<String> = (0..MAX_BAGGAGE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect();
        many.push("service.name=late".into());
        let b = Baggage::parse([&hv(&many.join(","))]).unwrap();
        assert_eq!(b.service_name, None);
    }

    #[test]
    fn traceparent_formats_and_parses() {
        let tp =
            TraceParent::new(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, 1).unwrap();
        let v = tp.to_header_value();
        assert_eq!(v, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(tp.to_string(), v.to_str().unwrap());
        assert_eq!(tp.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(TraceParent::parse(&v).unwrap(), tp);
        // Small ids keep their leading zeros.
        let small = TraceParent::new(1, 2, 0).unwrap();
        assert_eq!(
            small.to_header_value(),
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
        assert_eq!(TraceParent::parse(&small.to_header_value()).unwrap(), small);
        let big = TraceParent::new(u128::MAX, u64::MAX, 0xff).unwrap();
        assert_eq!(big.to_header_value(), big.to_string());
        assert_eq!(TraceParent::parse(&big.to_header_value()).unwrap(), big);
        // A future version may append fields.
        let future = hv("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-ever");
        assert_eq!(TraceParent::parse(&future).unwrap().trace_id, tp.trace_id);
    }

    #[test]
    fn zero_ids_are_never_made() {
        assert_eq!(TraceParent::new(0, 1, 1), None);
        assert_eq!(TraceParent::new(1, 0, 1), None);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
        ] {
            let r = TraceParent::parse(&hv(bad));
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
        }
        let long = hv(&format!(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-{}",
            "a".repeat(MAX_TRACEPARENT_BYTES)
        ));
        assert!(matches!(
            TraceParent::parse(&long),
            Err(MetadataError::TooLarge { .. })
        ));
    }

    #[test]
    fn forwarded_quotes_and_brackets_ipv6() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let v6: IpAddr = "2001:db8:cafe::17".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(forwarded_for(v4), "for=10.0.0.5");
        assert_eq!(forwarded_for(v6), "for=\"[2001:db8:cafe::17]\"");
        assert_eq!(forwarded_for(mapped), "for=10.0.0.5");
        let longest: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(
            parse_forwarded_for([&forwarded_for(longest)]).unwrap(),
            Some(longest)
        );
        for ip in [v4, v6] {
            assert_eq!(parse_forwarded_for([&forwarded_for(ip)]).unwrap(), Some(ip));
        }
    }

    #[test]
    fn forwarded_takes_the_first_hops_for() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                Some("192.0.2.60"),
            ),
            ("proto=https; For=\"192.0.2.60:4711\"", Some("192.0.2.60")),
            (
                "for=\"[2001:db8:cafe::17]:4711\"",
                Some("2001:db8:cafe::17"),
            ),
            ("for=192.0.2.43, for=198.51.100.17", Some("192.0.2.43")),
            ("for=\"_gazonk\"", None),
            ("for=unknown, for=192.0.2.1", None),
            ("by=203.0.113.43", None),
        ];
        for (value, want) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(parse_forwarded_for([&hv(value)]).unwrap(), want, "{value}");
        }
        assert_eq!(parse_forwarded_for([]).unwrap(), None);
    }

    #[test]
    fn malformed_forwarded_is_refused() {
        for bad in [
            "for=2001:db8::1",
            "for=\"[2001:db8::1\"",
            "for=\"[not-v6]\"",
            "for=\"192.0.2.1",
            "for=host.example",
            "garbage",
        ] {
            let r = parse_forwarded_for([&hv(bad)]);
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
        }
        let huge = hv(&format!(
            "for=192.0.2.1;x={}",
            "a".repeat(MAX_FORWARDED_BYTES)
        ));
        assert!(matches!(
            parse_forwarded_for([&huge]),
            Err(MetadataError::TooLarge { .. })
        ));
    }

    #[test]
    fn stream_metadata_keeps_what_parses_and_drops_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(BAGGAGE, hv("k8s.namespace.name=ns,k8s.pod.name=vm%201"));
        h.insert(FORWARDED, hv("for=\"[::1\""));
        h.insert(
            TRACEPARENT,
            hv("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let m = StreamMetadata::from_headers(&h);
        assert_eq!(m.baggage.namespace.as_deref(), Some("ns"));
        assert_eq!(m.baggage.workload_name.as_deref(), Some("vm 1"));
        assert_eq!(m.forwarded_for, None);
        assert_eq!(
            m.traceparent.map(|t| t.trace_id.to_string()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        // Two traceparents: neither is trusted.
        h.append(
            TRACEPARENT,
            hv("00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(StreamMetadata::from_headers(&h).traceparent, None);
        assert_eq!(
            StreamMetadata::from_headers(&HeaderMap::new()),
            StreamMetadata::default()
        );
    }
}
