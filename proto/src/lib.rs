//! Protobuf messages exchanged by callapi services over NATS, generated from `proto/callapi/v1`.
#![allow(missing_docs)]

/// Version 1 of the callapi wire messages.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/callapi.v1.rs"));
}

impl v1::CommandStep {
    /// The step's name in the client protocol (`CALL_START`, …; "" when unspecified).
    pub fn protocol_name(self) -> &'static str {
        self.as_str_name()
            .strip_prefix("COMMAND_STEP_")
            .filter(|_| self != Self::Unspecified)
            .unwrap_or("")
    }
}

impl v1::ErrorCode {
    /// The code's name in the client protocol (`CALL_FAILED`, …; "" when unspecified).
    pub fn protocol_name(self) -> &'static str {
        self.as_str_name()
            .strip_prefix("ERROR_CODE_")
            .filter(|_| self != Self::Unspecified)
            .unwrap_or("")
    }
}

impl v1::Leg {
    /// The leg's name in the client protocol and in OpenSIPS (`caller`, `callee`, `both`; ""
    /// when unspecified).
    pub fn protocol_name(self) -> &'static str {
        match self {
            Self::Unspecified => "",
            Self::Caller => "caller",
            Self::Callee => "callee",
            Self::Both => "both",
        }
    }
}

impl v1::CallEventKind {
    /// The kind's name in subjects (`callapi.v1.calls.<tenant>.<name>`) and in the client
    /// protocol (`answered`, `transfer_started`, …).
    pub fn protocol_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Created => "created",
            Self::Ringing => "ringing",
            Self::Answered => "answered",
            Self::Held => "held",
            Self::Resumed => "resumed",
            Self::TransferStarted => "transfer_started",
            Self::TransferProgress => "transfer_progress",
            Self::TransferCompleted => "transfer_completed",
            Self::TransferFailed => "transfer_failed",
            Self::Ended => "ended",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{CallEventKind, CommandStep, ErrorCode, Leg};

    #[test]
    fn protocol_names_are_the_documents_words() {
        assert_eq!(CommandStep::CallStart.protocol_name(), "CALL_START");
        assert_eq!(
            CommandStep::TransferAccept.protocol_name(),
            "TRANSFER_ACCEPT"
        );
        assert_eq!(CommandStep::Unspecified.protocol_name(), "");
        assert_eq!(
            ErrorCode::DialogNotFound.protocol_name(),
            "DIALOG_NOT_FOUND"
        );
        assert_eq!(ErrorCode::CommandLost.protocol_name(), "COMMAND_LOST");
        assert_eq!(ErrorCode::Unspecified.protocol_name(), "");
        assert_eq!(Leg::Both.protocol_name(), "both");
        assert_eq!(
            CallEventKind::TransferStarted.protocol_name(),
            "transfer_started"
        );
    }
}
