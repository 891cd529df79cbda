//! Numbers as the markdown tables print them.

use crate::procfs::Memory;

/// Milliseconds with about three significant digits.
pub fn ms(v: f64) -> String {
    if v < 0.1 {
        format!("{v:.3}")
    } else if v < 100.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

/// RSS and peak RSS in MiB.
pub fn mib(m: &Memory) -> String {
    format!(
        "{:.1} (peak {:.1})",
        m.rss_kib as f64 / 1024.0,
        m.peak_kib as f64 / 1024.0
    )
}
