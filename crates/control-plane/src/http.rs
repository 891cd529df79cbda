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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use axum::routing::post;
    use isthmus_socket::GuardConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(config: GuardConfig) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/echo", post(|body: String| async move { body }));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            app,
            ConnGuard::new("test", config),
            stop_rx,
        ));
        (addr, stop_tx)
    }

    async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("still open after {limit:?}"),
            }
        }
    }

    /// A client that stops sending halfway through its request body is closed at the idle
    /// deadline; one that never finishes its headers at the header deadline; and a proven
    /// connection is not evicted by newcomers.
    #[tokio::test]
    async fn stalled_bodies_and_headers_are_closed_and_proven_clients_stay() {
        let (addr, stop) = start(GuardConfig {
            max_total: 2,
            max_per_source: 10,
            handshake_timeout: Duration::from_secs(1),
            first_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_millis(1500),
        })
        .await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let took = closed_after(&mut stalled, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(1400), "{took:?}");

        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /echo HTTP/1.1\r\n").await.unwrap();
        let took = closed_after(&mut slow, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(900), "{took:?}");

        // A proven keep-alive client, then two silent newcomers at a cap of 2: the first
        // newcomer is evicted by the second, the proven client is still answered.
        let mut proven = TcpStream::connect(addr).await.unwrap();
        let request = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi";
        proven.write_all(request).await.unwrap();
        let mut buf = [0u8; 512];
        let n = proven.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hi"));
        let mut first = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _second = TcpStream::connect(addr).await.unwrap();
        let took = closed_after(&mut first, Duration::from_secs(5)).await;
        assert!(
            took < Duration::from_millis(900),
            "evicted, not timed out: {took:?}"
        );
        proven.write_all(request).await.unwrap();
        let n = proven.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hi"));

        // Shutdown: the proven client's connection is closed gracefully.
        stop.send(true).unwrap();
        closed_after(&mut proven, Duration::from_secs(5)).await;
    }
}
