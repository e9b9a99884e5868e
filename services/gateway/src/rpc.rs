//! The client protocol: JSON-RPC 2.0 requests of the OpenSIPS call-api, checked field by field
//! and turned into `CommandRequest`s; and the JSON of replies and notifications. No I/O here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use callapi_kit::subjects::CommandKind;
use callapi_proto::v1::{self as pb, command_request::Command};
use serde_json::value::RawValue;

use crate::params;
use serde_json::{Map, Value, json};

/// JSON-RPC error codes sent to clients.
pub mod code {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a valid JSON-RPC request (or too large, or binary).
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad params; `data.field` names the culprit.
    pub const INVALID_PARAMS: i64 = -32602;
    /// No commands service answered, or NATS is unreachable: try again later.
    pub const UNAVAILABLE: i64 = -32000;
    /// The commands service refused the command.
    pub const REFUSED: i64 = -32001;
    /// The `cmd_id` is already used by a running command of this connection.
    pub const DUPLICATE_CMD_ID: i64 = -32002;
    /// The connection already has as many commands in flight as it may.
    pub const TOO_MANY_COMMANDS: i64 = -32003;
    /// No such session (`CallGet`).
    pub const NOT_FOUND: i64 = -32004;
    /// The client's access token lacks the scope the method needs.
    pub const FORBIDDEN: i64 = -32005;
    /// The tenant's commands per second are used up; `data.retry_after_ms` says when to retry.
    pub const RATE_LIMITED: i64 = -32006;
    /// The tenant has as many active calls as it may: a CallStart is refused.
    pub const CALL_LIMIT: i64 = -32007;
}

/// Longest piece of client text (method name, member or param name) quoted in an error.
pub const MAX_QUOTED: usize = 64;

/// `text` as quoted in an error message: at most [`MAX_QUOTED`] bytes (cut on a character
/// boundary), with a note of the full length when cut, so no reply echoes unbounded input.
pub fn clip(text: &str) -> Cow<'_, str> {
    clip_to(text, MAX_QUOTED)
}

/// `text` cut to at most `max` bytes (on a character boundary), with a note of the full length
/// when cut.
pub fn clip_to(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// A request id exactly as the client wrote it (a string, a number or null), echoed verbatim:
/// `18446744073709551616` stays `18446744073709551616`, never a float.
#[derive(Debug, Clone)]
pub struct RpcId(Box<RawValue>);

impl RpcId {
    /// The `null` id (of replies to requests whose id is unknown).
    pub fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// The id's JSON text as sent.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// Accepts a raw `id` member if it is a string, a number or null.
    fn from_raw(raw: &RawValue) -> Option<Self> {
        let text = raw.get();
        let ok = match text.as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => true,
            Some(b'n') => text == "null",
            _ => false,
        };
        ok.then(|| Self(raw.to_owned()))
    }
}

impl PartialEq for RpcId {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

/// A JSON-RPC error to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Request id (null when unknown).
    pub id: RpcId,
    /// Error code (see [`code`]).
    pub code: i64,
    /// Message.
    pub message: String,
    /// Extra data.
    pub data: Option<Value>,
    /// Whether the request was a well-formed notification (no id): then nothing is answered.
    pub silent: bool,
}

impl RpcError {
    fn new(id: &RpcId, code: i64, message: impl Into<String>) -> Self {
        Self {
            id: id.clone(),
            code,
            message: message.into(),
            data: None,
            silent: false,
        }
    }

    fn field(id: &RpcId, field: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        let field = clip(field);
        Self {
            id: id.clone(),
            code: code::INVALID_PARAMS,
            message: format!("Invalid params: {field} {reason}"),
            data: Some(json!({"field": field, "reason": reason})),
            silent: false,
        }
    }

    /// The JSON text of this error response.
    pub fn to_json(&self) -> String {
        let mut error = json!({"code": self.code, "message": self.message});
        if let (Some(data), Some(map)) = (&self.data, error.as_object_mut()) {
            map.insert("data".into(), data.clone());
        }
        response(&self.id, "error", &error)
    }
}

/// A checked command request.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandCall {
    /// Request id (`None` for a notification: run it, answer nothing).
    pub id: Option<RpcId>,
    /// Command id the client gave, if any.
    pub cmd_id: Option<String>,
    /// Which command.
    pub kind: CommandKind,
    /// The command itself.
    pub command: Command,
}

/// A question about calls, answered at once (no `Started`, no notifications).
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// `CallList`: the tenant's sessions a selection picks.
    List(params::ListSelection),
    /// `CallGet`: one session.
    Get(params::SessionKey),
    /// `Subscribe`: the tenant's call events.
    Subscribe(params::EventFilter),
    /// `Unsubscribe`: no more call events.
    Unsubscribe,
    /// `CommandAttach`: a running (or recent) command's notifications, by its `cmd_id`.
    Attach(String),
}

/// A checked query request.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryCall {
    /// Request id (`None` for a notification: nothing is answered).
    pub id: Option<RpcId>,
    /// What is asked.
    pub query: Query,
}

/// A checked request: a command or a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A command (`CallStart`, ...).
    Command(CommandCall),
    /// A query (`CallList`, `CallGet`).
    Query(QueryCall),
}

/// A `result` reply.
pub fn result(id: &RpcId, body: &Value) -> String {
    response(id, "result", body)
}

/// A response object with the id as sent; `member` is `result` or `error`.
fn response(id: &RpcId, member: &str, body: &Value) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{},"{member}":{body}}}"#,
        id.as_json()
    )
}

/// The `result` reply to a started command.
pub fn started(id: &RpcId, cmd_id: &str) -> String {
    response(
        id,
        "result",
        &json!({"cmd_id": cmd_id, "status": "Started"}),
    )
}

/// The -32602 answer naming the field at fault.
pub fn params_error(id: &RpcId, error: &crate::params::ParamsError) -> String {
    RpcError::field(id, &error.field, error.reason.clone()).to_json()
}

/// An error reply.
pub fn error(id: &RpcId, code: i64, message: &str) -> String {
    RpcError::new(id, code, message).to_json()
}

/// An error reply with `data`.
pub fn error_with_data(id: &RpcId, code: i64, message: &str, data: Value) -> String {
    let mut error = RpcError::new(id, code, message);
    error.data = Some(data);
    error.to_json()
}

/// A notification (`Event`, `Error`, `Ended`) for a command, as JSON text.
pub fn notification(cmd_id: &str, kind: &pb::notification::Kind) -> String {
    let mut params = Map::new();
    params.insert("cmd_id".into(), cmd_id.into());
    let method = match kind {
        pb::notification::Kind::Event(event) => {
            params.insert("data".into(), event.step().protocol_name().into());
            for (key, value) in [
                ("callid", event.callid.as_str()),
                ("leg", event.leg().protocol_name()),
                ("sip_status", event.sip_status.as_str()),
                ("destination", event.destination.as_str()),
            ] {
                if !value.is_empty() {
                    params.insert(key.into(), value.into());
                }
            }
            "Event"
        }
        pb::notification::Kind::Error(error) => {
            params.insert("code".into(), error.code().protocol_name().into());
            params.insert("message".into(), error.message.clone().into());
            if error.sip_code != 0 {
                params.insert("sip_code".into(), error.sip_code.into());
            }
            "Error"
        }
        pb::notification::Kind::Ended(_) => "Ended",
    };
    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

/// Why a text is not a JSON object: not JSON at all, a batch, or another JSON value.
fn not_an_object(text: &str) -> RpcError {
    let null = RpcId::null();
    match serde_json::from_str::<Value>(text) {
        Err(e) => RpcError::new(&null, code::PARSE_ERROR, format!("Parse error: {e}")),
        Ok(Value::Array(_)) => RpcError::new(
            &null,
            code::INVALID_REQUEST,
            "Invalid Request: batch requests are not supported",
        ),
        Ok(_) => RpcError::new(
            &null,
            code::INVALID_REQUEST,
            "Invalid Request: a request must be a JSON object",
        ),
    }
}

/// Parses and checks one text message.
///
/// A request that is not a well-formed JSON-RPC 2.0 request object is always answered (with
/// `"id": null` when its id is missing or unusable); only a well-formed notification (no id)
/// stays silent on errors about its method or params.
pub fn parse(text: &str) -> Result<Request, RpcError> {
    let members: BTreeMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|_| not_an_object(text))?;
    let null = RpcId::null();
    let id = match members.get("id") {
        None => None,
        Some(raw) => Some(RpcId::from_raw(raw).ok_or_else(|| {
            RpcError::new(
                &null,
                code::INVALID_REQUEST,
                "Invalid Request: id must be a string, a number or null",
            )
        })?),
    };
    let reply_id = id.clone().unwrap_or_else(RpcId::null);
    let member = |key: &str| -> Result<Option<Value>, RpcError> {
        members
            .get(key)
            .map(|raw| serde_json::from_str::<Value>(raw.get()))
            .transpose()
            .map_err(|e| RpcError::new(&reply_id, code::PARSE_ERROR, format!("Parse error: {e}")))
    };
    if member("jsonrpc")?.as_ref().and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            "Invalid Request: jsonrpc must be \"2.0\"",
        ));
    }
    let Some(Value::String(method)) = member("method")? else {
        return Err(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            "Invalid Request: method must be a string",
        ));
    };
    if let Some(key) = members
        .keys()
        .find(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return Err(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            format!("Invalid Request: unknown member {:?}", clip(key)),
        ));
    }
    // From here on the request is well formed: a notification's errors go unanswered.
    let silence = |mut e: RpcError| {
        e.silent = id.is_none();
        e
    };
    if matches!(
        method.as_str(),
        "CallList" | "CallGet" | "Subscribe" | "Unsubscribe" | "CommandAttach"
    ) {
        let params = match member("params").map_err(silence)? {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(params)) => params,
            Some(_) => {
                return Err(silence(RpcError::field(
                    &reply_id,
                    "params",
                    "must be an object",
                )));
            }
        };
        let checked = match method.as_str() {
            "CallList" => params::list(params).map(Query::List),
            "CallGet" => params::session_key(params).map(Query::Get),
            "Subscribe" => params::subscription(params).map(Query::Subscribe),
            "CommandAttach" => params::attach(params).map(Query::Attach),
            _ if params.is_empty() => Ok(Query::Unsubscribe),
            _ => Err(params::ParamsError {
                field: "params".to_owned(),
                reason: "Unsubscribe takes no params".to_owned(),
            }),
        };
        let query = checked.map_err(|e| silence(RpcError::field(&reply_id, &e.field, e.reason)))?;
        return Ok(Request::Query(QueryCall { id, query }));
    }
    let kind = match method.as_str() {
        "CallStart" => CommandKind::CallStart,
        "CallBlindTransfer" => CommandKind::BlindTransfer,
        "CallAttendedTransfer" => CommandKind::AttendedTransfer,
        "CallHold" => CommandKind::Hold,
        "CallUnHold" | "CallUnhold" => CommandKind::Unhold,
        "CallEnd" => CommandKind::End,
        other => {
            return Err(silence(RpcError::new(
                &reply_id,
                code::METHOD_NOT_FOUND,
                format!("Method not found: {}", clip(other)),
            )));
        }
    };
    let mut params = match member("params").map_err(silence)? {
        Some(Value::Object(params)) => params,
        _ => {
            return Err(silence(RpcError::field(
                &reply_id,
                "params",
                "must be an object",
            )));
        }
    };
    // cmd_id rides in the params of every method; the rest are the command's own.
    let cmd_id = match params.remove("cmd_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(cmd_id)) if params::is_cmd_id(&cmd_id) => Some(cmd_id),
        Some(_) => {
            return Err(silence(RpcError::field(
                &reply_id,
                "cmd_id",
                "must be 1 to 128 printable ASCII characters",
            )));
        }
    };
    let command = params::command(kind, params)
        .map_err(|e| silence(RpcError::field(&reply_id, &e.field, e.reason)))?;
    Ok(Request::Command(CommandCall {
        id,
        cmd_id,
        kind,
        command,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_command(text: &str) -> Result<CommandCall, RpcError> {
        match parse(text)? {
            Request::Command(call) => Ok(call),
            Request::Query(query) => panic!("not a command: {query:?}"),
        }
    }

    #[test]
    fn queries_parse_and_check_their_params() {
        let selection = |text: &str| match parse(text).unwrap() {
            Request::Query(QueryCall {
                query: Query::List(selection),
                ..
            }) => selection,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            selection(r#"{"jsonrpc":"2.0","method":"CallList","id":1}"#),
            params::ListSelection {
                filter: None,
                descending: false,
                skip: 0,
                top: 100
            }
        );
        assert_eq!(
            selection(
                r#"{"jsonrpc":"2.0","method":"CallList","params":{"filter":"1001","orderby":"started_at desc","skip":2,"top":5},"id":1}"#
            ),
            params::ListSelection {
                filter: Some("1001".into()),
                descending: true,
                skip: 2,
                top: 5
            }
        );
        let q = parse(r#"{"jsonrpc":"2.0","method":"CallGet","params":{"session_id":"884757570370146304"},"id":1}"#).unwrap();
        assert!(matches!(
            q,
            Request::Query(QueryCall {
                query: Query::Get(params::SessionKey::Id(884_757_570_370_146_304)),
                ..
            })
        ));
        let q = parse(r#"{"jsonrpc":"2.0","method":"CallGet","params":{"callid":"x@y"},"id":1}"#)
            .unwrap();
        assert!(matches!(
            q,
            Request::Query(QueryCall {
                query: Query::Get(params::SessionKey::Callid(_)),
                ..
            })
        ));
        for (text, field) in [
            (
                r#"{"jsonrpc":"2.0","method":"CallList","params":{"x":1},"id":1}"#,
                "x",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallList","params":{"top":101},"id":1}"#,
                "top",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallList","params":{"skip":-1},"id":1}"#,
                "skip",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallList","params":{"orderby":"callee"},"id":1}"#,
                "orderby",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallGet","params":{},"id":1}"#,
                "session_id",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallGet","params":{"session_id":"-5"},"id":1}"#,
                "session_id",
            ),
            (
                r#"{"jsonrpc":"2.0","method":"CallGet","params":{"session_id":"1","callid":"c"},"id":1}"#,
                "session_id",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.code, e.data.unwrap()["field"].clone()),
                (code::INVALID_PARAMS, json!(field)),
                "{text}"
            );
        }
    }

    fn err(text: &str) -> RpcError {
        parse_command(text).unwrap_err()
    }

    #[test]
    fn the_documents_requests_parse_command() {
        let call = parse_command(r#"{"method":"CallStart","params":{"caller":"sip:alice@10.0.0.10","callee":"sip:bob@10.0.0.11"},"id":"831717ed97e5","jsonrpc":"2.0"}"#).unwrap();
        assert_eq!(call.kind, CommandKind::CallStart);
        assert_eq!(call.id.unwrap().as_json(), r#""831717ed97e5""#);
        let call = parse_command(r#"{"method":"CallAttendedTransfer","params":{"callid_a":"431fc357.a3e3.49c2@127.0.0.1","leg_a":"caller","callid_b":"0ba2cf53","leg_b":"callee","destination":"sip:cindy@10.0.0.11"},"id":1,"jsonrpc":"2.0"}"#).unwrap();
        let Command::AttendedTransfer(a) = call.command else {
            panic!()
        };
        assert_eq!(
            (a.leg_a, a.leg_b),
            (pb::Leg::Caller as i32, pb::Leg::Callee as i32)
        );
        let call = parse_command(r#"{"method":"CallAttendedTransfer","params":{"callidA":"a","legA":"caller","callidB":"b","legB":"callee"},"id":1,"jsonrpc":"2.0"}"#).unwrap();
        assert!(matches!(call.command, Command::AttendedTransfer(_)));
        let call = parse_command(
            r#"{"method":"CallHold","params":{"callid":"x"},"id":2,"jsonrpc":"2.0"}"#,
        )
        .unwrap();
        let Command::Hold(h) = call.command else {
            panic!()
        };
        assert_eq!(h.leg, pb::Leg::Unspecified as i32);
        assert!(parse_command(r#"{"method":"CallUnhold","params":{"callid":"x","cmd_id":"mine"},"id":2,"jsonrpc":"2.0"}"#).is_ok());
    }

    #[test]
    fn each_kind_of_malformed_request() {
        assert_eq!(err("{").code, code::PARSE_ERROR);
        assert_eq!(err("[]").code, code::INVALID_REQUEST);
        assert_eq!(err("42").code, code::INVALID_REQUEST);
        assert_eq!(
            err(r#"{"method":"CallEnd","params":{"callid":"x"},"id":1}"#).code,
            code::INVALID_REQUEST
        );
        assert_eq!(
            err(r#"{"jsonrpc":"2.0","method":7,"id":1}"#).code,
            code::INVALID_REQUEST
        );
        assert_eq!(
            err(r#"{"jsonrpc":"2.0","method":"CallEnd","id":{}}"#).code,
            code::INVALID_REQUEST
        );
        assert_eq!(
            err(r#"{"jsonrpc":"2.0","method":"Nope","id":1}"#).code,
            code::METHOD_NOT_FOUND
        );
        let e = err(r#"{"jsonrpc":"2.0","method":"CallEnd","params":["x"],"id":1}"#);
        assert_eq!(
            (e.code, e.data.unwrap()["field"].clone()),
            (code::INVALID_PARAMS, json!("params"))
        );
    }

    #[test]
    fn params_of_any_json_type_are_checked_and_named() {
        for (params, field) in [
            (r#"{"caller":1,"callee":"sip:b@c"}"#, "caller"),
            (r#"{"caller":"sip:a@b","callee":["sip:b@c"]}"#, "callee"),
            (r#"{"caller":"sip:a@b"}"#, "callee"),
            (r#"{"caller":"sip:a@b","callee":"bob"}"#, "callee"),
            (
                r#"{"caller":"sip:a@b\r\nX: y","callee":"sip:b@c"}"#,
                "caller",
            ),
            (
                r#"{"caller":"sip:a@b","callee":"sip:b@c","extra":true}"#,
                "extra",
            ),
            (
                r#"{"caller":"sip:a@b","callee":"sip:b@c","cmd_id":5}"#,
                "cmd_id",
            ),
            (
                r#"{"caller":"sip:a@b","callee":"sip:b@c","cmd_id":""}"#,
                "cmd_id",
            ),
        ] {
            let e = err(&format!(
                r#"{{"jsonrpc":"2.0","method":"CallStart","params":{params},"id":1}}"#
            ));
            assert_eq!(e.code, code::INVALID_PARAMS, "{params}");
            assert_eq!(e.data.unwrap()["field"], json!(field), "{params}");
        }
        let e = err(
            r#"{"jsonrpc":"2.0","method":"CallBlindTransfer","params":{"callid":"x","leg":"sideways","destination":"sip:c@d"},"id":1}"#,
        );
        assert_eq!(e.data.unwrap()["field"], "leg");
        let e =
            err(r#"{"jsonrpc":"2.0","method":"CallHold","params":{"callid":"x","leg":3},"id":1}"#);
        assert_eq!(e.data.unwrap()["field"], "leg");
        let e = err(
            r#"{"jsonrpc":"2.0","method":"CallAttendedTransfer","params":{"callid_a":"a","callidA":"a","leg_a":"caller","callid_b":"b","leg_b":"callee"},"id":1}"#,
        );
        assert_eq!(e.data.unwrap()["field"], "callid_a");
        let e = err(r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":""},"id":1}"#);
        assert_eq!(e.data.unwrap()["field"], "callid");
    }

    #[test]
    fn no_input_makes_it_panic() {
        // Every prefix and every one-byte corruption of valid requests, plus odd JSON.
        let valid = [
            r#"{"jsonrpc":"2.0","method":"CallStart","params":{"caller":"sip:a@b","callee":"sip:c@d","cmd_id":"x"},"id":1}"#,
            r#"{"jsonrpc":"2.0","method":"CallAttendedTransfer","params":{"callidA":"a","legA":"caller","callid_b":"b","leg_b":"callee","destination":"sip:é@b"},"id":"z"}"#,
            r#"{"jsonrpc":"2.0","method":"CallHold","params":{"callid":"x","leg":null},"id":null}"#,
        ];
        for text in valid {
            for end in 0..=text.len() {
                if text.is_char_boundary(end) {
                    let _ = parse(&text[..end]);
                }
            }
            let bytes = text.as_bytes();
            for i in 0..bytes.len() {
                for replacement in [b'"', b'{', b'}', b'\\', b'0', b' ', 0xff] {
                    let mut corrupted = bytes.to_vec();
                    corrupted[i] = replacement;
                    let _ = parse(&String::from_utf8_lossy(&corrupted));
                }
            }
        }
        for odd in [
            "null",
            "{}",
            r#"{"id":[]}"#,
            r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":{"a":[1e999]}},"id":1e400}"#,
            "\u{0}",
        ] {
            let _ = parse(odd);
        }
    }

    #[test]
    fn well_formed_notifications_without_id_are_silent_on_error() {
        assert!(err(r#"{"jsonrpc":"2.0","method":"Nope"}"#).silent);
        assert!(err(r#"{"jsonrpc":"2.0","method":"CallEnd","params":{}}"#).silent);
        assert!(err(r#"{"jsonrpc":"2.0","method":"CallEnd","params":"x"}"#).silent);
        assert!(!err(r#"{"jsonrpc":"2.0","method":"Nope","id":null}"#).silent);
    }

    #[test]
    fn invalid_requests_without_id_are_answered_with_a_null_id() {
        for text in [
            "{}",
            r#"{"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"1.0","method":"CallEnd","params":{"callid":"x"}}"#,
            r#"{"jsonrpc":2.0,"method":"CallEnd","params":{"callid":"x"}}"#,
            r#"{"jsonrpc":"2.0","method":7}"#,
            r#"{"jsonrpc":"2.0","params":{"callid":"x"}}"#,
            r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"x"},"extra":1}"#,
            r#"{"jsonrpc":"2.0","method":"CallEnd","id":true}"#,
        ] {
            let e = err(text);
            assert_eq!(e.code, code::INVALID_REQUEST, "{text}");
            assert!(!e.silent, "{text}");
            let reply: Value = serde_json::from_str(&e.to_json()).unwrap();
            assert_eq!(reply["id"], Value::Null, "{text}");
            assert!(reply.as_object().unwrap().contains_key("id"), "{text}");
        }
    }

    #[test]
    fn ids_are_echoed_exactly_as_sent() {
        for id in [
            "18446744073709551616",
            "-99999999999999999999999",
            "1.50",
            "1e400",
            "0",
            r#""\u00e9t\u00e9""#,
            r#""été""#,
            "null",
        ] {
            let text = format!(r#"{{"jsonrpc":"2.0","method":"Nope","id":{}}}"#, id);
            let e = err(&text);
            let expected = format!(r#""id":{}"#, id);
            assert!(
                e.to_json().contains(&expected),
                "{} in {}",
                expected,
                e.to_json()
            );
            let call = parse_command(&format!(
                r#"{{"jsonrpc":"2.0","method":"CallEnd","params":{{"callid":"x"}},"id":{}}}"#,
                id
            ))
            .unwrap();
            let reply = started(&call.id.unwrap(), "c");
            assert!(reply.contains(&expected), "{reply}");
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(&reply).is_ok());
        }
    }

    #[test]
    fn client_text_quoted_in_errors_is_bounded() {
        let long = "M".repeat(60_000);
        let e = err(&format!(r#"{{"jsonrpc":"2.0","method":"{long}","id":1}}"#));
        assert_eq!(e.code, code::METHOD_NOT_FOUND);
        assert!(e.to_json().len() < 300, "{}", e.to_json().len());
        assert!(e.message.contains("60000 bytes"), "{}", e.message);
        let e = err(&format!(
            r#"{{"jsonrpc":"2.0","method":"CallEnd","params":{{"callid":"x"}},"{long}":1,"id":1}}"#
        ));
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(e.to_json().len() < 300, "{}", e.to_json().len());
        let e = err(&format!(
            r#"{{"jsonrpc":"2.0","method":"CallEnd","params":{{"callid":"x","{long}":1}},"id":1}}"#
        ));
        assert_eq!(e.code, code::INVALID_PARAMS);
        assert!(e.to_json().len() < 400, "{}", e.to_json().len());
        // Cut on a character boundary.
        let wide = "é".repeat(100);
        assert!(clip(&wide).starts_with(&"é".repeat(MAX_QUOTED / 2)));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn notification_json_matches_the_document() {
        let kind = pb::notification::Kind::Event(pb::CommandEvent {
            step: pb::CommandStep::CallStart as i32,
            callid: "Y".into(),
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&notification("c1", &kind)).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"Event","params":{"cmd_id":"c1","data":"CALL_START","callid":"Y"}})
        );
        let kind = pb::notification::Kind::Event(pb::CommandEvent {
            step: pb::CommandStep::CallHold as i32,
            callid: "Y".into(),
            leg: pb::Leg::Both as i32,
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&notification("c1", &kind)).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"Event","params":{"cmd_id":"c1","data":"CALL_HOLD","callid":"Y","leg":"both"}})
        );
        let kind = pb::notification::Kind::Error(pb::CommandError {
            code: pb::ErrorCode::DialogNotFound as i32,
            message: "gone".into(),
            sip_code: 404,
        });
        let v: Value = serde_json::from_str(&notification("c1", &kind)).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"Error","params":{"cmd_id":"c1","code":"DIALOG_NOT_FOUND","message":"gone","sip_code":404}})
        );
        let v: Value = serde_json::from_str(&notification(
            "c1",
            &pb::notification::Kind::Ended(pb::CommandEnded {}),
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"Ended","params":{"cmd_id":"c1"}})
        );
        let id = parse_command(
            r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"x"},"id":"831717ed97e5"}"#,
        )
        .unwrap()
        .id
        .unwrap();
        let v: Value = serde_json::from_str(&started(&id, "b8")).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":"831717ed97e5","result":{"cmd_id":"b8","status":"Started"}})
        );
    }
}
