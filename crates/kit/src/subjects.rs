//! The NATS subject scheme, broad to narrow: `callapi.v1.<what>.<tenant>.<...>`.
//!
//! | subject | payload | from → to |
//! |---|---|---|
//! | `callapi.v1.cmd.<tenant>.<kind>` | `CommandRequest` → `CommandAck` | gateway → commands (queue `commands`) |
//! | `callapi.v1.notify.<tenant>.<gateway>.<cmd>` | `Notification` | commands → the gateway holding the client (and the stream `CALLAPI_COMMAND_LOG`) |
//! | `callapi.v1.cmdlog.<tenant>.<gateway>.<cmd>` | `CommandStarted` | gateway → the stream `CALLAPI_COMMAND_LOG` (`CommandAttach`) |
//! | `callapi.v1.mi.<node>` | `MiRequest` → `MiReply` | commands, event-ingest → proxy-connector (queue `proxy-connector`) |
//! | `callapi.v1.mi-release.<node>.<instance>.<lease>` | empty | commands → the proxy-connector instance keeping a slot |
//! | `callapi.v1.node.<node>.health` | `NodeHealth` | proxy-connector → gateways (which nodes take new calls) |
//! | `callapi.v1.calls.<tenant>.<kind>` | `CallEvent` | event-ingest → stream `CALLAPI_CALLS_<tenant>` → anyone |
//! | `callapi.v1.event.<tenant>.<node>.<event>.<callid>` | `OpensipsEvent` | event-ingest → anyone |
//!
//! Tenant, gateway and node ids must be subject-safe tokens (see [`is_token`]); a SIP Call-ID is
//! not (it holds `.` and `@`), so it is carried as unpadded URL-safe base64 ([`encode_callid`]).
//!
//! Every token built from input is bounded, so no subject can exceed NATS's control line (4 KiB;
//! the server closes a connection that sends a longer one): a Call-ID longer than
//! [`MAX_CALLID_LEN`] bytes is carried as `~` + hex SHA-256 (`~` is not in the base64
//! alphabet, so the two forms never collide), and an event name must pass [`is_event_name`].

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::validate::MAX_CALLID_LEN;

/// Queue group shared by all commands replicas.
pub const COMMANDS_QUEUE: &str = "commands";
/// Queue group shared by all proxy-connector replicas.
pub const PROXY_CONNECTOR_QUEUE: &str = "proxy-connector";
/// Every command subject, for a commands replica to subscribe to.
pub const ALL_COMMANDS: &str = "callapi.v1.cmd.*.*";
/// Token standing for "no Call-ID" in an event subject.
pub const NO_CALLID: &str = "_";
/// First character of the token of a Call-ID too long to carry whole (then hex SHA-256).
pub const HASHED_CALLID_PREFIX: char = '~';
/// Longest event name accepted as a subject token.
pub const MAX_EVENT_NAME_LEN: usize = 64;

/// Why a subject could not be built or a token not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// A tenant, node or gateway id is not a subject-safe token.
    #[error("{what} is not a subject token (1-64 letters, digits, '-' or '_')")]
    BadId {
        /// Which id.
        what: &'static str,
    },
    /// An event name is not a subject-safe token.
    #[error("event name is not a subject token (1-64 letters, digits, '_', '-' or ':')")]
    BadEventName,
    /// The Call-ID token is the hash of a long Call-ID: the Call-ID cannot be recovered.
    #[error("Call-ID token is the hash of a Call-ID too long to carry whole")]
    HashedCallid,
    /// The Call-ID token is not unpadded URL-safe base64.
    #[error("Call-ID token is not base64")]
    NotBase64,
    /// The Call-ID token decodes to bytes that are not UTF-8.
    #[error("Call-ID token is not UTF-8")]
    NotUtf8,
}

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

    /// Every kind.
    pub const ALL: [CommandKind; 6] = [
        Self::CallStart,
        Self::BlindTransfer,
        Self::AttendedTransfer,
        Self::Hold,
        Self::Unhold,
        Self::End,
    ];

    /// The kind whose subject token is `token`.
    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.token() == token)
    }
}

/// Tenant and kind of a command subject (`callapi.v1.cmd.<tenant>.<kind>`).
pub fn parse_command(subject: &str) -> Option<(&str, CommandKind)> {
    let rest = subject.strip_prefix("callapi.v1.cmd.")?;
    let (tenant, kind) = rest.split_once('.')?;
    is_token(tenant).then_some(())?;
    Some((tenant, CommandKind::from_token(kind)?))
}

/// Tenant and gateway id of a notification subject
/// (`callapi.v1.notify.<tenant>.<gateway>.<cmd token>`, or without the command's token).
pub fn parse_notify(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("callapi.v1.notify.")?;
    let mut tokens = rest.split('.');
    let (tenant, gateway) = (tokens.next()?, tokens.next()?);
    let command_ok = match tokens.next() {
        None => true,
        Some(command) => !command.is_empty() && tokens.next().is_none(),
    };
    (command_ok && is_token(tenant) && is_token(gateway)).then_some((tenant, gateway))
}

/// Whether `s` may be used as one subject token for an id (tenant, node, gateway).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `s` may be used as the event name token: 1 to [`MAX_EVENT_NAME_LEN`] letters, digits,
/// `_`, `-` or `:` (OpenSIPS names such as `E_CALL_TRANSFER`, and namespaced ones).
pub fn is_event_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EVENT_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'))
}

/// Encodes a SIP Call-ID as one subject token: `_` when empty, unpadded URL-safe base64 up to
/// [`MAX_CALLID_LEN`] bytes, `~` + hex SHA-256 beyond (at most 340 characters either way).
pub fn encode_callid(callid: &str) -> String {
    if callid.is_empty() {
        NO_CALLID.to_owned()
    } else if callid.len() > MAX_CALLID_LEN {
        let digest = Sha256::digest(callid.as_bytes());
        let mut token = String::with_capacity(1 + 2 * digest.len());
        token.push(HASHED_CALLID_PREFIX);
        for byte in digest {
            token.push(char::from(HEX[usize::from(byte >> 4)]));
            token.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        token
    } else {
        URL_SAFE_NO_PAD.encode(callid.as_bytes())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether a Call-ID token is the hashed form of a long Call-ID.
pub fn is_hashed_callid(token: &str) -> bool {
    token.starts_with(HASHED_CALLID_PREFIX)
}

/// Decodes a Call-ID token made by [`encode_callid`]; the hashed form of a long Call-ID cannot
/// be decoded and is refused with [`SubjectError::HashedCallid`] (compare tokens instead).
pub fn decode_callid(token: &str) -> Result<String, SubjectError> {
    if token == NO_CALLID {
        return Ok(String::new());
    }
    if is_hashed_callid(token) {
        return Err(SubjectError::HashedCallid);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| SubjectError::NotBase64)?;
    String::from_utf8(bytes).map_err(|_| SubjectError::NotUtf8)
}

/// Subject of a command of `kind` for `tenant`.
pub fn command(tenant: &str, kind: CommandKind) -> String {
    format!("callapi.v1.cmd.{tenant}.{}", kind.token())
}

/// Subject notifications for clients of gateway `gateway_id` are published on.
pub fn notify(tenant: &str, gateway_id: &str, cmd_id: &str) -> String {
    format!(
        "callapi.v1.notify.{tenant}.{gateway_id}.{}",
        encode_callid(cmd_id)
    )
}

/// What a gateway subscribes to: its notifications for every tenant and command.
pub fn notify_for_gateway(gateway_id: &str) -> String {
    format!("callapi.v1.notify.*.{gateway_id}.*")
}

/// Subject of a gateway's record that a command of `tenant` was taken (`CommandStarted`).
pub fn command_started(tenant: &str, gateway_id: &str, cmd_id: &str) -> String {
    format!(
        "callapi.v1.cmdlog.{tenant}.{gateway_id}.{}",
        encode_callid(cmd_id)
    )
}

/// Everything the command log keeps of `tenant`'s command `cmd_id`, whichever gateway ran it.
pub fn command_log_of(tenant: &str, cmd_id: &str) -> [String; 2] {
    let token = encode_callid(cmd_id);
    [
        format!("callapi.v1.cmdlog.{tenant}.*.{token}"),
        format!("callapi.v1.notify.{tenant}.*.{token}"),
    ]
}

/// Subject on which commands replica `replica` answers while it lives (its commands are taken
/// over by another replica once it does not).
pub fn replica_alive(replica: &str) -> String {
    format!("callapi.v1.replica.{replica}.alive")
}

/// The stream that keeps commands' notifications a while (`CommandAttach`).
pub const COMMAND_LOG_STREAM: &str = "CALLAPI_COMMAND_LOG";

/// Its subjects.
pub const COMMAND_LOG_SUBJECTS: [&str; 2] = ["callapi.v1.notify.>", "callapi.v1.cmdlog.>"];

/// Subject of MI requests for OpenSIPS node `node_id`.
pub fn mi(node_id: &str) -> String {
    format!("callapi.v1.mi.{node_id}")
}

/// Subject of a normalised call event of `tenant` (`CallEvent`; stream
/// `CALLAPI_CALLS_<tenant>`); `kind` is a subject token such as `answered`.
pub fn calls(tenant: &str, kind: &str) -> String {
    format!("callapi.v1.calls.{tenant}.{kind}")
}

/// Every call event of `tenant` (the subjects of its stream).
pub fn tenant_calls(tenant: &str) -> String {
    format!("callapi.v1.calls.{tenant}.>")
}

/// Subject on which proxy-connector tells whether it reaches node `node_id` (`NodeHealth`).
pub fn node_health(node_id: &str) -> String {
    format!("callapi.v1.node.{node_id}.health")
}

/// Every node's health reports.
pub const ALL_NODE_HEALTH: &str = "callapi.v1.node.*.health";

/// Subjects on which requesters give back the node slots one proxy-connector instance keeps
/// after a reply (`MiRequest.hold_slot_ms`): `<this>.<lease>` releases one.
pub fn mi_release(node_id: &str, instance: &str) -> String {
    format!("callapi.v1.mi-release.{node_id}.{instance}")
}

/// Subject an OpenSIPS event is published on; refused unless every token is bounded and
/// subject-safe (the event name and Call-ID come from the network).
pub fn event(
    tenant: &str,
    node_id: &str,
    event_name: &str,
    callid: &str,
) -> Result<String, SubjectError> {
    if !is_token(tenant) {
        return Err(SubjectError::BadId { what: "tenant" });
    }
    if !is_token(node_id) {
        return Err(SubjectError::BadId { what: "node id" });
    }
    if !is_event_name(event_name) {
        return Err(SubjectError::BadEventName);
    }
    Ok(format!(
        "callapi.v1.event.{tenant}.{node_id}.{event_name}.{}",
        encode_callid(callid)
    ))
}

/// Every event about one Call-ID of a tenant, from any node.
pub fn events_for_callid(tenant: &str, callid: &str) -> String {
    format!("callapi.v1.event.{tenant}.*.*.{}", encode_callid(callid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_and_notify_subjects_parse_back() {
        for kind in CommandKind::ALL {
            assert_eq!(parse_command(&command("acme", kind)), Some(("acme", kind)));
        }
        assert_eq!(
            parse_notify(&notify("acme", "gw-1", "a cmd/id")),
            Some(("acme", "gw-1"))
        );
        assert_eq!(
            parse_notify("callapi.v1.notify.acme.gw-1"),
            Some(("acme", "gw-1"))
        );
        for bad in [
            "callapi.v1.cmd.acme",
            "callapi.v1.cmd.acme.fly",
            "callapi.v1.cmd..hold",
            "callapi.v1.cmd.acme.hold.extra",
            "callapi.v2.cmd.acme.hold",
        ] {
            assert_eq!(parse_command(bad), None, "{bad}");
        }
        for bad in [
            "callapi.v1.notify.acme",
            "callapi.v1.notify.acme.gw.x.y",
            "callapi.v1.notify.acme.gw.",
            "callapi.v1.notify..gw",
        ] {
            assert_eq!(parse_notify(bad), None, "{bad}");
        }
    }

    /// Longest subject NATS accepts on a connection, with room left for `PUB`, size and CRLF.
    const NATS_CONTROL_LINE: usize = 4096;

    #[test]
    fn callid_tokens_are_subject_safe_and_round_trip() {
        let longest = "x".repeat(MAX_CALLID_LEN);
        for callid in [
            "431fc357.a3e3.49c2@127.0.0.1",
            "4fdbc63612fbb8cc@pyua-alice",
            "a b*c>d",
            "",
            longest.as_str(),
        ] {
            let token = encode_callid(callid);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert!(!is_hashed_callid(&token));
            assert_eq!(decode_callid(&token).as_deref(), Ok(callid));
        }
    }

    #[test]
    fn a_long_callid_is_carried_as_a_bounded_hash_token() {
        let long = "c".repeat(3_100);
        let token = encode_callid(&long);
        assert_eq!(token.len(), 65);
        assert!(token.starts_with('~'));
        assert!(token[1..].bytes().all(|b| b"0123456789abcdef".contains(&b)));
        // SHA-256 of 3,100 'c's, as Python's hashlib computes it.
        assert_eq!(
            token,
            "~1b78736d3d6193790357c6e0269f126c60f975f24fbcf815b85e17b9875918b3"
        );
        assert!(is_hashed_callid(&token));
        assert_eq!(decode_callid(&token), Err(SubjectError::HashedCallid));
        // One byte over the limit is hashed; different long Call-IDs give different tokens.
        let just_over = "x".repeat(MAX_CALLID_LEN + 1);
        assert!(is_hashed_callid(&encode_callid(&just_over)));
        assert_ne!(encode_callid(&just_over), encode_callid(&"y".repeat(256)));
        // A watcher of the long Call-ID matches the subject it is published on.
        let subject = event("acme", "node-1", "E_CALL_TRANSFER", &long).unwrap();
        let watch = events_for_callid("acme", &long);
        assert_eq!(
            subject.rsplit('.').next(),
            watch.rsplit('.').next(),
            "{subject} vs {watch}"
        );
    }

    #[test]
    fn the_hash_form_never_collides_with_base64() {
        // '~' is outside the URL-safe base64 alphabet, so no short Call-ID encodes to it.
        assert!(!URL_SAFE_NO_PAD.encode(b"~").contains('~'));
        for token in ["~", "~abc", "~~"] {
            assert_eq!(decode_callid(token), Err(SubjectError::HashedCallid));
        }
        assert_eq!(decode_callid("!!"), Err(SubjectError::NotBase64));
        assert_eq!(
            decode_callid(&URL_SAFE_NO_PAD.encode([0xff, 0xfe])),
            Err(SubjectError::NotUtf8)
        );
    }

    #[test]
    fn event_subjects_are_bounded_whatever_the_input() {
        let huge_callid = "@.".repeat(100_000);
        let longest_name = "E".repeat(MAX_EVENT_NAME_LEN);
        let long_id = "n".repeat(64);
        let subject = event(&long_id, &long_id, &longest_name, &huge_callid).unwrap();
        assert!(subject.len() < 600, "{}", subject.len());
        let subject = event(&long_id, &long_id, &longest_name, &"z".repeat(255)).unwrap();
        assert!(subject.len() < NATS_CONTROL_LINE / 4, "{}", subject.len());
        assert_eq!(subject.split('.').count(), 7);
    }

    #[test]
    fn event_names_must_be_bounded_tokens() {
        for good in [
            "E_CALL_TRANSFER",
            "E_DLG_STATE_CHANGED",
            "callops:E_X",
            "e-1",
        ] {
            assert!(is_event_name(good), "{good}");
            assert!(event("t", "n", good, "c").is_ok());
        }
        let too_long = "E".repeat(5_000);
        for bad in [
            "",
            "E.X",
            "E_*",
            ">",
            "E X",
            "E\u{0}",
            "é",
            too_long.as_str(),
        ] {
            assert!(!is_event_name(bad), "{bad:?}");
            assert_eq!(event("t", "n", bad, "c"), Err(SubjectError::BadEventName));
        }
        assert_eq!(
            event("a.b", "n", "E", "c"),
            Err(SubjectError::BadId { what: "tenant" })
        );
        assert_eq!(
            event("t", "*", "E", "c"),
            Err(SubjectError::BadId { what: "node id" })
        );
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
        assert_eq!(
            event("acme", "n1", "E_CALL_HOLD", "x@y").unwrap(),
            format!(
                "callapi.v1.event.acme.n1.E_CALL_HOLD.{}",
                encode_callid("x@y")
            )
        );
        assert!(!is_token("a.b"));
        assert!(is_token("node-1"));
    }
}
