//! Drives one flow over NATS: subscribes to the Call-IDs it watches (before its MI requests go
//! out), sends its MI requests to proxy-connector (watched for signs of life, so a lost request
//! is noticed within seconds), keeps the timers the flow asks for, feeds back replies, events,
//! timers and the deadline, and publishes its notifications in order. Every command ends: at its
//! deadline the flow is told, and a short grace later the driver ends it regardless.
//!
//! A subscription is live before the MI request that follows it without a flush (a round trip
//! to the server): both go out on the one NATS connection, in order, and nats-server handles a
//! connection's operations in order, so the node's events (published only after the request
//! reached it) find the subscription in place.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use callapi_kit::bus;
use callapi_kit::mi::{Liveness, MiAnswer, MiCall, MiCallError, SlotLease};
use callapi_kit::subjects;
use callapi_proto::v1::{
    CommandEnded, CommandError, CommandEvent, Notification, OpensipsEvent, notification,
    opensips_event,
};
use futures::StreamExt as _;
use futures::stream::{FuturesUnordered, SelectAll};
use prost::Message as _;
use tokio::time::Instant;

use crate::flow::{
    Action, CallEvent, ErrorCode, ErrorNote, Flow, Input, MiResult, Step, StepNote, Timer,
};

/// After the deadline, how long a flow may still take to wrap up.
pub const GRACE: Duration = Duration::from_secs(2);
/// Timeout of clean-up MI requests nobody waits for.
const DETACHED_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a command's requests and notifications go.
#[derive(Clone)]
pub struct Context {
    /// NATS client.
    pub client: async_nats::Client,
    /// MI requests to proxy-connector.
    pub mi: callapi_kit::mi::MiClient,
    /// OpenSIPS node the MI requests are for.
    pub node_id: String,
    /// Tenant of the command.
    pub tenant: String,
    /// Command id.
    pub cmd_id: String,
    /// Gateway connection id.
    pub connection_id: String,
    /// The request's submission number, echoed in notifications.
    pub attempt: u64,
    /// Subject of the gateway holding the client.
    pub notify_subject: String,
    /// How MI requests in flight are watched (`None`: only by their timeout).
    pub liveness: Option<Liveness>,
    /// Counts the losses of this replica's NATS connection.
    pub disconnects: tokio::sync::watch::Receiver<u64>,
    /// Where the flow's progress is kept for another replica to take it over (`None`: not
    /// kept).
    pub checkpoints: Option<crate::takeover::Checkpoints>,
    /// The command's kind, as its subject names it (a metrics label).
    pub kind: &'static str,
    /// Cancelled when this replica stops and its shutdown grace is over: the flow is handed to
    /// another replica (released checkpoint) or, without checkpoints, ended with
    /// `COMMAND_LOST`.
    pub hand_over: tokio_util::sync::CancellationToken,
}

/// How a flow's run begins: fresh, or resumed from another replica's checkpoint.
struct Begin {
    deadline_at: Instant,
    deadline_at_ms: u64,
    seq: u64,
    watched: Vec<String>,
    timers: HashMap<Timer, Instant>,
    /// Inputs to feed before waiting for anything (a resumed flow's losses).
    inputs: VecDeque<Input>,
    fresh: bool,
    /// The checkpoint's revision this replica wrote last (a resumed flow's: its claim's).
    revision: Option<u64>,
}

/// The checkpoint's view of the flow, borrowed (read back as `takeover::FlowState`).
#[derive(serde::Serialize)]
struct FlowStateRef<'a> {
    flow: &'a Flow,
    pending: &'a [Step],
    timers: Vec<(Timer, u64)>,
}

/// Longest wait for the answer to a `dlg_list` probe (the flow probes again after it).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at a clean-up request while OpenSIPS cannot be reached, a second apart.
const DETACHED_ATTEMPTS: u32 = 5;

/// Runs `flow` until it finishes or its deadline (plus grace) passes.
pub async fn drive(ctx: Context, flow: Flow, deadline: Duration) {
    let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
    let begin = Begin {
        deadline_at: Instant::now() + deadline,
        deadline_at_ms: callapi_kit::unix_ms().saturating_add(deadline_ms),
        seq: 0,
        watched: Vec::new(),
        timers: HashMap::new(),
        inputs: VecDeque::new(),
        fresh: true,
        revision: None,
    };
    run(ctx, flow, begin).await;
}

/// Resumes a flow another replica was running when it died, from its checkpoint: its
/// Call-IDs watched again, its timers set again, its MI requests in flight told lost and the
/// events of the gap possibly missed; it still ends by the command's deadline.
pub async fn resume(
    ctx: Context,
    state: crate::takeover::FlowState,
    checkpoint: &callapi_proto::v1::FlowCheckpoint,
    revision: u64,
) {
    let now_ms = callapi_kit::unix_ms();
    let at = |unix_ms: u64| Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_ms));
    let mut inputs = VecDeque::from([Input::ContactLost]);
    for step in state.pending {
        inputs.push_back(Input::Mi(
            step,
            MiResult::Lost(
                "the commands replica running this command stopped before OpenSIPS's answer reached it"
                    .to_owned(),
            ),
        ));
    }
    let begin = Begin {
        deadline_at: at(checkpoint.deadline_at_ms),
        deadline_at_ms: checkpoint.deadline_at_ms,
        seq: checkpoint.seq,
        watched: checkpoint.watched.clone(),
        timers: state
            .timers
            .into_iter()
            .map(|(timer, fires_ms)| (timer, at(fires_ms)))
            .collect(),
        inputs,
        fresh: false,
        revision: Some(revision),
    };
    run(ctx, state.flow, begin).await;
}

/// Counts a command in `callapi_commands_in_flight` while it lives.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        metrics::gauge!("callapi_commands_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("callapi_commands_in_flight").decrement(1.0);
    }
}

async fn run(ctx: Context, mut flow: Flow, begin: Begin) {
    let _in_flight = InFlight::new();
    let mut disconnects = ctx.disconnects.clone();
    disconnects.borrow_and_update();
    let started = Instant::now();
    let Begin {
        deadline_at,
        deadline_at_ms,
        mut seq,
        mut watched,
        mut timers,
        mut inputs,
        fresh,
        mut revision,
    } = begin;
    let hard_stop = deadline_at + GRACE;
    let mut events: SelectAll<async_nats::Subscriber> = SelectAll::new();
    for callid in &watched {
        match ctx
            .client
            .subscribe(subjects::events_for_callid(&ctx.tenant, callid))
            .await
        {
            Ok(subscriber) => events.push(subscriber),
            Err(err) => tracing::warn!(%err, %callid, "cannot watch Call-ID again"),
        }
    }
    let mut mi_calls = FuturesUnordered::new();
    // The steps of the MI requests in flight (what a replica taking over is told lost).
    let mut pending: Vec<Step> = Vec::new();
    let mut deadline_told = false;
    // Node slots kept for this flow's transfers; given back when it returns (dropped).
    let mut leases: Vec<SlotLease> = Vec::new();
    let key = crate::takeover::Checkpoints::key(
        &ctx.tenant,
        &ctx.connection_id,
        &ctx.cmd_id,
        ctx.attempt,
    );
    let mut actions = if fresh { flow.start() } else { Vec::new() };
    // Checkpointed yet (a resumed flow is); when it is first due.
    let mut kept = !fresh;
    let keep_from = started + ctx.checkpoints.as_ref().map_or(Duration::ZERO, |c| c.after);
    // Where the flow is now, for a checkpoint.
    macro_rules! snapshot {
        () => {
            Snapshot {
                flow: &flow,
                pending: &pending,
                timers: &timers,
                deadline_at_ms,
                seq,
                watched: &watched,
            }
        };
    }
    loop {
        for action in actions.drain(..) {
            match action {
                Action::Watch(callid) => {
                    if watched.is_empty() {
                        // The command's call: its span names it.
                        let span = tracing::Span::current();
                        span.record("callid", callid.as_str());
                        span.record(
                            "session_id",
                            callapi_kit::calls::session_id(&ctx.tenant, &callid),
                        );
                    }
                    let subject = subjects::events_for_callid(&ctx.tenant, &callid);
                    match ctx.client.subscribe(subject).await {
                        Ok(subscriber) => events.push(subscriber),
                        Err(err) => tracing::warn!(%err, %callid, "cannot watch Call-ID"),
                    }
                    watched.push(callid);
                }
                Action::Mi {
                    step,
                    method,
                    params,
                } => {
                    let mut budget = deadline_at.saturating_duration_since(Instant::now());
                    if step == Step::Probe {
                        budget = budget.min(PROBE_TIMEOUT);
                    }
                    pending.push(step);
                    let ctx = ctx.clone();
                    let params = params.to_string();
                    mi_calls.push(async move {
                        let budget = budget.max(Duration::from_millis(500));
                        // A REFER's INVITE rings on in OpenSIPS after the reply: the node's
                        // slot stays taken until this flow ends (at most its deadline).
                        let hold_slot = if holds_node_memory(method) {
                            budget + GRACE
                        } else {
                            Duration::ZERO
                        };
                        let (result, lease) =
                            mi_call(&ctx, method, params, budget, hold_slot, ctx.liveness).await;
                        (step, result, lease)
                    });
                }
                Action::MiDetached { method, params } => {
                    let ctx = ctx.clone();
                    let params = params.to_string();
                    tokio::spawn(async move {
                        // Clean-up matters most when OpenSIPS was out of reach: try again a
                        // few times while it still is (not when it answered, even an error).
                        for attempt in 1..=DETACHED_ATTEMPTS {
                            let (result, _) = mi_call(
                                &ctx,
                                method,
                                params.clone(),
                                DETACHED_TIMEOUT,
                                Duration::ZERO,
                                None,
                            )
                            .await;
                            match result {
                                MiResult::Ok(_) => return,
                                MiResult::Unreachable(_)
                                | MiResult::Lost(_)
                                | MiResult::Overloaded(_)
                                    if attempt < DETACHED_ATTEMPTS =>
                                {
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                other => {
                                    tracing::debug!(
                                        method,
                                        ?other,
                                        "clean-up request did not succeed"
                                    );
                                    return;
                                }
                            }
                        }
                    });
                }
                Action::StartTimer { timer, after } => {
                    timers.insert(timer, Instant::now() + after);
                }
                Action::Notify(note) => {
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Event(event_of(note))).await;
                }
                Action::Fail(error) => {
                    metrics::counter!("callapi_commands_failed_total", "kind" => ctx.kind, "code" => error.code.as_str_name()).increment(1);
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Error(error_of(error))).await;
                }
                Action::Finish => {
                    metrics::counter!("callapi_commands_ended_total", "kind" => ctx.kind)
                        .increment(1);
                    metrics::histogram!("callapi_command_duration_seconds", "kind" => ctx.kind)
                        .record(started.elapsed().as_secs_f64());
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Ended(CommandEnded {})).await;
                    if kept && let Some(checkpoints) = &ctx.checkpoints {
                        checkpoints.remove(&key).await;
                    }
                    tracing::debug!(cmd_id = %ctx.cmd_id, elapsed = ?started.elapsed(), "command ended");
                    return;
                }
            }
        }
        if let Some(checkpoints) = &ctx.checkpoints
            && Instant::now() >= keep_from
        {
            kept = true;
            let at = snapshot!();
            if let Some(checkpoint) = at.checkpoint(&ctx, &checkpoints.replica) {
                match checkpoints.save(&key, &checkpoint, revision).await {
                    crate::takeover::Saved::Kept(now) => revision = Some(now),
                    crate::takeover::Saved::TakenOver => {
                        tracing::warn!(cmd_id = %ctx.cmd_id, "command taken over by another replica meanwhile; leaving it to it");
                        return;
                    }
                    crate::takeover::Saved::NotNow => {}
                }
            }
        }
        if let Some(input) = inputs.pop_front() {
            actions = flow.handle(input);
            continue;
        }
        let next_timer = timers
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(t, at)| (*t, *at));
        let input = tokio::select! {
            // Answers and events before timers: an event and a timer ready together must not
            // be decided by chance.
            biased;
            Some((step, result, lease)) = mi_calls.next(), if !mi_calls.is_empty() => {
                leases.extend(lease);
                if let Some(at) = pending.iter().position(|s| *s == step) {
                    pending.remove(at);
                }
                Input::Mi(step, result)
            }
            Some(message) = events.next(), if !events.is_empty() => {
                // The event's own trace (event-ingest's) is linked to this command's.
                callapi_kit::telemetry::link(&tracing::Span::current(), message.headers.as_ref());
                match decode_event(&message.payload) {
                    Some(event) => Input::Event(event),
                    None => continue,
                }
            }
            Ok(()) = disconnects.changed() => {
                tracing::warn!(cmd_id = %ctx.cmd_id, "NATS connection lost during the command: events may be missing");
                // Cut off long enough, this replica may have been taken for dead and the
                // command taken over: its next checkpoint finds out (compare-and-set).
                Input::ContactLost
            }
            _ = tokio::time::sleep_until(keep_from), if !kept && ctx.checkpoints.is_some() => {
                // Due for its first checkpoint: kept at the top of the loop.
                continue;
            }
            Some(timer) = fire(next_timer) => {
                timers.remove(&timer);
                Input::Timer(timer)
            }
            // Handed over between steps only: an MI answer in flight would reach this
            // replica, not the next.
            _ = ctx.hand_over.cancelled(), if pending.is_empty() => {
                let at = snapshot!();
                hand_over(&ctx, &key, at, revision, seq).await;
                return;
            }
            _ = tokio::time::sleep_until(deadline_at), if !deadline_told => {
                deadline_told = true;
                Input::Deadline
            }
            _ = tokio::time::sleep_until(hard_stop) => {
                tracing::warn!(cmd_id = %ctx.cmd_id, "flow did not end after its deadline; ending it");
                metrics::counter!("callapi_commands_failed_total", "kind" => ctx.kind, "code" => ErrorCode::Timeout.as_str_name()).increment(1);
                metrics::counter!("callapi_commands_ended_total", "kind" => ctx.kind).increment(1);
                seq += 1;
                let error = ErrorNote::new(ErrorCode::Timeout, "the command did not complete in time", 0);
                publish(&ctx, seq, notification::Kind::Error(error_of(error))).await;
                seq += 1;
                publish(&ctx, seq, notification::Kind::Ended(CommandEnded {})).await;
                if kept && let Some(checkpoints) = &ctx.checkpoints {
                    checkpoints.remove(&key).await;
                }
                return;
            }
        };
        actions = flow.handle(input);
    }
}

/// Where a flow is, borrowed: what a checkpoint is made of.
struct Snapshot<'a> {
    flow: &'a Flow,
    pending: &'a [Step],
    timers: &'a HashMap<Timer, Instant>,
    deadline_at_ms: u64,
    seq: u64,
    watched: &'a [String],
}

impl Snapshot<'_> {
    /// The checkpoint of this flow, owned by `owner` ("": released, for any replica to take).
    fn checkpoint(&self, ctx: &Context, owner: &str) -> Option<callapi_proto::v1::FlowCheckpoint> {
        let now = Instant::now();
        let state = FlowStateRef {
            flow: self.flow,
            pending: self.pending,
            timers: self
                .timers
                .iter()
                .map(|(timer, at)| {
                    let left = at.saturating_duration_since(now);
                    let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                    (*timer, callapi_kit::unix_ms().saturating_add(left_ms))
                })
                .collect(),
        };
        match serde_json::to_string(&state) {
            Ok(state_json) => Some(callapi_proto::v1::FlowCheckpoint {
                owner: owner.to_owned(),
                tenant: ctx.tenant.clone(),
                cmd_id: ctx.cmd_id.clone(),
                connection_id: ctx.connection_id.clone(),
                attempt: ctx.attempt,
                notify_subject: ctx.notify_subject.clone(),
                node_id: ctx.node_id.clone(),
                deadline_at_ms: self.deadline_at_ms,
                seq: self.seq,
                watched: self.watched.to_vec(),
                state_json,
            }),
            Err(err) => {
                tracing::warn!(%err, "flow state not serialisable");
                None
            }
        }
    }
}

/// This replica is stopping: the flow is released for another replica to resume (its
/// checkpoint written with no owner). When checkpoints are off, the command is ended with
/// `COMMAND_LOST` so the client is told now rather than at the deadline. When the release
/// cannot be written (NATS away), nothing is published: a checkpoint of it may exist (this
/// replica's, taken over once it is gone) and its notifications would then go on from the same
/// `seq`; if none does, the gateway ends the command with `COMMAND_LOST` at its deadline.
async fn hand_over(ctx: &Context, key: &str, at: Snapshot<'_>, revision: Option<u64>, seq: u64) {
    if let Some(checkpoints) = &ctx.checkpoints {
        let Some(checkpoint) = at.checkpoint(ctx, "") else {
            return;
        };
        for _ in 0..HAND_OVER_TRIES {
            match checkpoints.save(key, &checkpoint, revision).await {
                crate::takeover::Saved::Kept(_) => {
                    metrics::counter!("callapi_commands_handed_over_total", "kind" => ctx.kind)
                        .increment(1);
                    tracing::info!(cmd_id = %ctx.cmd_id, "replica stopping: command handed over");
                    return;
                }
                crate::takeover::Saved::TakenOver => return,
                crate::takeover::Saved::NotNow => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        tracing::warn!(cmd_id = %ctx.cmd_id, "replica stopping: the command's release could not be written; it is taken over from its last checkpoint, if it has one, or ended by the gateway at its deadline");
        return;
    }
    metrics::counter!("callapi_commands_failed_total", "kind" => ctx.kind, "code" => ErrorCode::CommandLost.as_str_name()).increment(1);
    metrics::counter!("callapi_commands_ended_total", "kind" => ctx.kind).increment(1);
    let error = ErrorNote::new(
        ErrorCode::CommandLost,
        "the commands replica running this command stopped before it ended (takeover is off); the call may be in any state: look it up",
        0,
    );
    publish(ctx, seq + 1, notification::Kind::Error(error_of(error))).await;
    publish(ctx, seq + 2, notification::Kind::Ended(CommandEnded {})).await;
}

/// Attempts at writing a released checkpoint, 250 ms apart.
const HAND_OVER_TRIES: u32 = 4;

/// Waits for the earliest timer; never, if there is none.
async fn fire(next: Option<(Timer, Instant)>) -> Option<Timer> {
    match next {
        Some((timer, at)) => {
            tokio::time::sleep_until(at).await;
            Some(timer)
        }
        None => std::future::pending().await,
    }
}

/// Whether an MI command's effect goes on holding the node's memory after its reply: a
/// transfer's REFER makes an INVITE that rings on in OpenSIPS.
fn holds_node_memory(method: &str) -> bool {
    method == "call_transfer"
}

async fn mi_call(
    ctx: &Context,
    method: &str,
    params_json: String,
    budget: Duration,
    hold_slot: Duration,
    liveness: Option<Liveness>,
) -> (MiResult, Option<SlotLease>) {
    let call = MiCall {
        node_id: ctx.node_id.clone(),
        method: method.to_owned(),
        params_json,
        timeout: budget,
        tenant: ctx.tenant.clone(),
        client: ctx.connection_id.clone(),
        hold_slot,
    };
    let (answer, lease) = match ctx.mi.call_leased(&call, liveness).await {
        Ok((answer, lease)) => (Ok(answer), lease),
        Err(err) => (Err(err), None),
    };
    let result = match answer {
        Ok(MiAnswer::Result(json)) => {
            MiResult::Ok(serde_json::from_str(&json).unwrap_or(serde_json::Value::String(json)))
        }
        Ok(MiAnswer::Error {
            code,
            message,
            data_json,
        }) => MiResult::Err {
            code,
            message,
            data: match serde_json::from_str::<serde_json::Value>(&data_json) {
                Ok(serde_json::Value::String(text)) => text,
                _ => data_json,
            },
        },
        Err(lost @ MiCallError::Lost { .. }) => {
            tracing::warn!(cmd_id = %ctx.cmd_id, method, %lost, "MI request lost");
            MiResult::Lost(lost.to_string())
        }
        Err(MiCallError::Overloaded(reason)) => MiResult::Overloaded(reason),
        Err(MiCallError::BadRequest(reason)) => {
            tracing::error!(cmd_id = %ctx.cmd_id, method, %reason, "proxy-connector refused an MI request as malformed");
            MiResult::BadRequest(reason)
        }
        Err(MiCallError::BadReply(reason)) => MiResult::BadReply(reason),
        Err(
            other @ (MiCallError::NatsDown
            | MiCallError::NoConnector(_)
            | MiCallError::TimedOut { .. }
            | MiCallError::Unreachable(_)
            | MiCallError::UnknownNode(_)
            | MiCallError::Transport(_)),
        ) => MiResult::Unreachable(other.to_string()),
    };
    (result, lease)
}

fn decode_event(payload: &[u8]) -> Option<CallEvent> {
    let event = OpensipsEvent::decode(payload).ok()?;
    Some(match event.body? {
        opensips_event::Body::CallTransfer(t) => CallEvent::Transfer {
            state: t.state(),
            callid: t.callid,
            transfer_callid: t.transfer_callid,
            destination: t.destination,
            status: t.status,
        },
        opensips_event::Body::CallHold(h) => CallEvent::Hold {
            leg: h.leg(),
            action: h.action(),
            state: h.state(),
            callid: h.callid,
        },
        opensips_event::Body::DialogStateChanged(d) => CallEvent::DialogState {
            old_state: d.old_state(),
            new_state: d.new_state(),
            callid: d.callid,
        },
        opensips_event::Body::OtherParamsJson(_) => return None,
    })
}

fn event_of(note: StepNote) -> CommandEvent {
    CommandEvent {
        step: note.step as i32,
        callid: note.callid,
        leg: note.leg as i32,
        sip_status: note.sip_status,
        destination: note.destination,
    }
}

fn error_of(error: ErrorNote) -> CommandError {
    CommandError {
        code: error.code as i32,
        message: error.message,
        sip_code: error.sip_code,
    }
}

async fn publish(ctx: &Context, seq: u64, kind: notification::Kind) {
    let notification = Notification {
        tenant: ctx.tenant.clone(),
        cmd_id: ctx.cmd_id.clone(),
        connection_id: ctx.connection_id.clone(),
        seq,
        attempt: ctx.attempt,
        kind: Some(kind),
    };
    if let Err(err) = bus::publish(&ctx.client, ctx.notify_subject.clone(), &notification).await {
        tracing::warn!(%err, cmd_id = %ctx.cmd_id, "could not publish a notification");
    }
}
