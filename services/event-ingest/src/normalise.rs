//! OpenSIPS's events of a node, turned into one model of a call's life ([`CallEvent`]):
//! created, ringing, answered, held / resumed per leg, transfer started / progress / completed /
//! failed with the new call's Call-ID, ended with its cause. Pure bookkeeping per node (what
//! each dialog has been through), tested as a table; the events go to the JetStream stream
//! `CALLAPI_CALLS_<tenant>`.
//!
//! Each event gets a stable id, the same whichever event-ingest replica makes it and however
//! often the datagram came: the Call-ID and what makes the event unique in the dialog's life (a
//! state reached once, a transfer's one start, the n-th hold of a leg). JetStream drops a
//! second message with the same id (`Nats-Msg-Id`) within its duplicate window.

use std::collections::HashMap;

use callapi_kit::calls;
use callapi_proto::v1::{
    CallEvent, CallEventKind, DialogState, HoldAction, HoldState, Leg, OpensipsEvent,
    TransferState, opensips_event,
};

/// How long an ended dialog is remembered (late events of it still find its session).
pub const ENDED_TTL_MS: u64 = 60_000;
/// How long a dialog with no event is remembered.
pub const IDLE_TTL_MS: u64 = 6 * 3_600_000;

#[derive(Debug, Default)]
struct Dialog {
    session_id: u64,
    answered: bool,
    ringing: bool,
    ended_at_ms: Option<u64>,
    last_seen_ms: u64,
    /// Holds / unholds started, per (leg, action).
    holds: HashMap<(i32, i32), u32>,
    /// TRANSFER_PROGRESS events so far (their statuses repeat).
    progress: u32,
}

/// The dialogs of one node.
#[derive(Debug, Default)]
pub struct Normaliser {
    dialogs: HashMap<String, Dialog>,
    /// A transfer's new call → the session of the call it came from, until it is seen.
    links: HashMap<String, u64>,
    /// Events taken since the last [`Normaliser::forget_old`].
    since_pruned: u32,
}

/// Old dialogs are forgotten every this many events.
const PRUNE_EVERY: u32 = 4096;

impl Normaliser {
    /// The call events one OpenSIPS event (its tenant set) makes, received at `now_ms`.
    pub fn on_event(&mut self, event: &OpensipsEvent, now_ms: u64) -> Vec<CallEvent> {
        self.since_pruned += 1;
        if self.since_pruned >= PRUNE_EVERY {
            self.forget_old(now_ms);
        }
        let callid = event.callid.as_str();
        let Some(body) = &event.body else {
            return Vec::new();
        };
        if callid.is_empty() || matches!(body, opensips_event::Body::OtherParamsJson(_)) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let is_new = !self.dialogs.contains_key(callid);
        let session_id = match self.dialogs.get(callid) {
            Some(dialog) => dialog.session_id,
            None => self
                .links
                .remove(callid)
                .unwrap_or_else(|| calls::session_id(&event.tenant, callid)),
        };
        let dialog = self.dialogs.entry(callid.to_owned()).or_default();
        dialog.session_id = session_id;
        dialog.last_seen_ms = now_ms;
        let base = CallEvent {
            tenant: event.tenant.clone(),
            session_id,
            callid: callid.to_owned(),
            node_id: event.node_id.clone(),
            at_ms: event.received_at_ms,
            ..Default::default()
        };
        let node = event.node_id.as_str();
        let make = |kind: CallEventKind, id: String| CallEvent {
            kind: kind as i32,
            event_id: format!("{node}:{callid}:{id}"),
            ..base.clone()
        };
        if is_new {
            out.push(make(CallEventKind::Created, "created".into()));
        }
        match body {
            opensips_event::Body::DialogStateChanged(change) => {
                let new = change.new_state();
                if new == DialogState::Early && !dialog.ringing {
                    dialog.ringing = true;
                    out.push(make(CallEventKind::Ringing, "ringing".into()));
                }
                if matches!(new, DialogState::ConfirmedNotAcked | DialogState::Confirmed)
                    && !dialog.answered
                {
                    dialog.answered = true;
                    out.push(make(CallEventKind::Answered, "answered".into()));
                }
                if new == DialogState::Deleted && dialog.ended_at_ms.is_none() {
                    dialog.ended_at_ms = Some(now_ms);
                    let mut ended = make(CallEventKind::Ended, "ended".into());
                    ended.cause = if dialog.answered {
                        "hangup"
                    } else {
                        "not_answered"
                    }
                    .to_owned();
                    out.push(ended);
                }
            }
            opensips_event::Body::CallHold(hold) => {
                let key = (hold.leg, hold.action);
                match hold.state() {
                    HoldState::Start => *dialog.holds.entry(key).or_insert(0) += 1,
                    HoldState::Ok => {
                        let cycle = dialog.holds.get(&key).copied().unwrap_or(0);
                        let kind = if hold.action() == HoldAction::Unhold {
                            CallEventKind::Resumed
                        } else {
                            CallEventKind::Held
                        };
                        let mut held =
                            make(kind, format!("hold:{}:{}:{cycle}", hold.leg, hold.action));
                        held.leg = hold.leg;
                        out.push(held);
                    }
                    _ => {}
                }
            }
            opensips_event::Body::CallTransfer(transfer) => {
                let (kind, id) = match transfer.state() {
                    TransferState::Start => {
                        (CallEventKind::TransferStarted, "transfer:start".to_owned())
                    }
                    TransferState::Notify => {
                        dialog.progress += 1;
                        (
                            CallEventKind::TransferProgress,
                            format!("transfer:notify:{}", dialog.progress),
                        )
                    }
                    TransferState::Ok => {
                        (CallEventKind::TransferCompleted, "transfer:ok".to_owned())
                    }
                    TransferState::Fail => {
                        (CallEventKind::TransferFailed, "transfer:fail".to_owned())
                    }
                    TransferState::Unspecified => return out,
                };
                let mut event = make(kind, id);
                event.transfer_callid = transfer.transfer_callid.clone();
                event.sip_status = transfer.status.clone();
                // OpenSIPS puts the new Call-ID in `leg` of a start (quirk 3): no leg then.
                event.leg = match transfer.leg() {
                    Leg::Caller | Leg::Callee => transfer.leg,
                    _ => Leg::Unspecified as i32,
                };
                let new = &transfer.transfer_callid;
                if !new.is_empty() && !self.dialogs.contains_key(new) {
                    self.links.insert(new.clone(), session_id);
                }
                out.push(event);
            }
            opensips_event::Body::OtherParamsJson(_) => {}
        }
        out
    }

    /// Forgets dialogs ended [`ENDED_TTL_MS`] ago or silent for [`IDLE_TTL_MS`], and links
    /// never used within the latter.
    pub fn forget_old(&mut self, now_ms: u64) {
        self.since_pruned = 0;
        self.dialogs.retain(|_, d| match d.ended_at_ms {
            Some(at) => now_ms.saturating_sub(at) < ENDED_TTL_MS,
            None => now_ms.saturating_sub(d.last_seen_ms) < IDLE_TTL_MS,
        });
        if self.links.len() > 100_000 {
            self.links.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1::{CallHoldEvent, CallTransferEvent, DialogStateChanged};

    fn raw(callid: &str, body: opensips_event::Body) -> OpensipsEvent {
        OpensipsEvent {
            tenant: "acme".into(),
            node_id: "n1".into(),
            received_at_ms: 7,
            name: "E".into(),
            callid: callid.into(),
            body: Some(body),
        }
    }

    fn state(callid: &str, old: DialogState, new: DialogState) -> OpensipsEvent {
        raw(
            callid,
            opensips_event::Body::DialogStateChanged(DialogStateChanged {
                callid: callid.into(),
                old_state: old as i32,
                new_state: new as i32,
                ..Default::default()
            }),
        )
    }

    fn hold(callid: &str, action: HoldAction, state: HoldState) -> OpensipsEvent {
        raw(
            callid,
            opensips_event::Body::CallHold(CallHoldEvent {
                callid: callid.into(),
                leg: Leg::Caller as i32,
                action: action as i32,
                state: state as i32,
            }),
        )
    }

    fn transfer(callid: &str, state: TransferState, new: &str, status: &str) -> OpensipsEvent {
        raw(
            callid,
            opensips_event::Body::CallTransfer(CallTransferEvent {
                callid: callid.into(),
                leg: Leg::Callee as i32,
                transfer_callid: new.into(),
                state: state as i32,
                status: status.into(),
                ..Default::default()
            }),
        )
    }

    fn kinds(events: &[CallEvent]) -> Vec<CallEventKind> {
        events.iter().map(CallEvent::kind).collect()
    }

    #[test]
    fn an_answered_call_then_hung_up() {
        use DialogState::*;
        let mut n = Normaliser::default();
        let mut all = Vec::new();
        for (old, new) in [
            (Unconfirmed, Early),
            (Early, ConfirmedNotAcked),
            (ConfirmedNotAcked, Confirmed),
            (Confirmed, Deleted),
        ] {
            all.extend(n.on_event(&state("x", old, new), 1));
        }
        assert_eq!(
            kinds(&all),
            [
                CallEventKind::Created,
                CallEventKind::Ringing,
                CallEventKind::Answered,
                CallEventKind::Ended
            ]
        );
        assert_eq!(all[3].cause, "hangup");
        assert!(
            all.iter()
                .all(|e| e.session_id == calls::session_id("acme", "x"))
        );
        let ids: Vec<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "n1:x:created",
                "n1:x:ringing",
                "n1:x:answered",
                "n1:x:ended"
            ]
        );
    }

    #[test]
    fn a_rejected_call_ends_not_answered_and_repeats_make_nothing_new() {
        let mut n = Normaliser::default();
        let events = n.on_event(
            &state("y", DialogState::Unconfirmed, DialogState::Deleted),
            1,
        );
        assert_eq!(
            kinds(&events),
            [CallEventKind::Created, CallEventKind::Ended]
        );
        assert_eq!(events[1].cause, "not_answered");
        // The same datagram again: nothing more (the stream would drop it by id anyway).
        assert!(
            n.on_event(
                &state("y", DialogState::Unconfirmed, DialogState::Deleted),
                2
            )
            .is_empty()
        );
    }

    #[test]
    fn each_hold_cycle_has_its_own_id() {
        let mut n = Normaliser::default();
        n.on_event(&state("z", DialogState::Early, DialogState::Confirmed), 1);
        let mut ids = Vec::new();
        for action in [HoldAction::Hold, HoldAction::Unhold, HoldAction::Hold] {
            assert!(
                n.on_event(&hold("z", action, HoldState::Start), 2)
                    .is_empty()
            );
            let done = n.on_event(&hold("z", action, HoldState::Ok), 3);
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].leg(), Leg::Caller);
            ids.push((done[0].kind(), done[0].event_id.clone()));
        }
        assert_eq!(ids[0].0, CallEventKind::Held);
        assert_eq!(ids[1].0, CallEventKind::Resumed);
        assert_ne!(ids[0].1, ids[2].1, "a second hold is a new event");
        // A failed hold says nothing.
        assert!(
            n.on_event(&hold("z", HoldAction::Hold, HoldState::Fail), 4)
                .is_empty()
        );
    }

    #[test]
    fn a_transfers_new_call_joins_the_old_calls_session() {
        let mut n = Normaliser::default();
        n.on_event(&state("x", DialogState::Early, DialogState::Confirmed), 1);
        let started = n.on_event(&transfer("x", TransferState::Start, "y", ""), 2);
        assert_eq!(kinds(&started), [CallEventKind::TransferStarted]);
        assert_eq!(started[0].transfer_callid, "y");
        let progress = n.on_event(&transfer("x", TransferState::Notify, "y", "100 Trying"), 3);
        assert_eq!(progress[0].sip_status, "100 Trying");
        let again = n.on_event(&transfer("x", TransferState::Notify, "y", "100 Trying"), 4);
        assert_ne!(
            progress[0].event_id, again[0].event_id,
            "each NOTIFY counts"
        );
        let new = n.on_event(&state("y", DialogState::Unconfirmed, DialogState::Early), 5);
        assert_eq!(
            kinds(&new),
            [CallEventKind::Created, CallEventKind::Ringing]
        );
        assert_eq!(new[0].session_id, calls::session_id("acme", "x"));
        let done = n.on_event(&transfer("x", TransferState::Ok, "y", "200 OK"), 6);
        assert_eq!(kinds(&done), [CallEventKind::TransferCompleted]);
    }

    #[test]
    fn ended_dialogs_are_forgotten_after_a_while() {
        let mut n = Normaliser::default();
        n.on_event(&state("a", DialogState::Confirmed, DialogState::Deleted), 0);
        n.forget_old(ENDED_TTL_MS - 1);
        assert_eq!(n.dialogs.len(), 1);
        n.forget_old(ENDED_TTL_MS);
        assert!(n.dialogs.is_empty());
    }
}
