//! commands: the call-flow logic. Takes `CommandRequest`s from NATS (queue group `commands`, so
//! replicas share the work), runs each as a pure flow state machine ([`flow`]) driven by
//! [`driver`], and publishes the command's notifications to the gateway that holds the client.
//!
//! Architecture invariant: flows know OpenSIPS MI command names and event fields, but no wire
//! format (proxy-connector has MI, event-ingest has events) and no client protocol (gateway).
#![forbid(unsafe_code)]

pub mod driver;
pub mod flow;
pub mod intake;
pub mod takeover;

use std::time::Duration;

use callapi_kit::bus;
use callapi_kit::config::NatsSettings;
use callapi_kit::subjects;
use callapi_proto::v1::{CommandAck, CommandRequest};
use futures::StreamExt as _;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The commands configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where NATS is.
    pub nats: NatsSettings,
    /// OpenSIPS node that commands are sent to when the request names none.
    pub node_id: String,
    /// How long each kind of command may take.
    pub deadlines: Deadlines,
    /// How MI requests in flight are watched.
    pub mi: MiSettings,
    /// `[takeover]`: commands of a replica that died finished by another.
    pub takeover: takeover::TakeoverConfig,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (none: not served).
    pub ops_listen: Option<String>,
    /// On SIGTERM, how long the commands in flight may go on here, milliseconds; those still
    /// running then are handed to another replica (or, without `[takeover]`, ended with
    /// `COMMAND_LOST`). Keep it below Kubernetes' `terminationGracePeriodSeconds`.
    pub shutdown_grace_ms: u64,
    /// Where the caller's INVITE of a CallStart is sent first (`t_uac_dlg`'s `next_hop`), e.g.
    /// `sip:127.0.0.1:5060`, the node's own loopback socket: then OpenSIPS need not resolve the
    /// caller's SIP domain (deploy/opensips/README.md). None: OpenSIPS resolves it.
    pub invite_next_hop: Option<String>,
}

/// How MI requests in flight are watched, so a lost one is noticed within seconds.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct MiSettings {
    /// How often proxy-connector confirms it still holds a request, milliseconds.
    pub progress_interval_ms: u64,
    /// Silence after which a request is presumed lost, milliseconds; 0 turns the watch off
    /// (for a proxy-connector too old to send progress: upgrade proxy-connector first).
    pub lost_after_ms: u64,
}

impl Default for MiSettings {
    fn default() -> Self {
        Self {
            progress_interval_ms: 1_000,
            lost_after_ms: 3_500,
        }
    }
}

impl MiSettings {
    /// As `kit::mi` takes it (`None` when turned off).
    pub fn liveness(&self) -> Option<callapi_kit::mi::Liveness> {
        if self.lost_after_ms == 0 {
            return None;
        }
        let progress_interval = Duration::from_millis(self.progress_interval_ms.max(100));
        Some(callapi_kit::mi::Liveness {
            progress_interval,
            lost_after: Duration::from_millis(self.lost_after_ms).max(progress_interval * 2),
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            node_id: "opensips1".to_owned(),
            deadlines: Deadlines::default(),
            mi: MiSettings::default(),
            takeover: takeover::TakeoverConfig::default(),
            ops_listen: None,
            shutdown_grace_ms: 20_000,
            invite_next_hop: None,
        }
    }
}

/// Per-kind command deadlines, in milliseconds. Call set-up and transfers wait for phones to
/// ring and answer, so they need tens of seconds.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Deadlines {
    /// CallStart (two call set-ups).
    pub call_start_ms: u64,
    /// Blind and attended transfers.
    pub transfer_ms: u64,
    /// Hold and unhold.
    pub hold_ms: u64,
    /// CallEnd.
    pub end_ms: u64,
    /// After OpenSIPS accepted a transfer (CallStart's second step included), how long its
    /// `start` event may take before the transfer is called failed: OpenSIPS raises no event
    /// at all for an unknown target, and real phones place the new call within milliseconds.
    pub transfer_start_ms: u64,
}

impl Deadlines {
    /// The flow timings these settings give.
    pub fn timings(&self) -> flow::Timings {
        flow::Timings {
            transfer_start: Duration::from_millis(self.transfer_start_ms),
            ..flow::Timings::default()
        }
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            call_start_ms: 90_000,
            transfer_ms: 60_000,
            hold_ms: 15_000,
            end_ms: 10_000,
            transfer_start_ms: 5_000,
        }
    }
}

/// Longest wait, at shutdown, for the commands already delivered to the draining intake.
const DRAIN_WITHIN: Duration = Duration::from_secs(2);

/// After the shutdown grace, how long the commands still running have to be handed over.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(5);

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS could not be used.
    #[error("NATS: {0}")]
    Nats(String),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs the commands service until `shutdown` is cancelled; then lets the commands in flight
/// finish within `shutdown_grace_ms` and hands the rest to another replica before returning.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    if !subjects::is_token(&config.node_id) {
        return Err(Error::Config(format!(
            "node_id {:?} is not a valid id",
            config.node_id
        )));
    }
    if let Some(next_hop) = &config.invite_next_hop {
        intake::check_next_hop(next_hop).map_err(Error::Config)?;
    }
    if config.deadlines.transfer_start_ms == 0 {
        return Err(Error::Config(
            "deadlines.transfer_start_ms must be above 0 (every transfer would fail at once)"
                .to_owned(),
        ));
    }
    let (client, disconnects) = callapi_kit::nats::connect_watched(&config.nats, "commands")
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mut intake = client
        .queue_subscribe(subjects::ALL_COMMANDS, subjects::COMMANDS_QUEUE.into())
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mi = callapi_kit::mi::MiClient::new(client.clone())
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let replica = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (claimed_tx, mut claimed) = tokio::sync::mpsc::channel::<takeover::Claimed>(64);
    let checkpoints = if config.takeover.enabled {
        let jetstream = async_nats::jetstream::new(client.clone());
        let store = takeover::open(&jetstream, &config.takeover)
            .await
            .map_err(|e| {
                Error::Nats(format!(
                    "{e} (taking over commands needs JetStream; takeover.enabled = false runs without it)"
                ))
            })?;
        let checkpoints = takeover::start(
            &client,
            &replica,
            store.clone(),
            Duration::from_millis(config.takeover.checkpoint_after_ms),
        )
        .await
        .map_err(Error::Nats)?;
        tokio::spawn(takeover::watch(
            store,
            checkpoints.clone(),
            Duration::from_millis(config.takeover.scan_interval_ms),
            claimed_tx,
            shutdown.clone(),
        ));
        Some(checkpoints)
    } else {
        drop(claimed_tx);
        None
    };
    client
        .flush()
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mut ready = format!("node={} replica={replica}", config.node_id);
    let nats = client.clone();
    let ops = callapi_kit::ops::serve_configured(
        config.ops_listen.as_deref(),
        || std::sync::Arc::new(move || callapi_kit::ops::nats_connected(&nats)),
        &shutdown,
    )
    .await
    .map_err(Error::Config)?;
    if let Some(ops) = ops {
        ready.push_str(&format!(" {ops}"));
    }
    callapi_kit::announce_ready(&ready);

    let mut running = tokio::task::JoinSet::new();
    let hand_over = CancellationToken::new();
    // On shutdown the intake is drained: commands NATS delivered here already are still taken,
    // new ones go to the other replicas.
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + DRAIN_WITHIN);
                if intake.drain().await.is_err() {
                    break;
                }
            }
            _ = callapi_kit::shutdown::sleep_until_some(drain_until) => break,
            Some(taken) = claimed.recv() => {
                let state = match serde_json::from_str::<takeover::FlowState>(&taken.checkpoint.state_json) {
                    Ok(state) => state,
                    Err(err) => {
                        tracing::error!(%err, key = %taken.key, "a checkpoint's flow cannot be read; the gateway ends the command at its deadline");
                        continue;
                    }
                };
                let checkpoint = taken.checkpoint;
                let ctx = driver::Context {
                    client: mi.nats().clone(),
                    mi: mi.clone(),
                    node_id: checkpoint.node_id.clone(),
                    tenant: checkpoint.tenant.clone(),
                    cmd_id: checkpoint.cmd_id.clone(),
                    connection_id: checkpoint.connection_id.clone(),
                    attempt: checkpoint.attempt,
                    notify_subject: checkpoint.notify_subject.clone(),
                    liveness: config.mi.liveness(),
                    disconnects: disconnects.clone(),
                    checkpoints: checkpoints.clone(),
                    kind: "resumed",
                    hand_over: hand_over.clone(),
                };
                metrics::counter!("callapi_commands_taken_over_total").increment(1);
                let revision = taken.revision;
                let span = tracing::info_span!(
                    "commands.resume",
                    cmd_id = %checkpoint.cmd_id,
                    tenant = %checkpoint.tenant,
                    node = %checkpoint.node_id,
                    callid = tracing::field::Empty,
                    session_id = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                callapi_kit::telemetry::record_trace_id(&span);
                running.spawn(async move { driver::resume(ctx, state, &checkpoint, revision).await }.instrument(span));
            }
            message = intake.next() => {
                let Some(message) = message else { break };
                let ack = match accept(&config, &mi, &disconnects, checkpoints.as_ref(), &hand_over, &message) {
                    Ok((work, ends_within)) => {
                        running.spawn(work);
                        CommandAck {
                            accepted: true,
                            error: String::new(),
                            deadline_ms: u64::try_from(ends_within.as_millis()).unwrap_or(u64::MAX),
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, subject = %message.subject, "command refused");
                        CommandAck { accepted: false, error: reason, deadline_ms: 0 }
                    }
                };
                if let Some(reply) = message.reply.clone()
                    && let Err(err) = bus::publish(&client, reply, &ack).await
                {
                    tracing::warn!(%err, "could not acknowledge a command");
                }
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tracing::info!(
        in_flight = running.len(),
        ?grace,
        "stopping: finishing the commands in flight"
    );
    let finished = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::info!(
            in_flight = running.len(),
            "shutdown grace over: handing the commands still running to another replica"
        );
        hand_over.cancel();
        // A flow is handed over once no MI answer is due to it; one still waiting for one
        // after this (a caller's phone still ringing) is stopped here and left to the other
        // replicas' takeover of a replica gone, from its last checkpoint (its MI request then
        // counts as lost).
        let _ = tokio::time::timeout(HAND_OVER_WITHIN, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if !running.is_empty() {
            tracing::warn!(
                in_flight = running.len(),
                "commands still waiting for OpenSIPS stopped here; the other replicas take them over from their checkpoints"
            );
        }
        running.abort_all();
    }
    callapi_kit::nats::close(&client, Duration::from_secs(5)).await;
    Ok(())
}

/// Checks one command message and returns the future that runs it and the time within which
/// it ends.
fn accept(
    config: &Config,
    mi: &callapi_kit::mi::MiClient,
    disconnects: &tokio::sync::watch::Receiver<u64>,
    checkpoints: Option<&takeover::Checkpoints>,
    hand_over: &CancellationToken,
    message: &async_nats::Message,
) -> Result<
    (
        impl std::future::Future<Output = ()> + Send + 'static,
        Duration,
    ),
    String,
> {
    let request = CommandRequest::decode(message.payload.as_ref())
        .map_err(|e| format!("undecodable CommandRequest: {e}"))?;
    let subject = subjects::parse_command(&message.subject);
    if subject.map(|(tenant, _)| tenant) != Some(request.tenant.as_str()) {
        return Err("tenant of the message does not match its subject".to_owned());
    }
    if intake::kind_of(&request) != subject.map(|(_, kind)| kind) {
        return Err("command of the message does not match its subject".to_owned());
    }
    let notify_tenant = subjects::parse_notify(&request.notify_subject).map(|(tenant, _)| tenant);
    if notify_tenant != Some(request.tenant.as_str()) {
        return Err(
            "notify_subject must be callapi.v1.notify.<its tenant>.<gateway>[.<command>]"
                .to_owned(),
        );
    }
    let node_id = if request.node_id.is_empty() {
        config.node_id.clone()
    } else if subjects::is_token(&request.node_id) {
        request.node_id.clone()
    } else {
        return Err("node_id is not a node id".to_owned());
    };
    let (flow, deadline) = intake::flow_for(
        &request,
        &config.deadlines,
        config.invite_next_hop.as_deref(),
    )?;
    let ctx = driver::Context {
        client: mi.nats().clone(),
        mi: mi.clone(),
        node_id,
        tenant: request.tenant.clone(),
        cmd_id: request.cmd_id.clone(),
        connection_id: request.connection_id.clone(),
        attempt: request.attempt,
        notify_subject: request.notify_subject.clone(),
        liveness: config.mi.liveness(),
        disconnects: disconnects.clone(),
        checkpoints: checkpoints.cloned(),
        kind: intake::kind_of(&request).map_or("unknown", |k| k.token()),
        hand_over: hand_over.clone(),
    };
    metrics::counter!("callapi_commands_started_total", "kind" => ctx.kind).increment(1);
    tracing::debug!(cmd_id = %request.cmd_id, tenant = %request.tenant, ?deadline, "command accepted");
    let deadline = Duration::from_millis(deadline);
    // A child of the gateway's span, when the request carries its trace context.
    let span = tracing::info_span!(
        "commands.run",
        cmd_id = %request.cmd_id,
        tenant = %request.tenant,
        kind = ctx.kind,
        node = %ctx.node_id,
        callid = tracing::field::Empty,
        session_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    callapi_kit::telemetry::follow(&span, message.headers.as_ref());
    Ok((
        driver::drive(ctx, flow, deadline).instrument(span),
        deadline + driver::GRACE,
    ))
}
