//! What the agent takes from the OS at start so that it keeps working, and stops cleanly, under
//! load: the open-files limit raised to its hard limit, a per-listener bound on connections
//! derived from it, and a reserve of descriptors released at shutdown so the interception rules
//! can be removed even when every other descriptor is taken.

use std::fs::File;

// Shared with the server, which needs the same raise.
pub use isthmus_socket::nofile::{raise_nofile, NofileLimits};

/// Descriptors held back for shutdown: `iptables-save`/`-restore` and `ip` need a few each
/// (pipes, the binary, its libraries), twice over for IPv4 and IPv6.
const RESERVE: usize = 32;
/// Descriptors left to everything that is not a proxied connection (control plane, DNS, admin,
/// the HBONE pool, the reserve) when the per-listener bound is derived from the limit.
const HEADROOM: u64 = 256;
/// A proxied connection holds two descriptors (client and upstream); three listeners share the
/// rest, so each gets a sixth of it and all of them at their bound still leave the headroom.
const PER_LISTENER_SHARE: u64 = 6;

/// The default bound on concurrent connections per listener for an open-files limit of
/// `nofile`.
pub fn default_max_connections(nofile: u64) -> usize {
    let per = nofile.saturating_sub(HEADROOM) / PER_LISTENER_SHARE;
    usize::try_from(per.clamp(16, 1 << 20)).unwrap_or(1 << 20)
}

/// Descriptors opened at start and closed just before the rules are removed.
pub struct FdReserve {
    held: Vec<File>,
}

impl FdReserve {
    /// Holds up to `RESERVE` descriptors (fewer if the limit is already tight).
    pub fn take() -> Self {
        let held = (0..RESERVE)
            .map_while(|_| File::open("/dev/null").ok())
            .collect();
        Self { held }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Gives the descriptors back to the process.
    pub fn release(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_follows_the_limit_with_headroom() {
        assert_eq!(default_max_connections(1024), 128);
        assert_eq!(default_max_connections(1_048_576), 174_720);
        // Tiny limits still serve a few connections.
        assert_eq!(default_max_connections(64), 16);
        // Three listeners at the bound, two descriptors a connection, leave the headroom.
        for n in [1024u64, 65_536, 1_048_576] {
            let used = 3 * 2 * default_max_connections(n) as u64;
            assert!(used + HEADROOM <= n, "{n}");
        }
    }

    #[test]
    fn raise_and_reserve() {
        let l = raise_nofile().unwrap();
        assert_eq!(l.soft, l.hard);
        let mut r = FdReserve::take();
        assert_eq!(r.len(), RESERVE);
        r.release();
        assert!(r.is_empty());
    }
}
