//! Credentials that must never reach a log line: a [`Secret`] string type that prints `***`,
//! and [`redact_url`] for URLs that carry a user and password (`nats://u:p@h`, `http://u:p@h/mi`).
//!
//! Configuration structs derive `Debug`, and any of them may end up in a `tracing` field; a
//! password kept as a plain `String` would then be written out. Holding it as a `Secret` makes
//! the safe thing the default: reading it takes an explicit [`Secret::expose`].

use std::fmt;

/// What a redacted value prints as.
pub const REDACTED: &str = "***";

/// A credential (password, token) read from configuration. `Debug` and `Display` print `***`;
/// [`Secret::expose`] gives the value to whoever must send it.
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, to hand to the client library that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the credential is the empty string (an unset environment variable, say).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Decodes the %-escapes of URL user information (`p%40ss` → `p@ss`); `None` if an escape is
/// malformed or the result is not UTF-8.
pub fn percent_decode(text: &str) -> Option<Secret> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Secret::from)
}

/// A URL (or a comma-separated list of URLs) fit for a log line: any user information before
/// an `@` in an authority is replaced by `***` (`http://admin:pw@h:80/mi` →
/// `http://***@h:80/mi`). When in doubt it hides too much rather than too little: everything
/// from the start of an authority (after `://`, or the start of the text) up to its last `@`
/// before the next `://` goes.
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    loop {
        // `rest` starts an authority (or is the schemeless start of the text).
        let (region, next) = match rest.find("://") {
            Some(at) => (&rest[..at], Some(at)),
            None => (rest, None),
        };
        match region.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&region[at..]);
            }
            None => out.push_str(region),
        }
        match next {
            Some(at) => {
                out.push_str("://");
                rest = &rest[at + 3..];
            }
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_print_as_stars_but_can_be_read() {
        let secret = Secret::from("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(secret.expose(), "hunter2");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Settings {
            password: Option<Secret>,
        }
        let shown = format!(
            "{:?}",
            Settings {
                password: Some(secret)
            }
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(shown, "Settings { password: Some(***) }");
    }

    #[test]
    fn secrets_deserialize_from_a_string() {
        #[derive(serde::Deserialize)]
        struct Settings {
            password: Secret,
        }
        let settings: Settings = ::config::Config::builder()
            .add_source(::config::File::from_str(
                "password = \"s3cretpw\"",
                ::config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap();
        assert_eq!(settings.password.expose(), "s3cretpw");
    }

    #[test]
    fn urls_lose_their_user_information() {
        for (url, shown) in [
            (
                "http://admin:hunter2@127.0.0.1:18888/mi",
                "http://***@127.0.0.1:18888/mi",
            ),
            ("nats://u:p@h:4222", "nats://***@h:4222"),
            ("nats://token@h:4222", "nats://***@h:4222"),
            ("nats://h:4222", "nats://h:4222"),
            ("udp:127.0.0.1:8080", "udp:127.0.0.1:8080"),
            (
                "nats://a:1@h1:4222,nats://h2:4222,nats://b:2@h3:4222",
                "nats://***@h1:4222,nats://h2:4222,nats://***@h3:4222",
            ),
            ("u:p@h:4222", "***@h:4222"),
            ("nats://u:p@ss@h:4222", "nats://***@h:4222"),
            ("nats://u:pa,ss@h:4222", "nats://***@h:4222"),
            ("", ""),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn redaction_never_keeps_a_password_and_never_panics() {
        let password = "pw,/?#@:x";
        for url in [
            format!("nats://user:{password}@h:4222"),
            format!("http://user:{password}@h/mi"),
            format!("user:{password}@h"),
        ] {
            let shown = redact_url(&url);
            assert!(!shown.contains("pw,/"), "{url} -> {shown}");
            for end in 0..=url.len() {
                if url.is_char_boundary(end) {
                    let _ = redact_url(&url[..end]);
                }
            }
        }
        let _ = redact_url("é://ü@ß://");
    }
}
