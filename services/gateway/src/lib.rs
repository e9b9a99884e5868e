//! gateway: the client-facing edge. WebSocket JSON-RPC 2.0 at `/call-api` (the OpenSIPS
//! call-api protocol); each command becomes a `CommandRequest` on NATS, and the commands
//! service's notifications for this gateway come back on `callapi.v1.notify.*.<gateway_id>` and
//! are routed to the connection that started the command.
//!
//! Architecture invariant: only the gateway knows the client protocol.
#![forbid(unsafe_code)]

mod connection;
pub mod auth;
pub mod core;
mod outbox;
pub mod params;
pub mod rest;
pub mod rpc;
mod serve;
pub mod sessions;
pub mod tokens;
pub mod tracker;

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
use tokio_util::task::TaskTracker;

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
    /// Messages queued per connection before a too-slow client is disconnected.
    pub connection_queue: usize,
    /// Bytes queued per connection before a too-slow client is disconnected.
    pub connection_queue_bytes: usize,
    /// A write the client does not take within this long drops it, milliseconds.
    pub write_timeout_ms: u64,
    /// Commands in flight per connection; past it a request gets -32003.
    pub max_commands_per_connection: usize,
    /// Time from accepting a TCP connection until the WebSocket upgrade is done (or the HTTP
    /// request answered), milliseconds; then the connection is closed.
    pub handshake_timeout_ms: u64,
    /// A WebSocket peer silent this long is pinged, milliseconds (0: never).
    pub ping_interval_ms: u64,
    /// A pinged peer that sends nothing (no pong, no other frame) this long is dropped,
    /// milliseconds.
    pub pong_timeout_ms: u64,
    /// Follow the session store and answer `CallList` / `CallGet` (needs JetStream).
    pub sessions_enabled: bool,
    /// SIP domain that numbers given to the REST API (`caller: "1001"`) become URIs in.
    pub sip_domain: String,
    /// How long a REST control request waits for its command's first notification (so a
    /// failure known at once is its answer), milliseconds.
    pub rest_outcome_wait_ms: u64,
    /// Trunks a created call may go out through (`POST /api/sessions` `trunk`).
    pub trunks: Vec<TrunkConfig>,
}

/// A trunk: a name clients use and where OpenSIPS sends the calls that go through it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// Name (1 to 64 characters, unique).
    pub name: String,
    /// Where its calls are sent: a SIP URI of the trunk's gateway, e.g. `sip:203.0.113.7:5060`.
    pub uri: String,
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
            connection_queue_bytes: 1024 * 1024,
            write_timeout_ms: 10_000,
            max_commands_per_connection: 32,
            handshake_timeout_ms: 5_000,
            ping_interval_ms: 20_000,
            pong_timeout_ms: 10_000,
            sessions_enabled: true,
            sip_domain: "127.0.0.1".to_owned(),
            rest_outcome_wait_ms: 2_000,
            trunks: Vec::new(),
        }
    }
}

impl Config {
    /// Refuses settings the gateway cannot work with.
    pub fn check(&self) -> Result<(), Error> {
        let zero = [
            ("max_message_bytes", self.max_message_bytes == 0),
            ("connection_queue_bytes", self.connection_queue_bytes == 0),
            ("write_timeout_ms", self.write_timeout_ms == 0),
            (
                "max_commands_per_connection",
                self.max_commands_per_connection == 0,
            ),
            ("handshake_timeout_ms", self.handshake_timeout_ms == 0),
            ("pong_timeout_ms", self.pong_timeout_ms == 0),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(Error::Config(format!("{key} must be greater than 0")));
        }
        for (n, trunk) in self.trunks.iter().enumerate() {
            if !(1..=64).contains(&trunk.name.chars().count())
                || trunk.name.chars().any(char::is_control)
            {
                return Err(Error::Config(format!(
                    "trunks[{n}].name must be 1 to 64 characters"
                )));
            }
            if self.trunks[..n].iter().any(|t| t.name == trunk.name) {
                return Err(Error::Config(format!(
                    "trunks[{n}]: a second trunk called {:?}",
                    trunk.name
                )));
            }
            if !callapi_kit::validate::is_sip_scheme(&trunk.uri) {
                return Err(Error::Config(format!(
                    "trunks[{n}].uri must be a sip: or sips: URI"
                )));
            }
            callapi_kit::validate::sip_uri(&trunk.uri)
                .map_err(|why| Error::Config(format!("trunks[{n}].uri {why}")))?;
        }
        Ok(())
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
    /// The configuration.
    pub config: Config,
    /// Submits commands and routes their notifications to the clients.
    pub commands: core::CommandClient,
    /// The live view of every active call (`None` when `sessions_enabled` is off).
    pub sessions: Option<sessions::SessionView>,
    /// Cancelled when the gateway stops.
    pub shutdown: CancellationToken,
    /// HTTP connections and WebSocket clients, waited for on shutdown.
    pub tasks: TaskTracker,
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
    config.check()?;
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
    let commands = core::CommandClient::new(
        client.clone(),
        &gateway_id,
        Duration::from_millis(config.command_ack_timeout_ms),
    );
    let dispatcher = tokio::spawn(commands.clone().route_notifications(notifications));
    let sessions = if config.sessions_enabled {
        let jetstream = async_nats::jetstream::new(client.clone());
        Some(
            sessions::SessionView::start(&jetstream, shutdown.clone())
                .await
                .map_err(|e| {
                    Error::Nats(format!(
                        "{e} (the live view of calls needs JetStream on nats-server 2.11 or later; sessions_enabled = false runs without it)"
                    ))
                })?,
        )
    } else {
        None
    };
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind(config.listen.as_str()).await?,
    };
    let local = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config,
        commands,
        sessions,
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    let rest = Arc::new(rest::Rest::new(
        shared.commands.clone(),
        shared.sessions.clone(),
        &shared.config.tenant,
        &shared.config.sip_domain,
        Duration::from_millis(shared.config.rest_outcome_wait_ms),
        shared.config.trunks.clone(),
    ));
    let app = Router::new()
        .route("/call-api", get(upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared.clone())
        .merge(rest::router(rest).layer(axum::extract::DefaultBodyLimit::max(REST_BODY_LIMIT)));
    callapi_kit::announce_ready(&format!("listen={local} gateway_id={gateway_id}"));
    tracing::info!(%local, %gateway_id, "WebSocket JSON-RPC at ws://{local}/call-api");
    serve::accept_loop(listener, app, &shared).await;
    // Let clients get their close frames before NATS goes.
    shared.tasks.close();
    let grace = Duration::from_millis(shared.config.write_timeout_ms)
        .saturating_add(Duration::from_secs(1));
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
    dispatcher.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    Ok(())
}

/// Largest REST request body accepted (413 past it).
const REST_BODY_LIMIT: usize = 64 * 1024;

/// Initial WebSocket read buffer of each connection.
const READ_BUFFER: usize = 2 * 1024;
/// Frames are written to the socket once this many bytes wait, or at a flush.
const WRITE_BUFFER: usize = 16 * 1024;

async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let tracked = shared.tasks.token();
    // A small read buffer: most connections idle, requests are small, and it grows for a larger
    // message anyway. The write buffer is made at the first write; frames queued together
    // are written together (the writer flushes when its queue is empty).
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        .on_upgrade(move |socket| async move {
            connection::serve(socket, shared).await;
            drop(tracked);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_refused() {
        assert!(Config::default().check().is_ok());
        let no_pings = Config {
            ping_interval_ms: 0,
            ..Config::default()
        };
        assert!(no_pings.check().is_ok());
        for config in [
            Config {
                handshake_timeout_ms: 0,
                ..Config::default()
            },
            Config {
                max_commands_per_connection: 0,
                ..Config::default()
            },
            Config {
                connection_queue_bytes: 0,
                ..Config::default()
            },
            Config {
                write_timeout_ms: 0,
                ..Config::default()
            },
        ] {
            assert!(
                matches!(config.check(), Err(Error::Config(_))),
                "{config:?}"
            );
        }
    }
}
