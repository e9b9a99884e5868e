//! MI requests over NATS: how any service asks proxy-connector to run one MI command on an
//! OpenSIPS node (`callapi.v1.mi.<node>`), with one mapping of NATS failures to errors.
//!
//! A request may ask for progress messages ([`Liveness`]): proxy-connector then confirms it
//! took the request and keeps saying so while OpenSIPS works on it, so a request lost on the
//! way (connector killed, NATS restarted) is told apart from a slow one within seconds instead
//! of at the end of its timeout.

use std::time::Duration;

use callapi_proto::v1::{MiReply, MiRequest, mi_reply};
use futures::StreamExt as _;
use prost::Message as _;
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
    /// proxy-connector answered that OpenSIPS could not be asked or gave no usable answer.
    #[error("{0}")]
    Failure(String),
    /// NATS refused the request or the reply was not an `MiReply`.
    #[error("{0}")]
    Transport(String),
}

/// Sends `call` and waits for its outcome; with `liveness`, a silent request fails as
/// [`MiCallError::Lost`] long before its timeout.
pub async fn call(
    client: &async_nats::Client,
    call: &MiCall,
    liveness: Option<Liveness>,
) -> Result<MiAnswer, MiCallError> {
    if client.connection_state() != async_nats::connection::State::Connected {
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
    };
    let transport = |e: &dyn std::fmt::Display| MiCallError::Transport(format!("NATS: {e}"));
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| transport(&e))?;
    client
        .publish_with_reply(
            subjects::mi(&call.node_id),
            inbox,
            request.encode_to_vec().into(),
        )
        .await
        .map_err(|e| transport(&e))?;
    let give_up = Instant::now() + call.timeout;
    let mut last_heard = Instant::now();
    loop {
        let silence_limit = liveness.map_or(give_up, |l| (last_heard + l.lost_after).min(give_up));
        let message = match tokio::time::timeout_at(silence_limit, replies.next()).await {
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
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(MiCallError::NoConnector(call.node_id.clone()));
        }
        let outcome = MiReply::decode(message.payload.as_ref())
            .map_err(|_| MiCallError::Transport("undecodable reply from proxy-connector".into()))?
            .outcome;
        match outcome {
            Some(mi_reply::Outcome::Progress(_)) => last_heard = Instant::now(),
            Some(mi_reply::Outcome::ResultJson(json)) => return Ok(MiAnswer::Result(json)),
            Some(mi_reply::Outcome::Error(error)) => {
                return Ok(MiAnswer::Error {
                    code: error.code,
                    message: error.message,
                    data_json: error.data_json,
                });
            }
            Some(mi_reply::Outcome::Failure(failure)) => {
                return Err(
                    if failure.kind == callapi_proto::v1::mi_failure::Kind::Overloaded as i32 {
                        MiCallError::Overloaded(failure.message)
                    } else {
                        MiCallError::Failure(failure.message)
                    },
                );
            }
            None => {
                return Err(MiCallError::Transport(
                    "empty reply from proxy-connector".into(),
                ));
            }
        }
    }
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
