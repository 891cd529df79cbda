//! Client-supplied text on its way into logs and error messages: cut to a bound and with
//! control characters escaped, so a client can neither flood the log nor forge lines in it.

use std::borrow::Cow;
use std::fmt::Write;

/// The default bound for one client-supplied field in a log line or error message.
pub const LOG_FIELD: usize = 256;

/// `text` cut to at most `max` bytes (at a character boundary), with `…(N bytes more)` appended
/// when cut, and control characters (newlines, escapes, …) written as `\n`, `\u{1b}`.
/// Borrowed when nothing needs changing.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    let clean = !text.chars().any(char::is_control);
    if text.len() <= max && clean {
        return Cow::Borrowed(text);
    }
    let mut cut = max.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let (head, rest) = text.split_at(cut);
    let mut out = String::with_capacity(cut + 24);
    for c in head.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if !rest.is_empty() {
        // Writing to a String cannot fail.
        let _ = write!(out, "…({} bytes more)", rest.len());
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_borrowed() {
        assert!(matches!(
            clip("web-1.prod", 64),
            Cow::Borrowed("web-1.prod")
        ));
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary_and_says_how_much_was_cut() {
        assert_eq!(clip("abcdef", 4), "abcd…(2 bytes more)");
        // "é" is two bytes: a cut inside it moves back to its start.
        assert_eq!(clip("aé b", 2), "a…(4 bytes more)");
        let huge = "x".repeat(1_000_000);
        assert_eq!(
            clip(&huge, 10),
            format!("{}…(999990 bytes more)", "x".repeat(10))
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            clip("ok\nFAKE LOG LINE\u{1b}[31m", 64),
            "ok\\nFAKE LOG LINE\\u{1b}[31m"
        );
    }
}
