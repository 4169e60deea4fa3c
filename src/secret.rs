//! A string that must never be shown.
//!
//! API keys travel through configuration, credentials and HTTP headers. Keeping them in one type
//! whose `Debug` and `Display` print a fixed mask means a stray `{:?}` in a log line or an error
//! cannot leak them; the raw value is reachable only through [`Secret::expose`], which is easy to
//! grep for.

use std::fmt;

/// A secret value (an API key, a password). Prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a raw secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that must send it (an HTTP header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let key = Secret::new("sk-live-123");
        assert_eq!(format!("{key}"), "***");
        assert_eq!(format!("{key:?}"), "Secret(***)");
        assert_eq!(key.expose(), "sk-live-123");
    }
}
