//! A plain TCP listener's accept loop: connections past the listener's bound are closed at once
//! (counted), accept errors back off when descriptors run out; and its graceful stop: on the
//! signal, stop accepting (the listener closes, so new connections are refused at once), let
//! the open connections finish for up to the deadline the signal carries, then close what is
//! left.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_socket::{ConnLimit, Listener};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Sends the drain signal: `Some(deadline)` starts draining.
pub type DrainSender = watch::Sender<Option<Duration>>;
/// What a serving loop watches.
pub type DrainSignal = watch::Receiver<Option<Duration>>;

/// Accepts on `listener`, running `handle` per connection (at most `limit` at once), until
/// `drain` fires; then drains.
pub async fn serve<F, Fut>(
    listener: impl Into<Listener>,
    what: &'static str,
    mut drain: DrainSignal,
    limit: ConnLimit,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = listener.into();
    let mut conns = JoinSet::new();
    let deadline = loop {
        if let Some(d) = *drain.borrow_and_update() {
            break d;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, src, share)) => {
                    // Past the bound, `tcp` is dropped here: closed at once.
                    if let Some(permit) = limit.try_acquire(what) {
                        let conn = handle(tcp, src);
                        conns.spawn(async move {
                            conn.await;
                            drop((permit, share));
                        });
                    }
                }
                // Per-connection accept errors (EMFILE, aborted handshakes) are transient; out
                // of descriptors, pause rather than spin.
                Err(e) => isthmus_socket::accept_failed(what, &e).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            changed = drain.changed() => if changed.is_err() {
                // The sender is gone without a drain (the proxy was dropped): stop now.
                return;
            },
        }
    };
    drop(listener);
    let open = conns.len();
    if open == 0 {
        return;
    }
    tracing::info!(listener = what, open, ?deadline, "draining");
    let finished = tokio::time::timeout(deadline, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            listener = what,
            left = conns.len(),
            "drain deadline reached, closing remaining connections"
        );
        conns.shutdown().await;
    }
}
