//! The open-files limit, raised at start by every long-running role.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The open-files limits before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard one (an agent proxying many connections, or a
/// server holding every host's streams, needs more than the usual 1024), logging both values.
pub fn raise_nofile() -> std::io::Result<NofileLimits> {
    let (soft_before, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let mut soft = soft_before;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => soft = hard,
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        }
    }
    tracing::info!(soft_before, soft, hard, "open-files limit");
    Ok(NofileLimits {
        soft_before,
        soft,
        hard,
    })
}
