//! Typed NATS messaging: every service publishes and requests protobuf messages through these
//! few functions, so NATS failures map to one error type and the current span's trace context
//! goes with each message in one place (`traceparent` header, when traces are exported).

use std::time::Duration;

use prost::Message;

/// Why a message could not be published or a request got no usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// This service is not connected to NATS.
    #[error("NATS is unreachable (not connected)")]
    NatsDown,
    /// Nobody subscribes to the request's subject.
    #[error("no service answers on {0}")]
    NoResponders(String),
    /// No reply within the request's timeout.
    #[error("no reply on {subject} within {after:?}")]
    TimedOut {
        /// The request's subject.
        subject: String,
        /// The timeout.
        after: Duration,
    },
    /// The reply is not the expected message.
    #[error("undecodable reply on {0}")]
    Undecodable(String),
    /// NATS refused the publish or request.
    #[error("NATS: {0}")]
    Nats(String),
}

/// Whether the client is connected now (a publish while disconnected is only buffered).
pub fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Publishes `message` on `subject`.
pub async fn publish(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    message: &impl Message,
) -> Result<(), BusError> {
    publish_encoded(client, subject, message.encode_to_vec().into()).await
}

/// Publishes a message encoded already (one encoded once and sent many times).
pub async fn publish_encoded(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    payload: bytes::Bytes,
) -> Result<(), BusError> {
    match crate::telemetry::current_headers() {
        Some(headers) => client.publish_with_headers(subject, headers, payload).await,
        None => client.publish(subject, payload).await,
    }
    .map_err(nats_error)
}

/// Publishes `payload` with `headers` (e.g. a key-value bucket's removal marker).
pub async fn publish_with_headers(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    mut headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Result<(), BusError> {
    crate::telemetry::inject_current(&mut headers);
    client
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(nats_error)
}

fn nats_error(error: impl std::fmt::Display) -> BusError {
    BusError::Nats(error.to_string())
}

/// Sends `message` as a request on `subject` and decodes the single reply as `R`.
pub async fn request<R: Message + Default>(
    client: &async_nats::Client,
    subject: String,
    message: &impl Message,
    timeout: Duration,
) -> Result<R, BusError> {
    if !connected(client) {
        return Err(BusError::NatsDown);
    }
    let mut request = async_nats::Request::new()
        .payload(message.encode_to_vec().into())
        .timeout(Some(timeout));
    if let Some(headers) = crate::telemetry::current_headers() {
        request = request.headers(headers);
    }
    match client.send_request(subject.clone(), request).await {
        Ok(reply) => R::decode(reply.payload.as_ref()).map_err(|_| BusError::Undecodable(subject)),
        Err(_) if !connected(client) => Err(BusError::NatsDown),
        Err(err) => Err(match err.kind() {
            async_nats::RequestErrorKind::NoResponders => BusError::NoResponders(subject),
            async_nats::RequestErrorKind::TimedOut => BusError::TimedOut {
                subject,
                after: timeout,
            },
            _ => BusError::Nats(err.to_string()),
        }),
    }
}
