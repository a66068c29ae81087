//! Request values made safe to log (docs/reference/receiver-api.md, "Limits"): at most
//! [`MAX_LOGGED_CHARS`] characters, the cut marked with how many bytes were left out, and
//! control characters escaped, so no client can fill the log or forge a line of it with
//! what it sends.
//!
//! Every `tracing` call of the receiver that logs a value taken from a request (a header,
//! the body, the path) passes it through [`clip`]. Clipping happens while formatting, so a
//! value costs nothing when its log line is filtered out.

use std::fmt::{self, Write};

/// Longest part of a request value that is logged, in characters.
pub const MAX_LOGGED_CHARS: usize = 128;

/// `value` as it may be logged: see the module documentation.
pub fn clip(value: &str) -> Clipped<'_> {
    Clipped(value)
}

/// A request value that formats clipped; made by [`clip`].
#[derive(Clone, Copy)]
pub struct Clipped<'a>(&'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut end = self.0.len();
        for (count, (index, c)) in self.0.char_indices().enumerate() {
            if count == MAX_LOGGED_CHARS {
                end = index;
                break;
            }
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        if end < self.0.len() {
            write!(f, "…(+{} bytes)", self.0.len() - end)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_up_to_the_limit_are_logged_whole() {
        for value in ["", "install-1", &"a".repeat(MAX_LOGGED_CHARS)] {
            assert_eq!(clip(value).to_string(), value);
        }
    }

    #[test]
    fn longer_values_are_cut_and_the_cut_says_how_much_is_missing() {
        let value = "a".repeat(60_000);
        assert_eq!(
            clip(&value).to_string(),
            format!("{}…(+{} bytes)", "a".repeat(128), 60_000 - 128)
        );
        assert_eq!(
            clip(&"b".repeat(129)).to_string(),
            format!("{}…(+1 bytes)", "b".repeat(128))
        );
    }

    #[test]
    fn the_cut_counts_characters_and_falls_on_a_character_boundary() {
        // 'é' is two bytes: 200 of them are 400 bytes, of which 128 characters are kept.
        let value = "é".repeat(200);
        assert_eq!(
            clip(&value).to_string(),
            format!("{}…(+{} bytes)", "é".repeat(128), 72 * 2)
        );
        let mixed = format!("{}€rest", "x".repeat(127));
        assert_eq!(
            clip(&mixed).to_string(),
            format!("{}€…(+4 bytes)", "x".repeat(127))
        );
    }

    #[test]
    fn control_characters_are_escaped_so_no_log_line_can_be_forged() {
        assert_eq!(
            clip("id\nERROR forged line\r\u{1b}[31m").to_string(),
            "id\\nERROR forged line\\r\\u{1b}[31m"
        );
    }
}
