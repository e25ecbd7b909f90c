//! [`Secret`]: a value (a token, an environment that may hold tokens) that
//! must never reach a log line, an error message or a `{:?}` dump.
//!
//! Its `Debug` and `Display` print `<redacted>`, so a config holding one
//! can `#[derive(Debug)]`. The value comes out only through
//! [`Secret::expose`], which makes every use visible in the code. It does
//! not compare secrets: checking a token is the dispatcher's job, in
//! constant time.

use std::fmt;

/// What `Debug` and `Display` print in place of the value.
pub const REDACTED: &str = "<redacted>";

/// A value whose `Debug` and `Display` never show it.
///
/// ```
/// use surveil_common::Secret;
/// let token = Secret::from("s3cret");
/// assert_eq!(format!("{token:?} {token}"), "<redacted> <redacted>");
/// assert_eq!(token.expose(), "s3cret");
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself, for the one place that must send or use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    #[allow(dead_code)] // read only through Debug
    struct Config {
        name: String,
        token: Option<Secret>,
        env: Secret<Vec<(String, String)>>,
    }

    #[test]
    fn derived_debug_of_a_config_redacts_every_secret() {
        let config = Config {
            name: "ci-1".into(),
            token: Some("tok-never-shown".into()),
            env: Secret::new(vec![("SURVEIL_TOKEN".into(), "env-never-shown".into())]),
        };
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(shown.contains("ci-1"), "{shown}");
            assert!(!shown.contains("never-shown"), "{shown}");
            assert_eq!(shown.matches(REDACTED).count(), 2, "{shown}");
        }
        assert_eq!(config.token.unwrap().expose(), "tok-never-shown");
        assert_eq!(config.env.expose()[0].0, "SURVEIL_TOKEN");
    }

    #[test]
    fn display_redacts_too() {
        let token = Secret::new("x".to_owned());
        assert_eq!(format!("token={token}"), "token=<redacted>");
        assert_eq!(token.expose(), "x");
    }
}
