//! Configuration loading: built-in defaults < optional TOML file < environment variables.
//!
//! The file is named by `--config PATH` on the command line or `CALLAPI_CONFIG`; environment
//! variables are `CALLAPI_<KEY>` with `__` between nested keys (`CALLAPI_NATS__URL`).

use serde::de::DeserializeOwned;

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

/// Settings every service shares: where NATS is.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct NatsSettings {
    /// NATS server URL(s), comma separated.
    pub url: String,
    /// Connection name shown by the NATS server.
    pub name: Option<String>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            name: None,
        }
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

/// Loads a service configuration `T` (whose `Default` gives the built-in defaults).
pub fn load<T>(file: Option<&str>) -> Result<T, ConfigError>
where
    T: DeserializeOwned,
{
    let mut builder = ::config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(::config::File::with_name(path).required(true));
    }
    builder = builder.add_source(
        ::config::Environment::with_prefix("CALLAPI")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true),
    );
    Ok(builder.build()?.try_deserialize()?)
}
