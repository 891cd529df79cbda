//! `isthmus agent`: starts the agent's parts and runs until told to stop.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;

use crate::args::AgentArgs;
use crate::identity::IdentityManager;

pub async fn run(
    args: AgentArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if !args.identity_only {
        anyhow::bail!(
            "this version of the agent runs the identity manager only: pass --identity-only \
             (discovery, DNS and the proxy are not built yet)"
        );
    }
    let manager =
        IdentityManager::new(args.identity_config()).context("invalid agent configuration")?;
    let mut registry = Registry::default();
    manager.register_metrics(&mut registry);
    let registry = Arc::new(registry);

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for metrics (change it with --metrics-addr)",
                args.metrics_addr
            )
        })?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    // Writing into a String cannot fail.
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    out
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let metrics = tokio::spawn(async move { axum::serve(listener, app).await });

    let result = tokio::select! {
        r = manager.run() => match r {
            Ok(never) => match never {},
            Err(e) => Err(anyhow::Error::new(e)),
        },
        _ = shutdown => {
            tracing::info!("stopping; the certificate on disk stays valid until it expires");
            Ok(())
        }
    };
    metrics.abort();
    result
}
