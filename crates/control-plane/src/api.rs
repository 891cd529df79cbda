//! The admin API (HTTP/JSON, bearer-token authenticated) and the probes and metrics endpoints.
//! Described in docs/openapi.yaml, which is also served at /openapi.yaml.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use isthmus_model::{self as model, Kind, LabelSelector, Resource};
use isthmus_store::{EtcdCause, StoreError};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::identity::{self, CreateTokenRequest, IdentityError, StoreLedger};
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::registry::{DeregisterRequest, Filter, RegisterRequest, Registry, RegistryError};

/// Request bodies above this are refused with 413 before being parsed.
pub const MAX_BODY: usize = 1024 * 1024;
/// The name the serving certificate of port 15012 always carries, which hosts check.
pub const CA_SERVER_NAME: &str = "istiod.istio-system.svc";
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

pub struct ApiState {
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub admin_token: String,
    pub ready: AtomicBool,
    /// Turns true when shutdown begins; open watch streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub identity: IdentityState,
    /// The discovery server, for the connected hosts (`GET /api/v1/proxies`).
    pub xds: isthmus_xds::XdsServer,
    /// What hosts need to know about this control plane (`GET /api/v1/mesh`); set once the
    /// listeners are bound, before the admin API serves.
    pub mesh: std::sync::OnceLock<MeshInfo>,
    /// This replica's place among those sharing the store (`GET /api/v1/replicas`).
    pub session: Arc<crate::replicas::Session>,
    /// The informer's in-memory registry: what `/metrics` counts, so that a scrape never
    /// waits on the store (with etcd's quorum lost it would wait a request timeout per kind).
    pub view: tokio::sync::watch::Receiver<Arc<crate::informer::RegistryView>>,
}

/// The control plane as a host sees it: what `isthmus vm config` writes into a host's files.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MeshInfo {
    pub trust_domain: String,
    /// The DNS domain: services are `<name>.<namespace>.svc.<domain>`.
    pub domain: String,
    /// Where service VIPs come from: what hosts capture (`ISTIO_SERVICE_CIDR`).
    pub service_cidr: String,
    /// The addresses hosts reach the control plane at (--advertise-ip, else the gRPC address
    /// when it names one); empty when the server cannot know.
    pub advertised_ips: Vec<std::net::IpAddr>,
    /// Every replica's gRPC address (--public-addr), which bundles list in CA_ADDR so hosts
    /// fail over between replicas; empty for a single control plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_addrs: Vec<String>,
    /// The certificate and discovery API as bound (`ip:port`).
    pub grpc_addr: std::net::SocketAddr,
    /// The mesh DNS server as bound (`ip:port`).
    pub dns_addr: std::net::SocketAddr,
    /// The name on the control plane's serving certificate that hosts check.
    pub ca_server_name: String,
}

/// The CA and the join tokens, for the token and certificate routes.
pub struct IdentityState {
    pub ca: Arc<isthmus_ca::Ca>,
    pub tokens: Arc<isthmus_ca::TokenIssuer>,
    pub ledger: Arc<StoreLedger>,
}

/// An error as the API reports it: `{"error": {"code": 409, "reason": "Conflict", "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            details: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "code": self.status.as_u16(),
            "reason": self.status.canonical_reason().unwrap_or("Error"),
            "message": self.message,
        });
        if let Some(d) = self.details {
            body["details"] = d;
        }
        let mut resp = (self.status, Json(json!({ "error": body }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("2"),
            );
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read, so this connection cannot carry another request:
            // say so, or a client may reuse it and see it cut.
            resp.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match &e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Conflict(_) | RegistryError::VipExhausted(_) => StatusCode::CONFLICT,
            RegistryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RegistryError::Store(StoreError::Compacted { .. }) => StatusCode::GONE,
            RegistryError::Store(StoreError::FutureRevision { .. }) => StatusCode::BAD_REQUEST,
            // The request was fine and may succeed later, once the disk has room again.
            RegistryError::Store(StoreError::DiskFull { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            RegistryError::Store(StoreError::Unavailable { .. })
            | RegistryError::TooManyWatchers { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RegistryError::Store(StoreError::Etcd { cause, .. }) => match cause {
                EtcdCause::SpaceExceeded => StatusCode::INSUFFICIENT_STORAGE,
                EtcdCause::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                EtcdCause::Denied | EtcdCause::Other => StatusCode::INTERNAL_SERVER_ERROR,
                // etcd unreachable, without a leader, slow or shedding load: another try, or
                // another replica, may succeed.
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            RegistryError::Corrupt { .. } | RegistryError::Store(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let details = match &e {
            RegistryError::Invalid(v) => Some(json!(v
                .errors
                .iter()
                .map(|f| json!({"field": f.field, "value": f.value, "message": f.message}))
                .collect::<Vec<_>>())),
            _ => None,
        };
        let message = match &e {
            RegistryError::NotFound(what) => format!("{what} not found"),
            other => other.to_string(),
        };
        ApiError {
            status,
            message,
            details,
        }
    }
}

impl From<model::ParseError> for ApiError {
    fn from(e: model::ParseError) -> Self {
        let details = match &e {
            model::ParseError::Invalid { source, .. } => Some(json!(source
                .errors
                .iter()
                .map(|f| json!({"field": f.field, "value": f.value, "message": f.message}))
                .collect::<Vec<_>>())),
            _ => None,
        };
        let status = match &e {
            model::ParseError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            message: e.to_string(),
            details,
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/v1/{kind}", get(list_all))
        .route("/api/v1/namespaces/{ns}/{kind}", get(list_ns))
        .route(
            "/api/v1/namespaces/{ns}/{kind}/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/register", post(register))
        .route("/api/v1/deregister", post(deregister))
        .route("/api/v1/watch", get(watch))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/certs", post(issue_certs))
        .route("/api/v1/ca/root", get(ca_root))
        .route("/api/v1/proxies", get(list_proxies))
        .route("/api/v1/replicas", get(list_replicas))
        .route("/api/v1/mesh", get(mesh_info))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.yaml",
            get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            (state.clone(), "admin"),
            observe,
        ))
        .with_state(state)
}

/// Counts and times every request by route template, so cardinality stays bounded.
pub async fn observe<S>(
    State((state, api)): State<(Arc<S>, &'static str)>,
    req: Request,
    next: Next,
) -> Response
where
    S: HasMetrics,
{
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = state.metrics();
    m.latency
        .get_or_create(&RouteLabels {
            api,
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    m.requests
        .get_or_create(&RequestLabels {
            api,
            method,
            route,
            code: resp.status().as_u16(),
        })
        .inc();
    resp
}

pub trait HasMetrics: Send + Sync + 'static {
    fn metrics(&self) -> &Metrics;
}

impl HasMetrics for ApiState {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

async fn auth(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = match header.and_then(|h| h.strip_prefix("Bearer ")) {
        Some(t) => t.trim(),
        None => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token: pass --token, set ISTHMUS_TOKEN, or use the config file `isthmus server --dev` writes",
            )
            .into_response()
        }
    };
    if !bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid admin token: it does not match the server's (see admin-token in the server's data directory)",
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {}; the API is described at /openapi.yaml",
            uri.path()
        ),
    )
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response();
    }
    // A store that refuses writes serves reads, but a balancer should prefer a replica that
    // takes registrations; the cause is what an operator needs to act.
    match state.registry.store().health().write_failure {
        Some(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: registry writes fail: {err}\n"),
        )
            .into_response(),
        None => "ready\n".into_response(),
    }
}

/// Sets the gauges read at scrape time from memory: the store's last seen revision and the
/// number of objects of each kind in the informer's view.
pub fn refresh_gauges(
    registry: &Registry,
    view: &crate::informer::RegistryView,
    metrics: &Metrics,
) {
    metrics.store_revision.set(registry.store().revision());
    for kind in Kind::ALL {
        let n = match kind {
            Kind::Service => view.services.len(),
            Kind::WorkloadEntry => view.entries.len(),
            Kind::WorkloadGroup => view.groups.len(),
            Kind::AuthorizationPolicy => view.policies.len(),
            Kind::PeerAuthentication => view.peer_authentications.len(),
            Kind::VirtualService => view.virtual_services.len(),
            Kind::DestinationRule => view.destination_rules.len(),
            Kind::HttpRoute => view.http_routes.len(),
            Kind::GrpcRoute => view.grpc_routes.len(),
        };
        metrics
            .resources
            .get_or_create(&crate::metrics::KindLabels {
                kind: kind.as_str().into(),
            })
            .set(n as i64);
    }
}

pub async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let view = state.view.borrow().clone();
    refresh_gauges(&state.registry, &view, &state.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

fn parse_kind(s: &str) -> ApiResult<Kind> {
    s.parse::<Kind>()
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    namespace: Option<String>,
    label_selector: Option<String>,
}

fn selector(s: Option<&str>) -> ApiResult<LabelSelector> {
    LabelSelector::parse(s.unwrap_or(""))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn query<T: for<'de> Deserialize<'de>>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad query parameters: {}", e.body_text()),
        )
    })
}

async fn list(
    state: &ApiState,
    kind: Kind,
    namespace: Option<String>,
    q: ListQuery,
) -> ApiResult<Response> {
    let filter = Filter {
        kind: Some(kind),
        namespace: namespace.or(q.namespace).filter(|n| !n.is_empty()),
        selector: selector(q.label_selector.as_deref())?,
    };
    let (items, revision) = state.registry.list(&filter).await?;
    Ok(Json(json!({
        "apiVersion": model::API_VERSION,
        "kind": format!("{}List", kind.as_str()),
        "revision": revision,
        "items": items,
    }))
    .into_response())
}

async fn list_all(
    State(state): State<Arc<ApiState>>,
    Path(kind): Path<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let kind = parse_kind(&kind)?;
    list(&state, kind, None, query(q)?).await
}

async fn list_ns(
    State(state): State<Arc<ApiState>>,
    Path((ns, kind)): Path<(String, String)>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let kind = parse_kind(&kind)?;
    list(&state, kind, Some(ns), query(q)?).await
}

async fn get_one(
    State(state): State<Arc<ApiState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Resource>> {
    let kind = parse_kind(&kind)?;
    Ok(Json(state.registry.get(kind, &ns, &name).await?))
}

/// Reads a request body up to MAX_BODY, refusing larger ones with a 413 that says the limit.
async fn read_body(body: Body) -> ApiResult<Bytes> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than {} KiB; split the input into several requests",
                MAX_BODY / 1024
            ),
        )
    })
}

/// The resources of an `apply` body: a JSON list (`{"items": [...]}`) or YAML/JSON documents
/// (JSON is YAML too).
fn parse_apply(bytes: &[u8], yaml: bool) -> ApiResult<Vec<model::Resource>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the body is not UTF-8 text"))?;
    let list = if yaml {
        None
    } else {
        serde_json::from_str::<serde_json::Value>(text).ok()
    };
    Ok(
        match list
            .as_ref()
            .and_then(|v| v.get("items"))
            .and_then(|i| i.as_array())
        {
            Some(items) => items
                .iter()
                .map(|i| model::parse_json(i.to_string().as_bytes()))
                .collect::<Result<Vec<_>, _>>()?,
            None => model::parse_documents(text)?,
        },
    )
}

fn is_yaml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("yaml") || ct.starts_with("text/"))
}

/// Request bodies parsed at once, over all clients. Parsing runs on the blocking pool, never on
/// the async workers that serve everything else; the rest wait for a turn.
pub const PARSE_CONCURRENCY: usize = 2;
static PARSERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PARSE_CONCURRENCY);

/// Runs `parse` (of a client's text) on the blocking pool, at most [`PARSE_CONCURRENCY`] at once.
/// Documents are at most [`MAX_BODY`] bytes; nesting stops at 128 levels (serde_json's and
/// serde_yaml_ng's recursion limits) and YAML alias expansion at serde_yaml_ng's repetition
/// limit, each answered 400.
async fn parse_off_workers<T: Send + 'static>(
    parse: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    // The semaphore is never closed.
    let _turn = PARSERS.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    })?;
    tokio::task::spawn_blocking(parse).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("parsing the request body failed: {e}"),
        )
    })?
}

async fn parse_json_body<T: for<'de> Deserialize<'de> + Send + 'static>(
    bytes: Bytes,
) -> ApiResult<T> {
    parse_off_workers(move || parse_json_now(&bytes)).await
}

fn parse_json_now<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at {path}")
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body{at}: {}", e.into_inner()),
        )
    })
}

async fn put_one(
    State(state): State<Arc<ApiState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
    body: Body,
) -> ApiResult<Response> {
    let kind = parse_kind(&kind)?;
    let bytes = read_body(body).await?;
    let r = parse_off_workers(move || Ok(model::parse_json(&bytes)?)).await?;
    let m = r.meta();
    if r.kind() != kind || m.namespace != ns || m.name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is {} but the URL names {kind} {ns}/{name}; they must agree",
                r.id()
            ),
        ));
    }
    let (results, _) = state.registry.apply(vec![r]).await?;
    let object = state.registry.get(kind, &ns, &name).await?;
    let status = match results.first().map(|r| r.action) {
        Some(crate::registry::Action::Created) => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    Ok((status, Json(object)).into_response())
}

async fn delete_one(
    State(state): State<Arc<ApiState>>,
    Path((ns, kind, name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let kind = parse_kind(&kind)?;
    let (object, revision) = state.registry.delete(kind, &ns, &name).await?;
    Ok(Json(json!({"action": "deleted", "revision": revision, "object": object})).into_response())
}

/// `?wait=true` on a write: answer once the write is in the view DNS and discovery serve from.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    #[serde(default)]
    wait: bool,
}

/// Longest a `?wait=true` write waits for the served view (a snapshot is published within
/// `informer::DEBOUNCE_MAX` of a write, and at most every `informer::MIN_INTERVAL`).
const WRITE_WAIT: Duration = Duration::from_secs(2);

/// With `wait`, resolves once the informer's view (what DNS and discovery serve) holds the
/// write made at revision `written` (when anything was written), or after [`WRITE_WAIT`]: so
/// `isthmus register` then `dig` finds the name, and the write's answer is never held long.
async fn served(state: &ApiState, wait: bool, written: Option<isthmus_store::Revision>) {
    let Some(written) = written.filter(|_| wait) else {
        return;
    };
    let mut view = state.view.clone();
    let _ = tokio::time::timeout(WRITE_WAIT, view.wait_for(|v| v.revision >= written)).await;
}

async fn apply(
    State(state): State<Arc<ApiState>>,
    q: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let q = query(q)?;
    let bytes = read_body(body).await?;
    let yaml = is_yaml(&headers);
    let resources = parse_off_workers(move || parse_apply(&bytes, yaml)).await?;
    let (results, revision) = state.registry.apply(resources).await?;
    let wrote = results
        .iter()
        .any(|r| r.action != crate::registry::Action::Unchanged);
    served(&state, q.wait, wrote.then_some(revision)).await;
    Ok(Json(json!({"revision": revision, "results": results})).into_response())
}

async fn register(
    State(state): State<Arc<ApiState>>,
    q: Result<Query<WaitQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<Response> {
    let q = query(q)?;
    let req: RegisterRequest = parse_json_body(read_body(body).await?).await?;
    let resp = state.registry.register(req).await?;
    let wrote = [resp.service, resp.workload_entry]
        .iter()
        .any(|a| *a != crate::registry::Action::Unchanged);
    served(&state, q.wait, wrote.then_some(resp.revision)).await;
    Ok(Json(resp).into_response())
}

async fn deregister(State(state): State<Arc<ApiState>>, body: Body) -> ApiResult<Response> {
    let req: DeregisterRequest = parse_json_body(read_body(body).await?).await?;
    Ok(Json(state.registry.deregister(req).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WatchQuery {
    kind: Option<String>,
    namespace: Option<String>,
    label_selector: Option<String>,
    /// Resume: every change with a revision >= this one.
    revision: Option<String>,
}

/// Server-sent events; each event's `id` is its revision, so a client that reconnects with
/// `Last-Event-ID` resumes after the last event it saw with no gap.
async fn watch(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let q = query(q)?;
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    let filter = Filter {
        kind,
        namespace: q.namespace.filter(|n| !n.is_empty()),
        selector: selector(q.label_selector.as_deref())?,
    };
    let bad_rev = |v: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("revision {v:?} is not a number"),
        )
    };
    let from = match (
        headers.get("last-event-id").and_then(|v| v.to_str().ok()),
        q.revision.as_deref(),
    ) {
        (Some(last), _) => Some(resume_after(last, state.registry.store().revision())?),
        (None, Some(r)) => Some(r.parse::<i64>().map_err(|_| bad_rev(r))?),
        (None, None) => None,
    };
    let events = state.registry.watch(filter, from).await?;
    state.metrics.watchers.inc();
    let guard = WatcherGuard(state.clone());
    let mut stopping = state.stopping.clone();
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let stream = events.take_until(stop).map(move |ev| {
        let _keep = &guard;
        Ok(match ev {
            Ok(ev) => SseEvent::default()
                .event(match ev.kind {
                    crate::registry::WatchEventType::Added => "ADDED",
                    crate::registry::WatchEventType::Modified => "MODIFIED",
                    crate::registry::WatchEventType::Deleted => "DELETED",
                })
                .id(ev.revision.to_string())
                .data(serde_json::to_string(&ev).unwrap_or_default()),
            Err(e) => {
                let mut message = e.to_string();
                if matches!(e, RegistryError::Store(StoreError::Compacted { .. })) {
                    // The watcher fell further behind than the store keeps history.
                    message.push_str("; watch again without Last-Event-ID to re-list");
                }
                SseEvent::default()
                    .event("ERROR")
                    .data(json!({"error": {"message": message}}).to_string())
            }
        })
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The revision to resume from after the `Last-Event-ID` a client sent back. Anything this
/// store cannot have issued (beyond its current revision, past the end of the integer range,
/// negative, not a number) is refused alike: the client's state comes from elsewhere, and it
/// must re-list.
fn resume_after(
    last: &str,
    current: isthmus_store::Revision,
) -> ApiResult<isthmus_store::Revision> {
    match last.trim().parse::<isthmus_store::Revision>() {
        Ok(seen) if (0..=current).contains(&seen) => Ok(seen + 1),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Last-Event-ID {last:?} is not a revision this store issued (it is at revision \
                 {current}): watch again without it to re-list"
            ),
        )),
    }
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        let status = match &e {
            IdentityError::UnknownToken(_) => StatusCode::NOT_FOUND,
            IdentityError::Invalid(_) => StatusCode::BAD_REQUEST,
            IdentityError::Store(StoreError::DiskFull { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            IdentityError::Store(e) if e.is_storage() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn create_token(State(state): State<Arc<ApiState>>, body: Body) -> ApiResult<Response> {
    let mut req: CreateTokenRequest = parse_json_body(read_body(body).await?).await?;
    if let Some(group) = req.group.clone() {
        // The token records the group: it must exist, and its template agree on the identity.
        let ns = if req.namespace.is_empty() {
            model::DEFAULT_NAMESPACE
        } else {
            &req.namespace
        };
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
        let template = match state.registry.get(Kind::WorkloadGroup, ns, &group).await {
            Ok(Resource::WorkloadGroup(g)) => g.spec.template,
            Ok(_) | Err(RegistryError::NotFound(_)) => {
                return Err(bad(format!("WorkloadGroup {ns}/{group} not found")))
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(sa) = crate::hostfiles::group_defaults(&template).service_account {
            if req.service_account.is_empty() {
                req.service_account.clone_from(&sa);
            } else if req.service_account != sa {
                return Err(bad(format!(
                    "service account {:?} differs from WorkloadGroup {ns}/{group}'s template service account {sa:?}",
                    req.service_account
                )));
            }
        }
    }
    let id = &state.identity;
    let resp = identity::create_token(&id.tokens, &id.ledger, req).await?;
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

async fn list_tokens(State(state): State<Arc<ApiState>>) -> ApiResult<Response> {
    let entries = state.identity.ledger.list().await?;
    let items: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let r = &e.record;
            json!({
                "id": r.id, "namespace": r.namespace, "serviceAccount": r.service_account,
                "identity": r.identity.to_string(), "issuedAt": r.issued_at, "expiresAt": r.expires_at,
                "maxUses": r.max_uses, "uses": e.uses, "revoked": e.revoked,
                "state": identity::token_state(e),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })).into_response())
}

async fn revoke_token(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let entry = state.identity.ledger.revoke(&id).await?;
    Ok(Json(json!({"id": entry.record.id, "revoked": entry.revoked})).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertsRequest {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    service_account: String,
    /// Also issue a key and certificate for the host (the seeds' machine certs).
    #[serde(default)]
    bootstrap: bool,
    /// Lifetime of the bootstrap certificate, like `1h` (default: the CA's default).
    #[serde(default)]
    lifetime: Option<String>,
}

/// The seeds' "machineCerts": the root bundle, and on request a short-lived key and certificate
/// for a host that cannot use a join token. The key is generated here, so only use this over
/// a trusted channel (the admin API is loopback-only by default).
async fn issue_certs(State(state): State<Arc<ApiState>>, body: Body) -> ApiResult<Response> {
    let req: CertsRequest = parse_json_body(read_body(body).await?).await?;
    let ca = &state.identity.ca;
    let mut out = json!({ "rootCert": ca.trust_bundle_pem() });
    if req.bootstrap {
        let ns = if req.namespace.is_empty() {
            model::DEFAULT_NAMESPACE
        } else {
            &req.namespace
        };
        let sa = if req.service_account.is_empty() {
            model::DEFAULT_SERVICE_ACCOUNT
        } else {
            &req.service_account
        };
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
        let id =
            isthmus_ca::SpiffeId::new(ca.trust_domain(), ns, sa).map_err(|e| bad(e.to_string()))?;
        let lifetime = match req.lifetime.as_deref() {
            None | Some("") => None,
            Some(t) => Some(
                humantime::parse_duration(t)
                    .map_err(|e| bad(format!("lifetime {t:?} is not a duration like 1h: {e}")))?,
            ),
        };
        if let Some(l) = lifetime {
            if l > ca.max_lifetime() {
                return Err(bad(format!(
                    "lifetime {} is above this CA's maximum of {}",
                    humantime::format_duration(l),
                    humantime::format_duration(ca.max_lifetime())
                )));
            }
        }
        let pair = ca
            .issue_workload(&id, lifetime)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        out["identity"] = json!(id.to_string());
        out["certChain"] = json!(pair.chain_pem());
        out["key"] = json!(pair.key_pem);
    }
    Ok(Json(out).into_response())
}

async fn ca_root(State(state): State<Arc<ApiState>>) -> Response {
    Json(json!({ "rootCert": state.identity.ca.trust_bundle_pem(), "trustDomain": state.identity.ca.trust_domain() }))
        .into_response()
}

async fn mesh_info(State(state): State<Arc<ApiState>>) -> ApiResult<Response> {
    let info = state.mesh.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is still starting",
        )
    })?;
    Ok(Json(info).into_response())
}

/// Hosts connected to this server's discovery stream (`isthmus status`).
async fn list_proxies(State(state): State<Arc<ApiState>>) -> Response {
    let mut proxies = crate::proxies::list(&state.xds);
    for p in &mut proxies {
        p.replica = Some(state.session.name().to_string());
    }
    Json(proxies).into_response()
}

/// The replicas sharing the store, from their records (each under its lease, so a dead one
/// drops out within its TTL), which one leads, and how this one finds the store.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasView {
    /// The replica that answered.
    pub this: String,
    pub leader: Option<String>,
    pub replicas: Vec<ReplicaView>,
    /// Empty while the store answers; else why not (the list is then only this replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    #[serde(flatten)]
    pub record: crate::replicas::ReplicaRecord,
    pub leader: bool,
}

async fn list_replicas(State(state): State<Arc<ApiState>>) -> Response {
    let this = state.session.name().to_string();
    let listed = if state.session.shared() {
        crate::replicas::list(state.registry.store().as_ref()).await
    } else {
        Ok((vec![state.session.record().await], Some(this.clone())))
    };
    let (records, leader, store_error) = match listed {
        Ok((records, leader)) => (records, leader, None),
        Err(e) => (
            vec![state.session.record().await],
            state.session.is_leader().then(|| this.clone()),
            Some(e.to_string()),
        ),
    };
    let replicas = records
        .into_iter()
        .map(|record| ReplicaView {
            leader: leader.as_deref() == Some(record.name.as_str()),
            record,
        })
        .collect();
    Json(ReplicasView {
        this,
        leader,
        replicas,
        store_error,
    })
    .into_response()
}

struct WatcherGuard(Arc<ApiState>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.metrics.watchers.dec();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn last_event_id_outside_the_stores_revisions_is_refused_alike() {
        assert_eq!(super::resume_after("7", 9).unwrap(), 8);
        assert_eq!(super::resume_after(" 9 ", 9).unwrap(), 10);
        assert_eq!(super::resume_after("0", 9).unwrap(), 1);
        let beyond_i64 = (i64::MAX as u64 + 1).to_string();
        for last in [
            "10",
            &i64::MAX.to_string(),
            &beyond_i64,
            &u64::MAX.to_string(),
            "-1",
            &i64::MIN.to_string(),
            "abc",
            "",
            "1e3",
        ] {
            let e = super::resume_after(last, 9).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{last}");
            assert_eq!(
                e.message,
                format!(
                    "Last-Event-ID {last:?} is not a revision this store issued (it is at \
                     revision 9): watch again without it to re-list"
                )
            );
        }
    }

    /// Every route the router serves is described in docs/openapi.yaml, and nothing more.
    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(super::OPENAPI).expect("openapi.yaml is YAML");
        let documented: std::collections::BTreeSet<String> = doc["paths"]
            .as_mapping()
            .expect("paths")
            .keys()
            .map(|k| {
                k.as_str()
                    .unwrap_or_default()
                    .replace("{namespace}", "{ns}")
            })
            .collect();
        let source = include_str!("api.rs");
        let served: std::collections::BTreeSet<String> = source
            .split(".route(")
            .skip(1)
            .filter_map(|rest| rest.trim_start().strip_prefix('"'))
            .filter_map(|l| l.split('"').next())
            .filter(|p| p.starts_with('/'))
            .map(str::to_string)
            .collect();
        assert_eq!(served, documented);
    }
}
