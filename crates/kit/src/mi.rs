//! MI requests over NATS: how any service asks proxy-connector to run one MI command on an
//! OpenSIPS node (`callapi.v1.mi.<node>`), with one mapping of NATS failures to errors.
//!
//! A request may ask for progress messages ([`Liveness`]): proxy-connector then confirms it
//! took the request and keeps saying so while OpenSIPS works on it, so a request lost on the
//! way (connector killed, NATS restarted) is told apart from a slow one within seconds instead
//! of at the end of its timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use callapi_proto::v1::{MiReply, MiRequest, mi_reply};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::subjects;

/// One MI command for one node.
#[derive(Debug, Clone, Default)]
pub struct MiCall {
    /// OpenSIPS node id.
    pub node_id: String,
    /// MI command name.
    pub method: String,
    /// Named params as JSON text ("" = none).
    pub params_json: String,
    /// How long to wait for the outcome in all.
    pub timeout: Duration,
    /// Tenant the request is made for (fair sharing of the node's MI slots).
    pub tenant: String,
    /// Client within the tenant (fair sharing of the node's MI slots).
    pub client: String,
    /// Not zero: the command's effect goes on holding OpenSIPS memory after its reply
    /// (`call_transfer`'s REFERed INVITE rings on); the node's slot is kept for at most this
    /// long after a result, until the [`SlotLease`] that [`MiClient::call_leased`] returns is
    /// dropped.
    pub hold_slot: Duration,
}

/// A node slot proxy-connector keeps after a reply (see [`MiCall::hold_slot`]); given back
/// when dropped (or when its hold time ends, whichever comes first).
#[derive(Debug)]
pub struct SlotLease {
    nats: async_nats::Client,
    release_subject: String,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let nats = self.nats.clone();
        let subject = std::mem::take(&mut self.release_subject);
        runtime.spawn(async move {
            if let Err(err) = nats.publish(subject, bytes::Bytes::new()).await {
                tracing::debug!(%err, "could not give back a node slot; it ends with its hold time");
            }
        });
    }
}

/// How a request in flight is watched for signs of life.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// How often proxy-connector is asked to confirm it still holds the request.
    pub progress_interval: Duration,
    /// Silence after which the request is presumed lost.
    pub lost_after: Duration,
}

/// What OpenSIPS answered.
#[derive(Debug, Clone, PartialEq)]
pub enum MiAnswer {
    /// The JSON-RPC `result`, as JSON text.
    Result(String),
    /// The JSON-RPC `error`.
    Error {
        /// Error code.
        code: i64,
        /// Error message.
        message: String,
        /// The `data` member as JSON text ("" if none).
        data_json: String,
    },
}

/// Why an MI request got no answer from OpenSIPS.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MiCallError {
    /// This service is not connected to NATS.
    #[error("NATS is unreachable (not connected)")]
    NatsDown,
    /// No proxy-connector subscribes to the node's subject.
    #[error("no proxy-connector serves node {0}")]
    NoConnector(String),
    /// The request was taken (or sent) but then nothing more was heard of it.
    #[error(
        "lost contact with proxy-connector for node {node}: no sign of life for {silent:?} (the request may or may not have reached OpenSIPS)"
    )]
    Lost {
        /// Node id.
        node: String,
        /// How long it was silent.
        silent: Duration,
    },
    /// No outcome within the request's timeout.
    #[error("no answer from node {node} within {after:?}")]
    TimedOut {
        /// Node id.
        node: String,
        /// The timeout.
        after: Duration,
    },
    /// The node is overloaded (OpenSIPS out of memory, or the connector's queue full): the
    /// request was not carried out.
    #[error("{0}")]
    Overloaded(String),
    /// proxy-connector got no answer from OpenSIPS (none within its timeout, or the node
    /// refused the connection).
    #[error("{0}")]
    Unreachable(String),
    /// proxy-connector refused the request as malformed (bad method or params): a bug of the
    /// requester, not a state of the node. Not sent.
    #[error("{0}")]
    BadRequest(String),
    /// proxy-connector serves no node with this id (a configuration mistake).
    #[error("{0}")]
    UnknownNode(String),
    /// OpenSIPS answered something that is not a JSON-RPC reply.
    #[error("{0}")]
    BadReply(String),
    /// NATS refused the request or the reply was not an `MiReply`.
    #[error("{0}")]
    Transport(String),
}

/// The MI client of one service: every request's replies come back on one wildcard
/// subscription (`<inbox>.*`, made once) and are routed to the request by its last token, so a
/// request costs one publish and its replies, not a subscription of its own. Cheap to clone.
#[derive(Clone)]
pub struct MiClient {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    /// `_INBOX.<unique>`: replies come to `<prefix>.<request number>`.
    prefix: String,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>,
    next_id: AtomicU64,
    /// Stops the routing task when the last clone goes.
    _stop: tokio_util::sync::DropGuard,
}

/// A request's place in the routing table, removed when the request is done; replies routed
/// to it but never read give back the node slot they may keep.
struct Route<'a> {
    inner: &'a Inner,
    id: u64,
    replies: mpsc::UnboundedReceiver<async_nats::Message>,
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        lock(&self.inner.routes).remove(&self.id);
        self.replies.close();
        while let Ok(message) = self.replies.try_recv() {
            release_unclaimed(&self.inner.nats, &message);
        }
    }
}

/// A reply that no request will read (it finished, e.g. its flow ended on an event that came
/// first, or gave up): if proxy-connector kept a node slot for it, gives the slot back now
/// rather than at the end of its hold time.
fn release_unclaimed(nats: &async_nats::Client, message: &async_nats::Message) {
    let Ok(reply) = MiReply::decode(message.payload.as_ref()) else {
        return;
    };
    if reply.release_subject.is_empty() {
        return;
    }
    drop(SlotLease {
        nats: nats.clone(),
        release_subject: reply.release_subject,
    });
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MiClient {
    /// Subscribes to this client's reply subjects and starts routing them (the subscription
    /// is registered with the server before this returns).
    pub async fn new(nats: async_nats::Client) -> Result<Self, MiCallError> {
        let transport = |e: &dyn std::fmt::Display| MiCallError::Transport(format!("NATS: {e}"));
        let prefix = nats.new_inbox();
        let mut replies = nats
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(|e| transport(&e))?;
        nats.flush().await.map_err(|e| transport(&e))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let inner = Arc::new(Inner {
            nats,
            prefix,
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            _stop: stop.clone().drop_guard(),
        });
        let routing = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = replies.next() => message,
                };
                let Some(message) = message else { break };
                let Some(inner) = routing.upgrade() else {
                    break;
                };
                let id = message
                    .subject
                    .rsplit_once('.')
                    .and_then(|(_, id)| id.parse::<u64>().ok());
                match id.and_then(|id| lock(&inner.routes).get(&id).cloned()) {
                    Some(route) => {
                        // A request that just finished has dropped its receiver.
                        if let Err(unsent) = route.send(message) {
                            release_unclaimed(&inner.nats, &unsent.0);
                        }
                    }
                    None => release_unclaimed(&inner.nats, &message),
                }
            }
            // Requests still waiting see their replies end instead of waiting for a timeout.
            if let Some(inner) = routing.upgrade() {
                lock(&inner.routes).clear();
            }
        });
        Ok(Self { inner })
    }

    /// The NATS client requests go out on.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// Sends `call` and waits for its outcome; with `liveness`, a silent request fails as
    /// [`MiCallError::Lost`] long before its timeout.
    pub async fn call(
        &self,
        call: &MiCall,
        liveness: Option<Liveness>,
    ) -> Result<MiAnswer, MiCallError> {
        self.call_leased(call, liveness)
            .await
            .map(|(answer, _lease)| answer)
    }

    /// As [`MiClient::call`], and with the node slot proxy-connector keeps after a result when
    /// `call.hold_slot` is not zero: hold the lease while the command's effect lasts.
    pub async fn call_leased(
        &self,
        call: &MiCall,
        liveness: Option<Liveness>,
    ) -> Result<(MiAnswer, Option<SlotLease>), MiCallError> {
        let inner = &*self.inner;
        if inner.nats.connection_state() != async_nats::connection::State::Connected {
            return Err(MiCallError::NatsDown);
        }
        // The connector answers "unreachable" a little before our own timeout fires.
        let connector_timeout = call
            .timeout
            .saturating_sub(Duration::from_millis(250))
            .max(Duration::from_millis(200));
        let request = MiRequest {
            node_id: call.node_id.clone(),
            method: call.method.clone(),
            params_json: call.params_json.clone(),
            timeout_ms: millis_u32(connector_timeout),
            progress_interval_ms: liveness.map_or(0, |l| millis_u32(l.progress_interval).max(1)),
            tenant: call.tenant.clone(),
            client: call.client.clone(),
            hold_slot_ms: millis_u32(call.hold_slot),
        };
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, replies) = mpsc::unbounded_channel();
        lock(&inner.routes).insert(id, sender);
        let mut route = Route { inner, id, replies };
        let subject = subjects::mi(&call.node_id);
        let reply_to = format!("{}.{id}", inner.prefix);
        let payload: bytes::Bytes = request.encode_to_vec().into();
        match crate::telemetry::current_headers() {
            Some(headers) => {
                inner
                    .nats
                    .publish_with_reply_and_headers(subject, reply_to, headers, payload)
                    .await
            }
            None => {
                inner
                    .nats
                    .publish_with_reply(subject, reply_to, payload)
                    .await
            }
        }
        .map_err(|e| MiCallError::Transport(format!("NATS: {e}")))?;
        let give_up = Instant::now() + call.timeout;
        let mut last_heard = Instant::now();
        loop {
            let silence_limit =
                liveness.map_or(give_up, |l| (last_heard + l.lost_after).min(give_up));
            let message = match tokio::time::timeout_at(silence_limit, route.replies.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(MiCallError::Transport("NATS subscription closed".into())),
                Err(_) if silence_limit >= give_up => {
                    return Err(MiCallError::TimedOut {
                        node: call.node_id.clone(),
                        after: call.timeout,
                    });
                }
                Err(_) => {
                    return Err(MiCallError::Lost {
                        node: call.node_id.clone(),
                        silent: last_heard.elapsed(),
                    });
                }
            };
            match outcome_of(&message, &call.node_id)? {
                Some((answer, release_subject)) => {
                    let lease = (!release_subject.is_empty()).then(|| SlotLease {
                        nats: inner.nats.clone(),
                        release_subject,
                    });
                    return Ok((answer, lease));
                }
                None => last_heard = Instant::now(),
            }
        }
    }
}

/// What one reply message says: the answer and the subject releasing a kept slot ("" if
/// none), or `None` for a progress message.
fn outcome_of(
    message: &async_nats::Message,
    node_id: &str,
) -> Result<Option<(MiAnswer, String)>, MiCallError> {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(MiCallError::NoConnector(node_id.to_owned()));
    }
    let reply = MiReply::decode(message.payload.as_ref())
        .map_err(|_| MiCallError::Transport("undecodable reply from proxy-connector".into()))?;
    let release_subject = reply.release_subject;
    match reply.outcome {
        Some(mi_reply::Outcome::Progress(_)) => Ok(None),
        Some(mi_reply::Outcome::ResultJson(json)) => {
            Ok(Some((MiAnswer::Result(json), release_subject)))
        }
        Some(mi_reply::Outcome::Error(error)) => Ok(Some((
            MiAnswer::Error {
                code: error.code,
                message: error.message,
                data_json: error.data_json,
            },
            release_subject,
        ))),
        Some(mi_reply::Outcome::Failure(failure)) => {
            use callapi_proto::v1::mi_failure::Kind;
            let message = failure.message;
            Err(match Kind::try_from(failure.kind) {
                Ok(Kind::Overloaded) => MiCallError::Overloaded(message),
                Ok(Kind::BadRequest) => MiCallError::BadRequest(message),
                Ok(Kind::UnknownNode) => MiCallError::UnknownNode(message),
                Ok(Kind::BadReply) => MiCallError::BadReply(message),
                Ok(Kind::Unreachable | Kind::Unspecified) | Err(_) => {
                    MiCallError::Unreachable(message)
                }
            })
        }
        None => Err(MiCallError::Transport(
            "empty reply from proxy-connector".into(),
        )),
    }
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
