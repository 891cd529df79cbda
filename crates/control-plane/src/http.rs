//! The admin, registration and metrics listeners: axum routers served by hyper's HTTP/1
//! connections, one per accepted socket, under the listener's [`ConnGuard`].
//!
//! Why not `axum::serve`: it has no deadline before the first request's headers, none on an
//! idle keep-alive connection and no cap on connections, so slow or silent clients could hold
//! every descriptor of the process. Here a connection is proven by its first complete request
//! headers; until then it can be evicted (see [`isthmus_socket::guard`]), and hyper's
//! `header_read_timeout` bounds every request's headers.

use std::convert::Infallible;
use std::io;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use isthmus_socket::{ConnGuard, GuardedIo, Stage};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Serves `app` on `listener` until `stop` turns true; then stops accepting, lets every
/// connection finish its request in flight (hyper's graceful shutdown) and returns once all
/// are closed (watch streams end on the same signal).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    guard: ConnGuard,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopping(&mut stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                isthmus_socket::accept_failed(guard.listener(), &e).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Some(conn) = guard.admit(peer, Stage::First) else {
            continue; // dropped: closed at once
        };
        let _ = tcp.set_nodelay(true);
        let handle = conn.handle();
        let header_timeout = conn.config().first_timeout;
        let io = TokioIo::new(GuardedIo::new(tcp, conn, None));
        let app = app.clone();
        let proven = handle.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            // Complete headers: this client is no flood; from now only the idle deadline.
            proven.prove();
            let app = app.clone();
            async move {
                Ok::<_, Infallible>(
                    app.oneshot(req.map(axum::body::Body::new))
                        .await
                        .unwrap_or_else(|never| match never {}),
                )
            }
        });
        let mut stop = stop.clone();
        conns.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(io, service);
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = stopping(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    handle.timed_out(if handle.is_proven() {
                        Stage::Idle
                    } else {
                        Stage::First
                    });
                }
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
