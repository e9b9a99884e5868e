//! Shared plumbing of the callapi services: configuration loading, tracing set-up, NATS
//! connection, shutdown signal and the NATS subject scheme. Nothing here knows call flows.
#![forbid(unsafe_code)]

pub mod bus;
pub mod calls;
pub mod config;
pub mod mi;
pub mod nats;
pub mod secret;
pub mod shutdown;
pub mod sip_uri;
pub mod subjects;
pub mod telemetry;
pub mod validate;

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Prints the one-line readiness report (`READY key=value ...`) that scripts and tests wait for.
pub fn announce_ready(details: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the service down.
    let _ = writeln!(out, "READY {details}");
    let _ = out.flush();
}

/// The whole `main` of a service: tracing, configuration (defaults < `--config` file < env),
/// then `run(config, shutdown)` until SIGTERM/SIGINT. Returns the process exit code.
pub async fn service_main<C, F, Fut, E>(service: &str, run: F) -> std::process::ExitCode
where
    C: serde::de::DeserializeOwned,
    F: FnOnce(C, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    telemetry::init(service);
    let config =
        match config::config_path_from_args().and_then(|path| config::load::<C>(path.as_deref())) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(%err, "cannot load configuration");
                return std::process::ExitCode::FAILURE;
            }
        };
    match run(config, shutdown::on_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "{service} failed");
            std::process::ExitCode::FAILURE
        }
    }
}
