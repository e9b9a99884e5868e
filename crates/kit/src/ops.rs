//! The operations endpoint of a service (`ops_listen`): `GET /healthz` (the process is alive:
//! 200 `ok`), `GET /readyz` (it can do its job: 200 `ready`, or 503 with one line per reason
//! it cannot) and `GET /metrics` (Prometheus text format). Kubernetes probes the first two; a
//! Prometheus server scrapes the third.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What keeps a service from being ready: one short reason each (none: ready).
pub type Readiness = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's Prometheus recorder (once; later calls return the same handle), so
/// the `metrics` macros anywhere in the process are collected.
pub fn metrics() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            match metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ])
                .and_then(|builder| builder.install_recorder())
            {
                Ok(handle) => Some(handle),
                Err(err) => {
                    tracing::warn!(%err, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Named conditions a service keeps up to date (a node reachable, a node subscribed…), for its
/// readiness. Cheap to clone.
#[derive(Clone, Default)]
pub struct Checks(Arc<std::sync::Mutex<std::collections::BTreeMap<String, bool>>>);

impl Checks {
    /// Records whether `name` holds.
    pub fn set(&self, name: &str, holds: bool) {
        if let Ok(mut checks) = self.0.lock() {
            checks.insert(name.to_owned(), holds);
        }
    }

    /// The names that do not hold now.
    pub fn failing(&self) -> Vec<String> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |checks| {
                checks
                    .iter()
                    .filter(|(_, holds)| !**holds)
                    .map(|(name, _)| name.clone())
                    .collect()
            },
        )
    }

    /// Whether at least one holds (false before any was recorded).
    pub fn any_holds(&self) -> bool {
        self.0
            .lock()
            .is_ok_and(|checks| checks.values().any(|h| *h))
    }
}

/// The readiness every service shares: its NATS connection is up.
pub fn nats_connected(client: &async_nats::Client) -> Vec<String> {
    if client.connection_state() == async_nats::connection::State::Connected {
        Vec::new()
    } else {
        vec!["not connected to NATS".to_owned()]
    }
}

/// The routes, for a service that serves them on a listener of its own.
pub fn routes(readiness: Readiness) -> axum::Router {
    let handle = metrics();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let reasons = readiness();
                    if reasons.is_empty() {
                        (StatusCode::OK, "ready\n".to_owned()).into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready:\n{}\n", reasons.join("\n")),
                        )
                            .into_response()
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    match handle {
                        Some(handle) => (
                            [("content-type", "text/plain; version=0.0.4")],
                            handle.render(),
                        )
                            .into_response(),
                        None => (StatusCode::SERVICE_UNAVAILABLE, "no metrics\n").into_response(),
                    }
                }
            }),
        )
}

/// Serves the routes on `listen`, if one is configured, until `shutdown`; returns the READY
/// line's field for it (`ops=<address bound>`), or nothing.
pub async fn serve_configured(
    listen: Option<&str>,
    readiness: impl FnOnce() -> Readiness,
    shutdown: &CancellationToken,
) -> Result<Option<String>, String> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let bound = serve(listen, readiness(), shutdown.clone()).await?;
    Ok(Some(format!("ops={bound}")))
}

/// Serves the routes on `listen` until `shutdown`; returns the address bound.
pub async fn serve(
    listen: &str,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("ops_listen {listen}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("ops_listen {listen}: {e}"))?;
    let app = routes(readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::warn!(%err, "operations endpoint stopped");
        }
    });
    Ok(bound)
}
