//! CallHold / CallUnHold with `call_hold` / `call_unhold`.
//!
//! The MI answer ("OK") and the E_CALL_HOLD events (one `start` then `ok`/`fail` per leg, legs
//! in any order, before or after the MI answer, other calls' events on the same feed) are
//! gathered until every leg reported; a `fail` on any leg fails the command. OpenSIPS 3.x has no
//! per-leg hold (a `leg` param → -32602): that is reported as NOT_SUPPORTED. OpenSIPS 4.0 takes
//! `leg`, and still re-INVITEs and reports both legs.

use callapi_proto::v1 as pb;
use serde_json::json;

use super::{
    Action, CallEvent, ErrorCode, ErrorNote, Input, Leg, MiResult, Step, StepNote, generic_mi_error,
};

/// Hold or unhold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HoldAction {
    /// Put on hold.
    Hold,
    /// Resume.
    Unhold,
}

impl HoldAction {
    fn event_action(self) -> pb::HoldAction {
        match self {
            Self::Hold => pb::HoldAction::Hold,
            Self::Unhold => pb::HoldAction::Unhold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
enum LegState {
    #[default]
    Quiet,
    Started,
    Ok,
    Failed,
}

impl LegState {
    fn is_final(self) -> bool {
        matches!(self, Self::Ok | Self::Failed)
    }
}

/// The hold/unhold flow.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct HoldFlow {
    callid: String,
    leg: Option<Leg>,
    action: HoldAction,
    replied: bool,
    caller: LegState,
    callee: LegState,
    done: bool,
}

impl HoldFlow {
    /// Hold or unhold `leg` (None = both legs) of dialog `callid`.
    pub fn new(callid: String, leg: Option<Leg>, action: HoldAction) -> Self {
        Self {
            callid,
            leg,
            action,
            replied: false,
            caller: LegState::Quiet,
            callee: LegState::Quiet,
            done: false,
        }
    }

    /// First actions.
    pub fn start(&mut self) -> Vec<Action> {
        let mut params = json!({"callid": self.callid});
        if let (Some(leg), Some(map)) = (self.leg, params.as_object_mut()) {
            map.insert("leg".into(), leg.as_str().into());
        }
        vec![
            Action::Watch(self.callid.clone()),
            Action::Mi {
                step: Step::Hold,
                method: match self.action {
                    HoldAction::Hold => "call_hold",
                    HoldAction::Unhold => "call_unhold",
                },
                params,
            },
        ]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        if self.done {
            return Vec::new();
        }
        match input {
            Input::Mi(Step::Hold, MiResult::Ok(_)) => {
                self.replied = true;
                self.check(false)
            }
            Input::Mi(Step::Hold, result) => {
                let error = self.mi_error(&result);
                self.finish_with(Action::Fail(error))
            }
            Input::Event(CallEvent::Hold {
                callid,
                leg,
                action,
                state,
            }) if callid == self.callid && action == self.action.event_action() => {
                let slot = match leg {
                    pb::Leg::Caller => &mut self.caller,
                    pb::Leg::Callee => &mut self.callee,
                    pb::Leg::Both | pb::Leg::Unspecified => return Vec::new(),
                };
                *slot = match state {
                    pb::HoldState::Start if !slot.is_final() => LegState::Started,
                    pb::HoldState::Ok => LegState::Ok,
                    pb::HoldState::Fail => LegState::Failed,
                    pb::HoldState::Start | pb::HoldState::Unspecified => *slot,
                };
                self.check(false)
            }
            Input::Deadline => self.check(true),
            _ => Vec::new(),
        }
    }

    fn what(&self) -> &'static str {
        match self.action {
            HoldAction::Hold => "hold",
            HoldAction::Unhold => "unhold",
        }
    }

    fn check(&mut self, deadline: bool) -> Vec<Action> {
        let legs = [(Leg::Caller, self.caller), (Leg::Callee, self.callee)];
        if let Some((leg, _)) = legs.iter().find(|(_, s)| *s == LegState::Failed)
            && (self.replied || deadline || legs.iter().all(|(_, s)| s.is_final()))
        {
            {
                let error = ErrorNote::new(
                    ErrorCode::HoldFailed,
                    format!(
                        "{} failed on the {} leg of dialog {} (the phone refused the re-INVITE)",
                        self.what(),
                        leg.as_str(),
                        self.callid
                    ),
                    0,
                );
                return self.finish_with(Action::Fail(error));
            }
        }
        let all_final = legs.iter().all(|(_, s)| s.is_final());
        // At the deadline, a leg that never even started (the OpenSIPS side of a CallStart
        // dialog on 4.0) does not count against success if the other leg is done.
        let settled_at_deadline = deadline
            && self.replied
            && legs.iter().any(|(_, s)| *s == LegState::Ok)
            && legs.iter().all(|(_, s)| *s != LegState::Started);
        if self.replied && (all_final || settled_at_deadline) {
            let note = StepNote {
                step: match self.action {
                    HoldAction::Hold => pb::CommandStep::CallHold,
                    HoldAction::Unhold => pb::CommandStep::CallUnhold,
                },
                callid: self.callid.clone(),
                leg: self.leg.map_or(pb::Leg::Both, Leg::to_proto),
                sip_status: String::new(),
                destination: String::new(),
            };
            return self.finish_with(Action::Notify(note));
        }
        if deadline {
            let message = if self.replied {
                format!(
                    "OpenSIPS did not report the end of the {} of dialog {} in time",
                    self.what(),
                    self.callid
                )
            } else {
                format!(
                    "OpenSIPS did not answer the {} request in time",
                    self.what()
                )
            };
            return self.finish_with(Action::Fail(ErrorNote::new(ErrorCode::Timeout, message, 0)));
        }
        Vec::new()
    }

    fn mi_error(&self, result: &MiResult) -> ErrorNote {
        match result {
            MiResult::Err { code: -32602, .. } if self.leg.is_some() => ErrorNote::new(
                ErrorCode::NotSupported,
                format!(
                    "this OpenSIPS node cannot {} one leg only (per-leg hold needs OpenSIPS 4.0); omit leg to {} both legs",
                    self.what(),
                    self.what()
                ),
                -32602,
            ),
            MiResult::Err {
                code: 480, message, ..
            } => {
                let code = match self.action {
                    HoldAction::Hold => ErrorCode::AlreadyHeld,
                    HoldAction::Unhold => ErrorCode::NotHeld,
                };
                ErrorNote::new(code, format!("dialog {}: {message}", self.callid), 480)
            }
            MiResult::Err {
                code: 420, message, ..
            } => ErrorNote::new(
                ErrorCode::OpensipsError,
                format!("OpenSIPS refused the leg: 420 {message}"),
                420,
            ),
            MiResult::Err {
                code: 404, message, ..
            } => ErrorNote::new(
                ErrorCode::DialogNotFound,
                format!("dialog {} not found (OpenSIPS: 404 {message})", self.callid),
                404,
            ),
            other => generic_mi_error(other, self.what()),
        }
    }

    fn finish_with(&mut self, action: Action) -> Vec<Action> {
        self.done = true;
        vec![action, Action::Finish]
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn hold(leg: Option<Leg>) -> HoldFlow {
        HoldFlow::new("D".into(), leg, HoldAction::Hold)
    }

    #[test]
    fn transcript_c_hold_reply_after_all_events() {
        let mut f = hold(None);
        let start = f.start();
        assert_eq!(names(&start), ["watch D", "mi call_hold"]);
        let Action::Mi { params, .. } = &start[1] else {
            panic!()
        };
        assert_eq!(params, &json!({"callid": "D"}));
        assert!(
            f.handle(super::super::test_support::hold(
                "D", "caller", "hold", "start"
            ))
            .is_empty()
        );
        assert!(
            f.handle(super::super::test_support::hold(
                "D", "callee", "hold", "start"
            ))
            .is_empty()
        );
        assert!(
            f.handle(super::super::test_support::hold(
                "D", "callee", "hold", "ok"
            ))
            .is_empty()
        );
        assert!(
            f.handle(super::super::test_support::hold(
                "D", "caller", "hold", "ok"
            ))
            .is_empty()
        );
        assert_eq!(
            names(&f.handle(mi_ok(Step::Hold, json!("OK")))),
            ["notify CALL_HOLD", "finish"]
        );
    }

    #[test]
    fn transcript_c_unhold_reply_in_the_middle() {
        let mut f = HoldFlow::new("D".into(), None, HoldAction::Unhold);
        f.start();
        let ev = super::super::test_support::hold;
        assert!(f.handle(ev("D", "callee", "unhold", "start")).is_empty());
        assert!(f.handle(mi_ok(Step::Hold, json!("OK"))).is_empty());
        assert!(f.handle(ev("D", "caller", "unhold", "start")).is_empty());
        assert!(f.handle(ev("D", "callee", "unhold", "ok")).is_empty());
        let done = f.handle(ev("D", "caller", "unhold", "ok"));
        assert_eq!(names(&done), ["notify CALL_UNHOLD", "finish"]);
    }

    #[test]
    fn other_calls_and_other_actions_are_filtered_out() {
        let mut f = hold(None);
        f.start();
        let ev = super::super::test_support::hold;
        f.handle(mi_ok(Step::Hold, json!("OK")));
        assert!(f.handle(ev("OTHER", "caller", "hold", "ok")).is_empty());
        assert!(f.handle(ev("OTHER", "callee", "hold", "ok")).is_empty());
        assert!(f.handle(ev("D", "caller", "unhold", "ok")).is_empty());
        assert!(f.handle(ev("D", "callee", "unhold", "ok")).is_empty());
        assert!(f.handle(ev("D", "caller", "hold", "ok")).is_empty());
        assert_eq!(
            names(&f.handle(ev("D", "callee", "hold", "ok"))),
            ["notify CALL_HOLD", "finish"]
        );
    }

    #[test]
    fn transcript_d_caller_leg_fail_on_callstart_dialog() {
        let mut f = hold(None);
        f.start();
        let ev = super::super::test_support::hold;
        f.handle(ev("D", "caller", "hold", "start"));
        assert!(f.handle(ev("D", "caller", "hold", "fail")).is_empty());
        f.handle(ev("D", "callee", "hold", "start"));
        let actions = f.handle(mi_ok(Step::Hold, json!("OK")));
        assert_eq!(names(&actions), ["fail HOLD_FAILED", "finish"]);
    }

    #[test]
    fn already_held_and_not_held() {
        let mut f = hold(None);
        f.start();
        assert_eq!(
            names(&f.handle(mi_err(Step::Hold, 480, "Both dialog legs are on hold"))),
            ["fail ALREADY_HELD", "finish"]
        );
        let mut f = HoldFlow::new("D".into(), None, HoldAction::Unhold);
        f.start();
        assert_eq!(
            names(&f.handle(mi_err(Step::Hold, 480, "No dialog legs on hold"))),
            ["fail NOT_HELD", "finish"]
        );
    }

    #[test]
    fn per_leg_hold_on_36_is_not_supported() {
        let mut f = hold(Some(Leg::Caller));
        let start = f.start();
        let Action::Mi { params, .. } = &start[1] else {
            panic!()
        };
        assert_eq!(params, &json!({"callid": "D", "leg": "caller"}));
        let actions = f.handle(mi_err(Step::Hold, -32602, "Invalid params"));
        assert_eq!(names(&actions), ["fail NOT_SUPPORTED", "finish"]);
    }

    #[test]
    fn per_leg_hold_on_40_reports_both_legs_and_the_requested_one() {
        let mut f = hold(Some(Leg::Callee));
        f.start();
        let ev = super::super::test_support::hold;
        f.handle(mi_ok(Step::Hold, json!("OK")));
        f.handle(ev("D", "callee", "hold", "start"));
        f.handle(ev("D", "caller", "hold", "start"));
        f.handle(ev("D", "caller", "hold", "ok"));
        let done = f.handle(ev("D", "callee", "hold", "ok"));
        let Action::Notify(note) = &done[0] else {
            panic!()
        };
        assert_eq!(
            (note.step, note.leg),
            (pb::CommandStep::CallHold, pb::Leg::Callee)
        );
    }

    #[test]
    fn ringing_unknown_and_timeouts() {
        let mut f = hold(None);
        f.start();
        assert_eq!(
            names(&f.handle(mi_err(Step::Hold, 410, "Dialog not ready"))),
            ["fail DIALOG_NOT_READY", "finish"]
        );
        let mut f = hold(None);
        f.start();
        assert_eq!(
            names(&f.handle(mi_err(Step::Hold, 404, "Dialog not found"))),
            ["fail DIALOG_NOT_FOUND", "finish"]
        );
        let mut f = hold(None);
        f.start();
        assert_eq!(
            names(&f.handle(Input::Deadline)),
            ["fail TIMEOUT", "finish"]
        );
    }

    #[test]
    fn only_one_leg_reports_on_a_callstart_dialog_on_40() {
        let mut f = hold(None);
        f.start();
        let ev = super::super::test_support::hold;
        f.handle(mi_ok(Step::Hold, json!("OK")));
        f.handle(ev("D", "callee", "hold", "start"));
        assert!(f.handle(ev("D", "callee", "hold", "ok")).is_empty());
        assert_eq!(
            names(&f.handle(Input::Deadline)),
            ["notify CALL_HOLD", "finish"]
        );
    }
}
