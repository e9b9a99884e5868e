//! One WebSocket client: reads requests, starts commands, writes replies and notifications.
//!
//! A single writer task owns the socket's sending half, fed by an [`Outbox`] that never blocks:
//! a client that falls too far behind, or does not take a write within `write_timeout_ms`, is
//! dropped. The writer also keeps each command's order: notifications that arrive before the
//! command's `Started` reply is written are held back and written right after it. The reader
//! pings a silent peer and drops it when nothing comes back.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use bytes::Bytes;
use callapi_proto::v1::command_request::Command;
use callapi_proto::v1::notification;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::core::{NotificationSink, Origin, SubmitError};
use crate::outbox::{self, Charge, Inbox, Outbox, Outgoing};
use crate::params::{self, SessionKey};
use crate::rpc::{self, CommandCall, Query, QueryCall, Request, RpcId, code};
use crate::sessions;
use crate::tracker::{Admission, CommandTracker, Delivery};
use callapi_kit::tenants::Scope;

/// How the reader ended, and so what the writer does last.
enum Ending {
    /// Write what is queued, then close the WebSocket (sending this close frame, if any).
    Close(Option<CloseFrame>),
    /// Drop the connection at once: the peer is gone, too slow or unresponsive.
    Drop,
}

/// A notification held back for a pending command, with the queue bytes it keeps counted.
type Held = (notification::Kind, Option<Charge>);

/// The connection's commands, shared by the reader (which admits them) and the writer (which
/// sees them start, notify and end).
type Tracker = Arc<Mutex<CommandTracker<Held>>>;

fn lock(tracker: &Tracker) -> MutexGuard<'_, CommandTracker<Held>> {
    // No code panics while holding it; a poisoned tracker is still a correct one.
    tracker
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a connection's client may do, decided at its upgrade.
pub(crate) struct Access {
    /// The tenant it acts for.
    tenant: String,
    /// What it may do (`None`: everything; no authentication is configured).
    scopes: Option<std::collections::BTreeSet<Scope>>,
    /// When its access token expires (Unix seconds; `None`: never).
    expires_at: Option<u64>,
    /// The trunks its calls may go out through.
    trunks: Vec<crate::TrunkConfig>,
    /// The SIP domains its calls' parties must be in (empty: any).
    domains: Vec<String>,
    /// Its tenant's commands per second (0: any).
    commands_per_second: u32,
    /// Its tenant's most active calls (0: any).
    active_calls: u32,
    /// This connection, counted against its tenant's limit while it is open.
    _slot: Option<crate::limits::ConnectionSlot>,
}

impl Access {
    /// Everything, for the configured tenant: no `[auth]`.
    pub(crate) fn open(config: &crate::Config) -> Self {
        Self {
            tenant: config.tenant.clone(),
            scopes: None,
            expires_at: None,
            trunks: config.trunks.clone(),
            domains: Vec::new(),
            commands_per_second: 0,
            active_calls: 0,
            _slot: None,
        }
    }

    /// What `identity`'s token allows, in `tenant`.
    pub(crate) fn of(
        identity: &crate::auth::Identity,
        tenant: &callapi_kit::tenants::Tenant,
        slot: crate::limits::ConnectionSlot,
    ) -> Self {
        Self {
            tenant: identity.tenant.clone(),
            scopes: Some(identity.scopes.clone()),
            expires_at: Some(identity.expires_at),
            trunks: crate::TrunkConfig::of_tenant(tenant),
            domains: tenant.domains.clone(),
            commands_per_second: tenant.limits.commands_per_second,
            active_calls: tenant.limits.active_calls,
            _slot: Some(slot),
        }
    }

    fn may(&self, scope: Scope) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.contains(&scope))
    }

    /// The moment its token expires, on the monotonic clock.
    fn expiry(&self) -> Option<Instant> {
        let at = self.expires_at?;
        let left = at.saturating_sub(callapi_kit::unix_ms() / 1000);
        Instant::now().checked_add(Duration::from_secs(left))
    }

    /// The refusal of a request that needs `scope`, if the client lacks it.
    fn refuse(&self, id: &RpcId, scope: Scope) -> Option<String> {
        (!self.may(scope)).then(|| {
            rpc::error(
                id,
                code::FORBIDDEN,
                &format!("Forbidden: this needs the {} scope", scope.as_str()),
            )
        })
    }
}

/// Close code of a connection whose access token expired (private use range of RFC 6455).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Per-connection limits, from the configuration.
#[derive(Clone, Copy)]
struct Limits {
    write_timeout: Duration,
    ping_interval: Option<Duration>,
    pong_timeout: Duration,
}

/// Serves one upgraded WebSocket until the client leaves, is dropped, or the gateway stops.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>, access: Access) {
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    let config = &shared.config;
    let limits = Limits {
        write_timeout: Duration::from_millis(config.write_timeout_ms),
        ping_interval: (config.ping_interval_ms > 0)
            .then(|| Duration::from_millis(config.ping_interval_ms)),
        pong_timeout: Duration::from_millis(config.pong_timeout_ms),
    };
    let (sink, stream) = socket.split();
    let kill = CancellationToken::new();
    let (outbox, inbox) = outbox::channel(
        config.connection_queue.max(16),
        config.connection_queue_bytes,
        kill.clone(),
        connection_id.clone(),
    );
    let tracker = Tracker::new(Mutex::new(CommandTracker::new(
        config.max_commands_per_connection,
    )));
    let attachment = shared
        .commands
        .attach(&access.tenant, Arc::new(outbox.clone()));
    // The connection's call event feed (`Subscribe`), if any.
    let feed: Mutex<Option<CancellationToken>> = Mutex::new(None);
    metrics::gauge!("callapi_websocket_connections").increment(1.0);
    let detach = CancellationToken::new();
    let attached = Mutex::new(std::collections::HashMap::new());
    tracing::debug!(%connection_id, "client connected");
    let (ping_written, ping_watch) = tokio::sync::watch::channel(None);
    let writer = tokio::spawn(write_loop(
        sink,
        inbox,
        tracker.clone(),
        kill.clone(),
        limits.write_timeout,
        ping_written,
    ));
    let incoming = Incoming {
        stream,
        ping_written: ping_watch,
    };
    let ending = read_loop(
        incoming,
        &Client {
            shared: &shared,
            connection_id: &connection_id,
            origin: attachment.origin(),
            outbox: &outbox,
            tracker: &tracker,
            kill: &kill,
            access: &access,
            feed: &feed,
            detach: &detach,
            attached: &attached,
        },
        limits,
    )
    .await;
    drop(attachment);
    metrics::gauge!("callapi_websocket_connections").decrement(1.0);
    detach.cancel();
    if let Some(stop) = feed.lock().ok().and_then(|mut f| f.take()) {
        stop.cancel();
    }
    match ending {
        Ending::Close(frame) => {
            if outbox.push(Outgoing::Close(frame)).is_err() {
                kill.cancel();
            }
        }
        Ending::Drop => kill.cancel(),
    }
    drop(outbox);
    // The writer stops at once when killed, else after at most two bounded writes.
    let abort = writer.abort_handle();
    let writer_bound = limits
        .write_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1));
    if tokio::time::timeout(writer_bound, writer).await.is_err() {
        abort.abort();
    }
    tracing::debug!(%connection_id, "client gone");
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn close_frame(code: u16, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: reason.into(),
    })
}

/// What to tell a peer whose frame could not be read (RFC 6455 section 7.4.1), or `None` when
/// the connection itself failed and nothing can be sent.
fn close_for(err: axum::Error) -> Option<CloseFrame> {
    use tungstenite::error::{CapacityError, Error as WsError};
    let err = err.into_inner().downcast::<WsError>().ok()?;
    match *err {
        WsError::Utf8(_) => close_frame(close_code::INVALID, "invalid UTF-8 in a text message"),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => close_frame(
            close_code::SIZE,
            "message too big: frames and messages are limited to 1 MiB",
        ),
        WsError::Capacity(_) => close_frame(close_code::SIZE, "message too big"),
        WsError::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => close_frame(close_code::PROTOCOL, "WebSocket protocol error"),
        _ => None,
    }
}

/// What the reader listens to: the client's frames, and when the writer wrote its last ping.
struct Incoming {
    stream: SplitStream<WebSocket>,
    ping_written: tokio::sync::watch::Receiver<Option<Instant>>,
}

/// One connection's client as its reader sees it.
struct Client<'a> {
    shared: &'a Arc<Shared>,
    connection_id: &'a str,
    origin: &'a Origin,
    outbox: &'a Outbox,
    tracker: &'a Tracker,
    kill: &'a CancellationToken,
    access: &'a Access,
    feed: &'a Mutex<Option<CancellationToken>>,
    /// Cancelled when the connection ends: its `CommandAttach` feeds stop.
    detach: &'a CancellationToken,
    /// The commands followed by `CommandAttach`, by `cmd_id` (cancelled once done).
    attached: &'a Mutex<std::collections::HashMap<String, CancellationToken>>,
}

/// Reads requests until the client leaves, is killed, stays silent, or the gateway stops.
async fn read_loop(incoming: Incoming, client: &Client<'_>, limits: Limits) -> Ending {
    let Client {
        shared,
        connection_id,
        outbox,
        kill,
        ..
    } = *client;
    let Incoming {
        mut stream,
        mut ping_written,
    } = incoming;
    let mut last_heard = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let expiry = client.access.expiry();
    loop {
        let wake = match (limits.ping_interval, ping_sent) {
            (None, _) => None,
            (Some(every), None) => last_heard.checked_add(every),
            // The pong is due `pong_timeout` after the ping was written, not queued: a slow
            // but live reader may have much queued before it (the write timeout bounds that).
            (Some(_), Some(queued)) => match *ping_written.borrow() {
                Some(written) if written >= queued => written.checked_add(limits.pong_timeout),
                _ => queued.checked_add(limits.write_timeout + limits.pong_timeout),
            },
        };
        let message = tokio::select! {
            _ = kill.cancelled() => return Ending::Drop,
            Ok(()) = ping_written.changed(), if ping_sent.is_some() => continue,
            _ = shared.shutdown.cancelled() => {
                return Ending::Close(close_frame(close_code::AWAY, SHUTDOWN_REASON));
            }
            _ = sleep_until(expiry) => {
                tracing::info!(%connection_id, "access token expired: closing the connection");
                return Ending::Close(close_frame(
                    CLOSE_TOKEN_EXPIRED,
                    "access token expired: connect again with a new one",
                ));
            }
            _ = sleep_until(wake) => {
                if ping_sent.is_some() {
                    tracing::info!(%connection_id, "no answer to a ping in time: dropping the client");
                    return Ending::Drop;
                }
                if outbox.push(Outgoing::Ping).is_err() {
                    return Ending::Drop;
                }
                ping_sent = Some(Instant::now());
                continue;
            }
            message = stream.next() => message,
        };
        last_heard = Instant::now();
        ping_sent = None;
        let reply = match message {
            Some(Ok(Message::Text(text))) => handle_text(client, &text),
            Some(Ok(Message::Binary(_))) => Some(rpc::error(
                &RpcId::null(),
                code::INVALID_REQUEST,
                "Invalid Request: binary messages are not supported; send JSON text",
            )),
            Some(Ok(Message::Close(_))) | None => return Ending::Close(None),
            Some(Ok(_)) => None,
            Some(Err(err)) => {
                tracing::debug!(%err, %connection_id, "WebSocket read error");
                return match close_for(err) {
                    Some(frame) => Ending::Close(Some(frame)),
                    None => Ending::Drop,
                };
            }
        };
        if let Some(reply) = reply
            && outbox.push(Outgoing::Reply(reply)).is_err()
        {
            return Ending::Drop;
        }
        if kill.is_cancelled() {
            return Ending::Drop;
        }
        // Many small frames can be read from one socket read without ever waiting: give the
        // writer (often woken onto this very worker) and other tasks their turn.
        tokio::task::coop::consume_budget().await;
    }
}

/// Handles one text message; returns the reply to write at once, if any.
fn handle_text(client: &Client<'_>, text: &str) -> Option<String> {
    let shared = client.shared;
    if text.len() > shared.config.max_message_bytes {
        return Some(rpc::error(
            &RpcId::null(),
            code::INVALID_REQUEST,
            &format!(
                "Invalid Request: message of {} bytes is over the limit of {} bytes",
                text.len(),
                shared.config.max_message_bytes
            ),
        ));
    }
    match rpc::parse(text) {
        Ok(Request::Command(mut call)) => {
            if !client.access.may(Scope::CallsControl) {
                return client.access.refuse(call.id.as_ref()?, Scope::CallsControl);
            }
            if let Err(error) = params::resolve_trunk(&mut call.command, &client.access.trunks)
                .and_then(|()| params::check_domains(&call.command, &client.access.domains))
            {
                let id = call.id?;
                return Some(rpc::params_error(&id, &error));
            }
            if let Some((code, message, data)) = over_limits(client, &call) {
                let id = call.id?;
                return Some(match data {
                    Some(data) => rpc::error_with_data(&id, code, &message, data),
                    None => rpc::error(&id, code, &message),
                });
            }
            start_command(client, call)
        }
        Ok(Request::Query(query)) => {
            // Following a command is for those who may run commands.
            let scope = match query.query {
                Query::Attach(_) => Scope::CallsControl,
                _ => Scope::CallsRead,
            };
            if !client.access.may(scope) {
                return client.access.refuse(query.id.as_ref()?, scope);
            }
            answer_query(client, query)
        }
        Err(error) if error.silent => None,
        Err(error) => Some(error.to_json()),
    }
}

/// The refusal of a command over its tenant's limits (commands per second; active calls for a
/// CallStart), if it is: its JSON-RPC code, message and data.
fn over_limits(
    client: &Client<'_>,
    call: &CommandCall,
) -> Option<(i64, String, Option<serde_json::Value>)> {
    let access = client.access;
    let tenant = client.origin.tenant();
    if let Err(crate::limits::Over::Rate(wait)) = client
        .shared
        .limits
        .take_command(tenant, access.commands_per_second)
    {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let message = format!(
            "Rate limited: the tenant's {} commands per second are used; try again in {wait_ms} ms",
            access.commands_per_second
        );
        let data = serde_json::json!({"retry_after_ms": wait_ms});
        return Some((code::RATE_LIMITED, message, Some(data)));
    }
    if access.active_calls > 0
        && matches!(call.command, Command::CallStart(_))
        && let Some(view) = client.shared.sessions.as_ref()
    {
        let active = view.list(tenant).len();
        if active >= access.active_calls as usize {
            let message = format!(
                "Limit reached: the tenant has {active} active calls, its limit is {}",
                access.active_calls
            );
            return Some((code::CALL_LIMIT, message, None));
        }
    }
    None
}

/// What the live view answers.
enum ViewQuery {
    List(params::ListSelection),
    Get(SessionKey),
}

/// Starts (or replaces) the connection's call event feed; its reply comes from the feed.
fn subscribe(
    client: &Client<'_>,
    id: Option<RpcId>,
    filter: params::EventFilter,
) -> Option<String> {
    let stop = CancellationToken::new();
    if let Ok(mut feed) = client.feed.lock()
        && let Some(old) = feed.replace(stop.clone())
    {
        old.cancel();
    }
    tokio::spawn(crate::subscribe::run(crate::subscribe::Feed {
        nats: client.shared.nats.clone(),
        hub: client.shared.feeds.clone(),
        tenant: client.origin.tenant().to_owned(),
        filter,
        reply_id: id,
        outbox: client.outbox.clone(),
        view: client.shared.sessions.clone(),
        stop,
    }));
    None
}

/// Answers `CallList` / `CallGet` from the live view, for the client's tenant only; starts and
/// stops the call event feed.
fn answer_query(client: &Client<'_>, call: QueryCall) -> Option<String> {
    let query = match call.query {
        Query::Subscribe(filter) => return subscribe(client, call.id, filter),
        Query::Attach(cmd_id) => {
            if !client.shared.config.command_log.enabled {
                let id = call.id?;
                return Some(rpc::error(
                    &id,
                    code::UNAVAILABLE,
                    "the command log is off on this gateway (command_log.enabled)",
                ));
            }
            // As many at once as commands in flight: a second attach to the same cmd_id replaces
            // the first.
            let stop = client.detach.child_token();
            {
                let Ok(mut attached) = client.attached.lock() else {
                    return None;
                };
                attached.retain(|_, token| !token.is_cancelled());
                if let Some(old) = attached.insert(cmd_id.clone(), stop.clone()) {
                    old.cancel();
                } else if attached.len() > client.shared.config.max_commands_per_connection {
                    attached.remove(&cmd_id);
                    let id = call.id?;
                    return Some(rpc::error(
                        &id,
                        code::TOO_MANY_COMMANDS,
                        "too many commands followed on this connection: wait for one to end",
                    ));
                }
            }
            let done = stop.clone();
            let run = crate::attach::run(crate::attach::Attach {
                nats: client.shared.nats.clone(),
                tenant: client.origin.tenant().to_owned(),
                cmd_id,
                reply_id: call.id,
                outbox: client.outbox.clone(),
                stop,
            });
            tokio::spawn(async move {
                run.await;
                done.cancel();
            });
            return None;
        }
        Query::Unsubscribe => {
            if let Some(stop) = client.feed.lock().ok().and_then(|mut f| f.take()) {
                stop.cancel();
            }
            let id = call.id?;
            return Some(rpc::result(&id, &serde_json::json!({"subscribed": false})));
        }
        Query::List(selection) => ViewQuery::List(selection),
        Query::Get(key) => ViewQuery::Get(key),
    };
    let id = call.id?;
    let Some(view) = client.shared.sessions.as_ref() else {
        return Some(rpc::error(
            &id,
            code::UNAVAILABLE,
            "the session store is not available on this gateway",
        ));
    };
    let tenant = client.origin.tenant();
    let now = now_ms();
    Some(match query {
        ViewQuery::List(selection) => {
            let (count, page) = sessions::select(view.list(tenant), &selection);
            let items: Vec<serde_json::Value> =
                page.iter().map(|s| sessions::to_json(s, now)).collect();
            rpc::result(&id, &serde_json::json!({"count": count, "items": items}))
        }
        ViewQuery::Get(key) => {
            let found = match &key {
                SessionKey::Id(session_id) => view
                    .get(tenant, *session_id)
                    .or_else(|| view.ended(tenant, *session_id)),
                SessionKey::Callid(callid) => view.by_callid(tenant, callid),
            };
            match found {
                Some(session) => rpc::result(&id, &sessions::to_json(&session, now)),
                None => rpc::error(&id, code::NOT_FOUND, "no such session"),
            }
        }
    })
}

use callapi_kit::unix_ms as now_ms;

/// Sends the command to a commands replica (its reply is written once a replica took it), or
/// returns the error to answer at once.
fn start_command(client: &Client<'_>, call: CommandCall) -> Option<String> {
    let cmd_id = call
        .cmd_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let reply_id = call.id.clone().unwrap_or_else(RpcId::null);
    let admission = lock(client.tracker).admit(&cmd_id);
    let (attempt, refusal) = match admission {
        Admission::Admitted { attempt } => (attempt, None),
        Admission::Duplicate => (
            0,
            Some((
                code::DUPLICATE_CMD_ID,
                format!("cmd_id {cmd_id:?} is already used by a running command"),
            )),
        ),
        Admission::Full { limit } => (
            0,
            Some((
                code::TOO_MANY_COMMANDS,
                format!(
                    "too many commands in flight on this connection (limit {limit}); wait for one to end"
                ),
            )),
        ),
    };
    if let Some((code, message)) = refusal {
        return call
            .id
            .is_some()
            .then(|| rpc::error(&reply_id, code, &message));
    }
    let commands = client.shared.commands.clone();
    let origin = client.origin.clone();
    let outbox = client.outbox.clone();
    let answer = call.id.is_some();
    let sessions = client.shared.sessions.clone();
    let strict = client.shared.auth.is_some();
    let mut command = call.command;
    tokio::spawn(async move {
        if strict
            && let Some(callid) = foreign_callid(sessions.as_ref(), origin.tenant(), &command).await
        {
            tracing::info!(%cmd_id, tenant = origin.tenant(), "command on a Call-ID the tenant does not have refused");
            let message = format!("no call with Call-ID {}", rpc::clip(&callid));
            let _ = outbox.push(Outgoing::Refused {
                reply: answer.then(|| rpc::error(&reply_id, code::NOT_FOUND, &message)),
                cmd_id,
            });
            return;
        }
        let outcome = match remember(sessions.as_ref(), origin.tenant(), &mut command).await {
            Ok(()) => {
                commands
                    .submit(&origin, &cmd_id, attempt, call.kind, command)
                    .await
            }
            Err(err) => Err(err),
        };
        let outgoing = match outcome {
            Ok(ends_within) => Outgoing::Started {
                reply: answer.then(|| rpc::started(&reply_id, &cmd_id)),
                cmd_id,
                ends_within,
            },
            Err(err) => {
                tracing::warn!(%cmd_id, %err, "command not started");
                let code = match err {
                    SubmitError::Unavailable(_) => code::UNAVAILABLE,
                    SubmitError::Refused(_) => code::REFUSED,
                };
                Outgoing::Refused {
                    reply: answer.then(|| rpc::error(&reply_id, code, &err.to_string())),
                    cmd_id,
                }
            }
        };
        let _ = outbox.push(outgoing);
    });
    None
}

/// How long a command on a Call-ID the live view does not show yet waits for it (a call just
/// placed reaches the store within milliseconds).
const CALLID_WAIT: Duration = Duration::from_secs(1);

/// With tenants, a command acts only on the tenant's own calls: the first Call-ID `command`
/// names that the tenant's live view does not show (within [`CALLID_WAIT`]), if any. The
/// answer is the same whether the call is another tenant's or does not exist: no existence
/// leak. Without the live view nothing can be checked: every Call-ID is refused.
async fn foreign_callid(
    view: Option<&sessions::SessionView>,
    tenant: &str,
    command: &Command,
) -> Option<String> {
    let callids = crate::core::callids_of(command);
    let give_up = Instant::now() + CALLID_WAIT;
    for callid in callids {
        loop {
            if view.is_some_and(|v| v.by_callid(tenant, callid).is_some()) {
                break;
            }
            if view.is_none() || Instant::now() >= give_up {
                return Some(callid.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    None
}

/// Stores what a CallStart's options say that SIP does not tell back (so `CallGet` and REST
/// show it), choosing its first leg's Call-ID for that; other commands need nothing.
async fn remember(
    view: Option<&sessions::SessionView>,
    tenant: &str,
    command: &mut Command,
) -> Result<(), SubmitError> {
    let (Some(view), Command::CallStart(start)) = (view, command) else {
        return Ok(());
    };
    let Some(options) = start.options.as_deref() else {
        return Ok(());
    };
    if start.callid.is_empty() {
        start.callid = uuid::Uuid::new_v4().to_string();
    }
    let Some(meta) = sessions::meta_of_start(tenant, &start.callid, options, false) else {
        return Ok(());
    };
    view.remember(meta).await.map_err(|err| {
        tracing::warn!(%err, "cannot store a session's metadata");
        SubmitError::Unavailable("the session store cannot take this session's data now".into())
    })
}

/// A connection's notifications go into its outbox, which never blocks: a client that cannot
/// keep up is dropped by the outbox itself.
impl NotificationSink for Outbox {
    fn deliver(&self, cmd_id: String, attempt: u64, kind: notification::Kind) {
        let _ = self.push(Outgoing::Notification {
            cmd_id,
            attempt,
            kind,
        });
    }
}

/// Writes one message; false if the client did not take it within `limit` or is killed.
/// Writes `frames`, then flushes them to the socket if `flush` (else they wait in the
/// WebSocket's buffer for the next flush); false if the client did not take them within
/// `limit`, or is killed.
async fn write(
    sink: &mut SplitSink<WebSocket, Message>,
    frames: Vec<Message>,
    flush: bool,
    kill: &CancellationToken,
    limit: Duration,
) -> bool {
    let work = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        if flush {
            sink.flush().await?;
        }
        Ok::<(), axum::Error>(())
    };
    tokio::select! {
        biased;
        _ = kill.cancelled() => false,
        sent = tokio::time::timeout(limit, work) => match sent {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                tracing::debug!(%err, "WebSocket write failed");
                false
            }
            Err(_) => {
                tracing::warn!("client took no data for {limit:?}: disconnecting it");
                false
            }
        },
    }
}

/// What a client gets for a command whose commands replica never ended it.
fn overdue_frames(cmd_id: &str) -> [Message; 2] {
    tracing::warn!(%cmd_id, "no end from the commands service in time; ending the command");
    lost_command().map(|kind| Message::Text(rpc::notification(cmd_id, &kind).into()))
}

/// The close reason a client gets when its gateway stops (at most 123 bytes).
pub const SHUTDOWN_REASON: &str =
    "gateway shutting down: connect again and CommandAttach to your commands in flight";

/// The end of a command whose commands replica never ended it: `COMMAND_LOST`, `Ended`.
pub(crate) fn lost_command() -> [notification::Kind; 2] {
    let lost = notification::Kind::Error(callapi_proto::v1::CommandError {
        code: callapi_proto::v1::ErrorCode::CommandLost as i32,
        message: "the commands service handling this command did not finish it in time (it may have stopped); the call may be in any state".to_owned(),
        sip_code: 0,
    });
    [
        lost,
        notification::Kind::Ended(callapi_proto::v1::CommandEnded {}),
    ]
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    tracker: Tracker,
    kill: CancellationToken,
    write_timeout: Duration,
    ping_written: tokio::sync::watch::Sender<Option<Instant>>,
) {
    // One timer for the connection's next overdue command, moved as commands start and end.
    let overdue_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(overdue_timer);
    let mut overdue_at: Option<std::time::Instant> = None;
    loop {
        let next_overdue = lock(&tracker).next_overdue_at();
        if next_overdue != overdue_at {
            overdue_at = next_overdue;
            if let Some(at) = overdue_at {
                overdue_timer.as_mut().reset(Instant::from_std(at));
            }
        }
        let (outgoing, mut charge) = tokio::select! {
            biased;
            _ = kill.cancelled() => return,
            next = inbox.recv() => match next {
                Some((outgoing, charge)) => (outgoing, Some(charge)),
                None => break,
            },
            () = &mut overdue_timer, if overdue_at.is_some() => {
                let overdue = lock(&tracker).take_overdue(std::time::Instant::now());
                overdue_at = None;
                let frames = overdue.iter().flat_map(|cmd_id| overdue_frames(cmd_id)).collect();
                if !write(&mut sink, frames, true, &kill, write_timeout).await {
                    kill.cancel();
                    return;
                }
                continue;
            }
        };
        let mut frames = Vec::new();
        let mut closing = None;
        match outgoing {
            Outgoing::Reply(text) => frames.push(Message::Text(text.into())),
            Outgoing::Ping => frames.push(Message::Ping(Bytes::new())),
            Outgoing::Close(frame) => closing = Some(frame),
            Outgoing::Started {
                cmd_id,
                reply,
                ends_within,
            } => {
                frames.extend(reply.map(|text| Message::Text(text.into())));
                let held = lock(&tracker).started(&cmd_id, std::time::Instant::now(), ends_within);
                for (kind, _charge) in held {
                    frames.push(Message::Text(rpc::notification(&cmd_id, &kind).into()));
                }
            }
            Outgoing::Refused { cmd_id, reply } => {
                frames.extend(reply.map(|text| Message::Text(text.into())));
                lock(&tracker).refused(&cmd_id);
            }
            Outgoing::Notification {
                cmd_id,
                attempt,
                kind,
            } => {
                let ends = matches!(kind, notification::Kind::Ended(_));
                // A held notification keeps its bytes counted until it is written.
                let delivery =
                    lock(&tracker).notification(&cmd_id, attempt, (kind, charge.take()), ends);
                match delivery {
                    Delivery::Held => continue,
                    Delivery::Deliver((kind, own_charge)) => {
                        frames.push(Message::Text(rpc::notification(&cmd_id, &kind).into()));
                        charge = own_charge;
                    }
                    Delivery::Unknown(_) => {
                        tracing::debug!(%cmd_id, "notification for an unknown command dropped");
                    }
                }
            }
        }
        // What is queued right behind goes out in the same flush: one write for a command's
        // `Started` and the notifications held back for it, or for a burst of notifications.
        let ping = frames.iter().any(|frame| matches!(frame, Message::Ping(_)));
        let flush = ping || closing.is_some() || inbox.is_empty();
        if !write(&mut sink, frames, flush, &kill, write_timeout).await {
            kill.cancel();
            return;
        }
        if ping {
            ping_written.send_replace(Some(Instant::now()));
        }
        drop(charge);
        if let Some(frame) = closing {
            if let Some(frame) = frame
                && !write(
                    &mut sink,
                    vec![Message::Close(Some(frame))],
                    true,
                    &kill,
                    write_timeout,
                )
                .await
            {
                kill.cancel();
                return;
            }
            break;
        }
    }
    let _ = tokio::time::timeout(write_timeout, sink.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};

    fn code_for(err: WsError) -> Option<u16> {
        close_for(axum::Error::new(err)).map(|frame| frame.code)
    }

    #[test]
    fn read_errors_get_the_close_codes_of_rfc_6455() {
        assert_eq!(
            code_for(WsError::Utf8("invalid utf-8".into())),
            Some(close_code::INVALID)
        );
        assert_eq!(
            code_for(WsError::Capacity(CapacityError::MessageTooLong {
                size: 2 << 20,
                max_size: 1 << 20
            })),
            Some(close_code::SIZE)
        );
        assert_eq!(
            code_for(WsError::Protocol(ProtocolError::NonZeroReservedBits)),
            Some(close_code::PROTOCOL)
        );
        // A dead connection gets no close frame.
        assert_eq!(
            code_for(WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            None
        );
        assert_eq!(code_for(WsError::Io(std::io::Error::other("reset"))), None);
        assert!(close_for(axum::Error::new(std::io::Error::other("not tungstenite"))).is_none());
    }

    #[test]
    fn a_queued_reply_weighs_its_text() {
        let small = Outgoing::Reply("x".into()).weight();
        let big = Outgoing::Reply("x".repeat(60_000)).weight();
        assert_eq!(big - small, 59_999);
        assert!(Outgoing::Ping.weight() > 0);
    }
}
