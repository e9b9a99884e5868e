//! The JetStream streams of normalised call events, one per tenant (`CALLAPI_CALLS_<tenant>`,
//! subjects `callapi.v1.calls.<tenant>.<kind>`), so a stream's sequence numbers its tenant's
//! events with no gap. Every node's events, as [`crate::normalise`] makes them, go through one
//! [`Publisher`]: published with their stable id as `Nats-Msg-Id` (the stream keeps one copy of
//! each) and acknowledged by JetStream. A publish that is not acknowledged (NATS restarting, a
//! stream leader moving) is sent again with every later one, in order, until it is: no event is
//! lost to a NATS restart, and JetStream keeps one copy of an event sent again within its
//! duplicate window.

use std::collections::{HashSet, VecDeque};
use std::future::{Future, IntoFuture as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callapi_proto::v1::{CallEvent, OpensipsEvent};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::normalise::Normaliser;

/// `[calls_stream]`: the stream event-ingest creates when it is missing (an existing one is
/// left as it is).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct CallsStreamConfig {
    /// Make and publish the call events at all (off: no normalised events, no stream).
    pub publish: bool,
    /// Create the stream if missing (call events are published either way).
    pub enabled: bool,
    /// Events older than this are removed, seconds.
    pub max_age_secs: u64,
    /// The stream is kept under this size, bytes (oldest events removed first).
    pub max_bytes: i64,
    /// A second message with the same `Nats-Msg-Id` within this window is dropped, seconds.
    pub duplicate_window_secs: u64,
    /// Replicas of the stream (3 in a JetStream cluster).
    pub replicas: usize,
}

impl Default for CallsStreamConfig {
    fn default() -> Self {
        Self {
            publish: true,
            enabled: true,
            max_age_secs: 24 * 3600,
            max_bytes: 1024 * 1024 * 1024,
            duplicate_window_secs: 120,
            replicas: 1,
        }
    }
}

/// Creates `tenant`'s stream if it is missing, in up to `attempts` tries a second apart.
pub async fn ensure(
    jetstream: &async_nats::jetstream::Context,
    config: &CallsStreamConfig,
    tenant: &str,
    attempts: u32,
) -> Result<(), String> {
    let name = callapi_kit::calls::calls_stream(tenant);
    if jetstream.get_stream(&name).await.is_ok() {
        return Ok(());
    }
    let stream = async_nats::jetstream::stream::Config {
        name: name.clone(),
        description: Some(format!(
            "callapi: normalised call events of tenant {tenant} (callapi.v1.CallEvent)"
        )),
        subjects: vec![callapi_kit::subjects::tenant_calls(tenant)],
        max_age: Duration::from_secs(config.max_age_secs),
        max_bytes: config.max_bytes,
        duplicate_window: Duration::from_secs(config.duplicate_window_secs),
        num_replicas: config.replicas.max(1),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    callapi_kit::calls::ensure_stream(jetstream, stream, attempts).await
}

/// Creates the stream of each tenant the tenants file gains when it is read again.
pub async fn ensure_on_reload(
    jetstream: async_nats::jetstream::Context,
    config: CallsStreamConfig,
    mut tenants: tokio::sync::watch::Receiver<Arc<callapi_kit::tenants::Tenants>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = tenants.changed() => if changed.is_err() { return },
        }
        let ids: Vec<String> = tenants
            .borrow_and_update()
            .iter()
            .map(|t| t.id.clone())
            .collect();
        for tenant in ids {
            ensure_until_done(&jetstream, &config, &tenant, &shutdown).await;
        }
    }
}

/// Events waiting for the publisher; past this many (JetStream refusing for long) new ones are
/// dropped and counted, so the node's raw events never wait for the call events.
const QUEUE: usize = 16_384;
/// Publishes awaiting JetStream's acknowledgement at once.
const WINDOW: usize = 512;
/// A publish not acknowledged within this is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends call events to the publisher. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    events: mpsc::Sender<CallEvent>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Publisher {
    /// Starts the publisher task: with `config.enabled`, each tenant's stream is created when
    /// its first event comes and every event is acknowledged; without, events are only
    /// published. It ends when every sender is gone, or at `shutdown` after a last try.
    pub fn start(
        client: async_nats::Client,
        config: CallsStreamConfig,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (events, queue) = mpsc::channel(QUEUE);
        let task = tokio::spawn(publish_all(client, config, queue, shutdown));
        (
            Self {
                events,
                dropped: Arc::default(),
            },
            task,
        )
    }

    /// Queues `event`; when the queue is full (JetStream refusing for long), the event is
    /// dropped and counted rather than holding up the node's other events.
    fn send(&self, event: CallEvent) {
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("callapi_call_events_dropped_total").increment(1);
                let dropped = self
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if dropped.is_power_of_two() {
                    tracing::error!(
                        dropped,
                        "call events dropped: JetStream has not taken them for long"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("call event dropped: the publisher has stopped");
            }
        }
    }
}

type AckFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// An event sent to JetStream, not yet acknowledged.
struct InFlight {
    subject: String,
    event_id: String,
    payload: bytes::Bytes,
    ack: Option<AckFuture>,
}

async fn publish_all(
    client: async_nats::Client,
    config: CallsStreamConfig,
    mut queue: mpsc::Receiver<CallEvent>,
    shutdown: CancellationToken,
) {
    if !config.enabled {
        while let Some(event) = queue.recv().await {
            let (subject, headers, payload) = message(&event);
            if let Err(err) = client.publish_with_headers(subject, headers, payload).await {
                tracing::warn!(%err, "could not publish a call event");
            }
        }
        return;
    }
    let jetstream = async_nats::jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .build(client.clone());
    let mut streams: HashSet<String> = HashSet::new();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut open = true;
    loop {
        if !open && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if open => {
                // A last try for what is on its way, then stop.
                queue.close();
                while let Ok(event) = queue.try_recv() {
                    send(&jetstream, &mut in_flight, &event).await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), confirm_all(&client, &jetstream, &config, &mut in_flight)).await;
                return;
            }
            acked = front_ack(&mut in_flight) => {
                match acked {
                    Ok(_) => {
                        metrics::counter!("callapi_call_events_published_total").increment(1);
                        in_flight.pop_front();
                    }
                    Err(err) => {
                        tracing::warn!(%err, waiting = in_flight.len(), "call events not acknowledged; sending them again");
                        resend_all(&client, &jetstream, &config, &mut in_flight, &shutdown).await;
                    }
                }
            }
            event = queue.recv(), if open && in_flight.len() < WINDOW => {
                let Some(event) = event else {
                    open = false;
                    continue;
                };
                if !streams.contains(&event.tenant) {
                    ensure_until_done(&jetstream, &config, &event.tenant, &shutdown).await;
                    streams.insert(event.tenant.clone());
                }
                send(&jetstream, &mut in_flight, &event).await;
            }
        }
    }
}

/// The subject, headers and payload of `event`.
fn message(event: &CallEvent) -> (String, async_nats::HeaderMap, bytes::Bytes) {
    let subject = callapi_kit::subjects::calls(&event.tenant, event.kind().protocol_name());
    (
        subject,
        id_header(&event.event_id),
        event.encode_to_vec().into(),
    )
}

async fn send(
    jetstream: &async_nats::jetstream::Context,
    in_flight: &mut VecDeque<InFlight>,
    event: &CallEvent,
) {
    let (subject, headers, payload) = message(event);
    let mut entry = InFlight {
        subject,
        event_id: event.event_id.clone(),
        payload,
        ack: None,
    };
    // A send that fails now is sent again when the acknowledgement before it fails.
    entry.ack = publish(
        jetstream,
        entry.subject.clone(),
        headers,
        entry.payload.clone(),
    )
    .await;
    in_flight.push_back(entry);
}

async fn publish(
    jetstream: &async_nats::jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Option<AckFuture> {
    match jetstream
        .publish_with_headers(subject, headers, payload)
        .await
    {
        Ok(ack) => Some(Box::pin(ack.into_future()) as AckFuture),
        Err(err) => {
            tracing::debug!(%err, "call event not sent");
            None
        }
    }
}

/// The oldest publish's acknowledgement (never, while nothing is in flight).
async fn front_ack(
    in_flight: &mut VecDeque<InFlight>,
) -> Result<async_nats::jetstream::publish::PublishAck, String> {
    let Some(front) = in_flight.front_mut() else {
        return std::future::pending().await;
    };
    let result = match front.ack.as_mut() {
        Some(ack) => ack.await.map_err(|e| e.to_string()),
        None => Err("not sent".to_owned()),
    };
    // A finished acknowledgement is never awaited again.
    front.ack = None;
    result
}

/// Sends every unacknowledged event again, oldest first, with a growing pause between tries,
/// until the oldest is acknowledged (or `shutdown`). JetStream keeps one copy of each id.
async fn resend_all(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    config: &CallsStreamConfig,
    in_flight: &mut VecDeque<InFlight>,
    shutdown: &CancellationToken,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        // A stream removed meanwhile is made again (its tenant's events would fail forever).
        let mut tenants: Vec<&str> = in_flight
            .iter()
            .filter_map(|entry| entry.subject.split('.').nth(3))
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        let tenants: Vec<String> = tenants.into_iter().map(str::to_owned).collect();
        for tenant in &tenants {
            if let Err(err) = ensure(jetstream, config, tenant, 1).await {
                tracing::warn!(%err, %tenant, "cannot make the call events stream again");
            }
        }
        // Nothing is sent while NATS is away: the client would only queue it.
        while client.connection_state() != async_nats::connection::State::Connected {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        for entry in in_flight.iter_mut() {
            let (subject, headers, payload) = (
                entry.subject.clone(),
                id_header(&entry.event_id),
                entry.payload.clone(),
            );
            entry.ack = publish(jetstream, subject, headers, payload).await;
        }
        match front_ack(in_flight).await {
            Ok(_) => {
                in_flight.pop_front();
                return;
            }
            Err(err) => {
                tracing::warn!(%err, waiting = in_flight.len(), "call events still not acknowledged")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Waits for every acknowledgement, sending again what fails.
async fn confirm_all(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    config: &CallsStreamConfig,
    in_flight: &mut VecDeque<InFlight>,
) {
    let never = CancellationToken::new();
    while !in_flight.is_empty() {
        match front_ack(in_flight).await {
            Ok(_) => {
                in_flight.pop_front();
            }
            Err(_) => resend_all(client, jetstream, config, in_flight, &never).await,
        }
    }
}

fn id_header(event_id: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event_id);
    headers
}

/// Creates `tenant`'s stream, trying again (with a pause) until it exists or `shutdown`.
async fn ensure_until_done(
    jetstream: &async_nats::jetstream::Context,
    config: &CallsStreamConfig,
    tenant: &str,
    shutdown: &CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    while let Err(err) = ensure(jetstream, config, tenant, 1).await {
        tracing::warn!(%err, "cannot create a call events stream; trying again");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// One node's call events: normalised, then published. Cheap to clone.
#[derive(Clone)]
pub struct CallEvents {
    publisher: Option<Publisher>,
    normaliser: Arc<Mutex<Normaliser>>,
}

impl CallEvents {
    /// Nothing seen yet; without a publisher (`publish` off), nothing is ever made.
    pub fn new(publisher: Option<Publisher>) -> Self {
        Self {
            publisher,
            normaliser: Arc::default(),
        }
    }

    /// Publishes the call events one OpenSIPS event (its tenant set) makes.
    pub async fn on_event(&self, event: &OpensipsEvent) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        let events = self
            .normaliser
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .on_event(event, callapi_kit::unix_ms());
        for call_event in events {
            publisher.send(call_event);
        }
    }
}
