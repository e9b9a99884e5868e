//! `CommandAttach`: a client that lost its WebSocket (or moved to another gateway) re-attaches
//! to a command it started, by `cmd_id`, and gets every notification of it so far, then the
//! rest live until `Ended`. The JetStream stream `CALLAPI_COMMAND_LOG` keeps, a while, what
//! every gateway records when a commands replica takes a command (`CommandStarted`, on
//! `callapi.v1.cmdlog.<tenant>.<gateway>.<cmd>`) and every notification commands publish (on
//! `callapi.v1.notify.<tenant>.<gateway>.<cmd>`); the tenant in both subjects confines a
//! client to its own tenant's commands. A command that never ends (its replica died) is ended
//! for the attached client at its deadline, as for the client that started it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use callapi_kit::subjects;
use callapi_proto::v1::{CommandStarted, Notification, notification};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::outbox::{Outbox, Outgoing};
use crate::rpc::{self, RpcId, code};

/// How long after its deadline an attached command with no end is ended for the client (the
/// replica's own grace, then the gateway's).
const GRACE: Duration = Duration::from_secs(5);
/// Longest wait for what the log already holds.
const CATCH_UP: Duration = Duration::from_secs(2);

/// Creates the command log stream if it is missing.
pub(crate) async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: &crate::CommandLogConfig,
) -> Result<(), String> {
    let name = subjects::COMMAND_LOG_STREAM;
    if jetstream.get_stream(name).await.is_ok() {
        return Ok(());
    }
    let stream = jetstream::stream::Config {
        name: name.to_owned(),
        description: Some(
            "callapi: commands' notifications, kept for CommandAttach (callapi.v1.Notification, CommandStarted)"
                .to_owned(),
        ),
        subjects: subjects::COMMAND_LOG_SUBJECTS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        max_age: Duration::from_secs(config.max_age_secs.max(60)),
        num_replicas: config.replicas.max(1),
        storage: match config.storage {
            crate::LogStorage::Memory => jetstream::stream::StorageType::Memory,
            crate::LogStorage::File => jetstream::stream::StorageType::File,
        },
        ..Default::default()
    };
    callapi_kit::calls::ensure_stream(jetstream, stream, callapi_kit::calls::STARTUP_ATTEMPTS).await
}

/// One re-attachment.
pub(crate) struct Attach {
    pub nats: async_nats::Client,
    pub tenant: String,
    pub cmd_id: String,
    pub reply_id: Option<RpcId>,
    pub outbox: Outbox,
    pub stop: CancellationToken,
}

/// What the log holds of one run of the command: the latest start recorded under its id, and
/// the notifications of that run (by connection and attempt: a fast command's first ones may
/// be logged before its start record).
#[derive(Debug, Default)]
struct Run {
    started: Option<CommandStarted>,
    /// Notifications so far, in order, with the run (connection, attempt) each belongs to.
    notes: Vec<(String, u64, notification::Kind)>,
}

impl Run {
    /// Takes one logged message: a start (the latest one wins: a `cmd_id` used again later
    /// is a new command) or a notification.
    fn take(&mut self, subject: &str, payload: &[u8]) {
        if subject.starts_with("callapi.v1.cmdlog.") {
            if let Ok(started) = CommandStarted::decode(payload) {
                self.notes
                    .retain(|(c, a, _)| *c == started.connection_id && *a == started.attempt);
                self.started = Some(started);
            }
            return;
        }
        let Ok(note) = Notification::decode(payload) else {
            return;
        };
        if self.ended() {
            return;
        }
        if let Some(kind) = note.kind {
            self.notes.push((note.connection_id, note.attempt, kind));
        }
    }

    /// The notifications of the latest run.
    fn of_run(&self) -> Vec<&notification::Kind> {
        self.notes
            .iter()
            .filter(|(c, a, _)| {
                self.started
                    .as_ref()
                    .is_none_or(|s| s.connection_id == *c && s.attempt == *a)
            })
            .map(|(_, _, kind)| kind)
            .collect()
    }

    /// Whether the latest run ended.
    fn ended(&self) -> bool {
        self.of_run()
            .iter()
            .any(|kind| matches!(kind, notification::Kind::Ended(_)))
    }
}

/// Answers the `CommandAttach`, replays what the command said so far, then forwards the rest
/// until it ends, the client goes, or its deadline passes.
pub(crate) async fn run(attach: Attach) {
    let Attach {
        nats,
        tenant,
        cmd_id,
        reply_id,
        outbox,
        stop,
    } = attach;
    let send = |text: String| outbox.push(Outgoing::Reply(text)).is_ok();
    let fail = |code: i64, message: &str| {
        if let Some(id) = &reply_id {
            let _ = outbox.push(Outgoing::Reply(rpc::error(id, code, message)));
        }
    };
    let jetstream = jetstream::new(nats);
    let opened = async {
        let stream = jetstream
            .get_stream(subjects::COMMAND_LOG_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subjects: subjects::command_log_of(&tenant, &cmd_id).to_vec(),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let held = consumer
            .info()
            .await
            .map_err(|e| e.to_string())?
            .num_pending;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((messages, held))
    };
    let (mut messages, held) = match opened.await {
        Ok(opened) => opened,
        Err(err) => {
            tracing::debug!(%err, "command log unavailable");
            fail(
                code::UNAVAILABLE,
                "the command log is unavailable now; try again later",
            );
            return;
        }
    };
    // What the log holds now.
    let mut run = Run::default();
    let mut pending = held;
    while pending > 0 {
        let next = tokio::time::timeout(CATCH_UP, messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        run.take(&message.subject, &message.payload);
        pending = message.info().map(|i| i.pending).unwrap_or(0);
    }
    let Some(started) = run.started.clone() else {
        fail(
            code::NOT_FOUND,
            "no command with this cmd_id was started recently",
        );
        return;
    };
    let replayed = run.of_run().len();
    if let Some(id) = &reply_id
        && !send(rpc::result(
            id,
            &json!({"cmd_id": cmd_id, "status": "Attached", "replayed": replayed, "running": !run.ended()}),
        ))
    {
        return;
    }
    for kind in run.of_run() {
        if !send(rpc::notification(&cmd_id, kind)) {
            return;
        }
    }
    let mut sent = replayed;
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(
            started
                .deadline_at_ms
                .saturating_sub(callapi_kit::unix_ms()),
        )
        + GRACE;
    while !run.ended() {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => None,
            next = messages.next() => Some(next),
        };
        let Some(Some(Ok(message))) = next else {
            // The deadline passed (or the log went away): end it as the starting gateway does.
            for kind in crate::connection::lost_command() {
                let _ = send(rpc::notification(&cmd_id, &kind));
            }
            return;
        };
        run.take(&message.subject, &message.payload);
        let now = run.of_run();
        for kind in now.iter().skip(sent) {
            if !send(rpc::notification(&cmd_id, kind)) {
                return;
            }
        }
        sent = now.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1::{CommandEnded, CommandEvent};

    fn started(connection: &str, attempt: u64) -> Vec<u8> {
        CommandStarted {
            tenant: "acme".into(),
            cmd_id: "c".into(),
            connection_id: connection.into(),
            attempt,
            deadline_at_ms: 1,
        }
        .encode_to_vec()
    }

    fn note(connection: &str, attempt: u64, kind: notification::Kind) -> Vec<u8> {
        Notification {
            tenant: "acme".into(),
            cmd_id: "c".into(),
            connection_id: connection.into(),
            attempt,
            kind: Some(kind),
            ..Default::default()
        }
        .encode_to_vec()
    }

    const LOG: &str = "callapi.v1.cmdlog.acme.gw.Yw";
    const NOTE: &str = "callapi.v1.notify.acme.gw.Yw";

    #[test]
    fn notifications_logged_before_their_start_record_are_kept() {
        let ended = || notification::Kind::Ended(CommandEnded {});
        let mut run = Run::default();
        // A fast command: its Ended is logged before the gateway's start record.
        run.take(NOTE, &note("conn-1", 1, ended()));
        run.take(LOG, &started("conn-1", 1));
        assert_eq!(run.of_run().len(), 1);
        assert!(run.ended());
    }

    #[test]
    fn the_latest_run_of_a_cmd_id_is_the_one_attached_to() {
        let event = || notification::Kind::Event(CommandEvent::default());
        let ended = || notification::Kind::Ended(CommandEnded {});
        let mut run = Run::default();
        run.take(LOG, &started("conn-1", 1));
        run.take(NOTE, &note("conn-1", 1, event()));
        run.take(NOTE, &note("conn-1", 1, ended()));
        assert!(run.ended());
        // The same cmd_id used again by another connection: a new run.
        run.take(LOG, &started("conn-2", 1));
        assert!(!run.ended() && run.of_run().is_empty());
        // A late notification of the old run is not this run's.
        run.take(NOTE, &note("conn-1", 1, event()));
        assert!(run.of_run().is_empty());
        run.take(NOTE, &note("conn-2", 1, event()));
        run.take(NOTE, &note("conn-2", 1, ended()));
        run.take(NOTE, &note("conn-2", 1, event()));
        assert_eq!(run.of_run().len(), 2);
        assert!(run.ended());
        // Garbage is ignored.
        run.take(NOTE, b"\xff\xff");
        assert_eq!(run.of_run().len(), 2);
    }
}
