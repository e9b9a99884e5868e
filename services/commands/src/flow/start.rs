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
//!
//! Two ways OpenSIPS stays silent, both caught early rather than at the deadline:
//! - an unknown callee: the caller's INVITE to it gets 404 at once and OpenSIPS raises no
//!   E_CALL_TRANSFER at all, so no `start` within [`Timings::transfer_start`] of the accepted
//!   REFER means the call was not placed: CALL_FAILED, and X is ended;
//! - a lost `t_uac_dlg` (connector or NATS gone while the caller's phone rang): the flow asks
//!   OpenSIPS what became of X (`dlg_list`), ends it if it was answered (or once it stops
//!   ringing) and reports NODE_UNREACHABLE, never a "did not answer".

use callapi_proto::v1 as pb;
use serde_json::json;

use super::shape::{self, Shaped};
use super::{
    Action, CallEvent, ErrorCode, ErrorNote, Input, MiResult, Step, StepNote, Timer, Timings,
    TransferStage, generic_mi_error, status_code, transfer_stage,
};

/// SDP offer of the first INVITE (the caller's phone answers it; media then flows phone to phone).
const OFFER: &str = "v=0\r\no=click-to-dial 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Phase {
    Inviting,
    /// The INVITE's MI request was lost: finding out what became of X.
    Probing,
    Transferring,
    Done,
}

/// The CallStart flow.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StartFlow {
    caller: String,
    callee: String,
    callid: String,
    /// Its SIP, from the options.
    shaped: Shaped,
    phase: Phase,
    accepted: bool,
    new_callid: Option<String>,
    timings: Timings,
    /// Probes left while `Probing`.
    probes_left: u32,
    /// The loss was already reported to the client (while X still rings).
    loss_reported: bool,
    /// The answer to `call_transfer` was lost: only its events can tell whether it went on.
    transfer_answer_lost: bool,
    /// NATS was lost for a while: events may be missing, so silence proves nothing.
    contact_lost: bool,
    /// Where the caller's INVITE is sent first (`t_uac_dlg`'s `next_hop`): the node's own SIP
    /// socket, so OpenSIPS need not resolve the caller's domain; none: OpenSIPS resolves it.
    #[serde(default)]
    next_hop: Option<String>,
}

impl StartFlow {
    /// A CallStart from `caller` to `callee` shaped by `options` (already checked); `callid`
    /// is the fresh Call-ID of the first leg.
    pub fn new(
        caller: String,
        callee: String,
        callid: String,
        options: &pb::CallOptions,
        timings: Timings,
    ) -> Self {
        Self {
            shaped: shape::shape(&caller, &callee, options),
            caller,
            callee,
            callid,
            phase: Phase::Inviting,
            accepted: false,
            new_callid: None,
            timings,
            probes_left: timings.probes,
            loss_reported: false,
            transfer_answer_lost: false,
            contact_lost: false,
            next_hop: None,
        }
    }

    /// The caller's INVITE goes to `next_hop` first (`t_uac_dlg`'s `next_hop`).
    pub fn via(mut self, next_hop: Option<String>) -> Self {
        self.next_hop = next_hop;
        self
    }

    /// First actions: watch X, INVITE the caller.
    pub fn start(&mut self) -> Vec<Action> {
        let content_type = if self.shaped.offer {
            "Content-Type: application/sdp\r\n"
        } else {
            ""
        };
        // With a next hop, callapi's side of the first call is that socket: requests to it
        // (the BYE that ends the call) reach OpenSIPS with no DNS lookup of the caller's domain.
        let contact = match &self.next_hop {
            Some(next_hop) => contact_via(&self.caller, next_hop),
            None => self.caller.clone(),
        };
        let headers = format!(
            "From: {from}\r\nTo: <{callee}>\r\nContact: <{contact}>\r\n{content_type}CSeq: 1 INVITE\r\nCall-Id: {callid}\r\n{extra}",
            from = self.shaped.from,
            callee = self.callee,
            callid = self.callid,
            extra = self.shaped.caller_headers,
        );
        let mut params = json!({
            "method": "INVITE",
            "ruri": self.caller,
            "headers": headers,
        });
        if self.shaped.offer {
            params["body"] = json!(OFFER);
        }
        if let Some(next_hop) = &self.next_hop {
            params["next_hop"] = json!(next_hop);
        }
        vec![
            Action::Watch(self.callid.clone()),
            Action::Mi {
                step: Step::Invite,
                method: "t_uac_dlg",
                params,
            },
        ]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        match input {
            Input::ContactLost => {
                self.contact_lost = true;
                Vec::new()
            }
            Input::Mi(Step::Invite, MiResult::Lost(_)) => {
                self.phase = Phase::Probing;
                vec![self.probe()]
            }
            Input::Mi(Step::Invite, result) => self.on_invite(result),
            Input::Mi(Step::Prepare, MiResult::Ok(_)) if self.phase == Phase::Transferring => {
                vec![self.refer()]
            }
            Input::Mi(Step::Prepare, result) if self.phase == Phase::Transferring => {
                let error = generic_mi_error(
                    &result,
                    "setting up how OpenSIPS sends the call to the callee (dlg_push_var)",
                );
                self.fail_and_clean(error)
            }
            Input::Mi(Step::Probe, result) if self.phase == Phase::Probing => self.on_probe(result),
            Input::Timer(Timer::Reprobe) if self.phase == Phase::Probing => vec![self.probe()],
            Input::Deadline if self.phase == Phase::Probing => self.lost("its state is unknown"),
            Input::Mi(Step::Transfer, MiResult::Ok(_)) => {
                let mut actions = self.accept();
                if self.new_callid.is_none() {
                    actions.push(Action::StartTimer {
                        timer: Timer::TransferStart,
                        after: self.timings.transfer_start,
                    });
                }
                actions
            }
            Input::Mi(Step::Transfer, MiResult::Lost(_)) if self.new_callid.is_none() => {
                // OpenSIPS may have taken the transfer: its events would still tell.
                self.transfer_answer_lost = true;
                vec![Action::StartTimer {
                    timer: Timer::TransferStart,
                    after: self.timings.transfer_start,
                }]
            }
            Input::Mi(Step::Transfer, MiResult::Lost(_)) => Vec::new(),
            Input::Timer(Timer::TransferStart)
                if self.phase == Phase::Transferring
                    && self.new_callid.is_none()
                    && (self.transfer_answer_lost || self.contact_lost) =>
            {
                let message = format!(
                    "lost contact with OpenSIPS while the caller was being transferred to the callee {}, and no start of that call was seen within {} ms (it may or may not be up); the caller's first call is being ended",
                    self.callee,
                    self.timings.transfer_start.as_millis()
                );
                self.fail_and_clean(ErrorNote::new(ErrorCode::NodeUnreachable, message, 0))
            }
            Input::Deadline if self.phase == Phase::Transferring && self.contact_lost => {
                let message = format!(
                    "lost contact with OpenSIPS's events while calling the callee {}: the outcome of that call is unknown",
                    self.callee
                );
                self.fail_and_clean(ErrorNote::new(ErrorCode::NodeUnreachable, message, 0))
            }
            Input::Timer(Timer::TransferStart)
                if self.phase == Phase::Transferring && self.new_callid.is_none() =>
            {
                let message = format!(
                    "the call to the callee {} was not placed: OpenSIPS reported no start of it within {} ms of the caller accepting the REFER (the callee is probably unknown, e.g. 404 User Not Found, or the caller's phone could not call it, or the node is out of resources and refused that call); the caller's call is being ended",
                    self.callee,
                    self.timings.transfer_start.as_millis()
                );
                self.fail_and_clean(ErrorNote::new(ErrorCode::CallFailed, message, 0))
            }
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
                match transfer_stage(state, &transfer_callid, &destination, &status) {
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
                            step: pb::CommandStep::CallAnswer,
                            callid,
                            leg: pb::Leg::Callee,
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
            Input::Event(_) | Input::Timer(_) => Vec::new(),
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
                    let next = match &self.shaped.callee_instructions {
                        Some(value) => Action::Mi {
                            step: Step::Prepare,
                            method: "dlg_push_var",
                            params: json!({
                                "dlg_val_name": shape::CALLEE_VALUE,
                                "dlg_val_value": value,
                                "DID": [self.callid],
                            }),
                        },
                        None => self.refer(),
                    };
                    vec![
                        Action::Notify(StepNote {
                            step: pb::CommandStep::CallAnswer,
                            callid: self.callid.clone(),
                            leg: pb::Leg::Caller,
                            sip_status: status,
                            destination: self.caller.clone(),
                        }),
                        next,
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
            MiResult::Unreachable(_) | MiResult::BadReply(_) => {
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

    /// The REFER that makes the caller's phone call the callee.
    fn refer(&self) -> Action {
        Action::Mi {
            step: Step::Transfer,
            method: "call_transfer",
            params: json!({
                "callid": self.callid,
                "leg": "callee",
                "destination": self.shaped.destination,
            }),
        }
    }

    fn probe(&mut self) -> Action {
        self.probes_left = self.probes_left.saturating_sub(1);
        Action::Mi {
            step: Step::Probe,
            method: "dlg_list",
            params: json!({"callid": self.callid}),
        }
    }

    /// What `dlg_list {callid: X}` says of the first leg after its INVITE's answer was lost.
    fn on_probe(&mut self, result: MiResult) -> Vec<Action> {
        let state = match &result {
            MiResult::Ok(reply) => reply
                .get("Dialog")
                .or_else(|| reply.get("Dialogs").and_then(|d| d.get(0)))
                .and_then(|d| d.get("state"))
                .and_then(serde_json::Value::as_i64),
            _ => None,
        };
        match (state, &result) {
            (Some(3 | 4), _) => self.lost("the caller had answered, so that call was ended"),
            (Some(1 | 2), _) => {
                let mut actions = Vec::new();
                if !self.loss_reported {
                    self.loss_reported = true;
                    actions.push(Action::Fail(self.loss_note(
                        "the caller's phone is still ringing: that call is ended as soon as it is answered or stops ringing",
                    )));
                }
                actions.push(Action::StartTimer {
                    timer: Timer::Reprobe,
                    after: self.timings.reprobe,
                });
                actions
            }
            (Some(_), _) | (None, MiResult::Err { code: 404, .. }) => {
                self.lost("the call to the caller did not go through")
            }
            _ if self.probes_left == 0 => self.lost("its state is unknown"),
            _ => vec![Action::StartTimer {
                timer: Timer::Reprobe,
                after: self.timings.reprobe,
            }],
        }
    }

    fn loss_note(&self, what_became: &str) -> ErrorNote {
        ErrorNote::new(
            ErrorCode::NodeUnreachable,
            format!(
                "lost contact with OpenSIPS while the call to the caller {} was ringing; {what_became}",
                self.caller
            ),
            0,
        )
    }

    /// Ends the command after a lost INVITE: reports (unless already done) and ends X.
    fn lost(&mut self, what_became: &str) -> Vec<Action> {
        self.phase = Phase::Done;
        let mut actions = Vec::new();
        if !self.loss_reported {
            actions.push(Action::Fail(self.loss_note(what_became)));
        }
        actions.extend(self.end_first_leg());
        actions.push(Action::Finish);
        actions
    }

    fn accept(&mut self) -> Vec<Action> {
        if self.accepted {
            return Vec::new();
        }
        self.accepted = true;
        vec![Action::Notify(StepNote {
            step: pb::CommandStep::TransferAccept,
            callid: self.callid.clone(),
            leg: pb::Leg::Callee,
            sip_status: String::new(),
            destination: self.callee.clone(),
        })]
    }

    fn started(&mut self, transfer_callid: String, destination: &str) -> Vec<Action> {
        let mut actions = self.accept();
        if self.new_callid.is_none() {
            self.new_callid = Some(transfer_callid.clone());
            actions.push(Action::Notify(StepNote {
                step: pb::CommandStep::CallStart,
                callid: transfer_callid,
                leg: pb::Leg::Callee,
                sip_status: String::new(),
                destination: destination.to_owned(),
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

/// The Contact of callapi's side of the first call when its INVITE goes through `next_hop`:
/// the caller's user part at the next hop's host and port (`sip:1001@127.0.0.1:5060`).
fn contact_via(caller: &str, next_hop: &str) -> String {
    let without_scheme = |uri: &str| -> String {
        uri.split_once(':')
            .map_or(uri, |(_, rest)| rest)
            .split([';', '?'])
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let hop = without_scheme(next_hop);
    let hostport = hop.rsplit_once('@').map_or(hop.as_str(), |(_, h)| h);
    let caller_rest = without_scheme(caller);
    match caller_rest.split_once('@') {
        Some((user, _)) if caller.starts_with("sip") => format!("sip:{user}@{hostport}"),
        _ => format!("sip:{hostport}"),
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
            &pb::CallOptions::default(),
            Timings::default(),
        )
    }

    #[test]
    fn the_callers_invite_goes_to_the_next_hop_when_one_is_set() {
        let invite = |flow: &mut StartFlow| {
            flow.start()
                .into_iter()
                .find_map(|action| match action {
                    Action::Mi {
                        method: "t_uac_dlg",
                        params,
                        ..
                    } => Some(params),
                    _ => None,
                })
                .expect("an INVITE")
        };
        let direct = invite(&mut flow());
        assert!(direct.get("next_hop").is_none());
        assert!(
            direct["headers"]
                .as_str()
                .unwrap()
                .contains("Contact: <sip:alice@127.0.0.1>\r\n")
        );
        let mut via = flow().via(Some("sip:127.0.0.1:5060".into()));
        let invite = invite(&mut via);
        assert_eq!(invite["next_hop"], "sip:127.0.0.1:5060");
        // callapi's side of the call is that socket (its BYE needs no DNS).
        assert!(
            invite["headers"]
                .as_str()
                .unwrap()
                .contains("Contact: <sip:alice@127.0.0.1:5060>\r\n"),
            "{invite}"
        );
        assert_eq!(
            contact_via("sip:1001@acme.example;user=phone", "sip:10.0.0.5:5070;lr"),
            "sip:1001@10.0.0.5:5070"
        );
        assert_eq!(
            contact_via("tel:+4930123", "sip:127.0.0.1:5060"),
            "sip:127.0.0.1:5060"
        );
    }

    /// A CallStart whose callee's INVITE goes through a trunk, with a late offer.
    fn shaped_flow() -> StartFlow {
        StartFlow::new(
            "sip:1001@pbx.example.com".into(),
            "sip:+4930123@pbx.example.com".into(),
            "X".into(),
            &pb::CallOptions {
                late_offer: true,
                caller_display_name: "Desk".into(),
                trunk: Some(pb::Trunk {
                    name: "carrier".into(),
                    uri: "sip:10.0.0.5".into(),
                }),
                ..Default::default()
            },
            Timings::default(),
        )
    }

    #[test]
    fn options_shape_the_invite_and_push_the_callee_s_before_the_refer() {
        let mut f = shaped_flow();
        let actions = f.start();
        let Action::Mi { params, .. } = &actions[1] else {
            panic!()
        };
        let headers = params["headers"].as_str().unwrap();
        assert!(headers.contains("From: \"Desk\" <sip:1001@pbx.example.com>\r\n"));
        assert!(!headers.contains("Content-Type"));
        assert!(params.get("body").is_none());
        let actions = f.handle(answered());
        assert_eq!(names(&actions), ["notify CALL_ANSWER", "mi dlg_push_var"]);
        let Action::Mi { params, .. } = &actions[1] else {
            panic!()
        };
        assert_eq!(params["DID"], json!(["X"]));
        assert_eq!(params["dlg_val_name"], "callapi_callee");
        let pushed: serde_json::Value =
            serde_json::from_str(params["dlg_val_value"].as_str().unwrap()).unwrap();
        assert_eq!(pushed["du"], "sip:10.0.0.5");
        let actions = f.handle(mi_ok(Step::Prepare, json!("OK")));
        assert_eq!(names(&actions), ["mi call_transfer"]);
        let Action::Mi { params, .. } = &actions[0] else {
            panic!()
        };
        assert_eq!(params["destination"], "sip:+4930123@pbx.example.com");
    }

    #[test]
    fn a_refused_push_fails_the_call_and_ends_the_first_leg() {
        let mut f = shaped_flow();
        f.start();
        f.handle(answered());
        let actions = f.handle(mi_err(Step::Prepare, 403, "Dialog operation error"));
        assert_eq!(
            names(&actions),
            ["fail OPENSIPS_ERROR", "detached dlg_end_dlg", "finish"]
        );
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
            ["notify TRANSFER_ACCEPT", "timer TransferStart"]
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
            old_state: pb::DialogState::Confirmed,
            new_state: pb::DialogState::Deleted,
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
    fn unknown_callee_raises_no_event_so_a_short_timer_fails_it() {
        // Real OpenSIPS: the REFERed INVITE gets 404 at once and no E_CALL_TRANSFER is raised.
        let mut f = flow();
        f.start();
        f.handle(answered());
        let accepted = f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        assert_eq!(
            names(&accepted),
            ["notify TRANSFER_ACCEPT", "timer TransferStart"]
        );
        assert_eq!(
            accepted[1],
            Action::StartTimer {
                timer: Timer::TransferStart,
                after: Timings::default().transfer_start
            }
        );
        let actions = f.handle(Input::Timer(Timer::TransferStart));
        assert_eq!(
            names(&actions),
            ["fail CALL_FAILED", "detached dlg_end_dlg", "finish"]
        );
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert!(e.message.contains("sip:bob@127.0.0.1") && e.message.contains("unknown"));
        assert!(f.handle(Input::Deadline).is_empty());
    }

    #[test]
    fn a_transfer_that_started_is_not_failed_by_the_start_timer() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        f.handle(transfer("X", "Y", "Y", "start", ""));
        assert!(f.handle(Input::Timer(Timer::TransferStart)).is_empty());
        // A callee that rings and never answers is still caught by the deadline.
        assert_eq!(
            names(&f.handle(Input::Deadline)),
            ["fail TIMEOUT", "detached dlg_end_dlg", "finish"]
        );
    }

    #[test]
    fn events_before_the_accept_need_no_start_timer() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(transfer("X", "Y", "Y", "start", ""));
        assert!(
            f.handle(mi_ok(Step::Transfer, json!("Accepted")))
                .is_empty()
        );
    }

    #[test]
    fn a_lost_transfer_answer_waits_for_the_events_that_would_still_come() {
        let lost = || Input::Mi(Step::Transfer, MiResult::Lost("silent".into()));
        // The transfer went on: its events carry the command to its end.
        let mut f = flow();
        f.start();
        f.handle(answered());
        assert_eq!(names(&f.handle(lost())), ["timer TransferStart"]);
        assert_eq!(
            names(&f.handle(transfer("X", "Y", "Y", "start", ""))),
            ["notify TRANSFER_ACCEPT", "notify CALL_START"]
        );
        assert_eq!(
            names(&f.handle(transfer("X", "callee", "Y", "ok", "200 OK"))),
            ["notify CALL_ANSWER", "detached dlg_end_dlg", "finish"]
        );
        // Nothing came: lost contact, not an unknown callee.
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(lost());
        let actions = f.handle(Input::Timer(Timer::TransferStart));
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
        );
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert!(
            e.message.contains("lost contact with OpenSIPS"),
            "{}",
            e.message
        );
    }

    #[test]
    fn silence_after_lost_contact_is_not_blamed_on_the_callee() {
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(mi_ok(Step::Transfer, json!("Accepted")));
        assert!(f.handle(Input::ContactLost).is_empty());
        let actions = f.handle(Input::Timer(Timer::TransferStart));
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
        );
        // Started, then contact lost: the deadline is lost contact, not "still ringing".
        let mut f = flow();
        f.start();
        f.handle(answered());
        f.handle(transfer("X", "Y", "Y", "start", ""));
        f.handle(Input::ContactLost);
        let actions = f.handle(Input::Deadline);
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::NodeUnreachable, "{}", e.message);
    }

    fn lost_invite(f: &mut StartFlow) -> Vec<Action> {
        f.start();
        f.handle(Input::Mi(Step::Invite, MiResult::Lost("silent".into())))
    }

    fn dialog_in_state(state: i64) -> Input {
        mi_ok(
            Step::Probe,
            json!({"Dialog": {"callid": "X", "state": state}}),
        )
    }

    #[test]
    fn a_lost_invite_whose_caller_answered_is_ended_and_reported_as_lost_contact() {
        let mut f = flow();
        let probe = lost_invite(&mut f);
        assert_eq!(names(&probe), ["mi dlg_list"]);
        let Action::Mi { params, .. } = &probe[0] else {
            panic!()
        };
        assert_eq!(params, &json!({"callid": "X"}));
        let actions = f.handle(dialog_in_state(4));
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
        );
        let Action::Fail(e) = &actions[0] else {
            panic!()
        };
        assert!(e.message.contains("lost contact with OpenSIPS"));
        assert!(e.message.contains("answered"));
        assert!(!e.message.contains("did not answer"));
    }

    #[test]
    fn a_lost_invite_still_ringing_is_reported_at_once_and_ended_when_it_stops() {
        let mut f = flow();
        lost_invite(&mut f);
        let actions = f.handle(dialog_in_state(2));
        assert_eq!(names(&actions), ["fail NODE_UNREACHABLE", "timer Reprobe"]);
        assert_eq!(
            names(&f.handle(Input::Timer(Timer::Reprobe))),
            ["mi dlg_list"]
        );
        assert_eq!(names(&f.handle(dialog_in_state(2))), ["timer Reprobe"]);
        f.handle(Input::Timer(Timer::Reprobe));
        // Answered at last: ended, not reported twice.
        assert_eq!(
            names(&f.handle(dialog_in_state(4))),
            ["detached dlg_end_dlg", "finish"]
        );
    }

    #[test]
    fn a_lost_invite_probed_while_opensips_is_still_out_of_reach() {
        let mut f = flow();
        lost_invite(&mut f);
        let unreachable = || Input::Mi(Step::Probe, MiResult::Unreachable("no connector".into()));
        for _ in 1..Timings::default().probes {
            assert_eq!(names(&f.handle(unreachable())), ["timer Reprobe"]);
            assert_eq!(
                names(&f.handle(Input::Timer(Timer::Reprobe))),
                ["mi dlg_list"]
            );
        }
        let actions = f.handle(unreachable());
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
        );
        // A dialog OpenSIPS does not know: the call did not go through.
        let mut f = flow();
        lost_invite(&mut f);
        let actions = f.handle(mi_err(Step::Probe, 404, "No such dialog"));
        assert_eq!(
            names(&actions),
            ["fail NODE_UNREACHABLE", "detached dlg_end_dlg", "finish"]
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
