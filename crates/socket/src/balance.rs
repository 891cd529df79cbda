//! Exact balance of one port's connections over the proxy's shards, as Envoy's
//! `exact_balance` does.
//!
//! Each shard listens on the shared port (`SO_REUSEPORT`) and the kernel spreads new
//! connections by a hash of their addresses. That is fine for many short connections, but the
//! HBONE connections between two agents are few and long-lived (one per shard of the peer), so
//! the hash can put all of them on one shard while the others idle: two shards measured 16,622
//! or 13,782 requests/s in alternate runs, by where the two connections landed. With a
//! [`Balance`], the shard that accepts a connection gives it to the shard serving the fewest
//! connections of that port (itself on a tie, so nothing moves while the load is even). The
//! connection moves as a plain socket, before any byte is read, and is registered again with
//! the receiving shard's runtime; it then never leaves that shard.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

type Handoff = (std::net::TcpStream, SocketAddr);

/// The connections of one port, over every shard that serves it.
pub struct Balance {
    shards: Vec<Shard>,
    /// Held while choosing a shard, so two shards accepting at once both see the other's pick.
    pick: Mutex<()>,
}

struct Shard {
    active: Arc<AtomicUsize>,
    handoff: mpsc::UnboundedSender<Handoff>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Handoff>>>,
}

impl std::fmt::Debug for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("active", &self.active())
            .finish()
    }
}

impl Balance {
    /// A balance over `shards` shards (at least one).
    pub fn new(shards: usize) -> Arc<Self> {
        let shards = (0..shards.max(1))
            .map(|_| {
                let (handoff, inbox) = mpsc::unbounded_channel();
                Shard {
                    active: Arc::default(),
                    handoff,
                    inbox: Mutex::new(Some(inbox)),
                }
            })
            .collect();
        Arc::new(Self {
            shards,
            pick: Mutex::new(()),
        })
    }

    /// The connections each shard serves now.
    pub fn active(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.active.load(Ordering::Acquire))
            .collect()
    }

    /// Shard `me`'s listener, on its own socket of the shared port. Each shard's can be taken
    /// once.
    pub fn listener(self: &Arc<Self>, me: usize, listener: TcpListener) -> io::Result<Listener> {
        let inbox = self
            .shards
            .get(me)
            .and_then(|s| {
                s.inbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("shard {me}'s listener was already taken, or there is no such shard"),
                )
            })?;
        Ok(Listener {
            inner: listener,
            share: Some(Sharing {
                balance: self.clone(),
                me,
                inbox: tokio::sync::Mutex::new(inbox),
            }),
        })
    }

    /// The shard with the fewest connections, `me` on a tie; counted for it already.
    fn pick(&self, me: usize) -> usize {
        let _one = self.pick.lock().unwrap_or_else(PoisonError::into_inner);
        let load = |i: usize| self.shards[i].active.load(Ordering::Acquire);
        let mut best = me;
        for i in 0..self.shards.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        self.shards[best].active.fetch_add(1, Ordering::AcqRel);
        best
    }
}

/// A listener that is either plain, or one shard's share of a [`Balance`].
pub struct Listener {
    inner: TcpListener,
    share: Option<Sharing>,
}

struct Sharing {
    balance: Arc<Balance>,
    me: usize,
    /// Only this listener's accept loop takes it.
    inbox: tokio::sync::Mutex<mpsc::UnboundedReceiver<Handoff>>,
}

impl From<TcpListener> for Listener {
    fn from(inner: TcpListener) -> Self {
        Self { inner, share: None }
    }
}

/// Counts a connection for its shard until dropped (held for the connection's life).
#[derive(Debug)]
pub struct Share(Option<Arc<AtomicUsize>>);

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection this shard serves: one it accepted and kept, or one another shard
    /// accepted and gave it. Errors are the socket's accept errors, as `TcpListener::accept`.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr, Share)> {
        let Some(s) = &self.share else {
            let (tcp, peer) = self.inner.accept().await?;
            return Ok((tcp, peer, Share(None)));
        };
        let mut inbox = s.inbox.lock().await;
        loop {
            tokio::select! {
                biased;
                Some((std, peer)) = inbox.recv() => {
                    let share = Share(Some(s.balance.shards[s.me].active.clone()));
                    match TcpStream::from_std(std) {
                        Ok(tcp) => return Ok((tcp, peer, share)),
                        Err(e) => {
                            // Not a socket this runtime can take: the connection is closed.
                            tracing::debug!(%peer, error = %e, "a handed-over connection could not be registered");
                        }
                    }
                }
                accepted = self.inner.accept() => {
                    let (tcp, peer) = accepted?;
                    // Counted for `to` from here on: its loop adopts the count with the socket.
                    let to = s.balance.pick(s.me);
                    let mine = || Share(Some(s.balance.shards[s.me].active.clone()));
                    if to == s.me {
                        return Ok((tcp, peer, mine()));
                    }
                    let uncount = || s.balance.shards[to].active.fetch_sub(1, Ordering::AcqRel);
                    let std = match tcp.into_std() {
                        Ok(std) => std,
                        Err(e) => {
                            uncount();
                            tracing::debug!(%peer, error = %e, "cannot hand a connection over");
                            continue;
                        }
                    };
                    if let Err(mpsc::error::SendError((std, peer))) =
                        s.balance.shards[to].handoff.send((std, peer))
                    {
                        // That shard stopped serving the port: keep it here.
                        uncount();
                        s.balance.shards[s.me].active.fetch_add(1, Ordering::AcqRel);
                        return Ok((TcpStream::from_std(std)?, peer, mine()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `n` sockets listening on one port, as plain sockets (each thread registers its own).
    fn shared_port_listeners(n: usize) -> Vec<std::net::TcpListener> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in = rt.enter();
        let mut out = Vec::new();
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_reuseaddr(true).unwrap();
            s.set_reuseport(true).unwrap();
            s.bind(addr).unwrap();
            let l = s.listen(64).unwrap();
            addr = l.local_addr().unwrap();
            out.push(l.into_std().unwrap());
        }
        out
    }

    /// Two shards on their own threads and runtimes, as the agent runs them: whichever socket
    /// the kernel picks, the connections end up one per shard, each served on its shard's
    /// thread, and a shard's count falls when its connection closes.
    #[test]
    fn connections_go_to_the_shard_with_fewest() {
        let balance = Balance::new(2);
        let mut listeners = shared_port_listeners(2);
        let addr = listeners[0].local_addr().unwrap();
        let (served_tx, served_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for me in (0..2).rev() {
            let l = listeners.pop().unwrap();
            let b = balance.clone();
            let served = served_tx.clone();
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let l = b.listener(me, TcpListener::from_std(l).unwrap()).unwrap();
                    for _ in 0..3 {
                        let Ok(Ok((mut tcp, _, share))) =
                            tokio::time::timeout(std::time::Duration::from_secs(2), l.accept())
                                .await
                        else {
                            return;
                        };
                        served.send(me).unwrap();
                        // Echo one byte on this thread's runtime, then hold the connection
                        // until the client closes it.
                        tokio::spawn(async move {
                            let mut b = [0u8; 1];
                            if tcp.read_exact(&mut b).await.is_ok() {
                                let _ = tcp.write_all(&b).await;
                                let _ = tcp.read(&mut b).await;
                            }
                            drop(share);
                        });
                    }
                });
            }));
        }
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        client.block_on(async {
            let mut held = Vec::new();
            for i in 0..4u8 {
                let mut c = TcpStream::connect(addr).await.unwrap();
                c.write_all(&[i]).await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], i, "served, through whichever shard");
                held.push(c);
            }
            let mut per_shard = [0usize; 2];
            for _ in 0..4 {
                per_shard[served_rx.recv().unwrap()] += 1;
            }
            assert_eq!(
                per_shard,
                [2, 2],
                "an even split, whatever the kernel's hash"
            );
            assert_eq!(balance.active(), vec![2, 2]);
            let again = TcpListener::bind("127.0.0.1:0").await.unwrap();
            assert!(
                balance.listener(0, again).is_err(),
                "each shard's share is taken once"
            );
            held.truncate(1);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while balance.active().iter().sum::<usize>() != 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{:?}",
                    balance.active()
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
        drop(client);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[tokio::test]
    async fn a_plain_listener_keeps_everything() {
        let l = Listener::from(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (s, peer, share) = l.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
        assert!(share.0.is_none());
    }
}
