//! The queue in front of a connection's writer task, bounded in messages and in bytes.
//!
//! Its producers (the connection's reader, its command tasks and timers, the hub) must never
//! wait for a client: a client that lets more than `connection_queue` messages or
//! `connection_queue_bytes` bytes pile up is too slow, and pushing past either limit kills its
//! connection at once instead of blocking (or growing without bound).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use axum::extract::ws::CloseFrame;
use callapi_proto::v1::notification;

/// What the writer task sends.
pub(crate) enum Outgoing {
    /// A reply not tied to a running command.
    Reply(String),
    /// The command was taken: write the reply, then what was held back. If it has not ended
    /// after `ends_within`, its commands replica is presumed lost.
    Started {
        cmd_id: String,
        reply: Option<String>,
        ends_within: Duration,
    },
    /// The command was not taken: write the error, drop what was held back.
    Refused {
        cmd_id: String,
        reply: Option<String>,
    },
    /// A notification of a command (of submission `attempt` of its `cmd_id`).
    Notification {
        cmd_id: String,
        attempt: u64,
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
            Outgoing::Started { cmd_id, reply, .. } | Outgoing::Refused { cmd_id, reply } => {
                cmd_id.len() + reply.as_ref().map_or(0, String::len)
            }
            Outgoing::Notification { cmd_id, kind, .. } => cmd_id.len() + kind.encoded_len(),
            Outgoing::Ping => 0,
            Outgoing::Close(frame) => frame.as_ref().map_or(0, |f| f.reason.len()),
        };
        text + MESSAGE_OVERHEAD
    }
}

/// Why a message could not be queued: the connection is going away (or was just killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PushError {
    /// The client fell too far behind: its connection was killed.
    #[error("client too slow: connection killed")]
    TooSlow,
    /// The writer is gone.
    #[error("connection closed")]
    Closed,
}

struct Inner {
    queued_bytes: AtomicUsize,
    limit_bytes: usize,
    kill: CancellationToken,
    connection_id: String,
}

impl Inner {
    fn too_slow(&self, why: &str) -> PushError {
        if !self.kill.is_cancelled() {
            metrics::counter!("callapi_slow_clients_total").increment(1);
            tracing::warn!(connection = %self.connection_id, "client too slow ({why}): disconnecting it");
            self.kill.cancel();
        }
        PushError::TooSlow
    }
}

struct Queued {
    outgoing: Outgoing,
    charge: Charge,
}

/// The bytes of one queued message, counted until this is dropped (after it was written).
pub(crate) struct Charge {
    inner: Arc<Inner>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        metrics::gauge!("callapi_websocket_queued_messages").decrement(1.0);
        self.inner
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    // Boxed: the channel allocates its slots 32 at a time up front, and an idle connection
    // should pay for 32 pointers, not 32 messages.
    tx: mpsc::Sender<Box<Queued>>,
    inner: Arc<Inner>,
}

/// The writer's receiving side.
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Box<Queued>>,
}

/// A new outbox of at most `messages` messages and `bytes` bytes; `kill` is cancelled when a
/// push goes past either.
pub(crate) fn channel(
    messages: usize,
    bytes: usize,
    kill: CancellationToken,
    connection_id: String,
) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let inner = Arc::new(Inner {
        queued_bytes: AtomicUsize::new(0),
        limit_bytes: bytes,
        kill,
        connection_id,
    });
    (Outbox { tx, inner }, Inbox { rx })
}

impl Outbox {
    /// Queues `outgoing` without waiting; past a limit the connection is killed.
    pub fn push(&self, outgoing: Outgoing) -> Result<(), PushError> {
        if self.inner.kill.is_cancelled() {
            return Err(PushError::Closed);
        }
        let bytes = outgoing.weight();
        let before = self.inner.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        metrics::gauge!("callapi_websocket_queued_messages").increment(1.0);
        let charge = Charge {
            inner: self.inner.clone(),
            bytes,
        };
        if before.saturating_add(bytes) > self.inner.limit_bytes {
            drop(charge);
            return Err(self.inner.too_slow("too many bytes queued"));
        }
        match self.tx.try_send(Box::new(Queued { outgoing, charge })) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(self.inner.too_slow("too many messages queued"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::Closed),
        }
    }

    /// Bytes queued and not yet written (or held back) right now.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.inner.queued_bytes.load(Ordering::Acquire)
    }
}

impl Inbox {
    /// Whether nothing is queued right now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The next message and its charge (drop the charge once the message is written), or
    /// `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<(Outgoing, Charge)> {
        let queued = self.rx.recv().await?;
        Some((queued.outgoing, queued.charge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: usize) -> Outgoing {
        Outgoing::Reply("x".repeat(bytes))
    }

    #[tokio::test]
    async fn too_many_bytes_kill_the_connection_without_blocking() {
        let kill = CancellationToken::new();
        let (outbox, mut inbox) = channel(1000, 10_000, kill.clone(), "c".into());
        for _ in 0..4 {
            outbox.push(reply(2_000)).unwrap();
        }
        assert!(!kill.is_cancelled());
        assert_eq!(outbox.push(reply(4_000)), Err(PushError::TooSlow));
        assert!(kill.is_cancelled());
        assert_eq!(outbox.push(reply(1)), Err(PushError::Closed));
        // What was written is no longer counted.
        let (_, charge) = inbox.recv().await.unwrap();
        let before = outbox.queued_bytes();
        drop(charge);
        assert!(outbox.queued_bytes() < before);
    }

    #[tokio::test]
    async fn too_many_messages_kill_the_connection_without_blocking() {
        let kill = CancellationToken::new();
        let (outbox, _inbox) = channel(3, usize::MAX, kill.clone(), "c".into());
        for _ in 0..3 {
            outbox.push(reply(1)).unwrap();
        }
        assert_eq!(outbox.push(reply(1)), Err(PushError::TooSlow));
        assert!(kill.is_cancelled());
    }

    #[tokio::test]
    async fn bytes_are_released_as_messages_are_written() {
        let kill = CancellationToken::new();
        let (outbox, mut inbox) = channel(1000, 5_000, kill.clone(), "c".into());
        for _ in 0..100 {
            outbox.push(reply(3_000)).unwrap();
            let (_, charge) = inbox.recv().await.unwrap();
            drop(charge);
        }
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(!kill.is_cancelled());
    }
}
