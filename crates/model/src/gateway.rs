//! Gateway API routes for the mesh (`gateway.networking.k8s.io/v1` `HTTPRoute` and
//! `GRPCRoute` with a `Service` parent: the GAMMA profile), with the Gateway API's field
//! names, converted onto the same routes a VirtualService compiles to.

use serde::{Deserialize, Serialize};

use crate::traffic::{
    self, Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRedirect, HttpRewrite,
    HttpRoute, HttpRouteDestination, Percent, PortSelector, StringMatch,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether this names a Service (GAMMA), not a Gateway.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("") | Some("core"))
            && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypedMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GwHttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<TypedMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<TypedMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GwHttpMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<TypedMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

fn regex_escape(s: &str) -> String {
    regex::escape(s)
}

fn string_match(kind: Option<&str>, value: &str) -> Result<StringMatch, String> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(StringMatch {
            exact: Some(value.into()),
            ..Default::default()
        }),
        "RegularExpression" => Ok(StringMatch {
            regex: Some(value.into()),
            ..Default::default()
        }),
        other => Err(format!(
            "type {other:?} is not a match type; use Exact or RegularExpression"
        )),
    }
}

fn path_match(p: &PathMatch) -> Result<StringMatch, String> {
    let value = p.value.clone().unwrap_or_else(|| "/".into());
    match p.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => Ok(StringMatch {
            exact: Some(value),
            ..Default::default()
        }),
        // Gateway API prefixes match whole path segments: /foo matches /foo and /foo/bar,
        // not /foobar.
        "PathPrefix" if value == "/" => Ok(StringMatch {
            prefix: Some(value),
            ..Default::default()
        }),
        "PathPrefix" => Ok(StringMatch {
            regex: Some(format!(
                "{}(/.*)?",
                regex_escape(value.trim_end_matches('/'))
            )),
            ..Default::default()
        }),
        "RegularExpression" => Ok(StringMatch {
            regex: Some(value),
            ..Default::default()
        }),
        other => Err(format!(
            "type {other:?} is not a path match type; use Exact, PathPrefix or RegularExpression"
        )),
    }
}

fn operations(m: &HeaderModifier) -> HeaderOperations {
    HeaderOperations {
        set: m
            .set
            .iter()
            .map(|nv| (nv.name.to_ascii_lowercase(), nv.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|nv| (nv.name.to_ascii_lowercase(), nv.value.clone()))
            .collect(),
        remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn destination(b: &BackendRef, ns: &str) -> Result<Destination, String> {
    if !matches!(b.kind.as_deref(), None | Some("Service"))
        || !matches!(b.group.as_deref(), None | Some("") | Some("core"))
    {
        return Err(format!(
            "backendRef {:?} is not a Service; only Services are routed to",
            b.name
        ));
    }
    Ok(Destination {
        host: format!("{}.{}", b.name, b.namespace.as_deref().unwrap_or(ns)),
        subset: String::new(),
        port: b.port.map(|number| PortSelector { number }),
    })
}

/// Applies a rule's filters to `route`; `prefix` is the path prefix the rule matched, for
/// `ReplacePrefixMatch`.
fn apply_filters(route: &mut HttpRoute, filters: &[Filter], ns: &str) -> Result<(), String> {
    for (i, f) in filters.iter().enumerate() {
        let missing = |what: &str| format!("filters[{i}]: type {} needs {what}", f.kind);
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f.request_header_modifier.as_ref().ok_or_else(|| missing("requestHeaderModifier"))?;
                route.headers.get_or_insert_with(Headers::default).request = Some(operations(m));
            }
            "ResponseHeaderModifier" => {
                let m = f.response_header_modifier.as_ref().ok_or_else(|| missing("responseHeaderModifier"))?;
                route.headers.get_or_insert_with(Headers::default).response = Some(operations(m));
            }
            "RequestRedirect" => {
                let r = f.request_redirect.as_ref().ok_or_else(|| missing("requestRedirect"))?;
                route.redirect = Some(HttpRedirect {
                    uri: r.path.as_ref().and_then(|p| {
                        p.replace_full_path.clone().or(p.replace_prefix_match.clone())
                    }),
                    authority: r.hostname.as_ref().map(|h| match r.port {
                        Some(p) => format!("{h}:{p}"),
                        None => h.clone(),
                    }),
                    scheme: r.scheme.clone(),
                    redirect_code: Some(r.status_code.unwrap_or(302)),
                });
                route.route.clear();
            }
            "URLRewrite" => {
                let r = f.url_rewrite.as_ref().ok_or_else(|| missing("urlRewrite"))?;
                route.rewrite = Some(HttpRewrite {
                    uri: r.path.as_ref().and_then(|p| {
                        p.replace_prefix_match.clone().or(p.replace_full_path.clone())
                    }),
                    authority: r.hostname.clone(),
                });
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
                route.mirror = Some(destination(&m.backend_ref, ns)?);
                route.mirror_percentage = m.percent.map(|p| Percent { value: p as f64 });
            }
            other => {
                return Err(format!(
                    "filters[{i}]: type {other:?} is not supported; use RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite or RequestMirror"
                ))
            }
        }
    }
    Ok(())
}

fn backends(refs: &[BackendRef], ns: &str) -> Result<Vec<HttpRouteDestination>, String> {
    refs.iter()
        .enumerate()
        .filter(|(_, b)| b.weight != Some(0))
        .map(|(i, b)| {
            Ok(HttpRouteDestination {
                destination: destination(b, ns).map_err(|e| format!("backendRefs[{i}]: {e}"))?,
                weight: Some(b.weight.unwrap_or(1)),
                headers: None,
            })
        })
        .collect()
}

/// The routes an HTTPRoute in namespace `ns` gives a parent Service (only its port when the
/// parent names one), in the Gateway API's order of precedence within the route: exact paths,
/// then longer prefixes, then methods, headers and query parameters. Errors name the rule.
pub fn http_routes(
    spec: &HttpRouteSpec,
    ns: &str,
    port: Option<u32>,
) -> Result<Vec<HttpRoute>, String> {
    let mut out: Vec<(i64, HttpRoute)> = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = |e: String| format!("spec.rules[{i}]: {e}");
        let matches: Vec<GwHttpMatch> = if rule.matches.is_empty() {
            vec![GwHttpMatch::default()]
        } else {
            rule.matches.clone()
        };
        // One route per match, so each keeps its own precedence.
        for m in &matches {
            let mut hm = HttpMatchRequest {
                port,
                ..Default::default()
            };
            let path = m.path.clone().unwrap_or_default();
            hm.uri = Some(path_match(&path).map_err(at)?);
            for (j, h) in m.headers.iter().enumerate() {
                let name = h
                    .name
                    .clone()
                    .ok_or_else(|| at(format!("headers[{j}] needs a name")))?;
                hm.headers.insert(
                    name.to_ascii_lowercase(),
                    string_match(h.kind.as_deref(), &h.value).map_err(at)?,
                );
            }
            for (j, q) in m.query_params.iter().enumerate() {
                let name = q
                    .name
                    .clone()
                    .ok_or_else(|| at(format!("queryParams[{j}] needs a name")))?;
                hm.query_params
                    .insert(name, string_match(q.kind.as_deref(), &q.value).map_err(at)?);
            }
            if let Some(method) = &m.method {
                hm.method = Some(StringMatch {
                    exact: Some(method.clone()),
                    ..Default::default()
                });
            }
            let mut route = HttpRoute {
                name: rule.name.clone().unwrap_or_default(),
                matches: vec![hm],
                route: backends(&rule.backend_refs, ns).map_err(at)?,
                timeout: rule.timeouts.as_ref().and_then(|t| t.request.clone()),
                ..Default::default()
            };
            if let Some(b) = rule
                .timeouts
                .as_ref()
                .and_then(|t| t.backend_request.clone())
            {
                route.retries = Some(traffic::HttpRetry {
                    attempts: 2,
                    per_try_timeout: Some(b),
                    retry_on: None,
                    retry_remote_localities: None,
                });
            }
            apply_filters(&mut route, &rule.filters, ns).map_err(at)?;
            if route.route.is_empty() && route.redirect.is_none() {
                // No backend: the Gateway API answers 500.
                route.direct_response = Some(traffic::DirectResponse {
                    status: 500,
                    body: None,
                });
            }
            let v = path.value.as_deref().unwrap_or("/");
            let rank = match path.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => 1_000_000,
                "PathPrefix" => 10_000 * v.len() as i64,
                _ => 0,
            } + 1000 * i64::from(m.method.is_some())
                + 10 * m.headers.len() as i64
                + m.query_params.len() as i64;
            out.push((rank, route));
        }
    }
    // Stable: equal precedence keeps the written order.
    out.sort_by_key(|(rank, _)| -rank);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

/// The routes a GRPCRoute in namespace `ns` gives a parent Service: a method match is a match
/// on the path `/<service>/<method>`.
pub fn grpc_routes(
    spec: &GrpcRouteSpec,
    ns: &str,
    port: Option<u32>,
) -> Result<Vec<HttpRoute>, String> {
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = |e: String| format!("spec.rules[{i}]: {e}");
        let matches = if rule.matches.is_empty() {
            vec![GrpcMatch::default()]
        } else {
            rule.matches.clone()
        };
        let mut hms = Vec::new();
        for (j, m) in matches.iter().enumerate() {
            let mut hm = HttpMatchRequest {
                port,
                ..Default::default()
            };
            if let Some(mm) = &m.method {
                let (svc, method) = (mm.service.as_deref(), mm.method.as_deref());
                hm.uri = Some(match (mm.kind.as_deref().unwrap_or("Exact"), svc, method) {
                    ("Exact", Some(s), Some(m)) => StringMatch {
                        exact: Some(format!("/{s}/{m}")),
                        ..Default::default()
                    },
                    ("Exact", Some(s), None) => StringMatch {
                        prefix: Some(format!("/{s}/")),
                        ..Default::default()
                    },
                    ("Exact", None, Some(m)) => StringMatch {
                        regex: Some(format!("/[^/]+/{}", regex_escape(m))),
                        ..Default::default()
                    },
                    ("RegularExpression", s, m) => StringMatch {
                        regex: Some(format!(
                            "/{}/{}",
                            s.unwrap_or("[^/]+"),
                            m.unwrap_or("[^/]+")
                        )),
                        ..Default::default()
                    },
                    ("Exact", None, None) => {
                        return Err(at(format!(
                            "matches[{j}].method needs a service or a method"
                        )))
                    }
                    (other, _, _) => {
                        return Err(at(format!(
                            "matches[{j}].method.type {other:?} is not Exact or RegularExpression"
                        )))
                    }
                });
            }
            for (k, h) in m.headers.iter().enumerate() {
                let name = h
                    .name
                    .clone()
                    .ok_or_else(|| at(format!("headers[{k}] needs a name")))?;
                hm.headers.insert(
                    name.to_ascii_lowercase(),
                    string_match(h.kind.as_deref(), &h.value).map_err(at)?,
                );
            }
            hms.push(hm);
        }
        let mut route = HttpRoute {
            name: rule.name.clone().unwrap_or_default(),
            matches: hms,
            route: backends(&rule.backend_refs, ns).map_err(at)?,
            ..Default::default()
        };
        apply_filters(&mut route, &rule.filters, ns).map_err(at)?;
        out.push(route);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_route_becomes_routes_in_gateway_api_precedence() {
        let spec: HttpRouteSpec = serde_yaml_ng::from_str(
            r#"
parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
rules:
- backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: reviews-v2, port: 9080, weight: 10}]
- matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: End-User, value: jason}]}]
  filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-mesh, value: gamma}]}}]
  backendRefs: [{name: reviews-v2, port: 9080}]
- matches: [{path: {type: Exact, value: /old}}]
  filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
"#,
        )
        .unwrap();
        let routes = http_routes(&spec, "bookinfo", Some(9080)).unwrap();
        assert_eq!(routes.len(), 3);
        // Exact first, then the longer prefix, then the catch-all.
        assert_eq!(
            routes[0].matches[0].uri.as_ref().unwrap().exact.as_deref(),
            Some("/old")
        );
        assert_eq!(
            routes[0].redirect.as_ref().unwrap().redirect_code,
            Some(301)
        );
        assert_eq!(
            routes[1].matches[0].uri.as_ref().unwrap().regex.as_deref(),
            Some("/api(/.*)?")
        );
        assert!(routes[1].matches[0].headers.contains_key("end-user"));
        assert_eq!(routes[1].route[0].destination.host, "reviews-v2.bookinfo");
        assert_eq!(
            routes[2]
                .route
                .iter()
                .map(|d| d.weight.unwrap())
                .collect::<Vec<_>>(),
            vec![90, 10]
        );
        assert_eq!(routes[2].matches[0].port, Some(9080));
    }

    #[test]
    fn a_grpc_route_matches_on_service_and_method() {
        let spec: GrpcRouteSpec = serde_yaml_ng::from_str(
            r#"
parentRefs: [{kind: Service, name: ratings}]
rules:
- matches: [{method: {service: pkg.Ratings, method: Get}}]
  backendRefs: [{name: ratings-v2, port: 9090}]
- backendRefs: [{name: ratings, port: 9090}]
"#,
        )
        .unwrap();
        let routes = grpc_routes(&spec, "bookinfo", None).unwrap();
        assert_eq!(
            routes[0].matches[0].uri.as_ref().unwrap().exact.as_deref(),
            Some("/pkg.Ratings/Get")
        );
        assert!(routes[1].matches[0].uri.is_none());
        let bad: HttpRouteSpec = serde_yaml_ng::from_str(
            "parentRefs: [{kind: Service, name: r}]\nrules:\n- filters: [{type: ExtensionRef}]\n",
        )
        .unwrap();
        let e = http_routes(&bad, "ns", None).unwrap_err();
        assert!(
            e.contains("spec.rules[0]: filters[0]: type \"ExtensionRef\" is not supported"),
            "{e}"
        );
    }
}
