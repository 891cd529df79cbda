//! The seeds' read-only registration API (Pilot's `/v1/registration`), unauthenticated like the
//! original, on its own listener (default port 8080):
//! - `GET /v1/registration` → `[{"service-key": "<fqdn>|<port-name>", "hosts": [...]}, ...]`
//! - `GET /v1/registration/<fqdn>|<port-name>` → `{"hosts": [{"ip_address": ..., "port": ...}]}`
//!
//! Only healthy endpoints are listed, as Pilot listed only ready endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use isthmus_model::{Health, Service, WorkloadEntry};
use serde::Serialize;

use crate::api::{observe, ApiError, ApiState};

#[derive(Serialize, Debug, PartialEq)]
pub struct Host {
    pub ip_address: String,
    pub port: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Serialize, Debug)]
pub struct ServiceHosts {
    #[serde(rename = "service-key")]
    pub service_key: String,
    pub hosts: Vec<Host>,
}

/// One entry per service port: `<hostname>|<port name>` and the healthy endpoints' addresses.
pub fn registrations(
    domain: &str,
    services: &[Service],
    entries: &[WorkloadEntry],
) -> Vec<ServiceHosts> {
    let mut out = Vec::new();
    for svc in services {
        let endpoints: Vec<&WorkloadEntry> = entries
            .iter()
            .filter(|w| w.status.health == Health::Healthy && w.serves(svc))
            .collect();
        for port in &svc.spec.ports {
            let hosts = endpoints
                .iter()
                .map(|w| {
                    let mut tags = w.metadata.labels.clone();
                    tags.extend(w.spec.labels.clone());
                    Host {
                        ip_address: w.spec.address.clone(),
                        port: w
                            .spec
                            .ports
                            .get(&port.name)
                            .copied()
                            .unwrap_or_else(|| port.target()),
                        tags,
                    }
                })
                .collect();
            out.push(ServiceHosts {
                service_key: format!("{}|{}", svc.hostname(domain), port.name),
                hosts,
            });
        }
    }
    out
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/registration", get(list))
        .route("/v1/registration/", get(list))
        .route("/v1/registration/{key}", get(one))
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no route for {method} {}; this port serves GET /v1/registration and GET /v1/registration/<fqdn>|<port-name>", uri.path()),
            )
        })
        .layer(middleware::from_fn_with_state((state.clone(), "registration"), observe))
        .with_state(state)
}

async fn all(state: &ApiState) -> Result<Vec<ServiceHosts>, ApiError> {
    let (svcs, entries) = state.registry.services_and_entries().await?;
    Ok(registrations(state.registry.domain(), &svcs, &entries))
}

async fn list(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(all(&state).await?).into_response())
}

async fn one(
    State(state): State<Arc<ApiState>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    if !key.contains('|') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("service key {key:?} must be <fqdn>|<port-name>, e.g. mysql.onprem.svc.cluster.local|mysql"),
        ));
    }
    let found = all(&state)
        .await?
        .into_iter()
        .find(|s| s.service_key == key);
    match found {
        Some(s) => Ok(Json(serde_json::json!({ "hosts": s.hosts })).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no registration for service key {key:?}"),
        )),
    }
}
