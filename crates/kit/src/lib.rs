//! Shared plumbing of the callapi services: configuration loading, tracing set-up, NATS
//! connection, shutdown signal and the NATS subject scheme. Nothing here knows call flows.
#![forbid(unsafe_code)]

pub mod bus;
pub mod calls;
pub mod config;
pub mod mi;
pub mod nats;
pub mod ops;
pub mod secret;
pub mod shutdown;
pub mod sip_uri;
pub mod subjects;
pub mod telemetry;
pub mod tenants;
pub mod validate;

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Set once the service announced it is ready: before that, a stop signal ends it at once.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints the one-line readiness report (`READY key=value ...`) that scripts and tests wait for.
pub fn announce_ready(details: &str) {
    use std::io::Write;
    STARTED.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the service down.
    let _ = writeln!(out, "READY {details}");
    let _ = out.flush();
}

/// The tokio runtime of a service: `TOKIO_WORKER_THREADS` worker threads when that is set
/// (the operator's knob), else `default_workers`, else one per core (tokio's default).
///
/// commands, proxy-connector and event-ingest default to one worker: each uses a fraction of
/// a core at thousands of calls a second, and fewer threads mean fewer cross-thread wake-ups
/// per message (docs/performance.md); the gateway, which serves every client socket, keeps one
/// per core.
pub fn runtime(default_workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let from_env = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .filter(|workers| *workers > 0);
    if let Some(workers) = from_env.or(default_workers) {
        builder.worker_threads(workers);
    }
    builder.build()
}

/// [`service_main`] on the service's [`runtime`]: the whole of a service binary's `main`.
pub fn start_service<C, F, Fut, E>(
    service: &str,
    default_workers: Option<usize>,
    run: F,
) -> std::process::ExitCode
where
    C: serde::de::DeserializeOwned,
    F: FnOnce(C, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    // Outside the runtime: the trace exporter's HTTP client blocks, when made and when dropped.
    let _telemetry = telemetry::init(service);
    match runtime(default_workers) {
        Ok(runtime) => runtime.block_on(service_main(service, run)),
        Err(err) => {
            eprintln!("{service}: cannot start the async runtime: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole `main` of a service after [`telemetry::init`]: configuration (defaults <
/// `--config` file < env), then `run(config, shutdown)` until SIGTERM/SIGINT. Returns the
/// process exit code.
pub async fn service_main<C, F, Fut, E>(service: &str, run: F) -> std::process::ExitCode
where
    C: serde::de::DeserializeOwned,
    F: FnOnce(C, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let config =
        match config::config_path_from_args().and_then(|path| config::load::<C>(path.as_deref())) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(%err, "cannot load configuration");
                return std::process::ExitCode::FAILURE;
            }
        };
    let stop = shutdown::on_signal();
    // A service still starting (e.g. waiting for NATS) has nothing in flight: a stop signal
    // then ends it at once rather than after the connection it may never get.
    let stopped_while_starting = async {
        stop.cancelled().await;
        if STARTED.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        outcome = run(config, stop.clone()) => outcome,
        () = stopped_while_starting => {
            tracing::info!("stopped while starting");
            return std::process::ExitCode::SUCCESS;
        }
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "{service} failed");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_service_runtime_has_the_workers_asked_for() {
        // TOKIO_WORKER_THREADS, when the environment sets it, wins over the service's default.
        let expected = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(1);
        let runtime = super::runtime(Some(1)).expect("runtime");
        assert_eq!(runtime.metrics().num_workers(), expected);
        assert_eq!(runtime.block_on(async { 40 + 2 }), 42);
    }
}
