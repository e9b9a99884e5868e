//! Tracing set-up: human-readable logs on stderr, filtered by `RUST_LOG` (default `info`).

/// Installs the global tracing subscriber; later calls are no-ops.
pub fn init(service: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
}
