//! Configuration loading: built-in defaults < optional TOML file < environment variables.
//!
//! The file is named by `--config PATH` on the command line or `CALLAPI_CONFIG`; environment
//! variables are `CALLAPI_<KEY>` with `__` between nested keys (`CALLAPI_NATS__URL`).

use std::collections::HashMap;
use std::fmt;

use serde::de::DeserializeOwned;

use crate::secret::{Secret, redact_url};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment did not make a valid configuration.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] ::config::ConfigError),
    /// `--config` was given without a path.
    #[error("--config needs a file path")]
    MissingPath,
}

/// Settings every service shares: where NATS is and how to log in to it.
///
/// `Debug` hides the credentials: `user`, `password` and `token` print `***`, and so does any
/// user information in `url`.
#[derive(Clone, serde::Deserialize)]
#[serde(default)]
pub struct NatsSettings {
    /// NATS server URL(s), comma separated. A URL may carry credentials
    /// (`nats://user:password@host:4222`, or `nats://token@host:4222`); they are taken out of
    /// the URL and sent as if given in `user`/`password` (or `token`).
    pub url: String,
    /// Connection name shown by the NATS server.
    pub name: Option<String>,
    /// User name for NATS user/password authentication (with `password`).
    pub user: Option<Secret>,
    /// Password for NATS user/password authentication (with `user`).
    pub password: Option<Secret>,
    /// Token for NATS token authentication.
    pub token: Option<Secret>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            name: None,
            user: None,
            password: None,
            token: None,
        }
    }
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &redact_url(&self.url))
            .field("name", &self.name)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .finish()
    }
}

/// Finds the config file path from the command line (`--config PATH`) or `CALLAPI_CONFIG`.
pub fn config_path_from_args() -> Result<Option<String>, ConfigError> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(Some).ok_or(ConfigError::MissingPath);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Ok(Some(path.to_owned()));
        }
    }
    Ok(std::env::var("CALLAPI_CONFIG")
        .ok()
        .filter(|p| !p.is_empty()))
}

/// Last key segments of environment variables taken as written, never parsed as a number or
/// a boolean: a password `0123` must not become `123`.
pub const VERBATIM_KEYS: &[&str] = &["password", "token", "user"];

/// Loads a service configuration `T` (whose `Default` gives the built-in defaults).
pub fn load<T>(file: Option<&str>) -> Result<T, ConfigError>
where
    T: DeserializeOwned,
{
    // Variables that are not valid UTF-8 cannot name a setting: they are skipped.
    let env = std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(key, _)| key.starts_with("CALLAPI_"))
        .collect();
    load_with_env(file, env)
}

/// [`load`] with `env` in place of the process environment.
fn load_with_env<T>(file: Option<&str>, env: HashMap<String, String>) -> Result<T, ConfigError>
where
    T: DeserializeOwned,
{
    let (verbatim, parsed): (HashMap<_, _>, HashMap<_, _>) =
        env.into_iter().partition(|(key, _)| {
            key.rsplit("__")
                .next()
                .is_some_and(|last| VERBATIM_KEYS.iter().any(|v| last.eq_ignore_ascii_case(v)))
        });
    let environment = |vars: HashMap<String, String>| {
        ::config::Environment::with_prefix("CALLAPI")
            .prefix_separator("_")
            .separator("__")
            .source(Some(vars))
    };
    let mut builder = ::config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(::config::File::with_name(path).required(true));
    }
    builder = builder
        .add_source(environment(parsed).try_parsing(true))
        .add_source(environment(verbatim));
    Ok(builder.build()?.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Settings {
        nats: NatsSettings,
        hold_ms: u64,
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn credentials_from_the_environment_are_taken_as_written() {
        let settings: Settings = load_with_env(
            None,
            env(&[
                ("CALLAPI_NATS__USER", "007"),
                ("CALLAPI_NATS__PASSWORD", "0123"),
                ("CALLAPI_NATS__TOKEN", "1e5"),
                ("CALLAPI_HOLD_MS", "1500"),
                ("OTHER_NATS__PASSWORD", "ignored"),
            ]),
        )
        .unwrap();
        let expose = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned());
        assert_eq!(expose(&settings.nats.user).as_deref(), Some("007"));
        assert_eq!(expose(&settings.nats.password).as_deref(), Some("0123"));
        assert_eq!(expose(&settings.nats.token).as_deref(), Some("1e5"));
        assert_eq!(settings.hold_ms, 1500);
        assert_eq!(settings.nats.url, NatsSettings::default().url);
    }
}
