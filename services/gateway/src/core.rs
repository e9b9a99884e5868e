//! The transport-neutral command core of the gateway: a client (a WebSocket connection, a REST
//! caller) attaches a [`NotificationSink`], submits typed commands through the
//! [`CommandClient`] and gets each command's acknowledgement; the command's notifications come
//! back from the commands service on this gateway's notify subject and are routed to the sink
//! of the client that submitted it. Nothing here knows JSON-RPC, HTTP or WebSocket frames.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use callapi_kit::bus::{self, BusError};
use callapi_kit::subjects::{self, CommandKind};
use callapi_proto::v1::{CommandAck, CommandRequest, Notification, command_request, notification};
use futures::StreamExt as _;
use prost::Message as _;
use tracing::Instrument as _;

/// Where the notifications of one client's commands go.
pub trait NotificationSink: Send + Sync {
    /// Hands over one notification of submission `attempt` of command `cmd_id`; never waits (a
    /// sink that cannot keep up deals with it itself, e.g. by dropping its client).
    fn deliver(&self, cmd_id: String, attempt: u64, kind: notification::Kind);
}

/// Who a command is for: the tenant, and the attachment its notifications go to. Made only by
/// [`CommandClient::attach`], so the tenant comes from one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    tenant: String,
    route: String,
}

impl Origin {
    /// The tenant commands from this origin act for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// A client's attachment: its notifications are routed to its sink until this is dropped.
pub struct Attachment {
    origin: Origin,
    routes: Arc<Routes>,
}

impl Attachment {
    /// The origin to submit this client's commands with.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.routes.write() {
            routes.remove(&self.origin.route);
        }
    }
}

struct Route {
    tenant: String,
    sink: Arc<dyn NotificationSink>,
}

type Routes = RwLock<HashMap<String, Route>>;

/// Why a command did not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No commands replica could be asked (NATS down, none running, no answer in time): try
    /// again later.
    #[error("{0}")]
    Unavailable(String),
    /// A commands replica refused the command.
    #[error("command refused: {0}")]
    Refused(String),
}

/// What a client is told when the gateway has no working NATS connection.
pub const NATS_UNREACHABLE: &str =
    "NATS is unreachable: the gateway cannot reach the commands service; try again later";

/// The Call-IDs a command acts on, the call it is about first (a CallStart names none).
pub fn callids_of(command: &command_request::Command) -> Vec<&str> {
    use command_request::Command;
    match command {
        Command::CallStart(_) => Vec::new(),
        Command::BlindTransfer(t) => vec![&t.callid],
        Command::AttendedTransfer(t) => vec![&t.callid_a, &t.callid_b],
        Command::Hold(h) => vec![&h.callid],
        Command::Unhold(h) => vec![&h.callid],
        Command::End(e) => vec![&e.callid],
    }
}

/// Which OpenSIPS node a command acts on (see [`crate::nodes`]).
pub trait NodeChoice: Send + Sync {
    /// The node for `command` of `tenant` ("": the commands replica's own), or why there is
    /// none to use.
    fn node_for(&self, tenant: &str, command: &command_request::Command) -> Result<String, String>;
}

/// Submits commands and routes their notifications. Cheap to clone.
#[derive(Clone)]
pub struct CommandClient {
    nats: async_nats::Client,
    gateway_id: String,
    ack_timeout: Duration,
    routes: Arc<Routes>,
    nodes: Option<Arc<dyn NodeChoice>>,
    /// Record each command taken in the command log (`CommandAttach`).
    command_log: bool,
}

impl CommandClient {
    /// A client for gateway `gateway_id`, whose notifications arrive on its notify subjects.
    pub fn new(nats: async_nats::Client, gateway_id: &str, ack_timeout: Duration) -> Self {
        Self {
            nats,
            gateway_id: gateway_id.to_owned(),
            ack_timeout,
            routes: Arc::default(),
            nodes: None,
            command_log: false,
        }
    }

    /// Each command taken is recorded in the command log (stream `CALLAPI_COMMAND_LOG`), so a
    /// client can re-attach to it.
    pub fn with_command_log(mut self) -> Self {
        self.command_log = true;
        self
    }

    /// Records in the command log that the command was taken (its notifications are kept
    /// there too, from their subjects).
    async fn log_started(&self, origin: &Origin, cmd_id: &str, attempt: u64, deadline_ms: u64) {
        let started = callapi_proto::v1::CommandStarted {
            tenant: origin.tenant.clone(),
            cmd_id: cmd_id.to_owned(),
            connection_id: origin.route.clone(),
            attempt,
            deadline_at_ms: callapi_kit::unix_ms().saturating_add(deadline_ms),
        };
        let subject = subjects::command_started(&origin.tenant, &self.gateway_id, cmd_id);
        if let Err(err) = self
            .nats
            .publish(subject, prost::Message::encode_to_vec(&started).into())
            .await
        {
            tracing::debug!(%err, %cmd_id, "command not recorded in the command log");
        }
    }

    /// The NATS connection commands go out on.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Commands go to the node `nodes` chooses (without it: the commands replica's own).
    pub fn with_nodes(mut self, nodes: Arc<dyn NodeChoice>) -> Self {
        self.nodes = Some(nodes);
        self
    }

    /// Routes the notifications of commands submitted with the returned attachment's origin
    /// to `sink`, for a client of `tenant`.
    pub fn attach(&self, tenant: &str, sink: Arc<dyn NotificationSink>) -> Attachment {
        let route = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut routes) = self.routes.write() {
            routes.insert(
                route.clone(),
                Route {
                    tenant: tenant.to_owned(),
                    sink,
                },
            );
        }
        Attachment {
            origin: Origin {
                tenant: tenant.to_owned(),
                route,
            },
            routes: self.routes.clone(),
        }
    }

    /// Sends a command to a commands replica; how long it may run once taken.
    pub async fn submit(
        &self,
        origin: &Origin,
        cmd_id: &str,
        attempt: u64,
        kind: CommandKind,
        command: command_request::Command,
    ) -> Result<Duration, SubmitError> {
        let callid = match &command {
            command_request::Command::CallStart(start) => start.callid.as_str(),
            other => callids_of(other).first().copied().unwrap_or_default(),
        };
        // The root of the request's trace: commands, proxy-connector and the MI call follow
        // it through the NATS headers.
        let span = tracing::info_span!(
            "gateway.command",
            cmd_id,
            tenant = %origin.tenant,
            kind = kind.token(),
            callid = tracing::field::Empty,
            session_id = tracing::field::Empty,
            node = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if !callid.is_empty() {
            span.record("callid", callid);
            span.record(
                "session_id",
                callapi_kit::calls::session_id(&origin.tenant, callid),
            );
        }
        callapi_kit::telemetry::record_trace_id(&span);
        let node_id = match &self.nodes {
            Some(nodes) => nodes
                .node_for(&origin.tenant, &command)
                .map_err(SubmitError::Unavailable)?,
            None => String::new(),
        };
        if !node_id.is_empty() {
            span.record("node", node_id.as_str());
        }
        let request = CommandRequest {
            tenant: origin.tenant.clone(),
            cmd_id: cmd_id.to_owned(),
            notify_subject: subjects::notify(&origin.tenant, &self.gateway_id, cmd_id),
            connection_id: origin.route.clone(),
            attempt,
            node_id,
            command: Some(command),
        };
        let subject = subjects::command(&origin.tenant, kind);
        let answer = bus::request::<CommandAck>(&self.nats, subject, &request, self.ack_timeout);
        match answer.instrument(span.clone()).await {
            Ok(ack) if ack.accepted => {
                if self.command_log {
                    self.log_started(origin, cmd_id, attempt, ack.deadline_ms)
                        .instrument(span)
                        .await;
                }
                Ok(Duration::from_millis(ack.deadline_ms))
            }
            Ok(ack) => Err(SubmitError::Refused(ack.error)),
            Err(err) => Err(SubmitError::Unavailable(match err {
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
            })),
        }
    }

    /// Routes every notification to the sink of the client whose command it is, until the
    /// subscription ends. A notification for another tenant than the client's is dropped.
    pub async fn route_notifications(self, mut notifications: async_nats::Subscriber) {
        while let Some(message) = notifications.next().await {
            let notification = match Notification::decode(message.payload.as_ref()) {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(%err, "undecodable notification");
                    continue;
                }
            };
            // The subject's tenant is what NATS permissions confine publishers to: it, the
            // payload's and the client's must all agree.
            let subject_tenant = subjects::parse_notify(&message.subject).map(|(tenant, _)| tenant);
            if subject_tenant != Some(notification.tenant.as_str()) {
                tracing::warn!(subject = %message.subject, "notification whose tenant does not match its subject dropped");
                continue;
            }
            let sink = match self.routes.read() {
                Ok(routes) => match routes.get(&notification.connection_id) {
                    Some(route) if route.tenant == notification.tenant => Some(route.sink.clone()),
                    Some(_) => {
                        tracing::warn!(cmd_id = %notification.cmd_id, "notification for another tenant dropped");
                        None
                    }
                    None => {
                        tracing::debug!(cmd_id = %notification.cmd_id, "notification for a client that is gone");
                        None
                    }
                },
                Err(_) => None,
            };
            if let (Some(sink), Some(kind)) = (sink, notification.kind) {
                sink.deliver(notification.cmd_id, notification.attempt, kind);
            }
        }
    }
}
