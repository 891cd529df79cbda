//! What the bench binaries share: starting `isthmus server` and talking to its admin API,
//! the closed-loop load and its percentiles, what the kernel says about a process, and
//! table formatting. Each binary in `src/bin/` is one benchmark.
#![forbid(unsafe_code)]

pub mod etcd;
pub mod format;
pub mod procfs;
pub mod server;
pub mod stats;
