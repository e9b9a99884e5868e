//! CallStart: third-party call control by REFER, as call-api does it on real OpenSIPS.
//!
//! 1. `t_uac_dlg` INVITE to the caller (From = caller, To = callee, fresh Call-ID X, SDP offer);
//!    the MI reply comes after the final SIP answer; a non-2xx `Status` is a result, not an error.
//! 2. `call_transfer {callid: X, leg: "callee", destination: callee}`: the caller's phone gets a
//!    REFER and calls the callee, making a new dialog Y (`transfer_callid` of the events).
//! 3. E_CALL_TRANSFER on X: `start` → CALL_START (Y), `ok` → CALL_ANSWER (Y), then X is ended
//!    with `dlg_end_dlg` (never a hand-made BYE with a guessed CSeq); `fail` → error.
//!
//! X may go 4→5 on its own right after the REFER (some phones hang up): that is not a failure.

use serde_json::json;

use super::{
    Action, CallEvent, ErrorCode, ErrorNote, Input, MiResult, Step, StepNote, TransferStage,
    clean_destination, generic_mi_error, status_code, transfer_stage,
};

/// SDP offer of the first INVITE (the caller's phone answers it; media then flows phone to phone).
const OFFER: &str = "v=0\r\no=click-to-dial 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Inviting,
    Transferring,
    Done,
}

/// The CallStart flow.
#[derive(Debug)]
pub struct StartFlow {
    caller: String,
    callee: String,
    callid: String,
    phase: Phase,
    accepted: bool,
    new_callid: Option<String>,
}

impl StartFlow {
    /// A CallStart from `caller` to `callee`; `callid` is the fresh Call-ID of the first leg.
    pub fn new(caller: String, callee: String, callid: String) -> Self {
        Self {
            caller,
            callee,
            callid,
            phase: Phase::Inviting,
            accepted: false,
            new_callid: None,
        }
    }

    /// First actions: watch X, INVITE the caller.
    pub fn start(&mut self) -> Vec<Action> {
        let headers = format!(
            "From: <{caller}>\r\nTo: <{callee}>\r\nContact: <{caller}>\r\nContent-Type: application/sdp\r\nCSeq: 1 INVITE\r\nCall-Id: {callid}\r\n",
            caller = self.caller,
            callee = self.callee,
            callid = self.callid
        );
        vec![
            Action::Watch(self.callid.clone()),
            Action::Mi {
                step: Step::Invite,
                method: "t_uac_dlg",
                params: json!({
                    "method": "INVITE",
                    "ruri": self.caller,
                    "headers": headers,
                    "body": OFFER,
                }),
            },
        ]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        match input {
            Input::Mi(Step::Invite, result) => self.on_invite(result),
            Input::Mi(Step::Transfer, MiResult::Ok(_)) => self.accept(),
            Input::Mi(Step::Transfer, result) => {
                let mut error = match &result {
                    MiResult::Err {
                        code: 491, message, ..
                    } => ErrorNote::new(
                        ErrorCode::TransferPending,
                        format!("OpenSIPS refused to REFER the caller: 491 {message}"),
                        491,
                    ),
                    other => generic_mi_error(other, "transfer of the caller to the callee"),
                };
                if error.code == ErrorCode::DialogNotFound {
                    error.message = format!(
                        "the caller hung up before being transferred ({})",
                        error.message
                    );
                    error.code = ErrorCode::CallFailed;
                }
                self.fail_and_clean(error)
            }
            Input::Event(CallEvent::Transfer {
                callid,
                transfer_callid,
                destination,
                state,
                status,
                ..
            }) if callid == self.callid && self.phase == Phase::Transferring => {
                match transfer_stage(&state, &transfer_callid, &destination, &status) {
                    TransferStage::Started {
                        transfer_callid,
                        destination,
                    } => self.started(transfer_callid, &destination),
                    TransferStage::Answered {
                        transfer_callid,
                        status,
                    } => {
                        let mut actions = self.started(transfer_callid.clone(), &destination);
                        let callid = self.new_callid.clone().unwrap_or(transfer_callid);
                        actions.push(Action::Notify(StepNote {
                            name: "CALL_ANSWER",
                            callid,
                            leg: "callee".into(),
                            sip_status: status,
                            destination: self.callee.clone(),
                        }));
                        actions.extend(self.end_first_leg());
                        actions.push(Action::Finish);
                        self.phase = Phase::Done;
                        actions
                    }
                    TransferStage::Failed { status } => {
                        let message = if status.is_empty() {
                            format!("the call to the callee {} could not be placed", self.callee)
                        } else {
                            format!("the callee {} did not answer: {status}", self.callee)
                        };
                        self.fail_and_clean(ErrorNote::new(
                            ErrorCode::CallFailed,
                            message,
                            status_code(&status),
                        ))
                    }
                    TransferStage::Other => Vec::new(),
                }
            }
            Input::Event(_) => Vec::new(),
            Input::Deadline => {
                let message = match self.phase {
                    Phase::Inviting => format!("the caller {} did not answer in time", self.caller),
                    _ => format!(
                        "OpenSIPS reported no outcome of the call to the callee {} in time",
                        self.callee
                    ),
                };
                self.fail_and_clean(ErrorNote::new(ErrorCode::Timeout, message, 0))
            }
            Input::Mi(_, _) => Vec::new(),
        }
    }

    fn on_invite(&mut self, result: MiResult) -> Vec<Action> {
        match result {
            MiResult::Ok(reply) => {
                let status = reply
                    .get("Status")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let code = status_code(&status);
                if (200..300).contains(&code) {
                    self.phase = Phase::Transferring;
                    vec![
                        Action::Notify(StepNote {
                            name: "CALL_ANSWER",
                            callid: self.callid.clone(),
                            leg: "caller".into(),
                            sip_status: status,
                            destination: self.caller.clone(),
                        }),
                        Action::Mi {
                            step: Step::Transfer,
                            method: "call_transfer",
                            params: json!({
                                "callid": self.callid,
                                "leg": "callee",
                                "destination": self.callee,
                            }),
                        },
                    ]
                } else {
                    self.phase = Phase::Done;
                    let status = if status.is_empty() {
                        "no status".to_owned()
                    } else {
                        status
                    };
                    vec![
                        Action::Fail(ErrorNote::new(
                            ErrorCode::CallFailed,
                            format!("the caller {} did not answer: {status}", self.caller),
                            code,
                        )),
                        Action::Finish,
                    ]
                }
            }
            MiResult::Unreachable(_) => {
                // The INVITE may still be ringing: hang it up if it exists.
                self.fail_and_clean(generic_mi_error(&result, "call to the caller"))
            }
            other => {
                self.phase = Phase::Done;
                vec![
                    Action::Fail(generic_mi_error(&other, "call to the caller")),
                    Action::Finish,
                ]
            }
        }
    }

    fn accept(&mut self) -> Vec<Action> {
        if self.accepted {
            return Vec::new();
        }
        self.accepted = true;
        vec![Action::Notify(StepNote {
            name: "TRANSFER_ACCEPT",
            callid: self.callid.clone(),
            leg: "callee".into(),
            sip_status: String::new(),
            destination: self.callee.clone(),
        })]
    }

    fn started(&mut self, transfer_callid: String, destination: &str) -> Vec<Action> {
        let mut actions = self.accept();
        if self.new_callid.is_none() {
            self.new_callid = Some(transfer_callid.clone());
            actions.push(Action::Notify(StepNote {
                name: "CALL_START",
                callid: transfer_callid,
                leg: "callee".into(),
                sip_status: String::new(),
                destination: clean_destination(destination),
            }));
        }
        actions
    }

    fn end_first_leg(&self) -> Vec<Action> {
        vec![Action::MiDetached {
            method: "dlg_end_dlg",
            params: json!({"dialog_id": self.callid}),
        }]
    }

    fn fail_and_clean(&mut self, error: ErrorNote) -> Vec<Action> {
        self.phase = Phase::Done;
        let mut actions = vec![Action::Fail(error)];
        actions.extend(self.end_first_leg());
        actions.push(Action::Finish);
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn flow() -> StartFlow {
        StartFlow::new(
            "sip:alice@127.0.0.1".into(),
            "sip:bob@127.0.0.1".into(),
            "X".into(),
        )
    }

    fn answered() -> Input {
        mi_ok(
            Step::Invite,
            json!({"Status": "200 Answering", "RURI": "sip:alice@127.0.0.1:5071"}),
        )
    }

    #[test]
    fn invite_carries_the_fresh_callid_and_an_offer() {
        let mut f = flow();
        let actions = f.start();
        assert_eq!(names(&actions), ["watch X", "mi t_uac_dlg"]);
        let Action::Mi { params, .. } = &actions[1] else {
            panic!()
        };
        let headers = params["headers"].as_str().unwrap();
        assert!(headers.contains("Call-Id: X\r\n"));
        assert!(headers.contains("From: <sip:alice@127.0.0.1>\r\n"));
        assert!(headers.contains("Content-Type: application/sdp\r\n"));
        assert_eq!(params["ruri"], "sip:alice@127.0.0.1");
    }

    #[test]
    fn transcript_a_callstart_in_order() {
        // a_callstart: reply 200, Accepted, start (leg = transfer_callid quirk), X 4->5, ok.
        let mut f = flow();
        f.start();
        assert_eq!(
            names(&f.handle(answered())),
            ["notify CALL_ANSWER", "mi call_transfer"]
        );
        assert_eq!(
            names(&f.handle(mi_ok(Step::Transfer, json!("Accepted")))),
            ["notify TRANSFER_ACCEPT"]
        );
        let started = f.handle(transfer("X", "Y", "Y", "start", ""));
        assert_eq!(names(&started), ["notify CALL_START"]);
        let Action::Notify(note) = &started[0] else {
            panic!()
        };
        assert_eq!(note.callid, "Y");
        assert_eq!(note.destination, "sip:bob@127.0.0.1:5072");
        let dialog_gone = Input::Event(CallEvent::DialogState {
            callid: "X".into(),
            old_state: 4,
            new_state: 5,
        });
        assert!(f.handle(dialog_gone).is_empty());
        let done = f.handle(transfer("X", "callee", "Y", "ok", "200 Answering"));
        assert_eq!(
            names(&done),
            ["notify CALL_ANSWER", "detached dlg_end_dlg", "finish"]
        );
        let Action::Notify(note) = &done[0] else {
            panic!()
        };
        assert_eq!(note.callid, "Y");
        assert!(
            f.handle(transfer("X", "", "Y", "notify", "200 OK"))
                .is_empty()
        );
    }

    #[test]
    fn events_before_the_mi_reply_still_give_the_documented_order() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        let actions = f.handle(transfer("X", "Y", "Y", "start", ""));
        assert_eq!(
            names(&actions),
            ["notify TRANSFER_ACCEPT", "notify CALL_START"]
        );
        assert!(
            f.handle(mi_ok(Step::Transfer, json!("Accepted")))
                .is_empty()
        );
    }

    #[test]
    fn missing_start_event_still_reports_the_new_callid() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        let done = f.handle(transfer("X", "callee", "Y", "ok", "200 OK"));
        assert_eq!(
            names(&done),
            [
                "notify CALL_START",
                "notify CALL_ANSWER",
                "detached dlg_end_dlg",
                "finish"
            ]
        );
    }

    #[test]
    fn caller_busy_is_a_result_not_an_error() {
        let mut f = flow();
        f.start();
        let actions = f.handle(mi_ok(
            Step::Invite,
            json!({"Status": "486 Busy Here", "Message": "..."}),
        ));
        assert_eq!(names(&actions), ["fail CALL_FAILED", "finish"]);
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert_eq!(e.sip_code, 486);
        assert!(e.message.contains("486 Busy Here"));
    }

    #[test]
    fn unknown_and_unanswered_callers() {
        for (status, code) in [("404 User Not Found", 404), ("408 Request Timeout", 408)] {
            let mut f = flow();
            f.start();
            let actions = f.handle(mi_ok(Step::Invite, json!({"Status": status})));
            let Action::Fail(e) = &actions[0] else {
                panic!()
            };
            assert_eq!((e.code, e.sip_code), (ErrorCode::CallFailed, code));
        }
    }

    #[test]
    fn callee_busy_fails_and_hangs_up_the_caller() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        f.handle(transfer("X", "Y", "Y", "start", ""));
        let actions = f.handle(transfer("X", "callee", "Y", "fail", "486 Busy Here"));
        assert_eq!(
            names(&actions),
            ["fail CALL_FAILED", "detached dlg_end_dlg", "finish"]
        );
        assert!(f.handle(Input::Deadline).is_empty());
    }

    #[test]
    fn unknown_callee_raises_no_event_so_the_deadline_ends_it() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        let actions = f.handle(Input::Deadline);
        assert_eq!(
            names(&actions),
            ["fail TIMEOUT", "detached dlg_end_dlg", "finish"]
        );
    }

    #[test]
    fn unreachable_node_during_invite_cleans_up() {
        let mut f = flow();
        f.start();
        let actions = f.handle(Input::Mi(
            Step::Invite,
            MiResult::Unreachable("timeout".into()),
        ));
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
        );
    }

    #[test]
    fn other_calls_events_are_ignored() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        assert!(
            f.handle(transfer("OTHER", "callee", "Z", "ok", "200 OK"))
                .is_empty()
        );
    }
}
