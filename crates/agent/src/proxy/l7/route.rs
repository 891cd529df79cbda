//! The routing decision: a pure function of (request, compiled VirtualService, random draw).
//! A service's [`ServiceTraffic`] is compiled once per version into [`Routes`] (regexes
//! built, durations parsed), and every request is matched against it.

use std::collections::HashMap;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use isthmus_model::traffic::{
    self, HeaderOperations, HttpRoute, PortProtocol, ServiceTraffic, StringMatch, TrafficPolicy,
};
use rand::Rng;
use regex::Regex;

use super::authz::Headers;

/// One string condition.
#[derive(Clone, Debug)]
pub enum Str {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Str {
    fn compile(m: &StringMatch, ignore_case: bool) -> Result<Self, String> {
        let lower = |s: &String| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        if let Some(e) = &m.exact {
            Ok(Str::Exact(lower(e)))
        } else if let Some(p) = &m.prefix {
            Ok(Str::Prefix(lower(p)))
        } else if let Some(r) = &m.regex {
            let case = if ignore_case { "(?i)" } else { "" };
            regex::RegexBuilder::new(&format!("^{case}(?:{r})$"))
                .size_limit(1 << 20)
                .build()
                .map(Str::Regex)
                .map_err(|e| format!("regex {r:?}: {e}"))
        } else {
            // Istio: an empty match matches anything.
            Ok(Str::Prefix(String::new()))
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => v == e,
            Str::Prefix(p) => v.starts_with(p.as_str()),
            Str::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Match {
    uri: Option<Str>,
    ignore_uri_case: bool,
    scheme: Option<Str>,
    method: Option<Str>,
    authority: Option<Str>,
    headers: Vec<(HeaderName, Str)>,
    without_headers: Vec<(HeaderName, Str)>,
    query: Vec<(String, Str)>,
    port: Option<u16>,
}

/// What the router sees of a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: Headers<'a>,
    /// The service port the client connected to.
    pub port: u16,
}

impl Match {
    fn matches(&self, r: &RequestView) -> bool {
        if let Some(p) = self.port {
            if p != r.port {
                return false;
            }
        }
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches(&r.path.to_ascii_lowercase())
            } else {
                u.matches(r.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(r.method.as_str()) {
                return false;
            }
        }
        if let Some(a) = &self.authority {
            if !a.matches(r.authority) {
                return false;
            }
        }
        if let Some(s) = &self.scheme {
            if !s.matches(r.scheme) {
                return false;
            }
        }
        for (name, want) in &self.headers {
            let Some(v) = r.headers.first(name.as_str()) else {
                return false;
            };
            if !want.matches(v) {
                return false;
            }
        }
        for (name, unwanted) in &self.without_headers {
            if let Some(v) = r.headers.first(name.as_str()) {
                if unwanted.matches(v) {
                    return false;
                }
            }
        }
        for (name, want) in &self.query {
            let found = r.query.unwrap_or("").split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            });
            match found {
                Some(v) if want.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// Header changes, compiled.
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(ops: Option<&HeaderOperations>) -> Result<Self, String> {
        let Some(ops) = ops else {
            return Ok(Self::default());
        };
        let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::try_from(k.as_str()).map_err(|e| format!("header {k:?}: {e}"))?,
                HeaderValue::try_from(v.as_str()).map_err(|e| format!("header {k:?}: {e}"))?,
            ))
        };
        Ok(Self {
            set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: ops
                .remove
                .iter()
                .map(|k| HeaderName::try_from(k.as_str()).map_err(|e| format!("{k:?}: {e}")))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A destination: a service hostname, maybe a subset and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct WeightedDest {
    pub dest: Dest,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// When to retry, compiled from `retryOn`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub status_5xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub codes: Vec<u16>,
    /// gRPC statuses (by `grpc-status`): cancelled 1, deadline-exceeded 4,
    /// resource-exhausted 8, internal 13, unavailable 14.
    pub grpc: Vec<u32>,
}

impl RetryOn {
    pub fn parse(s: &str) -> Self {
        let mut r = RetryOn::default();
        for c in s.split(',').map(str::trim) {
            match c {
                "5xx" => r.status_5xx = true,
                "gateway-error" => r.gateway_error = true,
                "connect-failure" => r.connect_failure = true,
                "refused-stream" => r.refused_stream = true,
                "reset" => r.reset = true,
                "retriable-4xx" => r.retriable_4xx = true,
                "cancelled" => r.grpc.push(1),
                "deadline-exceeded" => r.grpc.push(4),
                "resource-exhausted" => r.grpc.push(8),
                "internal" => r.grpc.push(13),
                "unavailable" => r.grpc.push(14),
                // Codes listed alongside apply with it (or alone, as Istio takes them).
                "retriable-status-codes" => {}
                other => {
                    if let Ok(n) = other.parse::<u16>() {
                        r.codes.push(n);
                    }
                }
            }
        }
        r
    }

    /// Whether an answer with `status` (and `grpc` status, when the response carries one) is
    /// worth another attempt.
    pub fn retries_status(&self, status: StatusCode, grpc: Option<u32>) -> bool {
        let s = status.as_u16();
        (self.status_5xx && s >= 500)
            || (self.gateway_error && matches!(s, 502..=504))
            || (self.retriable_4xx && s == 409)
            || self.codes.contains(&s)
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

impl RetryPolicy {
    /// Istio's default when a route sets none: 2 retries on connect failures, refused
    /// streams and gRPC unavailable/cancelled.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            on: RetryOn::parse(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Action {
    Forward(Vec<WeightedDest>),
    Redirect {
        uri: Option<String>,
        authority: Option<String>,
        scheme: Option<String>,
        code: StatusCode,
    },
    Direct {
        status: StatusCode,
        body: String,
    },
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    /// (HTTP status, gRPC status, percentage)
    pub abort: Option<(StatusCode, Option<u32>, f64)>,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    matches: Vec<Match>,
    pub action: Action,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub rewrite_uri: Option<String>,
    pub rewrite_authority: Option<String>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub mirror: Option<(Dest, f64)>,
}

impl Route {
    /// The route used when no VirtualService names the service: everything to the service
    /// itself, with Istio's default retries.
    pub fn default_for(host: &str) -> Self {
        Route {
            name: "default".into(),
            matches: Vec::new(),
            action: Action::Forward(vec![WeightedDest {
                dest: Dest {
                    host: host.to_string(),
                    subset: None,
                    port: None,
                },
                weight: 100,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }]),
            timeout: None,
            retry: RetryPolicy::istio_default(),
            fault: None,
            rewrite_uri: None,
            rewrite_authority: None,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            mirror: None,
        }
    }

    fn compile(r: &HttpRoute) -> Result<Self, String> {
        let dur = |d: &Option<String>| -> Result<Option<Duration>, String> {
            d.as_deref().map(traffic::parse_duration).transpose()
        };
        let matches = r
            .matches
            .iter()
            .map(|m| {
                let ic = m.ignore_uri_case.unwrap_or(false);
                let opt = |s: &Option<StringMatch>, ic: bool| s.as_ref().map(|s| Str::compile(s, ic)).transpose();
                let named = |map: &std::collections::BTreeMap<String, StringMatch>| -> Result<Vec<(HeaderName, Str)>, String> {
                    map.iter()
                        .map(|(k, v)| {
                            Ok((
                                HeaderName::try_from(k.as_str()).map_err(|e| format!("{k:?}: {e}"))?,
                                Str::compile(v, false)?,
                            ))
                        })
                        .collect()
                };
                Ok(Match {
                    uri: opt(&m.uri, ic)?,
                    ignore_uri_case: ic,
                    scheme: opt(&m.scheme, false)?,
                    method: opt(&m.method, false)?,
                    authority: opt(&m.authority, false)?,
                    headers: named(&m.headers)?,
                    without_headers: named(&m.without_headers)?,
                    query: m
                        .query_params
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), Str::compile(v, false)?)))
                        .collect::<Result<_, String>>()?,
                    port: m.port.and_then(|p| u16::try_from(p).ok()),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let action = if let Some(rd) = &r.redirect {
            Action::Redirect {
                uri: rd.uri.clone(),
                authority: rd.authority.clone(),
                scheme: rd.scheme.clone(),
                code: StatusCode::from_u16(rd.redirect_code.unwrap_or(301) as u16)
                    .unwrap_or(StatusCode::MOVED_PERMANENTLY),
            }
        } else if let Some(d) = &r.direct_response {
            Action::Direct {
                status: StatusCode::from_u16(d.status as u16).unwrap_or(StatusCode::OK),
                body: d
                    .body
                    .as_ref()
                    .and_then(|b| b.string.clone())
                    .unwrap_or_default(),
            }
        } else {
            Action::Forward(
                r.route
                    .iter()
                    .map(|d| {
                        let h = d.headers.as_ref();
                        Ok(WeightedDest {
                            dest: Dest {
                                host: d.destination.host.clone(),
                                subset: (!d.destination.subset.is_empty())
                                    .then(|| d.destination.subset.clone()),
                                port: d
                                    .destination
                                    .port
                                    .as_ref()
                                    .and_then(|p| u16::try_from(p.number).ok()),
                            },
                            weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
                            request_headers: HeaderOps::compile(
                                h.and_then(|h| h.request.as_ref()),
                            )?,
                            response_headers: HeaderOps::compile(
                                h.and_then(|h| h.response.as_ref()),
                            )?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
            )
        };
        let retry = match &r.retries {
            None => RetryPolicy::istio_default(),
            Some(rt) => RetryPolicy {
                attempts: rt.attempts,
                per_try_timeout: dur(&rt.per_try_timeout)?,
                on: RetryOn::parse(rt.retry_on.as_deref().unwrap_or(
                    // Istio's default conditions when `retryOn` is left out.
                    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
                )),
            },
        };
        let pct = |p: &Option<traffic::Percent>| p.as_ref().map_or(100.0, |p| p.value);
        let fault = match &r.fault {
            None => None,
            Some(f) => Some(Fault {
                delay: f
                    .delay
                    .as_ref()
                    .map(|d| {
                        Ok::<_, String>((
                            traffic::parse_duration(&d.fixed_delay)?,
                            pct(&d.percentage),
                        ))
                    })
                    .transpose()?,
                abort: f.abort.as_ref().map(|a| {
                    let grpc = a
                        .grpc_status
                        .as_deref()
                        .and_then(isthmus_model::validate::grpc_code);
                    let status = a
                        .http_status
                        .and_then(|s| StatusCode::from_u16(s as u16).ok())
                        .unwrap_or(StatusCode::OK);
                    (status, grpc, pct(&a.percentage))
                }),
            }),
        };
        let h = r.headers.as_ref();
        Ok(Route {
            name: r.name.clone(),
            matches,
            action,
            timeout: dur(&r.timeout)?,
            retry,
            fault,
            rewrite_uri: r.rewrite.as_ref().and_then(|rw| rw.uri.clone()),
            rewrite_authority: r.rewrite.as_ref().and_then(|rw| rw.authority.clone()),
            request_headers: HeaderOps::compile(h.and_then(|h| h.request.as_ref()))?,
            response_headers: HeaderOps::compile(h.and_then(|h| h.response.as_ref()))?,
            mirror: r.mirror.as_ref().map(|m| {
                (
                    Dest {
                        host: m.host.clone(),
                        subset: (!m.subset.is_empty()).then(|| m.subset.clone()),
                        port: m.port.as_ref().and_then(|p| u16::try_from(p.number).ok()),
                    },
                    r.mirror_percentage.as_ref().map_or(100.0, |p| p.value),
                )
            }),
        })
    }

    fn matches(&self, r: &RequestView) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(r))
    }

    /// The first `uri` match's prefix (or exact path) the request matched, which a `rewrite`
    /// replaces.
    fn matched_uri_prefix(&self, r: &RequestView) -> Option<&str> {
        self.matches
            .iter()
            .filter(|m| m.matches(r))
            .find_map(|m| match &m.uri {
                Some(Str::Prefix(p)) | Some(Str::Exact(p)) => Some(p.as_str()),
                _ => None,
            })
    }

    /// The path (with query) after this route's `rewrite.uri`: the matched prefix replaced,
    /// or the whole path when the match was not a prefix, as Envoy does.
    pub fn rewritten_path(&self, r: &RequestView) -> Option<String> {
        let to = self.rewrite_uri.as_ref()?;
        let rest = match self.matched_uri_prefix(r) {
            Some(prefix) => &r.path[prefix.len().min(r.path.len())..],
            None => "",
        };
        let mut p = format!("{to}{rest}");
        if p.is_empty() {
            p.push('/');
        }
        if let Some(q) = r.query {
            p.push('?');
            p.push_str(q);
        }
        Some(p)
    }
}

/// A subset, with its members.
#[derive(Clone, Debug)]
pub struct Subset {
    pub workloads: std::collections::HashSet<String>,
    pub policy: Option<TrafficPolicy>,
}

/// One service's compiled traffic settings.
#[derive(Clone, Debug)]
pub struct Routes {
    pub hostname: String,
    pub ports: std::collections::BTreeMap<u16, PortProtocol>,
    pub routes: Vec<Route>,
    pub virtual_service: Option<String>,
    pub policy: Option<TrafficPolicy>,
    pub subsets: HashMap<String, Subset>,
}

impl Routes {
    /// Compiles what the control plane sent; without a VirtualService, the default route.
    pub fn compile(t: &ServiceTraffic) -> Result<Self, String> {
        let mut routes = t
            .http
            .iter()
            .map(Route::compile)
            .collect::<Result<Vec<_>, _>>()?;
        if t.virtual_service.is_none() {
            routes.push(Route::default_for(&t.hostname));
        }
        Ok(Routes {
            hostname: t.hostname.clone(),
            ports: t.ports.clone(),
            routes,
            virtual_service: t.virtual_service.clone(),
            policy: t.traffic_policy.clone(),
            subsets: t
                .subsets
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        Subset {
                            workloads: s.workloads.iter().cloned().collect(),
                            policy: s.traffic_policy.clone(),
                        },
                    )
                })
                .collect(),
        })
    }

    /// Settings for a service the control plane sent nothing about.
    pub fn plain(hostname: &str) -> Self {
        Routes {
            hostname: hostname.to_string(),
            ports: Default::default(),
            routes: vec![Route::default_for(hostname)],
            virtual_service: None,
            policy: None,
            subsets: HashMap::new(),
        }
    }

    pub fn protocol(&self, port: u16) -> PortProtocol {
        self.ports.get(&port).copied().unwrap_or_default()
    }

    /// The traffic policy of a destination subset: the subset's own, else the rule's.
    pub fn policy_for(&self, subset: Option<&str>) -> Option<&TrafficPolicy> {
        subset
            .and_then(|s| self.subsets.get(s))
            .and_then(|s| s.policy.as_ref())
            .or(self.policy.as_ref())
    }
}

/// What to do with one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// No route matched: 404 with flag `NR`, as Envoy answers.
    NoRoute,
    Route {
        route: &'a Route,
        /// Chosen by weight (for `Action::Forward`).
        dest: Option<&'a WeightedDest>,
        /// Fault injection drawn for this request.
        delay: Option<Duration>,
        abort: Option<(StatusCode, Option<u32>)>,
        /// Whether this request is mirrored.
        mirror: bool,
    },
}

/// Picks the route and, for a forward, the weighted destination; draws faults and mirroring.
pub fn decide<'a, R: Rng + ?Sized>(
    routes: &'a Routes,
    req: &RequestView,
    rng: &mut R,
) -> Decision<'a> {
    let Some(route) = routes.routes.iter().find(|r| r.matches(req)) else {
        return Decision::NoRoute;
    };
    let dest = match &route.action {
        Action::Forward(dests) => pick_weighted(dests, rng),
        _ => None,
    };
    let hit = |pct: f64, rng: &mut R| pct >= 100.0 || (pct > 0.0 && rng.gen::<f64>() * 100.0 < pct);
    let (mut delay, mut abort) = (None, None);
    if let Some(f) = &route.fault {
        if let Some((d, pct)) = f.delay {
            if hit(pct, rng) {
                delay = Some(d);
            }
        }
        if let Some((status, grpc, pct)) = f.abort {
            if hit(pct, rng) {
                abort = Some((status, grpc));
            }
        }
    }
    let mirror = route.mirror.as_ref().is_some_and(|(_, pct)| hit(*pct, rng));
    Decision::Route {
        route,
        dest,
        delay,
        abort,
        mirror,
    }
}

fn pick_weighted<'a, R: Rng + ?Sized>(
    dests: &'a [WeightedDest],
    rng: &mut R,
) -> Option<&'a WeightedDest> {
    let total: u32 = dests.iter().map(|d| d.weight).sum();
    if total == 0 {
        return dests.first();
    }
    let mut n = rng.gen_range(0..total);
    for d in dests {
        if n < d.weight {
            return Some(d);
        }
        n -= d.weight;
    }
    dests.last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn routes(yaml: &str) -> Routes {
        let http: Vec<HttpRoute> = serde_yaml_ng::from_str(yaml).unwrap();
        Routes::compile(&ServiceTraffic {
            hostname: "reviews.bookinfo.svc.cluster.local".into(),
            namespace: "bookinfo".into(),
            virtual_service: Some("bookinfo/reviews".into()),
            http,
            ..Default::default()
        })
        .unwrap()
    }

    struct Req {
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        port: u16,
    }

    fn req(path: &str) -> Req {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path.to_string(), None),
        };
        Req {
            method: Method::GET,
            path,
            query,
            headers: HeaderMap::new(),
            port: 9080,
        }
    }

    impl Req {
        fn header(mut self, k: &'static str, v: &'static str) -> Self {
            self.headers.insert(k, HeaderValue::from_static(v));
            self
        }
        fn method(mut self, m: Method) -> Self {
            self.method = m;
            self
        }
        fn view(&self) -> RequestView<'_> {
            RequestView {
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                authority: "reviews:9080",
                scheme: "http",
                headers: Headers::Map(&self.headers),
                port: self.port,
            }
        }
    }

    /// The destination subset (or route name) each request gets.
    fn dest_of(rs: &Routes, r: &Req, rng: &mut StdRng) -> String {
        match decide(rs, &r.view(), rng) {
            Decision::NoRoute => "NR".into(),
            Decision::Route { route, dest, .. } => match (&route.action, dest) {
                (_, Some(d)) => d.dest.subset.clone().unwrap_or_else(|| d.dest.host.clone()),
                (Action::Redirect { .. }, _) => "redirect".into(),
                (Action::Direct { .. }, _) => "direct".into(),
                _ => "?".into(),
            },
        }
    }

    const BOOKINFO: &str = r#"
- name: jason
  match:
  - headers: {end-user: {exact: jason}}
  route:
  - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v2}
- name: api
  match:
  - uri: {prefix: /api/v3}
    method: {exact: POST}
  - uri: {regex: "/ratings/[0-9]+"}
  - queryParams: {beta: {exact: "1"}}
  route:
  - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v3}
- name: moved
  match:
  - uri: {exact: /old}
  redirect: {uri: /new, redirectCode: 308}
- name: split
  route:
  - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v1}
    weight: 90
  - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v2}
    weight: 10
"#;

    #[test]
    fn matches_pick_the_first_route_that_fits() {
        let rs = routes(BOOKINFO);
        let mut rng = StdRng::seed_from_u64(1);
        let table: Vec<(Req, &str)> = vec![
            (req("/reviews/1").header("end-user", "jason"), "v2"),
            (req("/api/v3/x").method(Method::POST), "v3"),
            // method does not fit, so the split catches it (v1 or v2)
            (req("/ratings/12"), "v3"),
            (req("/ratings/12a"), "split"),
            (req("/x?a=2&beta=1"), "v3"),
            (req("/x?beta=10"), "split"),
            (req("/old"), "redirect"),
            (req("/old/more"), "split"),
            (req("/reviews/1").header("end-user", "jasonx"), "split"),
        ];
        for (r, want) in table {
            let got = dest_of(&rs, &r, &mut rng);
            if want == "split" {
                assert!(got == "v1" || got == "v2", "{} got {got}", r.path);
            } else {
                assert_eq!(got, want, "{} {:?}", r.path, r.query);
            }
        }
        // No route at all matches: NR.
        let only = routes(
            "- match: [{uri: {prefix: /only}}]\n  route: [{destination: {host: reviews}}]\n",
        );
        assert_eq!(dest_of(&only, &req("/other"), &mut rng), "NR");
    }

    #[test]
    fn a_90_10_split_over_2000_requests_lands_within_3_points() {
        let rs = routes(BOOKINFO);
        let mut rng = StdRng::seed_from_u64(7);
        let mut v2 = 0;
        for _ in 0..2000 {
            if dest_of(&rs, &req("/reviews/1"), &mut rng) == "v2" {
                v2 += 1;
            }
        }
        let pct = v2 as f64 / 20.0;
        assert!((7.0..=13.0).contains(&pct), "v2 got {pct}%");
    }

    #[test]
    fn fault_abort_at_50_percent_aborts_about_half() {
        let rs = routes(
            "- route: [{destination: {host: reviews}}]\n  fault: {abort: {percentage: {value: 50}, httpStatus: 503}, delay: {fixedDelay: 5ms}}\n",
        );
        let mut rng = StdRng::seed_from_u64(3);
        let mut aborted = 0;
        for _ in 0..2000 {
            match decide(&rs, &req("/").view(), &mut rng) {
                Decision::Route { abort, delay, .. } => {
                    assert_eq!(
                        delay,
                        Some(Duration::from_millis(5)),
                        "100% delay by default"
                    );
                    if let Some((s, _)) = abort {
                        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
                        aborted += 1;
                    }
                }
                Decision::NoRoute => panic!("no route"),
            }
        }
        assert!((900..=1100).contains(&aborted), "{aborted} of 2000 aborted");
    }

    #[test]
    fn rewrite_replaces_the_matched_prefix() {
        let rs = routes(
            "- match: [{uri: {prefix: /v1/reviews}}]\n  rewrite: {uri: /reviews}\n  route: [{destination: {host: reviews}}]\n",
        );
        let r = req("/v1/reviews/7?x=1");
        assert_eq!(
            rs.routes[0].rewritten_path(&r.view()).as_deref(),
            Some("/reviews/7?x=1")
        );
    }

    #[test]
    fn retry_conditions_follow_retry_on() {
        let on = RetryOn::parse("gateway-error,429,unavailable");
        assert!(on.retries_status(StatusCode::BAD_GATEWAY, None));
        assert!(!on.retries_status(StatusCode::INTERNAL_SERVER_ERROR, None));
        assert!(on.retries_status(StatusCode::TOO_MANY_REQUESTS, None));
        assert!(on.retries_status(StatusCode::OK, Some(14)));
        assert!(!on.retries_status(StatusCode::OK, Some(2)));
        let all = RetryOn::parse("5xx");
        assert!(all.retries_status(StatusCode::INTERNAL_SERVER_ERROR, None));
        // Without a VirtualService: Istio's default, which does not retry a 503 answer.
        let rs = Routes::plain("reviews.bookinfo.svc.cluster.local");
        let r = &rs.routes[0].retry;
        assert_eq!(r.attempts, 2);
        assert!(r.on.connect_failure && r.on.refused_stream);
        assert!(!r.on.retries_status(StatusCode::SERVICE_UNAVAILABLE, None));
    }

    #[test]
    fn header_operations_set_add_remove() {
        let rs = routes(
            "- route: [{destination: {host: reviews}}]\n  headers: {request: {set: {x-a: '1'}, add: {x-b: '2'}, remove: [x-c]}}\n",
        );
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("0"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert("x-c", HeaderValue::from_static("gone"));
        rs.routes[0].request_headers.apply(&mut h);
        assert_eq!(h.get("x-a").unwrap(), "1");
        assert_eq!(h.get_all("x-b").iter().count(), 2);
        assert!(h.get("x-c").is_none());
    }
}
