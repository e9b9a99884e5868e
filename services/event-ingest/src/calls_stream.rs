//! The JetStream stream of normalised call events (`CALLAPI_CALLS`, subjects
//! `callapi.v1.calls.<tenant>.<kind>`): every node's events, as [`crate::normalise`] makes
//! them, published with their stable id as `Nats-Msg-Id` so the stream keeps one copy of each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callapi_proto::v1::{CallEvent, OpensipsEvent};
use prost::Message as _;

use crate::normalise::Normaliser;

/// The stream's name.
pub const STREAM: &str = callapi_kit::calls::CALLS_STREAM;
/// The stream's subjects.
pub const SUBJECTS: &str = "callapi.v1.calls.>";

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

/// Creates the stream if it is missing.
pub async fn ensure(
    jetstream: &async_nats::jetstream::Context,
    config: &CallsStreamConfig,
) -> Result<(), String> {
    if jetstream.get_stream(STREAM).await.is_ok() {
        return Ok(());
    }
    let stream = async_nats::jetstream::stream::Config {
        name: STREAM.to_owned(),
        description: Some("callapi: normalised call events (callapi.v1.CallEvent)".to_owned()),
        subjects: vec![SUBJECTS.to_owned()],
        max_age: Duration::from_secs(config.max_age_secs),
        max_bytes: config.max_bytes,
        duplicate_window: Duration::from_secs(config.duplicate_window_secs),
        num_replicas: config.replicas.max(1),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    match jetstream.create_stream(stream).await {
        Ok(_) => Ok(()),
        // Another replica made it meanwhile.
        Err(_) if jetstream.get_stream(STREAM).await.is_ok() => Ok(()),
        Err(err) => Err(format!("stream {STREAM}: {err}")),
    }
}

/// One node's call events: normalised, then published. Cheap to clone.
#[derive(Clone)]
pub struct CallEvents {
    client: async_nats::Client,
    normaliser: Arc<Mutex<Normaliser>>,
    publish: bool,
}

impl CallEvents {
    /// Nothing seen yet; with `publish` off, nothing is ever made.
    pub fn new(client: async_nats::Client, publish: bool) -> Self {
        Self {
            client,
            normaliser: Arc::default(),
            publish,
        }
    }

    /// Publishes the call events one OpenSIPS event (its tenant set) makes.
    pub async fn on_event(&self, event: &OpensipsEvent) {
        if !self.publish {
            return;
        }
        let events = self
            .normaliser
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .on_event(event, callapi_kit::unix_ms());
        for call_event in events {
            self.publish(&call_event).await;
        }
    }

    async fn publish(&self, event: &CallEvent) {
        let subject = callapi_kit::subjects::calls(&event.tenant, event.kind().protocol_name());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        if let Err(err) = self
            .client
            .publish_with_headers(subject, headers, event.encode_to_vec().into())
            .await
        {
            tracing::warn!(%err, "could not publish a call event");
        }
    }
}
