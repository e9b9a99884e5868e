//! Graceful shutdown: a `CancellationToken` cancelled on SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Waits until `at`; forever when it is `None` (a `select!` branch for a deadline not set yet).
pub async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A service that keeps serving a while after it is told to stop, not ready meanwhile (so
/// Kubernetes takes it out of its Service's endpoints first).
#[derive(Clone)]
pub struct Draining {
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled `delay` after the stop: when the service really stops.
    pub shutdown: CancellationToken,
}

impl Draining {
    /// Watches `stop` (the signal); `shutdown` is cancelled `delay` after it.
    pub fn after(stop: CancellationToken, delay: std::time::Duration) -> Self {
        let draining = Self {
            stopping: std::sync::Arc::default(),
            shutdown: CancellationToken::new(),
        };
        let this = draining.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = this.shutdown.cancelled() => return,
            }
            this.stopping
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                ?delay,
                "stopping: not ready; serving on for the drain delay"
            );
            tokio::time::sleep(delay).await;
            this.shutdown.cancel();
        });
        draining
    }

    /// Whether the stop was asked (readiness then says "shutting down").
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }
}
