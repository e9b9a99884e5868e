//! NATS connection with retry on first connect, so services may start before the server.
//!
//! Credentials come from `nats.user`/`nats.password`, `nats.token`, or the user information of
//! the URLs (`nats://user:password@host`, `nats://token@host`). They are taken out of the URLs
//! before async-nats sees them (it would not send them, and its debug logging prints the URLs)
//! and handed to it as connect options; nothing here logs them.

use crate::config::NatsSettings;
use crate::secret::{Secret, redact_url};

/// Why a NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The NATS settings do not make sense.
    #[error("NATS settings: {0}")]
    Settings(&'static str),
    /// async-nats could not connect.
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
}

/// How to log in to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credentials {
    /// No authentication.
    None,
    /// User and password.
    UserPassword(Secret, Secret),
    /// A token.
    Token(Secret),
}

/// The server URLs without user information, and the credentials to log in with.
#[derive(Debug, PartialEq, Eq)]
struct Prepared {
    urls: Vec<String>,
    credentials: Credentials,
}

/// Connects to NATS; keeps retrying until the server is reachable.
pub async fn connect(
    settings: &NatsSettings,
    service: &str,
) -> Result<async_nats::Client, NatsError> {
    Ok(connect_watched(settings, service).await?.0)
}

/// Closes `client` at shutdown: what was published is flushed to the server first (a drain
/// alone was seen to lose a reply published just before it), then its subscriptions drained;
/// each step waits at most `within`.
pub async fn close(client: &async_nats::Client, within: std::time::Duration) {
    let _ = tokio::time::timeout(within, client.flush()).await;
    let _ = tokio::time::timeout(within, client.drain()).await;
}

/// Like [`connect`], also giving the number of times the connection was lost so far: messages
/// published meanwhile (replies, events) may be gone, and whoever waits for one should know.
pub async fn connect_watched(
    settings: &NatsSettings,
    service: &str,
) -> Result<(async_nats::Client, tokio::sync::watch::Receiver<u64>), NatsError> {
    let prepared = prepare(settings)?;
    let name = settings.name.clone().unwrap_or_else(|| service.to_owned());
    let (disconnects, watch) = tokio::sync::watch::channel(0u64);
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .event_callback(move |event| {
            match event {
                async_nats::Event::Disconnected => {
                    metrics::counter!("callapi_nats_disconnects_total").increment(1);
                    disconnects.send_modify(|count| *count += 1);
                }
                async_nats::Event::Connected if *disconnects.borrow() > 0 => {
                    metrics::counter!("callapi_nats_reconnects_total").increment(1);
                }
                async_nats::Event::SlowConsumer(_) => {
                    metrics::counter!("callapi_nats_slow_consumers_total").increment(1);
                }
                _ => {}
            }
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS slow consumer: messages were dropped")
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        });
    let auth = match &prepared.credentials {
        Credentials::None => "none",
        Credentials::UserPassword(user, password) => {
            options =
                options.user_and_password(user.expose().to_owned(), password.expose().to_owned());
            "user/password"
        }
        Credentials::Token(token) => {
            options = options.token(token.expose().to_owned());
            "token"
        }
    };
    tracing::info!(url = %redact_url(&settings.url), auth, "connecting to NATS");
    let client = options.connect(prepared.urls.as_slice()).await?;
    Ok((client, watch))
}

/// Splits the URL list, takes credentials out of the URLs and picks the credentials to use:
/// explicit settings win over those in the URLs.
fn prepare(settings: &NatsSettings) -> Result<Prepared, NatsError> {
    let mut urls = Vec::new();
    let mut from_urls: Option<Credentials> = None;
    for url in settings
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        let (bare, credentials) = split_userinfo(url)?;
        urls.push(bare);
        if let Some(credentials) = credentials {
            match &from_urls {
                Some(seen) if *seen != credentials => {
                    return Err(NatsError::Settings(
                        "the NATS URLs carry different credentials",
                    ));
                }
                _ => from_urls = Some(credentials),
            }
        }
    }
    if urls.is_empty() {
        return Err(NatsError::Settings("nats.url names no server"));
    }
    let set = |s: &Option<Secret>| s.clone().filter(|s| !s.is_empty());
    let explicit = match (
        set(&settings.user),
        set(&settings.password),
        set(&settings.token),
    ) {
        (None, None, None) => None,
        (Some(user), Some(password), None) => Some(Credentials::UserPassword(user, password)),
        (None, None, Some(token)) => Some(Credentials::Token(token)),
        (Some(_), None, None) | (None, Some(_), None) => {
            return Err(NatsError::Settings(
                "nats.user and nats.password must be given together",
            ));
        }
        (_, _, Some(_)) => {
            return Err(NatsError::Settings(
                "give either nats.token or nats.user and nats.password, not both",
            ));
        }
    };
    Ok(Prepared {
        urls,
        credentials: explicit.or(from_urls).unwrap_or(Credentials::None),
    })
}

/// `nats://user:pw@host:4222` → (`nats://host:4222`, user/password); `nats://tok@host` → token.
fn split_userinfo(url: &str) -> Result<(String, Option<Credentials>), NatsError> {
    let start = url.find("://").map_or(0, |at| at + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |at| start + at);
    let Some(at) = url[start..end].rfind('@').map(|at| start + at) else {
        return Ok((url.to_owned(), None));
    };
    let bare = format!("{}{}", &url[..start], &url[at + 1..]);
    let credentials = match url[start..at].split_once(':') {
        Some((user, password)) => {
            Credentials::UserPassword(percent_decode(user)?, percent_decode(password)?)
        }
        None => Credentials::Token(percent_decode(&url[start..at])?),
    };
    Ok((bare, Some(credentials)))
}

/// Decodes the %-escapes of URL user information.
fn percent_decode(text: &str) -> Result<Secret, NatsError> {
    crate::secret::percent_decode(text).ok_or(NatsError::Settings(
        "bad %-escape in the credentials of nats.url",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> NatsSettings {
        NatsSettings {
            url: url.to_owned(),
            ..NatsSettings::default()
        }
    }

    fn user_password(user: &str, password: &str) -> Credentials {
        Credentials::UserPassword(user.into(), password.into())
    }

    #[test]
    fn credentials_are_taken_out_of_the_urls() {
        let prepared = prepare(&settings("nats://callapi:s3cret%40pw@127.0.0.1:4222")).unwrap();
        assert_eq!(prepared.urls, ["nats://127.0.0.1:4222"]);
        assert_eq!(prepared.credentials, user_password("callapi", "s3cret@pw"));
        let prepared = prepare(&settings("nats://tok@h:4222")).unwrap();
        assert_eq!(prepared.urls, ["nats://h:4222"]);
        assert_eq!(prepared.credentials, Credentials::Token("tok".into()));
        let prepared = prepare(&settings("u:p@h:4222")).unwrap();
        assert_eq!(prepared.urls, ["h:4222"]);
        assert_eq!(prepared.credentials, user_password("u", "p"));
    }

    #[test]
    fn a_list_of_urls_is_split() {
        let prepared = prepare(&settings(
            "nats://u:p@a:4222, nats://b:4222 ,nats://u:p@c:4222",
        ))
        .unwrap();
        assert_eq!(
            prepared.urls,
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
        assert_eq!(prepared.credentials, user_password("u", "p"));
        assert!(prepare(&settings("nats://u:p@a,nats://v:q@b")).is_err());
        assert!(prepare(&settings(" , ")).is_err());
    }

    #[test]
    fn explicit_settings_win_and_must_be_complete() {
        let mut s = settings("nats://url:cred@h");
        s.user = Some("callapi".into());
        s.password = Some("pw".into());
        assert_eq!(
            prepare(&s).unwrap().credentials,
            user_password("callapi", "pw")
        );
        s.password = None;
        assert!(prepare(&s).is_err());
        s.password = Some(Secret::from(""));
        assert!(prepare(&s).is_err());
        s.user = None;
        s.token = Some("tok".into());
        assert_eq!(
            prepare(&s).unwrap().credentials,
            Credentials::Token("tok".into())
        );
        s.user = Some("callapi".into());
        s.password = Some("pw".into());
        assert!(prepare(&s).is_err());
        assert_eq!(
            prepare(&settings("nats://h:4222")).unwrap().credentials,
            Credentials::None
        );
    }

    #[test]
    fn bad_escapes_in_credentials_are_refused_without_panicking() {
        for url in [
            "nats://u:%zz@h",
            "nats://u:%4@h",
            "nats://u:%@h",
            "nats://%ff:p@h",
        ] {
            assert!(prepare(&settings(url)).is_err(), "{url}");
        }
    }

    #[test]
    fn settings_debug_shows_no_credentials() {
        let mut s = settings("nats://callapi:s3cretpw@h:4222");
        s.password = Some("hunter2".into());
        s.token = Some("tok3n".into());
        let shown = format!("{s:?}");
        for secret in ["s3cretpw", "hunter2", "tok3n"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("nats://***@h:4222"), "{shown}");
    }
}
