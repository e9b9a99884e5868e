//! Blind and attended transfers with `call_transfer`; the outcome only comes as E_CALL_TRANSFER
//! events on the transferred dialog (`start`, `notify`…, then `ok` or `fail`). Quirks handled:
//! `start` carries the transfer Call-ID as its leg; `notify` may be missing; a rejected REFER or
//! an unknown target raises no event at all, so a transfer accepted but not started within
//! [`Timings::transfer_start`] has failed (the original call stays up); 491 after one transfer.

use callapi_proto::v1 as pb;
use serde_json::json;

use super::{
    Action, CallEvent, ErrorCode, ErrorNote, Input, Leg, MiResult, Step, StepNote, Timer, Timings,
    TransferStage, generic_mi_error, status_code, transfer_stage,
};

/// Progress shared by both kinds of transfer.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Progress {
    callid: String,
    leg: Leg,
    destination: String,
    accepted: bool,
    started: bool,
    done: bool,
    timings: Timings,
    /// The answer to `call_transfer` was lost: only its events can tell whether it went on.
    answer_lost: bool,
    /// NATS was lost for a while: events may be missing, so silence proves nothing.
    contact_lost: bool,
}

impl Progress {
    fn new(callid: String, leg: Leg, destination: String, timings: Timings) -> Self {
        Self {
            callid,
            leg,
            destination,
            accepted: false,
            started: false,
            done: false,
            timings,
            answer_lost: false,
            contact_lost: false,
        }
    }

    /// The answer to `call_transfer` was lost: OpenSIPS may have taken it, so wait for its
    /// `start` as after "Accepted", but without telling the client it was accepted.
    fn on_answer_lost(&mut self) -> Vec<Action> {
        self.answer_lost = true;
        if self.started {
            return Vec::new();
        }
        vec![Action::StartTimer {
            timer: Timer::TransferStart,
            after: self.timings.transfer_start,
        }]
    }

    /// `call_transfer` answered "Accepted": the transfer must start soon.
    fn on_accepted(&mut self) -> Vec<Action> {
        let mut actions = self.accept();
        if !self.started {
            actions.push(Action::StartTimer {
                timer: Timer::TransferStart,
                after: self.timings.transfer_start,
            });
        }
        actions
    }

    /// No `start` in time: OpenSIPS raises nothing for an unknown target or a rejected REFER.
    fn not_started(&mut self) -> Vec<Action> {
        if self.started {
            return Vec::new();
        }
        let target = if self.destination.is_empty() {
            "the other call".to_owned()
        } else {
            self.destination.clone()
        };
        let waited = self.timings.transfer_start.as_millis();
        if self.answer_lost || self.contact_lost {
            let message = format!(
                "lost contact with OpenSIPS during the transfer to {target}, and no start of it was seen within {waited} ms (it may or may not have happened)"
            );
            return self.fail(ErrorNote::new(ErrorCode::NodeUnreachable, message, 0));
        }
        let message = format!(
            "the transfer to {target} was not placed: OpenSIPS reported no start of it within {waited} ms of accepting it (the target is probably unknown, e.g. 404 User Not Found, or the phone rejected the REFER); the call stays as it was"
        );
        self.fail(ErrorNote::new(ErrorCode::TransferFailed, message, 0))
    }

    fn accept(&mut self) -> Vec<Action> {
        if self.accepted {
            return Vec::new();
        }
        self.accepted = true;
        vec![Action::Notify(StepNote {
            step: pb::CommandStep::TransferAccept,
            callid: self.callid.clone(),
            leg: self.leg.to_proto(),
            sip_status: String::new(),
            destination: self.destination.clone(),
        })]
    }

    fn start(&mut self, transfer_callid: String, destination: &str) -> Vec<Action> {
        let mut actions = self.accept();
        if !self.started {
            self.started = true;
            let destination = if destination.is_empty() {
                self.destination.clone()
            } else {
                destination.to_owned()
            };
            actions.push(Action::Notify(StepNote {
                step: pb::CommandStep::CallStart,
                callid: transfer_callid,
                leg: self.leg.to_proto(),
                sip_status: String::new(),
                destination,
            }));
        }
        actions
    }

    /// `ok` on the transferred dialog: report, hang up the transferor's dialog, finish.
    fn succeed(&mut self, transfer_callid: String, destination: &str) -> Vec<Action> {
        let mut actions = self.start(transfer_callid, destination);
        actions.push(Action::MiDetached {
            method: "dlg_end_dlg",
            params: json!({"dialog_id": self.callid}),
        });
        actions.push(Action::Finish);
        self.done = true;
        actions
    }

    fn fail(&mut self, error: ErrorNote) -> Vec<Action> {
        self.done = true;
        vec![Action::Fail(error), Action::Finish]
    }

    fn mi_error(&mut self, result: &MiResult, transfer_dialog: Option<&str>) -> Vec<Action> {
        let error = match result {
            MiResult::Err {
                code: 491, message, ..
            } => ErrorNote::new(
                ErrorCode::TransferPending,
                format!(
                    "OpenSIPS refused the transfer of dialog {}: 491 {message} (OpenSIPS allows one transfer per dialog)",
                    self.callid
                ),
                491,
            ),
            MiResult::Err {
                code: 404, message, ..
            } if message.contains("Transfer") => ErrorNote::new(
                ErrorCode::DialogNotFound,
                format!(
                    "dialog {} not found (OpenSIPS: 404 {message})",
                    transfer_dialog.unwrap_or_default()
                ),
                404,
            ),
            MiResult::Err {
                code: 404, message, ..
            } => ErrorNote::new(
                ErrorCode::DialogNotFound,
                format!("dialog {} not found (OpenSIPS: 404 {message})", self.callid),
                404,
            ),
            other => generic_mi_error(other, "transfer"),
        };
        self.fail(error)
    }

    fn on_event(
        &mut self,
        state: pb::TransferState,
        transfer_callid: &str,
        destination: &str,
        status: &str,
    ) -> Vec<Action> {
        match transfer_stage(state, transfer_callid, destination, status) {
            TransferStage::Started {
                transfer_callid,
                destination,
            } => self.start(transfer_callid, &destination),
            TransferStage::Answered {
                transfer_callid, ..
            } => self.succeed(transfer_callid, destination),
            TransferStage::Failed { status } => {
                let message = if status.is_empty() {
                    format!("the transfer to {} could not be placed", self.destination)
                } else {
                    format!(
                        "the transfer target {} did not answer: {status}",
                        self.destination
                    )
                };
                self.fail(ErrorNote::new(
                    ErrorCode::TransferFailed,
                    message,
                    status_code(&status),
                ))
            }
            TransferStage::Other => Vec::new(),
        }
    }

    fn timeout(&mut self) -> Vec<Action> {
        if self.contact_lost {
            let message = format!(
                "lost contact with OpenSIPS's events during the transfer to {}: its outcome is unknown",
                self.destination
            );
            return self.fail(ErrorNote::new(ErrorCode::NodeUnreachable, message, 0));
        }
        let message = if self.accepted {
            format!(
                "OpenSIPS reported no outcome of the transfer to {} in time (the target may still be ringing)",
                self.destination
            )
        } else {
            "OpenSIPS did not answer the transfer request in time".to_owned()
        };
        self.fail(ErrorNote::new(ErrorCode::Timeout, message, 0))
    }
}

/// CallBlindTransfer: `call_transfer {callid, leg, destination}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BlindTransferFlow {
    progress: Progress,
}

impl BlindTransferFlow {
    /// Transfer the party on `leg` of dialog `callid` to `destination`.
    pub fn new(callid: String, leg: Leg, destination: String, timings: Timings) -> Self {
        Self {
            progress: Progress::new(callid, leg, destination, timings),
        }
    }

    /// First actions.
    pub fn start(&mut self) -> Vec<Action> {
        let p = &self.progress;
        vec![
            Action::Watch(p.callid.clone()),
            Action::Mi {
                step: Step::Transfer,
                method: "call_transfer",
                params: json!({
                    "callid": p.callid,
                    "leg": p.leg.as_str(),
                    "destination": p.destination,
                }),
            },
        ]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let p = &mut self.progress;
        if p.done {
            return Vec::new();
        }
        match input {
            Input::Mi(Step::Transfer, MiResult::Ok(_)) => p.on_accepted(),
            Input::Mi(Step::Transfer, MiResult::Lost(_)) => p.on_answer_lost(),
            Input::Mi(Step::Transfer, result) => p.mi_error(&result, None),
            Input::ContactLost => {
                p.contact_lost = true;
                Vec::new()
            }
            Input::Timer(Timer::TransferStart) => p.not_started(),
            Input::Event(CallEvent::Transfer {
                callid,
                transfer_callid,
                destination,
                state,
                status,
                ..
            }) if callid == p.callid => p.on_event(state, &transfer_callid, &destination, &status),
            Input::Deadline => p.timeout(),
            _ => Vec::new(),
        }
    }
}

/// CallAttendedTransfer: `call_transfer {callid: A, leg, transfer_callid: B, transfer_leg}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AttendedTransferFlow {
    progress: Progress,
    callid_b: String,
    leg_b: Leg,
}

impl AttendedTransferFlow {
    /// Connect the party on `leg_a` of dialog A with the party on `leg_b` of dialog B.
    pub fn new(
        callid_a: String,
        leg_a: Leg,
        callid_b: String,
        leg_b: Leg,
        destination: String,
        timings: Timings,
    ) -> Self {
        Self {
            progress: Progress::new(callid_a, leg_a, destination, timings),
            callid_b,
            leg_b,
        }
    }

    /// First actions.
    pub fn start(&mut self) -> Vec<Action> {
        let p = &self.progress;
        vec![
            Action::Watch(p.callid.clone()),
            Action::Watch(self.callid_b.clone()),
            Action::Mi {
                step: Step::Transfer,
                method: "call_transfer",
                params: json!({
                    "callid": p.callid,
                    "leg": p.leg.as_str(),
                    "transfer_callid": self.callid_b,
                    "transfer_leg": self.leg_b.as_str(),
                }),
            },
        ]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let p = &mut self.progress;
        if p.done {
            return Vec::new();
        }
        match input {
            Input::Mi(Step::Transfer, MiResult::Ok(_)) => p.on_accepted(),
            Input::Mi(Step::Transfer, MiResult::Lost(_)) => p.on_answer_lost(),
            Input::Mi(Step::Transfer, result) => p.mi_error(&result, Some(&self.callid_b)),
            Input::ContactLost => {
                p.contact_lost = true;
                Vec::new()
            }
            Input::Timer(Timer::TransferStart) => p.not_started(),
            Input::Event(CallEvent::Transfer {
                callid,
                transfer_callid,
                destination,
                state,
                status,
                ..
            }) => {
                // Dialog B only matters when its side fails.
                if callid == p.callid
                    || (callid == self.callid_b && state == pb::TransferState::Fail)
                {
                    p.on_event(state, &transfer_callid, &destination, &status)
                } else {
                    Vec::new()
                }
            }
            Input::Deadline => p.timeout(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn blind() -> BlindTransferFlow {
        BlindTransferFlow::new(
            "D".into(),
            Leg::Callee,
            "sip:cindy@127.0.0.1".into(),
            Timings::default(),
        )
    }

    #[test]
    fn transcript_b_blind_transfer() {
        let mut f = blind();
        assert_eq!(names(&f.start()), ["watch D", "mi call_transfer"]);
        assert_eq!(
            names(&f.handle(mi_ok(Step::Transfer, json!("Accepted")))),
            ["notify TRANSFER_ACCEPT", "timer TransferStart"]
        );
        let started = f.handle(transfer("D", "N", "N", "start", ""));
        assert_eq!(names(&started), ["notify CALL_START"]);
        let Action::Notify(note) = &started[0] else {
            panic!()
        };
        assert_eq!((note.callid.as_str(), note.leg), ("N", pb::Leg::Callee));
        assert!(
            f.handle(transfer("D", "callee", "N", "notify", "100 Trying"))
                .is_empty()
        );
        assert_eq!(
            names(&f.handle(transfer("D", "callee", "N", "ok", "200 Answering"))),
            ["detached dlg_end_dlg", "finish"]
        );
        assert!(
            f.handle(transfer("D", "", "N", "notify", "200 OK"))
                .is_empty()
        );
        assert!(f.handle(Input::Deadline).is_empty());
    }

    #[test]
    fn blind_transfer_to_busy_fails_with_the_sip_status() {
        let mut f = blind();
        f.start();
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        f.handle(transfer("D", "N", "N", "start", ""));
        let actions = f.handle(transfer("D", "callee", "N", "fail", "486 Busy Here"));
        assert_eq!(names(&actions), ["fail TRANSFER_FAILED", "finish"]);
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert_eq!(e.sip_code, 486);
        assert!(e.message.contains("486 Busy Here"));
    }

    #[test]
    fn fail_with_empty_status_when_refer_could_not_be_sent() {
        let mut f = blind();
        f.start();
        let actions = f.handle(transfer("D", "callee", "", "fail", ""));
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert_eq!((e.code, e.sip_code), (ErrorCode::TransferFailed, 0));
    }

    #[test]
    fn second_transfer_on_a_dialog_is_491() {
        let mut f = blind();
        f.start();
        let actions = f.handle(mi_err(Step::Transfer, 491, "Request Pending"));
        assert_eq!(names(&actions), ["fail TRANSFER_PENDING", "finish"]);
    }

    #[test]
    fn unknown_dialog() {
        let mut f = blind();
        f.start();
        let actions = f.handle(mi_err(Step::Transfer, 404, "Dialog not found"));
        assert_eq!(names(&actions), ["fail DIALOG_NOT_FOUND", "finish"]);
    }

    #[test]
    fn rejected_refer_or_unknown_target_raises_nothing_so_the_start_timer_fails_it() {
        let mut f = blind();
        f.start();
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        let actions = f.handle(Input::Timer(Timer::TransferStart));
        assert_eq!(names(&actions), ["fail TRANSFER_FAILED", "finish"]);
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert!(e.message.contains("sip:cindy@127.0.0.1") && e.message.contains("unknown"));
        assert!(f.handle(Input::Deadline).is_empty());
    }

    #[test]
    fn a_started_transfer_ignores_the_start_timer_and_waits_for_its_outcome() {
        let mut f = blind();
        f.start();
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        f.handle(transfer("D", "N", "N", "start", ""));
        assert!(f.handle(Input::Timer(Timer::TransferStart)).is_empty());
        assert_eq!(
            names(&f.handle(Input::Deadline)),
            ["fail TIMEOUT", "finish"]
        );
    }

    #[test]
    fn a_lost_transfer_answer_is_settled_by_the_events() {
        let lost = || Input::Mi(Step::Transfer, MiResult::Lost("silent".into()));
        let mut f = blind();
        f.start();
        assert_eq!(names(&f.handle(lost())), ["timer TransferStart"]);
        f.handle(transfer("D", "N", "N", "start", ""));
        assert_eq!(
            names(&f.handle(transfer("D", "callee", "N", "ok", "200 OK"))),
            ["detached dlg_end_dlg", "finish"]
        );
        let mut f = blind();
        f.start();
        f.handle(lost());
        let actions = f.handle(Input::Timer(Timer::TransferStart));
        assert_eq!(names(&actions), ["fail NODE_UNREACHABLE", "finish"]);
    }

    #[test]
    fn attended_transfer_that_never_starts_fails_early() {
        let mut f = AttendedTransferFlow::new(
            "A".into(),
            Leg::Callee,
            "B".into(),
            Leg::Callee,
            String::new(),
            Timings::default(),
        );
        f.start();
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        assert_eq!(
            names(&f.handle(Input::Timer(Timer::TransferStart))),
            ["fail TRANSFER_FAILED", "finish"]
        );
    }

    #[test]
    fn transcript_f_attended_transfer() {
        let mut f = AttendedTransferFlow::new(
            "A".into(),
            Leg::Callee,
            "B".into(),
            Leg::Callee,
            "sip:cindy@127.0.0.1".into(),
            Timings::default(),
        );
        assert_eq!(
            names(&f.start()),
            ["watch A", "watch B", "mi call_transfer"]
        );
        let Action::Mi { params, .. } = &f.start()[2] else {
            panic!()
        };
        assert_eq!(params["transfer_callid"], "B");
        assert_eq!(
            names(&f.handle(mi_ok(Step::Transfer, json!("Accepted")))),
            ["notify TRANSFER_ACCEPT", "timer TransferStart"]
        );
        assert_eq!(
            names(&f.handle(transfer("A", "callee", "N", "start", ""))),
            ["notify CALL_START"]
        );
        assert!(
            f.handle(transfer("B", "callee", "N", "start", ""))
                .is_empty()
        );
        assert!(
            f.handle(transfer("B", "callee", "N", "ok", "200 OK"))
                .is_empty()
        );
        assert_eq!(
            names(&f.handle(transfer("A", "callee", "N", "ok", "200 OK"))),
            ["detached dlg_end_dlg", "finish"]
        );
    }

    #[test]
    fn attended_with_unknown_second_dialog_names_it() {
        let mut f = AttendedTransferFlow::new(
            "A".into(),
            Leg::Callee,
            "B".into(),
            Leg::Caller,
            String::new(),
            Timings::default(),
        );
        f.start();
        let actions = f.handle(mi_err(Step::Transfer, 404, "Transfer dialog not found"));
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::DialogNotFound);
        assert!(e.message.contains("dialog B"));
    }

    #[test]
    fn attended_failure_on_the_second_dialog() {
        let mut f = AttendedTransferFlow::new(
            "A".into(),
            Leg::Callee,
            "B".into(),
            Leg::Callee,
            String::new(),
            Timings::default(),
        );
        f.start();
        let actions = f.handle(transfer(
            "B",
            "callee",
            "N",
            "fail",
            "481 Call Does Not Exist",
        ));
        assert_eq!(names(&actions), ["fail TRANSFER_FAILED", "finish"]);
    }
}
