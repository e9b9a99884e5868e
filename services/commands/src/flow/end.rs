//! CallEnd: `dlg_end_dlg {dialog_id}` (OpenSIPS sends BYE to both parties with the right CSeq).

use serde_json::json;

use super::{Action, ErrorCode, ErrorNote, Input, MiResult, Step, generic_mi_error};

/// The CallEnd flow.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EndFlow {
    callid: String,
    done: bool,
}

impl EndFlow {
    /// End dialog `callid`.
    pub fn new(callid: String) -> Self {
        Self {
            callid,
            done: false,
        }
    }

    /// First actions.
    pub fn start(&mut self) -> Vec<Action> {
        vec![Action::Mi {
            step: Step::End,
            method: "dlg_end_dlg",
            params: json!({"dialog_id": self.callid}),
        }]
    }

    /// Next actions after `input`.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        if self.done {
            return Vec::new();
        }
        let actions = match input {
            Input::Mi(Step::End, MiResult::Ok(_)) => vec![Action::Finish],
            Input::Mi(
                Step::End,
                MiResult::Err {
                    code: 404, message, ..
                },
            ) => vec![
                Action::Fail(ErrorNote::new(
                    ErrorCode::DialogNotFound,
                    format!("dialog {} not found (OpenSIPS: 404 {message})", self.callid),
                    404,
                )),
                Action::Finish,
            ],
            Input::Mi(Step::End, other) => {
                vec![
                    Action::Fail(generic_mi_error(&other, "end")),
                    Action::Finish,
                ]
            }
            Input::Deadline => vec![
                Action::Fail(ErrorNote::new(
                    ErrorCode::Timeout,
                    "OpenSIPS did not answer the end request in time",
                    0,
                )),
                Action::Finish,
            ],
            _ => return Vec::new(),
        };
        self.done = true;
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn transcript_e_end_then_again() {
        let mut f = EndFlow::new("D".into());
        assert_eq!(names(&f.start()), ["mi dlg_end_dlg"]);
        assert_eq!(names(&f.handle(mi_ok(Step::End, json!("OK")))), ["finish"]);
        let mut f = EndFlow::new("D".into());
        f.start();
        assert_eq!(
            names(&f.handle(mi_err(Step::End, 404, "Requested Dialog not found"))),
            ["fail DIALOG_NOT_FOUND", "finish"]
        );
    }

    #[test]
    fn unreachable_node() {
        let mut f = EndFlow::new("D".into());
        f.start();
        let actions = f.handle(Input::Mi(Step::End, MiResult::Unreachable("down".into())));
        assert_eq!(names(&actions), ["fail NODE_UNREACHABLE", "finish"]);
    }

    #[test]
    fn a_refused_request_or_an_unusable_answer_is_not_called_unreachable() {
        let mut f = EndFlow::new("D".into());
        f.start();
        let actions = f.handle(Input::Mi(
            Step::End,
            MiResult::BadRequest("bad params".into()),
        ));
        assert_eq!(names(&actions), ["fail INTERNAL_ERROR", "finish"]);
        let mut f = EndFlow::new("D".into());
        f.start();
        let actions = f.handle(Input::Mi(Step::End, MiResult::BadReply("not JSON".into())));
        assert_eq!(names(&actions), ["fail OPENSIPS_ERROR", "finish"]);
    }
}
