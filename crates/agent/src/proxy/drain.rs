//! Graceful stop of a plain TCP listener: on the signal, stop accepting (the listener closes,
//! so new connections are refused at once), let the open connections finish for up to the
//! deadline the signal carries, then close what is left.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Sends the drain signal: `Some(deadline)` starts draining.
pub type DrainSender = watch::Sender<Option<Duration>>;
/// What a serving loop watches.
pub type DrainSignal = watch::Receiver<Option<Duration>>;

/// Accepts on `listener`, running `handle` per connection, until `drain` fires; then drains.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    mut drain: DrainSignal,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let deadline = loop {
        if let Some(d) = *drain.borrow_and_update() {
            break d;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, src)) => {
                    conns.spawn(handle(tcp, src));
                }
                // Per-connection accept errors (EMFILE, aborted handshakes) are transient.
                Err(e) => tracing::warn!(error = %e, listener = what, "accept failed"),
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
