//! Drives one flow over NATS: subscribes to the Call-IDs it watches (before its MI requests go
//! out), sends its MI requests to proxy-connector, feeds back replies, events and the deadline,
//! and publishes its notifications in order. Every command ends: at its deadline the flow is
//! told, and a short grace later the driver ends it regardless.

use std::time::Duration;

use callapi_kit::subjects;
use callapi_proto::v1::{
    CommandEnded, CommandError, CommandEvent, MiReply, MiRequest, Notification, OpensipsEvent,
    mi_reply, notification, opensips_event,
};
use futures::StreamExt as _;
use futures::stream::{FuturesUnordered, SelectAll};
use prost::Message as _;
use tokio::time::Instant;

use crate::flow::{Action, CallEvent, ErrorCode, ErrorNote, Flow, Input, MiResult, StepNote};

/// After the deadline, how long a flow may still take to wrap up.
pub const GRACE: Duration = Duration::from_secs(2);
/// Timeout of clean-up MI requests nobody waits for.
const DETACHED_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a command's requests and notifications go.
#[derive(Clone)]
pub struct Context {
    /// NATS client.
    pub client: async_nats::Client,
    /// OpenSIPS node the MI requests are for.
    pub node_id: String,
    /// Tenant of the command.
    pub tenant: String,
    /// Command id.
    pub cmd_id: String,
    /// Gateway connection id.
    pub connection_id: String,
    /// Subject of the gateway holding the client.
    pub notify_subject: String,
}

/// Runs `flow` until it finishes or its deadline (plus grace) passes.
pub async fn drive(ctx: Context, mut flow: Flow, deadline: Duration) {
    let started = Instant::now();
    let deadline_at = started + deadline;
    let hard_stop = deadline_at + GRACE;
    let mut seq = 0u64;
    let mut events: SelectAll<async_nats::Subscriber> = SelectAll::new();
    let mut mi_calls = FuturesUnordered::new();
    let mut deadline_told = false;
    let mut actions = flow.start();
    loop {
        let mut need_flush = false;
        for action in actions.drain(..) {
            match action {
                Action::Watch(callid) => {
                    let subject = subjects::events_for_callid(&ctx.tenant, &callid);
                    match ctx.client.subscribe(subject).await {
                        Ok(subscriber) => {
                            events.push(subscriber);
                            need_flush = true;
                        }
                        Err(err) => tracing::warn!(%err, %callid, "cannot watch Call-ID"),
                    }
                }
                Action::Mi {
                    step,
                    method,
                    params,
                } => {
                    if need_flush {
                        // Make sure the event subscriptions are live before OpenSIPS acts.
                        if let Err(err) = ctx.client.flush().await {
                            tracing::warn!(%err, "NATS flush failed");
                        }
                        need_flush = false;
                    }
                    let budget = deadline_at.saturating_duration_since(Instant::now());
                    let ctx = ctx.clone();
                    let params = params.to_string();
                    mi_calls.push(async move {
                        (
                            step,
                            mi_call(&ctx, method, params, budget.max(Duration::from_millis(500)))
                                .await,
                        )
                    });
                }
                Action::MiDetached { method, params } => {
                    let ctx = ctx.clone();
                    let params = params.to_string();
                    tokio::spawn(async move {
                        let result = mi_call(&ctx, method, params, DETACHED_TIMEOUT).await;
                        if !matches!(result, MiResult::Ok(_)) {
                            tracing::debug!(method, ?result, "clean-up request did not succeed");
                        }
                    });
                }
                Action::Notify(note) => {
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Event(event_of(note))).await;
                }
                Action::Fail(error) => {
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Error(error_of(error))).await;
                }
                Action::Finish => {
                    seq += 1;
                    publish(&ctx, seq, notification::Kind::Ended(CommandEnded {})).await;
                    tracing::info!(cmd_id = %ctx.cmd_id, elapsed = ?started.elapsed(), "command ended");
                    return;
                }
            }
        }
        let input = tokio::select! {
            Some((step, result)) = mi_calls.next(), if !mi_calls.is_empty() => Input::Mi(step, result),
            Some(message) = events.next(), if !events.is_empty() => {
                match decode_event(&message.payload) {
                    Some(event) => Input::Event(event),
                    None => continue,
                }
            }
            _ = tokio::time::sleep_until(deadline_at), if !deadline_told => {
                deadline_told = true;
                Input::Deadline
            }
            _ = tokio::time::sleep_until(hard_stop) => {
                tracing::warn!(cmd_id = %ctx.cmd_id, "flow did not end after its deadline; ending it");
                seq += 1;
                let error = ErrorNote::new(ErrorCode::Timeout, "the command did not complete in time", 0);
                publish(&ctx, seq, notification::Kind::Error(error_of(error))).await;
                seq += 1;
                publish(&ctx, seq, notification::Kind::Ended(CommandEnded {})).await;
                return;
            }
        };
        actions = flow.handle(input);
    }
}

async fn mi_call(ctx: &Context, method: &str, params_json: String, budget: Duration) -> MiResult {
    // The connector answers "unreachable" a little before our own NATS timeout fires.
    let connector_timeout = budget
        .saturating_sub(Duration::from_millis(250))
        .max(Duration::from_millis(200));
    let request = MiRequest {
        node_id: ctx.node_id.clone(),
        method: method.to_owned(),
        params_json,
        timeout_ms: u32::try_from(connector_timeout.as_millis()).unwrap_or(u32::MAX),
    };
    let subject = subjects::mi(&ctx.node_id);
    let nats_request = async_nats::Request::new()
        .payload(request.encode_to_vec().into())
        .timeout(Some(budget));
    let reply = match ctx.client.send_request(subject, nats_request).await {
        Ok(message) => message,
        Err(err) => {
            let reason = match err.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    format!("no proxy-connector serves node {}", ctx.node_id)
                }
                async_nats::RequestErrorKind::TimedOut => {
                    format!("no answer from node {} within {budget:?}", ctx.node_id)
                }
                _ => format!("NATS request failed: {err}"),
            };
            return MiResult::Unreachable(reason);
        }
    };
    match MiReply::decode(reply.payload.as_ref()).map(|r| r.outcome) {
        Ok(Some(mi_reply::Outcome::ResultJson(json))) => {
            MiResult::Ok(serde_json::from_str(&json).unwrap_or(serde_json::Value::String(json)))
        }
        Ok(Some(mi_reply::Outcome::Error(error))) => MiResult::Err {
            code: error.code,
            message: error.message,
            data: match serde_json::from_str::<serde_json::Value>(&error.data_json) {
                Ok(serde_json::Value::String(text)) => text,
                _ => error.data_json,
            },
        },
        Ok(Some(mi_reply::Outcome::Failure(failure))) => MiResult::Unreachable(failure.message),
        Ok(None) | Err(_) => {
            MiResult::Unreachable("undecodable reply from proxy-connector".to_owned())
        }
    }
}

fn decode_event(payload: &[u8]) -> Option<CallEvent> {
    let event = OpensipsEvent::decode(payload).ok()?;
    Some(match event.body? {
        opensips_event::Body::CallTransfer(t) => CallEvent::Transfer {
            callid: t.callid,
            leg: t.leg,
            transfer_callid: t.transfer_callid,
            destination: t.destination,
            state: t.state,
            status: t.status,
        },
        opensips_event::Body::CallHold(h) => CallEvent::Hold {
            callid: h.callid,
            leg: h.leg,
            action: h.action,
            state: h.state,
        },
        opensips_event::Body::DialogStateChanged(d) => CallEvent::DialogState {
            callid: d.callid,
            old_state: d.old_state,
            new_state: d.new_state,
        },
        opensips_event::Body::OtherParamsJson(_) => return None,
    })
}

fn event_of(note: StepNote) -> CommandEvent {
    CommandEvent {
        name: note.name.to_owned(),
        callid: note.callid,
        leg: note.leg,
        sip_status: note.sip_status,
        destination: note.destination,
    }
}

fn error_of(error: ErrorNote) -> CommandError {
    CommandError {
        code: error.code.as_str().to_owned(),
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
        kind: Some(kind),
    };
    if let Err(err) = ctx
        .client
        .publish(
            ctx.notify_subject.clone(),
            notification.encode_to_vec().into(),
        )
        .await
    {
        tracing::warn!(%err, cmd_id = %ctx.cmd_id, "could not publish a notification");
    }
}
