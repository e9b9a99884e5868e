//! gateway: the client-facing edge. WebSocket JSON-RPC 2.0 at `/call-api` (the OpenSIPS
//! call-api protocol); each command becomes a `CommandRequest` on NATS, and the commands
//! service's notifications for this gateway come back on `callapi.v1.notify.*.<gateway_id>` and
//! are routed to the connection that started the command.
//!
//! Architecture invariant: only the gateway knows the client protocol.
#![forbid(unsafe_code)]

mod connection;
mod hub;
pub mod rpc;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use callapi_kit::config::NatsSettings;
use callapi_kit::subjects;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The gateway configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where NATS is.
    pub nats: NatsSettings,
    /// Address to listen on.
    pub listen: String,
    /// This instance's id in notification subjects (default: random).
    pub gateway_id: Option<String>,
    /// Tenant of every client (until authentication names it).
    pub tenant: String,
    /// Largest request accepted, bytes; larger ones get -32600.
    pub max_message_bytes: usize,
    /// How long to wait for a commands replica to take a command, milliseconds.
    pub command_ack_timeout_ms: u64,
    /// Notifications queued per connection before a too-slow client is disconnected.
    pub connection_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            listen: "127.0.0.1:5059".to_owned(),
            gateway_id: None,
            tenant: "default".to_owned(),
            max_message_bytes: 64 * 1024,
            command_ack_timeout_ms: 5_000,
            connection_queue: 1024,
        }
    }
}

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS could not be used.
    #[error("NATS: {0}")]
    Nats(String),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// What every connection handler shares.
pub(crate) struct Shared {
    pub client: async_nats::Client,
    pub config: Config,
    pub notify_subject: String,
    pub hub: hub::Hub,
    pub shutdown: CancellationToken,
}

/// Frames larger than this are refused by the WebSocket layer itself (connection closed);
/// below it, messages over `max_message_bytes` get a JSON-RPC error and the connection stays.
const HARD_FRAME_LIMIT: usize = 1024 * 1024;

/// Runs the gateway until `shutdown`; `listener` lets tests pass a pre-bound socket.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    listener: Option<TcpListener>,
) -> Result<(), Error> {
    let gateway_id = config
        .gateway_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    if !subjects::is_token(&gateway_id) || !subjects::is_token(&config.tenant) {
        return Err(Error::Config(
            "gateway_id and tenant must be letters, digits, '-' or '_'".to_owned(),
        ));
    }
    let client = callapi_kit::nats::connect(&config.nats, "gateway")
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let notifications = client
        .subscribe(subjects::notify_for_gateway(&gateway_id))
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let hub = hub::Hub::default();
    let dispatcher = tokio::spawn(hub.clone().dispatch(notifications));
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind(config.listen.as_str()).await?,
    };
    let local = listener.local_addr()?;
    let shared = Arc::new(Shared {
        notify_subject: subjects::notify(&config.tenant, &gateway_id),
        client: client.clone(),
        config,
        hub,
        shutdown: shutdown.clone(),
    });
    let app = Router::new()
        .route("/call-api", get(upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared);
    callapi_kit::announce_ready(&format!("listen={local} gateway_id={gateway_id}"));
    tracing::info!(%local, %gateway_id, "WebSocket JSON-RPC at ws://{local}/call-api");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    dispatcher.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    Ok(())
}

async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        .on_upgrade(move |socket| connection::serve(socket, shared))
}
