//! Call flows as pure state machines: no sockets, no clocks, no randomness.
//!
//! A flow is created from a command, asked for its first [`Action`]s with `start`, then fed
//! [`Input`]s (MI replies, OpenSIPS events about the Call-IDs it watches, its deadline) and
//! answers each with more actions, until it emits [`Action::Finish`]. The driver
//! (`crate::driver`) performs the actions over NATS; tests feed inputs by hand.

mod end;
mod hold;
pub mod shape;
mod start;
mod transfer;

pub use end::EndFlow;
pub use hold::{HoldAction, HoldFlow};
pub use start::StartFlow;
pub use transfer::{AttendedTransferFlow, BlindTransferFlow};

use std::time::Duration;

use callapi_proto::v1 as pb;
use serde_json::Value;

/// Which party of a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Leg {
    /// The party that sent the initial INVITE.
    Caller,
    /// The party that received it.
    Callee,
}

impl Leg {
    /// The name OpenSIPS uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Callee => "callee",
        }
    }

    /// The leg on the wire.
    pub fn to_proto(self) -> pb::Leg {
        match self {
            Self::Caller => pb::Leg::Caller,
            Self::Callee => pb::Leg::Callee,
        }
    }
}

/// Which MI request an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Step {
    /// `t_uac_dlg` INVITE of CallStart.
    Invite,
    /// `dlg_push_var` of CallStart: how OpenSIPS's script shapes the callee's INVITE.
    Prepare,
    /// `call_transfer`.
    Transfer,
    /// `call_hold` / `call_unhold`.
    Hold,
    /// `dlg_end_dlg` of CallEnd.
    End,
    /// `dlg_list {callid}`: what became of a dialog whose MI request was lost.
    Probe,
}

/// Timers a flow may ask for; the driver feeds `Input::Timer` when one fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Timer {
    /// The transfer was accepted but has not started (no `start` event) yet.
    TransferStart,
    /// Time to ask OpenSIPS again what became of a dialog.
    Reprobe,
}

/// Times a flow waits for OpenSIPS, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// After `call_transfer` was accepted, how long to wait for the transfer's `start` event
    /// before calling it failed (OpenSIPS raises no event for an unknown target).
    pub transfer_start: Duration,
    /// Between two `dlg_list` probes of a dialog whose MI request was lost.
    pub reprobe: Duration,
    /// How many probes before giving up on learning the dialog's state.
    pub probes: u32,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            transfer_start: Duration::from_secs(5),
            reprobe: Duration::from_secs(1),
            probes: 30,
        }
    }
}

/// How an MI request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum MiResult {
    /// OpenSIPS answered a `result`.
    Ok(Value),
    /// OpenSIPS answered an `error`.
    Err {
        /// Error code (JSON-RPC or SIP-like).
        code: i64,
        /// Error message.
        message: String,
        /// Error data, if any, as text.
        data: String,
    },
    /// No answer: node down, timeout, no connector.
    Unreachable(String),
    /// The node is overloaded (OpenSIPS out of shared memory, or too many requests waiting):
    /// the request was not carried out.
    Overloaded(String),
    /// The request was sent but contact was lost before its answer (connector gone, NATS
    /// restarted): OpenSIPS may or may not have acted on it.
    Lost(String),
    /// proxy-connector refused the request as malformed: callapi's own mistake. Not sent.
    BadRequest(String),
    /// OpenSIPS answered something that is not a JSON-RPC reply: it may have acted.
    BadReply(String),
}

/// An OpenSIPS event about a watched Call-ID.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// E_CALL_TRANSFER.
    Transfer {
        /// Dialog the transfer runs on.
        callid: String,
        /// Call-ID of the new call.
        transfer_callid: String,
        /// Transfer target (without callops' `;osid=`), may be empty.
        destination: String,
        /// Where the transfer is.
        state: pb::TransferState,
        /// SIP status line, may be empty.
        status: String,
    },
    /// E_CALL_HOLD.
    Hold {
        /// Dialog.
        callid: String,
        /// The leg.
        leg: pb::Leg,
        /// Hold or unhold.
        action: pb::HoldAction,
        /// Where the leg's hold or unhold is.
        state: pb::HoldState,
    },
    /// E_DLG_STATE_CHANGED.
    DialogState {
        /// Dialog.
        callid: String,
        /// Previous state.
        old_state: pb::DialogState,
        /// New state.
        new_state: pb::DialogState,
    },
}

/// What a flow is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The answer to an MI request the flow asked for.
    Mi(Step, MiResult),
    /// An event about a watched Call-ID.
    Event(CallEvent),
    /// A timer the flow asked for fired.
    Timer(Timer),
    /// The connection to NATS was lost for a while: events published meanwhile may be gone.
    ContactLost,
    /// The command's deadline passed.
    Deadline,
}

/// A step reported to the client (`Event` notification).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepNote {
    /// The step (CALL_ANSWER, TRANSFER_ACCEPT, ...).
    pub step: pb::CommandStep,
    /// Call-ID the step is about.
    pub callid: String,
    /// Leg, if the step is about one.
    pub leg: pb::Leg,
    /// SIP status line, or empty.
    pub sip_status: String,
    /// Destination, or empty.
    pub destination: String,
}

/// Stable error codes sent to clients (defined in `commands.proto`).
pub use callapi_proto::v1::ErrorCode;

/// A failure reported to the client (`Error` notification).
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorNote {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// SIP or MI status behind it, 0 if none.
    pub sip_code: i32,
}

impl ErrorNote {
    /// A new error note.
    pub fn new(code: ErrorCode, message: impl Into<String>, sip_code: i32) -> Self {
        Self {
            code,
            message: message.into(),
            sip_code,
        }
    }
}

/// What a flow asks the driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Subscribe to events about this Call-ID (before any MI request that follows).
    Watch(String),
    /// Send an MI request and feed its answer back as `Input::Mi(step, ..)`.
    Mi {
        /// Which request this is.
        step: Step,
        /// MI command.
        method: &'static str,
        /// Named params.
        params: Value,
    },
    /// Send an MI request whose answer does not matter (clean-up).
    MiDetached {
        /// MI command.
        method: &'static str,
        /// Named params.
        params: Value,
    },
    /// Feed `Input::Timer(timer)` after `after` (a timer asked for again is moved).
    StartTimer {
        /// Which timer.
        timer: Timer,
        /// When it fires, from now.
        after: Duration,
    },
    /// Tell the client about a step.
    Notify(StepNote),
    /// Tell the client the command failed.
    Fail(ErrorNote),
    /// The command is over (the driver sends `Ended`).
    Finish,
}

/// Any flow, as the driver holds it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Flow {
    /// CallStart.
    Start(StartFlow),
    /// CallBlindTransfer.
    Blind(BlindTransferFlow),
    /// CallAttendedTransfer.
    Attended(AttendedTransferFlow),
    /// CallHold / CallUnHold.
    Hold(HoldFlow),
    /// CallEnd.
    End(EndFlow),
}

impl Flow {
    /// The first actions.
    pub fn start(&mut self) -> Vec<Action> {
        match self {
            Self::Start(f) => f.start(),
            Self::Blind(f) => f.start(),
            Self::Attended(f) => f.start(),
            Self::Hold(f) => f.start(),
            Self::End(f) => f.start(),
        }
    }

    /// The actions that follow an input.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match self {
            Self::Start(f) => f.handle(input),
            Self::Blind(f) => f.handle(input),
            Self::Attended(f) => f.handle(input),
            Self::Hold(f) => f.handle(input),
            Self::End(f) => f.handle(input),
        }
    }
}

/// The numeric code of a SIP status line ("486 Busy Here" → 486), 0 if none.
pub fn status_code(status: &str) -> i32 {
    status
        .split_whitespace()
        .next()
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Maps an MI error or failure that no flow handles specially.
pub fn generic_mi_error(result: &MiResult, what: &str) -> ErrorNote {
    match result {
        MiResult::Err {
            code: 404, message, ..
        } => ErrorNote::new(
            ErrorCode::DialogNotFound,
            format!("{what}: dialog not found (OpenSIPS: 404 {message})"),
            404,
        ),
        MiResult::Err {
            code: 410, message, ..
        } => ErrorNote::new(
            ErrorCode::DialogNotReady,
            format!("{what}: the dialog is not answered yet (OpenSIPS: 410 {message})"),
            410,
        ),
        MiResult::Err {
            code,
            message,
            data,
        } => {
            let detail = if data.is_empty() {
                String::new()
            } else {
                format!(": {data}")
            };
            ErrorNote::new(
                ErrorCode::OpensipsError,
                format!("{what}: OpenSIPS answered {code} {message}{detail}"),
                i32::try_from(*code).unwrap_or(0),
            )
        }
        MiResult::Unreachable(reason) => ErrorNote::new(
            ErrorCode::NodeUnreachable,
            format!("{what}: could not reach OpenSIPS: {reason}"),
            0,
        ),
        MiResult::Overloaded(reason) => ErrorNote::new(
            ErrorCode::NodeOverloaded,
            format!(
                "{what}: not done, the OpenSIPS node is overloaded ({reason}); try again later"
            ),
            0,
        ),
        MiResult::Lost(reason) => ErrorNote::new(
            ErrorCode::NodeUnreachable,
            format!("{what}: lost contact with OpenSIPS before it answered: {reason}"),
            0,
        ),
        MiResult::BadRequest(reason) => ErrorNote::new(
            ErrorCode::InternalError,
            format!(
                "{what}: not sent, proxy-connector refused the request callapi made ({reason}); please report it"
            ),
            0,
        ),
        MiResult::BadReply(reason) => ErrorNote::new(
            ErrorCode::OpensipsError,
            format!("{what}: OpenSIPS gave an unusable answer: {reason}"),
            0,
        ),
        MiResult::Ok(_) => ErrorNote::new(
            ErrorCode::OpensipsError,
            format!("{what}: unexpected answer"),
            0,
        ),
    }
}

/// The outcome of an E_CALL_TRANSFER event for a transfer we are waiting on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TransferStage {
    /// `start`: REFER sent; the new call has this Call-ID.
    Started {
        transfer_callid: String,
        destination: String,
    },
    /// `ok`: the target answered.
    Answered {
        transfer_callid: String,
        status: String,
    },
    /// `fail`: the target did not answer (status may be empty).
    Failed { status: String },
    /// `notify` and anything else: informative only.
    Other,
}

pub(crate) fn transfer_stage(
    state: pb::TransferState,
    transfer_callid: &str,
    destination: &str,
    status: &str,
) -> TransferStage {
    match state {
        pb::TransferState::Start => TransferStage::Started {
            transfer_callid: transfer_callid.to_owned(),
            destination: destination.to_owned(),
        },
        pb::TransferState::Ok => TransferStage::Answered {
            transfer_callid: transfer_callid.to_owned(),
            status: status.to_owned(),
        },
        pb::TransferState::Fail => TransferStage::Failed {
            status: status.to_owned(),
        },
        pb::TransferState::Notify | pb::TransferState::Unspecified => TransferStage::Other,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// An E_CALL_TRANSFER as event-ingest publishes it, in OpenSIPS's words (`leg` is not
    /// kept: OpenSIPS puts the new Call-ID there).
    pub fn transfer(callid: &str, _leg: &str, tcid: &str, state: &str, status: &str) -> Input {
        Input::Event(CallEvent::Transfer {
            callid: callid.into(),
            transfer_callid: tcid.into(),
            destination: "sip:bob@127.0.0.1:5072".into(),
            state: match state {
                "start" => pb::TransferState::Start,
                "notify" => pb::TransferState::Notify,
                "ok" => pb::TransferState::Ok,
                "fail" => pb::TransferState::Fail,
                _ => pb::TransferState::Unspecified,
            },
            status: status.into(),
        })
    }

    /// An E_CALL_HOLD as event-ingest publishes it, in OpenSIPS's words.
    pub fn hold(callid: &str, leg: &str, action: &str, state: &str) -> Input {
        Input::Event(CallEvent::Hold {
            callid: callid.into(),
            leg: match leg {
                "caller" => pb::Leg::Caller,
                "callee" => pb::Leg::Callee,
                _ => pb::Leg::Unspecified,
            },
            action: match action {
                "hold" => pb::HoldAction::Hold,
                "unhold" => pb::HoldAction::Unhold,
                _ => pb::HoldAction::Unspecified,
            },
            state: match state {
                "start" => pb::HoldState::Start,
                "ok" => pb::HoldState::Ok,
                "fail" => pb::HoldState::Fail,
                _ => pb::HoldState::Unspecified,
            },
        })
    }

    pub fn mi_ok(step: Step, value: Value) -> Input {
        Input::Mi(step, MiResult::Ok(value))
    }

    pub fn mi_err(step: Step, code: i64, message: &str) -> Input {
        Input::Mi(
            step,
            MiResult::Err {
                code,
                message: message.into(),
                data: String::new(),
            },
        )
    }

    pub fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Watch(c) => format!("watch {c}"),
                Action::Mi { method, .. } => format!("mi {method}"),
                Action::StartTimer { timer, .. } => format!("timer {timer:?}"),
                Action::MiDetached { method, .. } => format!("detached {method}"),
                Action::Notify(n) => format!("notify {}", n.step.protocol_name()),
                Action::Fail(e) => format!("fail {}", e.code.protocol_name()),
                Action::Finish => "finish".into(),
            })
            .collect()
    }
}
