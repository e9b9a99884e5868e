//! Parsing of OpenSIPS event notifications (`{"jsonrpc":"2.0","method":"E_…","params":{…}}`)
//! into `OpensipsEvent`s. Fields OpenSIPS leaves out or sends as `null` become empty.
//!
//! Two inputs reach the NATS subject: the event name (`method`), which must be a bounded
//! subject token ([`callapi_kit::subjects::is_event_name`]) or the event is refused, and the
//! Call-ID, which the subject scheme encodes into a bounded token whatever its length.

use callapi_kit::subjects;
use callapi_proto::v1::{
    CallHoldEvent, CallTransferEvent, DialogState, DialogStateChanged, HoldAction, HoldState, Leg,
    OpensipsEvent, TransferState, opensips_event,
};
use serde_json::{Map, Value};

/// Largest event accepted, in bytes (a UDP datagram's payload at most; OpenSIPS events seen
/// so far are under 300 bytes).
pub const MAX_EVENT_BYTES: usize = 65_535;
/// How much of a refused event name an error quotes.
const QUOTED_NAME_CHARS: usize = 32;

/// Why an event cannot be used. The text never quotes more than a few bytes of the input.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Larger than [`MAX_EVENT_BYTES`].
    #[error("event of {0} bytes is larger than {MAX_EVENT_BYTES}")]
    TooLarge(usize),
    /// Not a JSON value.
    #[error("event is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// No string `method` member.
    #[error("event has no method")]
    NoMethod,
    /// The event name is not a bounded subject token.
    #[error("event name {name:?} ({len} bytes) is not 1-64 letters, digits, '_', '-' or ':'")]
    BadName {
        /// The start of the name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// Parses one event (a datagram, or one JSON value of an event stream).
pub fn event(
    bytes: &[u8],
    tenant: &str,
    node_id: &str,
    received_at_ms: u64,
) -> Result<OpensipsEvent, ParseError> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(ParseError::TooLarge(bytes.len()));
    }
    let value: Value = serde_json::from_slice(bytes)?;
    let name = value
        .get("method")
        .and_then(Value::as_str)
        .ok_or(ParseError::NoMethod)?;
    if !subjects::is_event_name(name) {
        return Err(ParseError::BadName {
            name: name.chars().take(QUOTED_NAME_CHARS).collect(),
            len: name.len(),
        });
    }
    let empty = Map::new();
    let params = value
        .get("params")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let text = |key: &str| -> String {
        match params.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    };
    let number = |key: &str| -> i32 {
        match params.get(key) {
            Some(Value::Number(n)) => n.as_i64().and_then(|n| i32::try_from(n).ok()).unwrap_or(0),
            Some(Value::String(s)) => s.parse().unwrap_or(0),
            _ => 0,
        }
    };
    let callid = text("callid");
    let body = match name {
        "E_DLG_STATE_CHANGED" => opensips_event::Body::DialogStateChanged(DialogStateChanged {
            dialog_id: text("id"),
            db_id: text("db_id"),
            callid: callid.clone(),
            from_tag: text("from_tag"),
            to_tag: text("to_tag"),
            old_state: dialog_state(number("old_state")) as i32,
            new_state: dialog_state(number("new_state")) as i32,
        }),
        "E_CALL_TRANSFER" => opensips_event::Body::CallTransfer(CallTransferEvent {
            callid: callid.clone(),
            leg: leg(&text("leg")) as i32,
            transfer_callid: text("transfer_callid"),
            destination: without_osid(&text("destination")),
            state: transfer_state(&text("state")) as i32,
            status: text("status"),
        }),
        "E_CALL_HOLD" => opensips_event::Body::CallHold(CallHoldEvent {
            callid: callid.clone(),
            leg: leg(&text("leg")) as i32,
            action: match text("action").as_str() {
                "hold" => HoldAction::Hold,
                "unhold" => HoldAction::Unhold,
                _ => HoldAction::Unspecified,
            } as i32,
            state: match text("state").as_str() {
                "start" => HoldState::Start,
                "ok" => HoldState::Ok,
                "fail" => HoldState::Fail,
                _ => HoldState::Unspecified,
            } as i32,
        }),
        _ => opensips_event::Body::OtherParamsJson(Value::Object(params.clone()).to_string()),
    };
    Ok(OpensipsEvent {
        tenant: tenant.to_owned(),
        node_id: node_id.to_owned(),
        received_at_ms,
        name: name.to_owned(),
        callid,
        body: Some(body),
    })
}

/// A leg as OpenSIPS names it; anything else (E_CALL_TRANSFER puts the new Call-ID there in
/// `start`) is no leg.
fn leg(text: &str) -> Leg {
    match text {
        "caller" => Leg::Caller,
        "callee" => Leg::Callee,
        _ => Leg::Unspecified,
    }
}

fn dialog_state(number: i32) -> DialogState {
    DialogState::try_from(number).unwrap_or(DialogState::Unspecified)
}

fn transfer_state(text: &str) -> TransferState {
    match text {
        "start" => TransferState::Start,
        "notify" => TransferState::Notify,
        "ok" => TransferState::Ok,
        // OpenSIPS says "fail"; "failure" is what the Go call-api expected.
        "fail" | "failure" => TransferState::Fail,
        _ => TransferState::Unspecified,
    }
}

/// A URI without the `;osid=...` parameter callops adds (to transfer targets, and so to the
/// To URI of the call a transfer makes).
pub(crate) fn without_osid(destination: &str) -> String {
    destination
        .split(';')
        .filter(|part| !part.starts_with("osid="))
        .collect::<Vec<_>>()
        .join(";")
}

/// JSON values cut from the front of an event_stream buffer.
#[derive(Debug, Default)]
pub struct Framed<'a> {
    /// Each complete JSON value, as bytes.
    pub events: Vec<&'a [u8]>,
    /// Bytes used up (complete values and the whitespace between them).
    pub consumed: usize,
    /// Set when the stream holds something that can never become JSON.
    pub garbage: Option<String>,
}

/// Splits back-to-back JSON notifications (event_stream framing: no delimiter) off `buffer`;
/// an incomplete value at the end is left for the next read.
pub fn split_stream(buffer: &[u8]) -> Framed<'_> {
    let mut framed = Framed::default();
    let mut values =
        serde_json::Deserializer::from_slice(buffer).into_iter::<serde::de::IgnoredAny>();
    loop {
        let start = values.byte_offset();
        match values.next() {
            None => {
                framed.consumed = buffer.len();
                return framed;
            }
            Some(Ok(_)) => {
                let end = values.byte_offset();
                let value = buffer[start..end].trim_ascii_start();
                framed.events.push(value);
                framed.consumed = end;
            }
            Some(Err(err)) if err.is_eof() => return framed,
            Some(Err(err)) => {
                framed.garbage = Some(err.to_string());
                return framed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn transcript_events_parse() {
        let e = event(br#"{"jsonrpc": "2.0", "method": "E_CALL_TRANSFER", "params": {"callid": "e98214db-e770-4682-b03f-b39e0132a91b", "leg": "82874d5bc6400262", "transfer_callid": "82874d5bc6400262", "destination": "sip:bob@127.0.0.1:5072;osid=fed.b360b044", "state": "start", "status": ""}}"#, "t", "n", 1).unwrap();
        assert_eq!(e.callid, "e98214db-e770-4682-b03f-b39e0132a91b");
        let Some(opensips_event::Body::CallTransfer(t)) = e.body else {
            panic!()
        };
        assert_eq!(
            (t.state(), t.transfer_callid.as_str(), t.leg()),
            (TransferState::Start, "82874d5bc6400262", Leg::Unspecified)
        );
        // OpenSIPS's vocabulary stays here: the target comes without callops' osid.
        assert_eq!(t.destination, "sip:bob@127.0.0.1:5072");

        let e = event(br#"{"jsonrpc": "2.0", "method": "E_DLG_STATE_CHANGED", "params": {"id": "185.f5453241", "db_id": "6051946779743", "callid": "ac6a8eb7310d488e", "from_tag": "c80007b51531c07b", "to_tag": null, "old_state": 1, "new_state": 5}}"#, "t", "n", 1).unwrap();
        let Some(opensips_event::Body::DialogStateChanged(d)) = e.body else {
            panic!()
        };
        assert_eq!(
            (d.old_state(), d.new_state(), d.to_tag.as_str()),
            (DialogState::Unconfirmed, DialogState::Deleted, "")
        );

        let e = event(br#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"b9","leg":"caller","action":"hold","state":"ok"}}"#, "t", "n", 1).unwrap();
        let Some(opensips_event::Body::CallHold(h)) = e.body else {
            panic!()
        };
        assert_eq!(
            (h.leg(), h.action(), h.state()),
            (Leg::Caller, HoldAction::Hold, HoldState::Ok)
        );
        let e = event(br#"{"jsonrpc":"2.0","method":"E_CALL_TRANSFER","params":{"callid":"c","leg":"","state":"fail","status":"486 Busy Here"}}"#, "t", "n", 1).unwrap();
        let Some(opensips_event::Body::CallTransfer(t)) = e.body else {
            panic!()
        };
        assert_eq!(
            (t.state(), t.status.as_str()),
            (TransferState::Fail, "486 Busy Here")
        );
    }

    #[test]
    fn stream_framing_handles_back_to_back_and_partial_values() {
        let a = br#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"x","leg":"caller","action":"hold","state":"ok"}}"#;
        let b = br#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{"callid":"y","old_state":1,"new_state":2}}"#;
        let mut stream = Vec::new();
        stream.extend_from_slice(a);
        stream.extend_from_slice(b);
        stream.extend_from_slice(&a[..20]);
        let framed = split_stream(&stream);
        assert_eq!(framed.events, vec![&a[..], &b[..]]);
        assert_eq!(framed.consumed, a.len() + b.len());
        assert!(framed.garbage.is_none());
        let rest = &stream[framed.consumed..];
        assert!(split_stream(rest).events.is_empty());
        let framed = split_stream(b"  {\"a\":1}\n");
        assert_eq!(framed.events, vec![&b"{\"a\":1}"[..]]);
        assert!(split_stream(b"400 Parse_error").garbage.is_some());
    }

    #[test]
    fn no_stream_content_makes_it_panic() {
        let events = br#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"x","leg":"caller","action":"hold","state":"ok"}}{"method":"E_X","params":[1]}"#;
        for i in 0..events.len() {
            let _ = split_stream(&events[..i]);
            for replacement in [b'"', b'{', b'}', b'[', 0xff, b'9'] {
                let mut corrupted = events.to_vec();
                corrupted[i] = replacement;
                let framed = split_stream(&corrupted);
                for one in framed.events {
                    let _ = event(one, "t", "n", 0);
                }
                let _ = event(&corrupted, "t", "n", 0);
            }
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for bad in [
            &b"400 Parse_error"[..],
            b"{}",
            b"[1,2]",
            br#"{"method":"a.b"}"#,
            b"\xff\xfe",
        ] {
            assert!(event(bad, "t", "n", 0).is_err());
        }
        let huge = format!(
            r#"{{"method":"E_X","params":{{"callid":"{}"}}}}"#,
            "x".repeat(MAX_EVENT_BYTES)
        );
        assert!(matches!(
            event(huge.as_bytes(), "t", "n", 0),
            Err(ParseError::TooLarge(_))
        ));
        let e = event(
            br#"{"method":"E_CORE_THRESHOLD","params":null}"#,
            "t",
            "n",
            0,
        )
        .unwrap();
        assert_eq!(e.callid, "");
    }

    #[test]
    fn event_names_that_are_not_bounded_tokens_are_refused() {
        let long = "E".repeat(5_000);
        for name in ["E_X.evil", "E_*", ">", "E X", "", long.as_str()] {
            let datagram = json!({"method": name, "params": {"callid": "c1"}}).to_string();
            let err = event(datagram.as_bytes(), "t", "n", 0).unwrap_err();
            assert!(matches!(err, ParseError::BadName { .. }), "{name:?}");
            assert!(
                err.to_string().len() < 200,
                "the error quotes all of {name:?}"
            );
        }
        let namespaced = br#"{"method":"callops:E_CALL_X","params":{"callid":"c1"}}"#;
        assert_eq!(
            event(namespaced, "t", "n", 0).unwrap().name,
            "callops:E_CALL_X"
        );
    }

    #[test]
    fn a_long_callid_is_kept_whole_in_the_event() {
        let callid = "c".repeat(3_100);
        let datagram =
            json!({"method": "E_CALL_TRANSFER", "params": {"callid": callid, "state": "ok"}});
        let e = event(datagram.to_string().as_bytes(), "t", "n", 0).unwrap();
        assert_eq!(e.callid, callid);
    }
}
