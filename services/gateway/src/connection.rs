//! One WebSocket client: reads requests, starts commands, writes replies and notifications.
//!
//! A single writer task owns the socket's sending half, fed by a bounded queue. It also keeps
//! each command's order: notifications that arrive before the command's `Started` reply is
//! written are held back and written right after it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use callapi_kit::subjects;
use callapi_proto::v1::{CommandAck, CommandRequest, notification};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::hub::ConnectionHandle;
use crate::rpc::{self, CommandCall, code};

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
    /// A command's time is up: if it is still running, end it for the client.
    Overdue(String, u64),
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
}

pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(shared.config.connection_queue.max(16));
    let kill = CancellationToken::new();
    let active: Arc<Mutex<HashSet<String>>> = Arc::default();
    shared.hub.add(
        connection_id.clone(),
        ConnectionHandle {
            tenant: shared.config.tenant.clone(),
            outgoing: tx.clone(),
            kill: kill.clone(),
        },
    );
    tracing::debug!(%connection_id, "client connected");
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        tx.downgrade(),
        active.clone(),
        kill.clone(),
    ));
    loop {
        let message = tokio::select! {
            _ = kill.cancelled() => break,
            _ = shared.shutdown.cancelled() => break,
            message = stream.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(Message::Binary(_))) => {
                let reply = rpc::error(
                    &Value::Null,
                    code::INVALID_REQUEST,
                    "Invalid Request: binary messages are not supported; send JSON text",
                );
                if tx.send(Outgoing::Reply(reply)).await.is_err() {
                    break;
                }
                continue;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                tracing::debug!(%err, %connection_id, "WebSocket read error");
                break;
            }
        };
        if text.len() > shared.config.max_message_bytes {
            let reply = rpc::error(
                &Value::Null,
                code::INVALID_REQUEST,
                &format!(
                    "Invalid Request: message of {} bytes is over the limit of {} bytes",
                    text.len(),
                    shared.config.max_message_bytes
                ),
            );
            if tx.send(Outgoing::Reply(reply)).await.is_err() {
                break;
            }
            continue;
        }
        match rpc::parse(&text) {
            Ok(call) => {
                if !start_command(&shared, &connection_id, &tx, &active, call).await {
                    break;
                }
            }
            Err(error) => {
                if !error.silent && tx.send(Outgoing::Reply(error.to_json())).await.is_err() {
                    break;
                }
            }
        }
    }
    shared.hub.remove(&connection_id);
    drop(tx);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        // The client stopped reading: do not leave the writer blocked on it.
        abort.abort();
    }
    tracing::debug!(%connection_id, "client gone");
}

/// Sends the command to a commands replica; the reply is written when it took it.
/// Returns false when the connection is going away.
async fn start_command(
    shared: &Arc<Shared>,
    connection_id: &str,
    tx: &mpsc::Sender<Outgoing>,
    active: &Arc<Mutex<HashSet<String>>>,
    call: CommandCall,
) -> bool {
    let cmd_id = call
        .cmd_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let reply_id = call.id.clone().unwrap_or(Value::Null);
    let fresh = active
        .lock()
        .map(|mut set| set.insert(cmd_id.clone()))
        .unwrap_or(false);
    if !fresh {
        if call.id.is_some() {
            let reply = rpc::error(
                &reply_id,
                code::DUPLICATE_CMD_ID,
                &format!("cmd_id {cmd_id:?} is already used by a running command"),
            );
            return tx.send(Outgoing::Reply(reply)).await.is_ok();
        }
        return true;
    }
    if tx.send(Outgoing::Register(cmd_id.clone())).await.is_err() {
        return false;
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
    let tx = tx.clone();
    let answer = call.id.is_some();
    tokio::spawn(async move {
        let nats_request = async_nats::Request::new()
            .payload(request.encode_to_vec().into())
            .timeout(Some(Duration::from_millis(
                shared.config.command_ack_timeout_ms,
            )));
        let outcome = match shared.client.send_request(subject, nats_request).await {
            Ok(message) => match CommandAck::decode(message.payload.as_ref()) {
                Ok(ack) if ack.accepted => Ok(Duration::from_millis(ack.deadline_ms)),
                Ok(ack) => Err((code::REFUSED, format!("command refused: {}", ack.error))),
                Err(_) => Err((
                    code::UNAVAILABLE,
                    "unreadable answer from the commands service".to_owned(),
                )),
            },
            Err(err) => Err((
                code::UNAVAILABLE,
                match err.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        "no commands service is running; try again later".to_owned()
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        "the commands service did not take the command in time; try again later"
                            .to_owned()
                    }
                    _ => format!("could not reach the commands service: {err}"),
                },
            )),
        };
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
        let _ = tx.send(outgoing).await;
    });
    true
}

enum CommandState {
    Pending(Vec<notification::Kind>),
    Live,
}

/// Extra time given to a commands replica beyond the deadline it announced.
const OVERDUE_MARGIN: Duration = Duration::from_secs(3);

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    myself: mpsc::WeakSender<Outgoing>,
    active: Arc<Mutex<HashSet<String>>>,
    kill: CancellationToken,
) {
    let mut commands: HashMap<String, CommandState> = HashMap::new();
    let mut generations: HashMap<String, u64> = HashMap::new();
    let mut generation = 0u64;
    let finish = |cmd_id: &str| {
        if let Ok(mut set) = active.lock() {
            set.remove(cmd_id);
        }
    };
    while let Some(outgoing) = rx.recv().await {
        let mut texts = Vec::new();
        match outgoing {
            Outgoing::Reply(text) => texts.push(text),
            Outgoing::Register(cmd_id) => {
                commands.insert(cmd_id, CommandState::Pending(Vec::new()));
            }
            Outgoing::Started {
                cmd_id,
                reply,
                ends_within,
            } => {
                texts.extend(reply);
                let myself = myself.clone();
                let overdue = cmd_id.clone();
                generation += 1;
                let this_run = generation;
                generations.insert(cmd_id.clone(), this_run);
                tokio::spawn(async move {
                    tokio::time::sleep(ends_within + OVERDUE_MARGIN).await;
                    if let Some(tx) = myself.upgrade() {
                        let _ = tx.send(Outgoing::Overdue(overdue, this_run)).await;
                    }
                });
                if let Some(CommandState::Pending(held)) =
                    commands.insert(cmd_id.clone(), CommandState::Live)
                {
                    for kind in held {
                        if matches!(kind, notification::Kind::Ended(_)) {
                            commands.remove(&cmd_id);
                            finish(&cmd_id);
                        }
                        texts.push(rpc::notification(&cmd_id, &kind));
                    }
                }
            }
            Outgoing::Overdue(cmd_id, run) => {
                // A cmd_id may be reused once its command ended: only the same run counts.
                if generations.get(&cmd_id) == Some(&run)
                    && generations.remove(&cmd_id).is_some()
                    && commands.remove(&cmd_id).is_some()
                {
                    finish(&cmd_id);
                    tracing::warn!(%cmd_id, "no end from the commands service in time; ending the command");
                    let lost = notification::Kind::Error(callapi_proto::v1::CommandError {
                        code: "COMMAND_LOST".to_owned(),
                        message: "the commands service handling this command did not finish it in time (it may have stopped); the call may be in any state".to_owned(),
                        sip_code: 0,
                    });
                    texts.push(rpc::notification(&cmd_id, &lost));
                    texts.push(rpc::notification(
                        &cmd_id,
                        &notification::Kind::Ended(callapi_proto::v1::CommandEnded {}),
                    ));
                }
            }
            Outgoing::Refused { cmd_id, reply } => {
                texts.extend(reply);
                commands.remove(&cmd_id);
                finish(&cmd_id);
            }
            Outgoing::Notification { cmd_id, kind } => match commands.get_mut(&cmd_id) {
                Some(CommandState::Pending(held)) => held.push(kind),
                Some(CommandState::Live) => {
                    if matches!(kind, notification::Kind::Ended(_)) {
                        commands.remove(&cmd_id);
                        finish(&cmd_id);
                    }
                    texts.push(rpc::notification(&cmd_id, &kind));
                }
                None => tracing::debug!(%cmd_id, "notification for an unknown command dropped"),
            },
        }
        for text in texts {
            if sink.send(Message::Text(text.into())).await.is_err() {
                kill.cancel();
                return;
            }
        }
    }
    let _ = sink.close().await;
}
