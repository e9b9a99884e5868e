//! The NATS subject scheme, broad to narrow: `callapi.v1.<what>.<tenant>.<...>`.
//!
//! | subject | payload | from → to |
//! |---|---|---|
//! | `callapi.v1.cmd.<tenant>.<kind>` | `CommandRequest` → `CommandAck` | gateway → commands (queue `commands`) |
//! | `callapi.v1.notify.<tenant>.<gateway>` | `Notification` | commands → the gateway holding the client |
//! | `callapi.v1.mi.<node>` | `MiRequest` → `MiReply` | commands, event-ingest → proxy-connector (queue `proxy-connector`) |
//! | `callapi.v1.event.<tenant>.<node>.<event>.<callid>` | `OpensipsEvent` | event-ingest → anyone |
//!
//! Tenant, gateway and node ids must be subject-safe tokens (see [`is_token`]); a SIP Call-ID is
//! not (it holds `.` and `@`), so it is carried as unpadded URL-safe base64 ([`encode_callid`]).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Queue group shared by all commands replicas.
pub const COMMANDS_QUEUE: &str = "commands";
/// Queue group shared by all proxy-connector replicas.
pub const PROXY_CONNECTOR_QUEUE: &str = "proxy-connector";
/// Every command subject, for a commands replica to subscribe to.
pub const ALL_COMMANDS: &str = "callapi.v1.cmd.*.*";
/// Token standing for "no Call-ID" in an event subject.
pub const NO_CALLID: &str = "_";

/// The kinds of command, as the last token of a command subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// `CallStart`
    CallStart,
    /// `CallBlindTransfer`
    BlindTransfer,
    /// `CallAttendedTransfer`
    AttendedTransfer,
    /// `CallHold`
    Hold,
    /// `CallUnHold`
    Unhold,
    /// `CallEnd`
    End,
}

impl CommandKind {
    /// The subject token of this kind.
    pub fn token(self) -> &'static str {
        match self {
            Self::CallStart => "call_start",
            Self::BlindTransfer => "blind_transfer",
            Self::AttendedTransfer => "attended_transfer",
            Self::Hold => "hold",
            Self::Unhold => "unhold",
            Self::End => "end",
        }
    }
}

/// Whether `s` may be used as one subject token for an id (tenant, node, gateway).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Encodes a SIP Call-ID as one subject token.
pub fn encode_callid(callid: &str) -> String {
    if callid.is_empty() {
        NO_CALLID.to_owned()
    } else {
        URL_SAFE_NO_PAD.encode(callid.as_bytes())
    }
}

/// Decodes a Call-ID token made by [`encode_callid`].
pub fn decode_callid(token: &str) -> Option<String> {
    if token == NO_CALLID {
        return Some(String::new());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

/// Subject of a command of `kind` for `tenant`.
pub fn command(tenant: &str, kind: CommandKind) -> String {
    format!("callapi.v1.cmd.{tenant}.{}", kind.token())
}

/// Subject notifications for clients of gateway `gateway_id` are published on.
pub fn notify(tenant: &str, gateway_id: &str) -> String {
    format!("callapi.v1.notify.{tenant}.{gateway_id}")
}

/// What a gateway subscribes to: its notifications for every tenant.
pub fn notify_for_gateway(gateway_id: &str) -> String {
    format!("callapi.v1.notify.*.{gateway_id}")
}

/// Subject of MI requests for OpenSIPS node `node_id`.
pub fn mi(node_id: &str) -> String {
    format!("callapi.v1.mi.{node_id}")
}

/// Subject an OpenSIPS event is published on.
pub fn event(tenant: &str, node_id: &str, event_name: &str, callid: &str) -> String {
    format!(
        "callapi.v1.event.{tenant}.{node_id}.{event_name}.{}",
        encode_callid(callid)
    )
}

/// Every event about one Call-ID of a tenant, from any node.
pub fn events_for_callid(tenant: &str, callid: &str) -> String {
    format!("callapi.v1.event.{tenant}.*.*.{}", encode_callid(callid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callid_tokens_are_subject_safe_and_round_trip() {
        for callid in [
            "431fc357.a3e3.49c2@127.0.0.1",
            "4fdbc63612fbb8cc@pyua-alice",
            "a b*c>d",
            "",
        ] {
            let token = encode_callid(callid);
            assert!(token == NO_CALLID || is_token(&token) || token.len() > 64);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(decode_callid(&token).as_deref(), Some(callid));
        }
    }

    #[test]
    fn subjects_put_the_tenant_early() {
        assert_eq!(
            command("acme", CommandKind::Hold),
            "callapi.v1.cmd.acme.hold"
        );
        assert_eq!(
            events_for_callid("acme", "x@y"),
            format!("callapi.v1.event.acme.*.*.{}", encode_callid("x@y"))
        );
        assert!(!is_token("a.b"));
        assert!(is_token("node-1"));
    }
}
