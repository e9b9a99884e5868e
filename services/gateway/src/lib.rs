//! gateway: the client-facing edge. WebSocket JSON-RPC 2.0 at `/call-api` (the OpenSIPS
//! call-api protocol); each command becomes a `CommandRequest` on NATS, and the commands
//! service's notifications for this gateway come back on `callapi.v1.notify.*.<gateway_id>.*` and
//! are routed to the connection that started the command.
//!
//! Architecture invariant: only the gateway knows the client protocol.
#![forbid(unsafe_code)]

mod attach;
pub mod auth;
mod connection;
pub mod core;
pub mod limits;
pub mod nodes;
mod outbox;
pub mod params;
pub mod rest;
pub mod rpc;
mod serve;
pub mod sessions;
mod subscribe;
pub mod tokens;
pub mod tracker;
pub mod webhooks;

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
    /// On SIGTERM, how long the gateway goes on serving while `/readyz` answers 503, so load
    /// balancers stop sending it new clients, milliseconds; then it closes every WebSocket
    /// (1001, "connect again") and stops.
    pub drain_delay_ms: u64,
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
    /// Trunks a created call may go out through (`POST /api/sessions` `trunk`), without
    /// `[auth]` (with it, each tenant's come from the tenants file).
    pub trunks: Vec<TrunkConfig>,
    /// Authentication: every client signs in and acts for its tenant. Without it every client
    /// acts for `tenant`, unauthenticated: for development only.
    pub auth: Option<auth::AuthConfig>,
    /// `[command_log]`: commands' notifications kept a while, so a client that reconnected
    /// can re-attach to a running command (`CommandAttach`).
    pub command_log: CommandLogConfig,
}

/// `[command_log]`: the JetStream stream `CALLAPI_COMMAND_LOG` (created by the first gateway
/// that finds it missing; an existing one is left as it is).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandLogConfig {
    /// Keep commands' notifications (off: `CommandAttach` answers that it is unavailable).
    pub enabled: bool,
    /// How long they are kept, seconds (longer than the longest command's deadline).
    pub max_age_secs: u64,
    /// Replicas of the stream when created (3 in a JetStream cluster).
    pub replicas: usize,
    /// Keep it in memory (the default: cheaper; a nats-server restart forgets it) or on disk
    /// (`file`).
    pub storage: LogStorage,
}

/// Where the command log is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStorage {
    /// In nats-server's memory.
    #[default]
    Memory,
    /// On nats-server's disk.
    File,
}

impl Default for CommandLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age_secs: 900,
            replicas: 1,
            storage: LogStorage::Memory,
        }
    }
}

/// A trunk: a name clients use and where OpenSIPS sends the calls that go through it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// Name (1 to 64 characters, unique).
    pub name: String,
    /// Where its calls are sent: a SIP URI of the trunk's gateway, e.g. `sip:203.0.113.7:5060`.
    pub uri: String,
    /// The identities a call through it may rewrite (`rewrite_from`, `rewrite_pai`,
    /// `rewrite_rpi`); absent: all of them.
    #[serde(default)]
    pub rewrites: Option<std::collections::BTreeSet<callapi_kit::tenants::Rewrite>>,
}

impl TrunkConfig {
    /// A tenant's trunks, with the rewrites each allows.
    pub fn of_tenant(tenant: &callapi_kit::tenants::Tenant) -> Vec<Self> {
        tenant
            .trunks
            .iter()
            .map(|t| Self {
                name: t.name.clone(),
                uri: t.uri.clone(),
                rewrites: Some(t.rewrites.clone()),
            })
            .collect()
    }
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
            drain_delay_ms: 0,
            max_commands_per_connection: 32,
            handshake_timeout_ms: 5_000,
            ping_interval_ms: 20_000,
            pong_timeout_ms: 10_000,
            sessions_enabled: true,
            sip_domain: "127.0.0.1".to_owned(),
            rest_outcome_wait_ms: 2_000,
            trunks: Vec::new(),
            auth: None,
            command_log: CommandLogConfig::default(),
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
    /// Sign-in and token checks (`None` without `[auth]`).
    pub auth: Option<Arc<auth::Auth>>,
    /// Each tenant's usage of its limits on this gateway.
    pub limits: limits::TenantLimits,
    /// The NATS connection (call event feeds read the stream through it).
    pub nats: async_nats::Client,
    /// Each tenant's live call events, shared by its subscribers on this gateway.
    pub feeds: subscribe::Hub,
    /// Cancelled when the gateway stops.
    pub shutdown: CancellationToken,
    /// HTTP connections and WebSocket clients, waited for on shutdown.
    pub tasks: TaskTracker,
}

/// Frames larger than this are refused by the WebSocket layer itself (connection closed);
/// below it, messages over `max_message_bytes` get a JSON-RPC error and the connection stays.
const HARD_FRAME_LIMIT: usize = 1024 * 1024;

/// Runs the gateway until `stop`; `listener` lets tests pass a pre-bound socket.
///
/// On `stop`, `/readyz` answers 503 at once and the gateway serves on for `drain_delay_ms`;
/// then it accepts nothing more, closes every WebSocket with 1001 and a reason (the client
/// connects again, to another gateway, and re-attaches to its commands with `CommandAttach`),
/// and lets HTTP exchanges in flight finish.
pub async fn run(
    config: Config,
    stop: CancellationToken,
    listener: Option<TcpListener>,
) -> Result<(), Error> {
    config.check()?;
    let draining =
        callapi_kit::shutdown::Draining::after(stop, Duration::from_millis(config.drain_delay_ms));
    let shutdown = draining.shutdown.clone();
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
    let commands = if config.command_log.enabled {
        let jetstream = async_nats::jetstream::new(client.clone());
        attach::ensure_stream(&jetstream, &config.command_log)
            .await
            .map_err(|e| {
                Error::Nats(format!(
                    "{e} (the command log needs JetStream; command_log.enabled = false runs without it)"
                ))
            })?;
        commands.with_command_log()
    } else {
        commands
    };
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
    let auth = match &config.auth {
        Some(auth_config) => {
            let jetstream = async_nats::jetstream::new(client.clone());
            Some(
                auth::Auth::start(auth_config, &jetstream, shutdown.clone())
                    .await
                    .map_err(|e| Error::Config(format!("{e} (authentication needs JetStream)")))?,
            )
        }
        None => {
            tracing::warn!(
                tenant = %config.tenant,
                "no [auth] configured: every client acts for this tenant unauthenticated (development only)"
            );
            None
        }
    };
    // Every gateway takes part in delivering the tenants' webhooks.
    if let Some(auth) = &auth {
        webhooks::start(
            client.clone(),
            auth.watch_tenants(),
            sessions.clone(),
            shutdown.clone(),
        );
    }
    // With tenants, each command goes to the node its tenant's policy or its call's dialog
    // names.
    let commands = match &auth {
        Some(auth) => commands.with_nodes(
            nodes::Nodes::start(&client, auth.clone(), sessions.clone(), shutdown.clone())
                .await
                .map_err(Error::Nats)?,
        ),
        None => commands,
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
        auth,
        limits: limits::TenantLimits::default(),
        nats: client.clone(),
        feeds: subscribe::Hub::default(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    let outcome_wait = Duration::from_millis(shared.config.rest_outcome_wait_ms);
    let rest = Arc::new(match &shared.auth {
        Some(auth) => rest::RestState::with_auth(
            shared.commands.clone(),
            shared.sessions.clone(),
            outcome_wait,
            auth.clone(),
            shared.limits.clone(),
        ),
        None => rest::RestState::open(rest::Rest::new(
            shared.commands.clone(),
            shared.sessions.clone(),
            &shared.config.tenant,
            &shared.config.sip_domain,
            outcome_wait,
            shared.config.trunks.clone(),
        )),
    });
    let nats = client.clone();
    let readiness: callapi_kit::ops::Readiness = Arc::new(move || {
        let mut reasons = callapi_kit::ops::nats_connected(&nats);
        if draining.stopping() {
            reasons.push("shutting down".to_owned());
        }
        reasons
    });
    let mut app = Router::new()
        .route("/call-api", get(upgrade))
        .with_state(shared.clone())
        .merge(callapi_kit::ops::routes(readiness))
        .merge(rest::router(rest).layer(axum::extract::DefaultBodyLimit::max(REST_BODY_LIMIT)));
    if let Some(auth) = &shared.auth {
        app = app.merge(
            auth::routes(auth.clone())
                .layer(axum::extract::DefaultBodyLimit::max(LOGIN_BODY_LIMIT)),
        );
    }
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
    callapi_kit::nats::close(&client, Duration::from_secs(5)).await;
    Ok(())
}

/// Largest REST request body accepted (413 past it).
const REST_BODY_LIMIT: usize = 64 * 1024;
/// Largest sign-in request body accepted.
const LOGIN_BODY_LIMIT: usize = 8 * 1024;

/// Initial WebSocket read buffer of each connection.
const READ_BUFFER: usize = 2 * 1024;
/// Frames are written to the socket once this many bytes wait, or at a flush.
const WRITE_BUFFER: usize = 16 * 1024;

/// The `access_token` query parameter (browsers cannot set headers on a WebSocket).
#[derive(serde::Deserialize, Default)]
struct UpgradeQuery {
    #[serde(default)]
    access_token: Option<String>,
}

/// Who a WebSocket client is, checked before the upgrade: a 401 (no or bad token) or a 403 (an
/// `Origin` not allowed) answers the HTTP request instead.
fn admit(
    shared: &Shared,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Result<connection::Access, auth::Refusal> {
    let Some(auth) = &shared.auth else {
        return Ok(connection::Access::open(&shared.config));
    };
    let origin = headers
        .get(axum::http::header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("?"));
    if !auth.origin_allowed(origin) {
        tracing::info!(
            origin = origin.unwrap_or(""),
            "WebSocket from an origin not allowed refused"
        );
        return Err(auth::Refusal::forbidden(match origin {
            Some(_) => "this Origin is not allowed (auth.allowed_origins)",
            None => "an Origin header is required (auth.require_origin)",
        }));
    }
    let from_query = query
        .and_then(|q| serde_urlencoded::from_str::<UpgradeQuery>(q).ok())
        .and_then(|q| q.access_token);
    let token = auth::bearer(headers)
        .map(str::to_owned)
        .or(from_query)
        .ok_or(auth::AuthError::Missing)?;
    let identity = auth.authenticate(&token, callapi_kit::unix_ms() / 1000)?;
    let tenants = auth.tenants();
    let tenant = tenants.get(&identity.tenant).ok_or(auth::AuthError::Gone)?;
    let slot = shared
        .limits
        .open_connection(&tenant.id, tenant.limits.websocket_connections)
        .map_err(|_| {
            auth::Refusal::too_many(
                "TOO_MANY_CONNECTIONS",
                format!(
                    "the tenant already has its {} WebSocket connections open on this gateway",
                    tenant.limits.websocket_connections
                ),
                None,
            )
        })?;
    Ok(connection::Access::of(&identity, tenant, slot))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    let access = match admit(&shared, &headers, query.as_deref()) {
        Ok(access) => access,
        Err(refused) => return refused.into_response(),
    };
    let tracked = shared.tasks.token();
    // A small read buffer: most connections idle, requests are small, and it grows for a larger
    // message anyway. The write buffer is made at the first write; frames queued together
    // are written together (the writer flushes when its queue is empty).
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        .on_upgrade(move |socket| async move {
            connection::serve(socket, shared, access).await;
            drop(tracked);
        })
        .into_response()
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
