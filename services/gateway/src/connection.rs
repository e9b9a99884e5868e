//! One WebSocket client: reads requests, starts commands, writes replies and notifications.
//!
//! A single writer task owns the socket's sending half, fed by an [`Outbox`] that never blocks:
//! a client that falls too far behind, or does not take a write within `write_timeout_ms`, is
//! dropped. The writer also keeps each command's order: notifications that arrive before the
//! command's `Started` reply is written are held back and written right after it. The reader
//! pings a silent peer and drops it when nothing comes back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use bytes::Bytes;
use callapi_kit::bus::{self, BusError};
use callapi_kit::subjects;
use callapi_proto::v1::{CommandAck, CommandRequest, notification};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::Shared;
use crate::hub::ConnectionHandle;
use crate::outbox::{self, Charge, Inbox, Outbox};
use crate::rpc::{self, CommandCall, RpcId, code};

/// What the writer task sends.
pub(crate) enum Outgoing {
    /// A reply not tied to a running command.
    Reply(String),
    /// A command is about to be sent: hold its notifications until `Started`.
    Register(String),
    /// The command was taken: write the reply, then what was held back. If it has not ended
    /// after `ends_within`, its commands replica is presumed lost.
    Started {
        cmd_id: String,
        reply: Option<String>,
        ends_within: Duration,
    },
    /// A command's time is up: if it is still running, end it for the client (made by the
    /// writer itself when a command's timer is due, never queued).
    Overdue(String),
    /// The command was not taken: write the error, drop what was held back.
    Refused {
        cmd_id: String,
        reply: Option<String>,
    },
    /// A notification of a command.
    Notification {
        cmd_id: String,
        kind: notification::Kind,
    },
    /// Ask a silent peer whether it is still there.
    Ping,
    /// Write what is queued before this, then close (with this close frame, if any) and stop.
    Close(Option<CloseFrame>),
}

/// Bytes counted per queued message on top of its text: the JSON envelope and bookkeeping.
const MESSAGE_OVERHEAD: usize = 64;

impl Outgoing {
    /// About how many bytes this message holds until it is written.
    pub(crate) fn weight(&self) -> usize {
        let text = match self {
            Outgoing::Reply(text) => text.len(),
            Outgoing::Register(cmd_id) | Outgoing::Overdue(cmd_id) => cmd_id.len(),
            Outgoing::Started { cmd_id, reply, .. } | Outgoing::Refused { cmd_id, reply } => {
                cmd_id.len() + reply.as_ref().map_or(0, String::len)
            }
            Outgoing::Notification { cmd_id, kind } => cmd_id.len() + kind.encoded_len(),
            Outgoing::Ping => 0,
            Outgoing::Close(frame) => frame.as_ref().map_or(0, |f| f.reason.len()),
        };
        text + MESSAGE_OVERHEAD
    }
}

/// How the reader ended, and so what the writer does last.
enum Ending {
    /// Write what is queued, then close the WebSocket (sending this close frame, if any).
    Close(Option<CloseFrame>),
    /// Drop the connection at once: the peer is gone, too slow or unresponsive.
    Drop,
}

/// The commands of a connection that are running (or about to): cmd_ids.
type Active = Arc<Mutex<HashSet<String>>>;

fn lock(active: &Active) -> MutexGuard<'_, HashSet<String>> {
    // No code panics while holding it; a poisoned set is still a correct set.
    active
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Per-connection limits, from the configuration.
#[derive(Clone, Copy)]
struct Limits {
    write_timeout: Duration,
    ping_interval: Option<Duration>,
    pong_timeout: Duration,
}

/// Serves one upgraded WebSocket until the client leaves, is dropped, or the gateway stops.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
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
    let active = Active::default();
    shared.hub.add(
        connection_id.clone(),
        ConnectionHandle {
            tenant: config.tenant.clone(),
            outbox: outbox.clone(),
        },
    );
    tracing::debug!(%connection_id, "client connected");
    let (ping_written, ping_watch) = tokio::sync::watch::channel(None);
    let writer = tokio::spawn(write_loop(
        sink,
        inbox,
        active.clone(),
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
        &shared,
        &connection_id,
        &outbox,
        &active,
        &kill,
        limits,
    )
    .await;
    shared.hub.remove(&connection_id);
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

/// Reads requests until the client leaves, is killed, stays silent, or the gateway stops.
async fn read_loop(
    incoming: Incoming,
    shared: &Arc<Shared>,
    connection_id: &str,
    outbox: &Outbox,
    active: &Active,
    kill: &CancellationToken,
    limits: Limits,
) -> Ending {
    let Incoming {
        mut stream,
        mut ping_written,
    } = incoming;
    let mut last_heard = Instant::now();
    let mut ping_sent: Option<Instant> = None;
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
                return Ending::Close(close_frame(close_code::AWAY, "the gateway is shutting down"));
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
            Some(Ok(Message::Text(text))) => {
                handle_text(shared, connection_id, outbox, active, &text)
            }
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
fn handle_text(
    shared: &Arc<Shared>,
    connection_id: &str,
    outbox: &Outbox,
    active: &Active,
    text: &str,
) -> Option<String> {
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
        Ok(call) => start_command(shared, connection_id, outbox, active, call),
        Err(error) if error.silent => None,
        Err(error) => Some(error.to_json()),
    }
}

/// Whether a command may start on this connection.
enum Admission {
    Fresh,
    Duplicate,
    Full,
}

/// Sends the command to a commands replica (its reply is written once a replica took it), or
/// returns the error to answer at once.
fn start_command(
    shared: &Arc<Shared>,
    connection_id: &str,
    outbox: &Outbox,
    active: &Active,
    call: CommandCall,
) -> Option<String> {
    let cmd_id = call
        .cmd_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let reply_id = call.id.clone().unwrap_or_else(RpcId::null);
    let limit = shared.config.max_commands_per_connection;
    let admission = {
        let mut set = lock(active);
        if set.contains(&cmd_id) {
            Admission::Duplicate
        } else if set.len() >= limit {
            Admission::Full
        } else {
            set.insert(cmd_id.clone());
            Admission::Fresh
        }
    };
    let refusal = match admission {
        Admission::Fresh => None,
        Admission::Duplicate => Some((
            code::DUPLICATE_CMD_ID,
            format!("cmd_id {cmd_id:?} is already used by a running command"),
        )),
        Admission::Full => Some((
            code::TOO_MANY_COMMANDS,
            format!(
                "too many commands in flight on this connection (limit {limit}); wait for one to end"
            ),
        )),
    };
    if let Some((code, message)) = refusal {
        return call
            .id
            .is_some()
            .then(|| rpc::error(&reply_id, code, &message));
    }
    if outbox.push(Outgoing::Register(cmd_id.clone())).is_err() {
        lock(active).remove(&cmd_id);
        return None;
    }
    let request = CommandRequest {
        tenant: shared.config.tenant.clone(),
        cmd_id: cmd_id.clone(),
        notify_subject: shared.notify_subject.clone(),
        connection_id: connection_id.to_owned(),
        command: Some(call.command),
    };
    let subject = subjects::command(&shared.config.tenant, call.kind);
    let shared = shared.clone();
    let outbox = outbox.clone();
    let answer = call.id.is_some();
    tokio::spawn(async move {
        let outcome = send_command(&shared, subject, request).await;
        let outgoing = match outcome {
            Ok(ends_within) => Outgoing::Started {
                reply: answer.then(|| rpc::started(&reply_id, &cmd_id)),
                cmd_id,
                ends_within,
            },
            Err((code, message)) => {
                tracing::warn!(%cmd_id, %message, "command not started");
                Outgoing::Refused {
                    reply: answer.then(|| rpc::error(&reply_id, code, &message)),
                    cmd_id,
                }
            }
        };
        let _ = outbox.push(outgoing);
    });
    None
}

/// What a client is told when the gateway has no working NATS connection.
const NATS_UNREACHABLE: &str =
    "NATS is unreachable: the gateway cannot reach the commands service; try again later";

/// Sends one command as a NATS request; how long it may run, or the JSON-RPC error.
async fn send_command(
    shared: &Shared,
    subject: String,
    request: CommandRequest,
) -> Result<Duration, (i64, String)> {
    let timeout = Duration::from_millis(shared.config.command_ack_timeout_ms);
    match bus::request::<CommandAck>(&shared.client, subject, &request, timeout).await {
        Ok(ack) if ack.accepted => Ok(Duration::from_millis(ack.deadline_ms)),
        Ok(ack) => Err((code::REFUSED, format!("command refused: {}", ack.error))),
        Err(err) => Err((
            code::UNAVAILABLE,
            match err {
                BusError::NatsDown => NATS_UNREACHABLE.to_owned(),
                BusError::NoResponders(_) => {
                    "no commands service is running; try again later".to_owned()
                }
                BusError::TimedOut { .. } => {
                    "the commands service did not take the command in time; try again later"
                        .to_owned()
                }
                BusError::Undecodable(_) => {
                    "unreadable answer from the commands service".to_owned()
                }
                BusError::Nats(reason) => {
                    format!("could not reach the commands service: {reason}")
                }
            },
        )),
    }
}

enum CommandState {
    /// Not started yet: its notifications (and their queued bytes) are held back.
    Pending(Vec<(notification::Kind, Charge)>),
    Live,
}

/// Extra time given to a commands replica beyond the deadline it announced.
const OVERDUE_MARGIN: Duration = Duration::from_secs(3);

/// The writer's view of the connection's commands: which are pending or live, and when each
/// live one is overdue (one timer queue for all, dropped entries when a command ends).
struct Commands {
    states: HashMap<String, CommandState>,
    /// Made at the first command: its timer wheel costs kilobytes, idle connections none.
    overdue: Option<DelayQueue<String>>,
    timers: HashMap<String, delay_queue::Key>,
    active: Active,
}

impl Commands {
    fn new(active: Active) -> Self {
        Self {
            states: HashMap::new(),
            overdue: None,
            timers: HashMap::new(),
            active,
        }
    }

    /// The command is over (ended, refused or overdue): forget it everywhere.
    fn end(&mut self, cmd_id: &str) {
        self.states.remove(cmd_id);
        if let (Some(key), Some(overdue)) = (self.timers.remove(cmd_id), self.overdue.as_mut()) {
            overdue.try_remove(&key);
        }
        lock(&self.active).remove(cmd_id);
    }

    /// The command was taken and must end within `ends_within`.
    fn start(&mut self, cmd_id: &str, ends_within: Duration) -> Option<CommandState> {
        let overdue = self.overdue.get_or_insert_with(DelayQueue::new);
        let key = overdue.insert(cmd_id.to_owned(), ends_within + OVERDUE_MARGIN);
        if let Some(old) = self.timers.insert(cmd_id.to_owned(), key) {
            overdue.try_remove(&old);
        }
        self.states.insert(cmd_id.to_owned(), CommandState::Live)
    }

    /// The next command whose time is up; never, while none is live.
    async fn next_overdue(&mut self) -> Option<String> {
        let Some(overdue) = self.overdue.as_mut().filter(|queue| !queue.is_empty()) else {
            return std::future::pending().await;
        };
        let expired = std::future::poll_fn(|cx| overdue.poll_expired(cx)).await?;
        let cmd_id = expired.into_inner();
        self.timers.remove(&cmd_id);
        Some(cmd_id)
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

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    active: Active,
    kill: CancellationToken,
    write_timeout: Duration,
    ping_written: tokio::sync::watch::Sender<Option<Instant>>,
) {
    let mut commands = Commands::new(active);
    loop {
        let (outgoing, charge) = tokio::select! {
            biased;
            _ = kill.cancelled() => return,
            next = inbox.recv() => match next {
                Some((outgoing, charge)) => (outgoing, Some(charge)),
                None => break,
            },
            Some(cmd_id) = commands.next_overdue() => (Outgoing::Overdue(cmd_id), None),
        };
        let mut frames = Vec::new();
        let mut closing = None;
        match outgoing {
            Outgoing::Reply(text) => frames.push(Message::Text(text.into())),
            Outgoing::Ping => frames.push(Message::Ping(Bytes::new())),
            Outgoing::Close(frame) => closing = Some(frame),
            Outgoing::Register(cmd_id) => {
                commands
                    .states
                    .insert(cmd_id, CommandState::Pending(Vec::new()));
            }
            Outgoing::Started {
                cmd_id,
                reply,
                ends_within,
            } => {
                frames.extend(reply.map(|text| Message::Text(text.into())));
                if let Some(CommandState::Pending(held)) = commands.start(&cmd_id, ends_within) {
                    for (kind, _charge) in held {
                        if matches!(kind, notification::Kind::Ended(_)) {
                            commands.end(&cmd_id);
                        }
                        frames.push(Message::Text(rpc::notification(&cmd_id, &kind).into()));
                    }
                }
            }
            Outgoing::Overdue(cmd_id) => {
                // Its timer went with it if it ended: a due timer means it is still running.
                if commands.states.contains_key(&cmd_id) {
                    commands.end(&cmd_id);
                    tracing::warn!(%cmd_id, "no end from the commands service in time; ending the command");
                    let lost = notification::Kind::Error(callapi_proto::v1::CommandError {
                        code: "COMMAND_LOST".to_owned(),
                        message: "the commands service handling this command did not finish it in time (it may have stopped); the call may be in any state".to_owned(),
                        sip_code: 0,
                    });
                    frames.push(Message::Text(rpc::notification(&cmd_id, &lost).into()));
                    frames.push(Message::Text(
                        rpc::notification(
                            &cmd_id,
                            &notification::Kind::Ended(callapi_proto::v1::CommandEnded {}),
                        )
                        .into(),
                    ));
                }
            }
            Outgoing::Refused { cmd_id, reply } => {
                frames.extend(reply.map(|text| Message::Text(text.into())));
                commands.end(&cmd_id);
            }
            Outgoing::Notification { cmd_id, kind } => match commands.states.get_mut(&cmd_id) {
                Some(CommandState::Pending(held)) => {
                    // Its bytes stay counted while it is held back.
                    if let Some(charge) = charge {
                        held.push((kind, charge));
                    }
                    continue;
                }
                Some(CommandState::Live) => {
                    if matches!(kind, notification::Kind::Ended(_)) {
                        commands.end(&cmd_id);
                    }
                    frames.push(Message::Text(rpc::notification(&cmd_id, &kind).into()));
                }
                None => tracing::debug!(%cmd_id, "notification for an unknown command dropped"),
            },
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
