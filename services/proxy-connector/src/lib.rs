//! proxy-connector: serves `MiRequest`s from NATS (`callapi.v1.mi.<node>`) by sending them to
//! that OpenSIPS node over `mi_datagram` (UDP) or `mi_http`, correlating replies by JSON-RPC id,
//! bounding requests in flight per node and answering "unreachable" when OpenSIPS is silent.
//!
//! Architecture invariant: this is the only crate that knows the MI wire format.
#![forbid(unsafe_code)]

pub mod adaptive;
mod envelope;
pub mod fair;
mod lease;
mod transport;

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument as _;

use callapi_kit::bus;
use callapi_kit::config::NatsSettings;
use callapi_kit::secret::redact_url;
use callapi_kit::subjects;
use callapi_proto::v1::{MiFailure, MiProgress, MiReply, MiRequest, mi_failure, mi_reply};
use futures::StreamExt as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::lease::Leases;

pub use envelope::{MiOutcome, build_request};
pub use transport::{MiEndpoint, MiRoutes, MiTransport, TransportError};

/// The proxy-connector configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where NATS is.
    pub nats: NatsSettings,
    /// The OpenSIPS nodes this connector serves.
    pub nodes: Vec<NodeConfig>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (none: not served).
    pub ops_listen: Option<String>,
    /// On SIGTERM, how long the MI requests in flight may take to be answered, milliseconds
    /// (new ones go to the other replicas of the queue group); those still unanswered then are
    /// left to the commands' loss handling.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            nodes: vec![NodeConfig::default()],
            ops_listen: None,
            shutdown_grace_ms: 20_000,
        }
    }
}

/// One OpenSIPS node and how to reach its MI.
#[derive(Clone, serde::Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Node id, used in subjects (`callapi.v1.mi.<id>`).
    pub id: String,
    /// `udp:HOST:PORT` for mi_datagram (the default, fast for every command) or
    /// `http://HOST:PORT/mi` for mi_http (then `mi_async` is needed).
    pub mi: String,
    /// Where asynchronous commands (`t_uac_dlg`) go when `mi` is mi_http: a `udp:HOST:PORT`
    /// (OpenSIPS's mi_http answers them only at its next 500 ms poll step, one at a time).
    pub mi_async: Option<String>,
    /// Most MI requests in flight to this node at once: the ceiling of the adaptive limit.
    pub max_in_flight: usize,
    /// The adaptive limit never goes below this.
    pub min_in_flight: usize,
    /// MI requests waiting for a slot at once; more fail at once as overloaded.
    pub max_queued: usize,
    /// A short MI command answered slower than this (milliseconds) counts as an overload signal.
    pub slow_ms: u64,
    /// Most long requests in flight at once (`t_uac_dlg`, which holds its slot while a phone
    /// rings, and a `call_transfer` kept while the INVITE it made rings), so that short
    /// commands always find a slot.
    pub max_async_in_flight: usize,
    /// Most `t_uac_dlg` requests in flight at once for one client (tenant + connection).
    pub max_async_per_client: usize,
    /// Wait for an answer this long when the request names no timeout.
    pub default_timeout_ms: u64,
    /// How often the node is asked (MI `version`) whether it answers, and the answer published
    /// on `callapi.v1.node.<id>.health` for the gateways (0: never; a node not reported on is
    /// taken as reachable).
    pub health_interval_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "opensips1".to_owned(),
            mi: "udp:127.0.0.1:8080".to_owned(),
            mi_async: None,
            max_in_flight: 64,
            min_in_flight: 4,
            max_queued: 4096,
            slow_ms: 500,
            max_async_in_flight: 48,
            max_async_per_client: 8,
            default_timeout_ms: 10_000,
            health_interval_ms: 1_000,
        }
    }
}

impl std::fmt::Debug for NodeConfig {
    /// Like a derived `Debug`, with the credentials of MI URLs hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("id", &self.id)
            .field("mi", &redact_url(&self.mi))
            .field("mi_async", &self.mi_async.as_deref().map(redact_url))
            .field("max_in_flight", &self.max_in_flight)
            .field("min_in_flight", &self.min_in_flight)
            .field("max_queued", &self.max_queued)
            .field("slow_ms", &self.slow_ms)
            .field("max_async_in_flight", &self.max_async_in_flight)
            .field("max_async_per_client", &self.max_async_per_client)
            .field("default_timeout_ms", &self.default_timeout_ms)
            .field("health_interval_ms", &self.health_interval_ms)
            .finish()
    }
}

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS could not be used.
    #[error("NATS: {0}")]
    Nats(String),
    /// A node is misconfigured.
    #[error("node {node}: {reason}")]
    Node {
        /// The node id.
        node: String,
        /// What is wrong.
        reason: String,
    },
}

/// Decreases of a node's adaptive limit are at least this far apart (one burst counts once).
const ADAPTIVE_COOLDOWN: Duration = Duration::from_millis(200);

/// Longest timeout a request may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the connector until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let client = callapi_kit::nats::connect(&config.nats, "proxy-connector")
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mut tasks = Vec::new();
    // Which nodes answer the health probe (a node without probes counts as answering).
    let reachable = callapi_kit::ops::Checks::default();
    // Names this instance in the subjects releasing the slots it keeps.
    let instance = uuid::Uuid::new_v4().simple().to_string();
    for node in &config.nodes {
        if !subjects::is_token(&node.id) {
            return Err(Error::Node {
                node: node.id.clone(),
                reason: "id must be letters, digits, '-' or '_'".to_owned(),
            });
        }
        let routes =
            MiRoutes::new(&node.mi, node.mi_async.as_deref()).map_err(|reason| Error::Node {
                node: node.id.clone(),
                reason,
            })?;
        let described = routes.describe();
        let transport = Arc::new(
            MiTransport::open(
                routes,
                fair::Limits {
                    total: node.max_in_flight,
                    long: node.max_async_in_flight,
                    long_per_client: node.max_async_per_client,
                    max_queued: node.max_queued,
                },
                adaptive::Aimd::new(
                    // Two at least: one for a t_uac_dlg, one for everything else.
                    node.min_in_flight.max(2),
                    // Low, for slow start to find the node's capacity from below.
                    node.min_in_flight.max(2) * 2,
                    node.max_in_flight,
                    Duration::from_millis(node.slow_ms),
                    ADAPTIVE_COOLDOWN,
                ),
            )
            .await
            .map_err(|e| Error::Node {
                node: node.id.clone(),
                reason: e.to_string(),
            })?,
        );
        let subscriber = client
            .queue_subscribe(
                subjects::mi(&node.id),
                subjects::PROXY_CONNECTOR_QUEUE.into(),
            )
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        let leases = Leases::new(&node.id, &instance);
        let releases = client
            .subscribe(leases.subscription())
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        tracing::info!(
            node = %node.id,
            mi = %redact_url(&node.mi),
            "serving MI requests: {described}"
        );
        if node.health_interval_ms > 0 {
            tasks.push(tokio::spawn(report_health(
                client.clone(),
                transport.clone(),
                node.id.clone(),
                Duration::from_millis(node.health_interval_ms),
                reachable.clone(),
                shutdown.clone(),
            )));
        } else {
            reachable.set(&node.id, true);
        }
        tasks.push(tokio::spawn(serve_node(
            node.id.clone(),
            client.clone(),
            subscriber,
            releases,
            leases,
            transport,
            Duration::from_millis(node.default_timeout_ms),
            Duration::from_millis(config.shutdown_grace_ms),
            shutdown.clone(),
        )));
    }
    client
        .flush()
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let nodes: Vec<&str> = config.nodes.iter().map(|n| n.id.as_str()).collect();
    let mut ready = format!("nodes={}", nodes.join(","));
    let nats = client.clone();
    // Ready while NATS is up and at least one OpenSIPS node answers.
    let readiness = || -> callapi_kit::ops::Readiness {
        Arc::new(move || {
            let mut reasons = callapi_kit::ops::nats_connected(&nats);
            if !reachable.any_holds() {
                reasons.extend(
                    reachable
                        .failing()
                        .into_iter()
                        .map(|node| format!("OpenSIPS node {node} does not answer")),
                );
                if reasons.is_empty() {
                    reasons.push("no OpenSIPS node answered yet".to_owned());
                }
            }
            reasons
        })
    };
    let ops =
        callapi_kit::ops::serve_configured(config.ops_listen.as_deref(), readiness, &shutdown)
            .await
            .map_err(|reason| Error::Node {
                node: "*".to_owned(),
                reason,
            })?;
    if let Some(ops) = ops {
        ready.push_str(&format!(" {ops}"));
    }
    callapi_kit::announce_ready(&ready);
    shutdown.cancelled().await;
    for task in tasks {
        let _ = task.await;
    }
    callapi_kit::nats::close(&client, Duration::from_secs(5)).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve_node(
    node_id: String,
    client: async_nats::Client,
    mut subscriber: async_nats::Subscriber,
    mut releases: async_nats::Subscriber,
    leases: Arc<Leases>,
    transport: Arc<MiTransport>,
    default_timeout: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let mut in_flight = tokio::task::JoinSet::new();
    // On shutdown the subscription is drained: requests NATS delivered here already are still
    // served, new ones go to the other replicas.
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + DRAIN_WITHIN);
                if subscriber.drain().await.is_err() {
                    break;
                }
            }
            _ = callapi_kit::shutdown::sleep_until_some(drain_until) => break,
            Some(release) = releases.next() => {
                if !leases.release(release.subject.as_str()) {
                    tracing::debug!(subject = %release.subject, "release of a slot no longer kept");
                }
            }
            message = subscriber.next() => {
                let Some(message) = message else { break };
                let client = client.clone();
                let transport = transport.clone();
                let leases = leases.clone();
                let node_id = node_id.clone();
                // A child of the command's span when the request carries its trace context.
                let span = tracing::info_span!(
                    "mi.request",
                    node = %node_id,
                    method = tracing::field::Empty,
                    tenant = tracing::field::Empty,
                    callid = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                callapi_kit::telemetry::follow(&span, message.headers.as_ref());
                in_flight.spawn(async move {
                    let Some(reply_to) = message.reply.clone() else {
                        tracing::warn!("MI request without a reply subject dropped");
                        return;
                    };
                    let reply = match MiRequest::decode(message.payload.as_ref()) {
                        Ok(request) => {
                            let span = tracing::Span::current();
                            span.record("method", request.method.as_str());
                            span.record("tenant", request.tenant.as_str());
                            if let Some(callid) = callid_param(&request.params_json) {
                                span.record("callid", callid.as_str());
                            }
                            let begun = std::time::Instant::now();
                            let work = handle(&transport, &leases, &request, default_timeout);
                            let reply = with_progress(&client, &reply_to, &request, work).await;
                            record(&node_id, &request, &reply, begun.elapsed());
                            reply
                        }
                        Err(err) => failure(
                            mi_failure::Kind::BadRequest,
                            format!("bad MiRequest: {err}"),
                        ),
                    };
                    if let Err(err) = bus::publish(&client, reply_to, &reply).await {
                        tracing::warn!(%err, "could not publish MI reply");
                    }
                }.instrument(span));
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    // Answer what is already in flight before going away, within the grace.
    let answered = tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if answered.is_err() {
        tracing::warn!(node = %node_id, unanswered = in_flight.len(), "shutdown grace over with MI requests unanswered; their commands find them lost");
    }
}

/// Longest wait, at shutdown, for the requests already delivered to a draining subscription.
const DRAIN_WITHIN: Duration = Duration::from_secs(2);

/// The SIP Call-ID an MI request is about (`callid`, `dialog_id` or the first `DID`), if any.
fn callid_param(params_json: &str) -> Option<String> {
    let params: serde_json::Value = serde_json::from_str(params_json).ok()?;
    let value = params
        .get("callid")
        .or_else(|| params.get("dialog_id"))
        .or_else(|| params.get("DID").and_then(|d| d.get(0)))?;
    value.as_str().map(str::to_owned)
}

/// Longest wait for the node's answer to a health probe.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the node every `every` whether it answers (MI `version`; any answer, even an error or
/// "overloaded", is an answer) and publishes the outcome on `callapi.v1.node.<node>.health`.
async fn report_health(
    client: async_nats::Client,
    transport: Arc<MiTransport>,
    node_id: String,
    every: Duration,
    reachable_nodes: callapi_kit::ops::Checks,
    shutdown: CancellationToken,
) {
    let subject = subjects::node_health(&node_id);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let answer = transport
            .call(
                "version",
                None,
                HEALTH_PROBE_TIMEOUT,
                "proxy-connector/health",
            )
            .await;
        let reachable = !matches!(
            answer,
            Err(TransportError::Timeout(..) | TransportError::Unreachable(..))
        );
        if last != Some(reachable) {
            tracing::info!(node = %node_id, reachable, "OpenSIPS node health");
            last = Some(reachable);
        }
        reachable_nodes.set(&node_id, reachable);
        metrics::gauge!("callapi_mi_in_flight_limit", "node" => node_id.clone())
            .set(transport.limit() as f64);
        let (in_flight, queued) = transport.load();
        metrics::gauge!("callapi_mi_in_flight", "node" => node_id.clone()).set(in_flight as f64);
        metrics::gauge!("callapi_mi_queued", "node" => node_id.clone()).set(queued as f64);
        metrics::gauge!("callapi_node_reachable", "node" => node_id.clone()).set(if reachable {
            1.0
        } else {
            0.0
        });
        let report = callapi_proto::v1::NodeHealth {
            node_id: node_id.clone(),
            reachable,
            at_ms: callapi_kit::unix_ms(),
        };
        if let Err(err) = bus::publish(&client, subject.clone(), &report).await {
            tracing::debug!(%err, "could not publish the node's health");
        }
    }
}

/// Runs `work` while telling the requester, if it asked, that the request is alive: one
/// progress message per `progress_interval_ms` until the outcome (none for a request answered
/// within the first interval, which is nearly every one: a message less per request).
async fn with_progress(
    client: &async_nats::Client,
    reply_to: &async_nats::Subject,
    request: &MiRequest,
    work: impl std::future::Future<Output = MiReply>,
) -> MiReply {
    if request.progress_interval_ms == 0 {
        return work.await;
    }
    let progress = MiReply {
        outcome: Some(mi_reply::Outcome::Progress(MiProgress {})),
        release_subject: String::new(),
    }
    .encode_to_vec();
    let period = Duration::from_millis(u64::from(
        request.progress_interval_ms.max(MIN_PROGRESS_INTERVAL_MS),
    ));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    loop {
        tokio::select! {
            reply = &mut work => return reply,
            _ = ticks.tick() => {
                if let Err(err) =
                    callapi_kit::bus::publish_encoded(client, reply_to.clone(), progress.clone().into()).await
                {
                    tracing::debug!(%err, "could not publish MI progress");
                }
            }
        }
    }
}

/// Progress is never sent more often than this, whatever a request asks.
const MIN_PROGRESS_INTERVAL_MS: u32 = 100;

/// Turns one `MiRequest` into its `MiReply`.
async fn handle(
    transport: &MiTransport,
    leases: &Arc<Leases>,
    request: &MiRequest,
    default_timeout: Duration,
) -> MiReply {
    let timeout = match request.timeout_ms {
        0 => default_timeout,
        ms => Duration::from_millis(u64::from(ms)).min(MAX_TIMEOUT),
    };
    let params = match envelope::parse_params(&request.params_json) {
        Ok(params) => params,
        Err(reason) => return failure(mi_failure::Kind::BadRequest, reason),
    };
    let client = format!("{}/{}", request.tenant, request.client);
    let hold = Duration::from_millis(u64::from(request.hold_slot_ms)).min(MAX_TIMEOUT);
    let (outcome, kept) = match transport
        .call_keeping(&request.method, params, timeout, &client, !hold.is_zero())
        .await
    {
        Ok(answered) => answered,
        Err(TransportError::BadMethod(reason)) => {
            return failure(mi_failure::Kind::BadRequest, reason);
        }
        Err(TransportError::Overloaded(reason) | TransportError::Refused(reason)) => {
            tracing::debug!(method = %request.method, %reason, "node overloaded");
            return failure(mi_failure::Kind::Overloaded, reason);
        }
        Err(TransportError::BadReply(reason)) => {
            return failure(mi_failure::Kind::BadReply, reason);
        }
        Err(err) => return failure(mi_failure::Kind::Unreachable, err.to_string()),
    };
    // A reply can hold whole SIP messages: only their size at DEBUG, all of it at TRACE.
    match &outcome {
        MiOutcome::Result(value) => tracing::debug!(
            method = %request.method,
            result_bytes = value.to_string().len(),
            "MI reply: result"
        ),
        MiOutcome::Error { code, .. } => {
            tracing::debug!(method = %request.method, code, "MI reply: error")
        }
    }
    tracing::trace!(method = %request.method, ?outcome, "MI reply");
    let release_subject = kept.map_or_else(String::new, |permit| leases.keep(permit, hold));
    match outcome {
        MiOutcome::Result(value) => MiReply {
            outcome: Some(mi_reply::Outcome::ResultJson(value.to_string())),
            release_subject,
        },
        MiOutcome::Error {
            code,
            message,
            data,
        } => MiReply {
            outcome: Some(mi_reply::Outcome::Error(callapi_proto::v1::MiError {
                code,
                message,
                data_json: data.map(|d| d.to_string()).unwrap_or_default(),
            })),
            release_subject,
        },
    }
}

/// Counts an MI request by node, method and outcome, and its time.
fn record(node_id: &str, request: &MiRequest, reply: &MiReply, took: Duration) {
    let outcome = match &reply.outcome {
        Some(mi_reply::Outcome::ResultJson(_)) => "result",
        Some(mi_reply::Outcome::Error(_)) => "error",
        Some(mi_reply::Outcome::Failure(failure)) => failure.kind().as_str_name(),
        Some(mi_reply::Outcome::Progress(_)) | None => "none",
    };
    tracing::Span::current().record("outcome", outcome);
    let node = node_id.to_owned();
    metrics::counter!("callapi_mi_requests_total", "node" => node.clone(), "method" => request.method.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!("callapi_mi_duration_seconds", "node" => node, "method" => request.method.clone())
        .record(took.as_secs_f64());
}

fn failure(kind: mi_failure::Kind, message: String) -> MiReply {
    MiReply {
        outcome: Some(mi_reply::Outcome::Failure(MiFailure {
            kind: kind as i32,
            message,
        })),
        release_subject: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_settings_debug_shows_no_credentials() {
        let node = NodeConfig {
            mi: "http://admin:hunter2@127.0.0.1:8888/mi".to_owned(),
            mi_async: Some("udp:127.0.0.1:8080".to_owned()),
            ..NodeConfig::default()
        };
        let shown = format!("{node:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("127.0.0.1:8888"), "{shown}");
    }
}
