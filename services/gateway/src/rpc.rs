//! The client protocol: JSON-RPC 2.0 requests of the OpenSIPS call-api, checked field by field
//! and turned into `CommandRequest`s; and the JSON of replies and notifications. No I/O here.

use callapi_kit::{subjects::CommandKind, validate};
use callapi_proto::v1::{self as pb, command_request::Command};
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
    /// No commands service answered: try again later.
    pub const UNAVAILABLE: i64 = -32000;
    /// The commands service refused the command.
    pub const REFUSED: i64 = -32001;
    /// The `cmd_id` is already used by a running command of this connection.
    pub const DUPLICATE_CMD_ID: i64 = -32002;
}

/// A JSON-RPC error to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Request id (null when unknown).
    pub id: Value,
    /// Error code (see [`code`]).
    pub code: i64,
    /// Message.
    pub message: String,
    /// Extra data.
    pub data: Option<Value>,
    /// Whether the request was a notification (no id): then nothing is answered.
    pub silent: bool,
}

impl RpcError {
    fn new(id: &Value, code: i64, message: impl Into<String>) -> Self {
        Self {
            id: id.clone(),
            code,
            message: message.into(),
            data: None,
            silent: false,
        }
    }

    fn field(id: &Value, field: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
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
        json!({"jsonrpc": "2.0", "id": self.id, "error": error}).to_string()
    }
}

/// A checked command request.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandCall {
    /// Request id (`None` for a notification: run it, answer nothing).
    pub id: Option<Value>,
    /// Command id the client gave, if any.
    pub cmd_id: Option<String>,
    /// Which command.
    pub kind: CommandKind,
    /// The command itself.
    pub command: Command,
}

/// The `result` reply to a started command.
pub fn started(id: &Value, cmd_id: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": {"cmd_id": cmd_id, "status": "Started"}})
        .to_string()
}

/// An error reply.
pub fn error(id: &Value, code: i64, message: &str) -> String {
    RpcError::new(id, code, message).to_json()
}

/// A notification (`Event`, `Error`, `Ended`) for a command, as JSON text.
pub fn notification(cmd_id: &str, kind: &pb::notification::Kind) -> String {
    let mut params = Map::new();
    params.insert("cmd_id".into(), cmd_id.into());
    let method = match kind {
        pb::notification::Kind::Event(event) => {
            params.insert("data".into(), event.name.clone().into());
            for (key, value) in [
                ("callid", &event.callid),
                ("leg", &event.leg),
                ("sip_status", &event.sip_status),
                ("destination", &event.destination),
            ] {
                if !value.is_empty() {
                    params.insert(key.into(), value.clone().into());
                }
            }
            "Event"
        }
        pb::notification::Kind::Error(error) => {
            params.insert("code".into(), error.code.clone().into());
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

/// Parses and checks one text message.
pub fn parse(text: &str) -> Result<CommandCall, RpcError> {
    let null = Value::Null;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RpcError::new(&null, code::PARSE_ERROR, format!("Parse error: {e}")))?;
    let Value::Object(request) = value else {
        let message = if value.is_array() {
            "Invalid Request: batch requests are not supported"
        } else {
            "Invalid Request: a request must be a JSON object"
        };
        return Err(RpcError::new(&null, code::INVALID_REQUEST, message));
    };
    let id = match request.get("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id.clone()),
        Some(_) => {
            return Err(RpcError::new(
                &null,
                code::INVALID_REQUEST,
                "Invalid Request: id must be a string, a number or null",
            ));
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    let silence = |mut e: RpcError| {
        e.silent = id.is_none();
        e
    };
    if request.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(silence(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            "Invalid Request: jsonrpc must be \"2.0\"",
        )));
    }
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return Err(silence(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            "Invalid Request: method must be a string",
        )));
    };
    if let Some(key) = request
        .keys()
        .find(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return Err(silence(RpcError::new(
            &reply_id,
            code::INVALID_REQUEST,
            format!("Invalid Request: unknown member {key:?}"),
        )));
    }
    let kind = match method {
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
                format!("Method not found: {other}"),
            )));
        }
    };
    let params = match request.get("params") {
        Some(Value::Object(params)) => params,
        _ => {
            return Err(silence(RpcError::field(
                &reply_id,
                "params",
                "must be an object",
            )));
        }
    };
    let mut reader = Params::new(params, &reply_id);
    let cmd_id = reader.optional_string("cmd_id").map_err(silence)?;
    if let Some(cmd_id) = &cmd_id
        && (cmd_id.is_empty()
            || cmd_id.len() > 128
            || !cmd_id.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(silence(RpcError::field(
            &reply_id,
            "cmd_id",
            "must be 1 to 128 printable ASCII characters",
        )));
    }
    let command = command(kind, &mut reader).map_err(silence)?;
    reader.no_leftovers().map_err(silence)?;
    Ok(CommandCall {
        id,
        cmd_id,
        kind,
        command,
    })
}

fn command(kind: CommandKind, p: &mut Params<'_>) -> Result<Command, RpcError> {
    Ok(match kind {
        CommandKind::CallStart => Command::CallStart(pb::CallStart {
            caller: p.uri("caller")?,
            callee: p.uri("callee")?,
        }),
        CommandKind::BlindTransfer => Command::BlindTransfer(pb::CallBlindTransfer {
            callid: p.callid("callid")?,
            leg: p.leg("leg", false)? as i32,
            destination: p.uri("destination")?,
        }),
        CommandKind::AttendedTransfer => {
            let callid_a = p.callid_alias("callid_a", "callidA")?;
            let leg_a = p.leg_alias("leg_a", "legA")?;
            let callid_b = p.callid_alias("callid_b", "callidB")?;
            let leg_b = p.leg_alias("leg_b", "legB")?;
            let destination = match p.optional_string("destination")? {
                Some(uri) => {
                    validate::sip_uri(&uri).map_err(|why| p.bad("destination", why))?;
                    uri
                }
                None => String::new(),
            };
            Command::AttendedTransfer(pb::CallAttendedTransfer {
                callid_a,
                leg_a: leg_a as i32,
                callid_b,
                leg_b: leg_b as i32,
                destination,
            })
        }
        CommandKind::Hold => Command::Hold(pb::CallHold {
            callid: p.callid("callid")?,
            leg: p.optional_leg("leg")? as i32,
        }),
        CommandKind::Unhold => Command::Unhold(pb::CallUnhold {
            callid: p.callid("callid")?,
            leg: p.optional_leg("leg")? as i32,
        }),
        CommandKind::End => Command::End(pb::CallEnd {
            callid: p.callid("callid")?,
        }),
    })
}

/// Reads params, remembering which were used so leftovers can be refused.
struct Params<'a> {
    params: &'a Map<String, Value>,
    used: Vec<&'static str>,
    id: &'a Value,
}

impl<'a> Params<'a> {
    fn new(params: &'a Map<String, Value>, id: &'a Value) -> Self {
        Self {
            params,
            used: Vec::new(),
            id,
        }
    }

    fn bad(&self, field: &str, reason: impl Into<String>) -> RpcError {
        RpcError::field(self.id, field, reason)
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<String>, RpcError> {
        self.used.push(field);
        match self.params.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self.bad(field, format!("must be a string, not {}", type_name(other))))
            }
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, RpcError> {
        self.optional_string(field)?
            .ok_or_else(|| self.bad(field, "is required"))
    }

    fn uri(&mut self, field: &'static str) -> Result<String, RpcError> {
        let uri = self.string(field)?;
        validate::sip_uri(&uri).map_err(|why| self.bad(field, why))?;
        Ok(uri)
    }

    fn callid(&mut self, field: &'static str) -> Result<String, RpcError> {
        let callid = self.string(field)?;
        validate::callid(&callid).map_err(|why| self.bad(field, why))?;
        Ok(callid)
    }

    /// A field that may also be spelled as the Go call-api does (`callidA`).
    fn alias(&mut self, field: &'static str, alias: &'static str) -> Result<String, RpcError> {
        let main = self.optional_string(field)?;
        let other = self.optional_string(alias)?;
        match (main, other) {
            (Some(_), Some(_)) => Err(self.bad(field, format!("is given twice (also as {alias})"))),
            (Some(v), None) | (None, Some(v)) => Ok(v),
            (None, None) => Err(self.bad(field, "is required")),
        }
    }

    fn callid_alias(
        &mut self,
        field: &'static str,
        alias: &'static str,
    ) -> Result<String, RpcError> {
        let callid = self.alias(field, alias)?;
        validate::callid(&callid).map_err(|why| self.bad(field, why))?;
        Ok(callid)
    }

    fn leg_alias(&mut self, field: &'static str, alias: &'static str) -> Result<pb::Leg, RpcError> {
        let leg = self.alias(field, alias)?;
        match leg.as_str() {
            "caller" => Ok(pb::Leg::Caller),
            "callee" => Ok(pb::Leg::Callee),
            _ => Err(self.bad(field, "must be \"caller\" or \"callee\"")),
        }
    }

    fn leg(&mut self, field: &'static str, both_allowed: bool) -> Result<pb::Leg, RpcError> {
        let leg = self.string(field)?;
        match leg.as_str() {
            "caller" => Ok(pb::Leg::Caller),
            "callee" => Ok(pb::Leg::Callee),
            "both" if both_allowed => Ok(pb::Leg::Both),
            _ if both_allowed => Err(self.bad(field, "must be \"caller\", \"callee\" or \"both\"")),
            _ => Err(self.bad(field, "must be \"caller\" or \"callee\"")),
        }
    }

    fn optional_leg(&mut self, field: &'static str) -> Result<pb::Leg, RpcError> {
        match self.params.get(field) {
            None | Some(Value::Null) => {
                self.used.push(field);
                Ok(pb::Leg::Unspecified)
            }
            Some(_) => self.leg(field, true),
        }
    }

    fn no_leftovers(&self) -> Result<(), RpcError> {
        match self
            .params
            .keys()
            .find(|k| !self.used.contains(&k.as_str()))
        {
            Some(key) => Err(self.bad(key, "is not a parameter of this method")),
            None => Ok(()),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> RpcError {
        parse(text).unwrap_err()
    }

    #[test]
    fn the_documents_requests_parse() {
        let call = parse(r#"{"method":"CallStart","params":{"caller":"sip:alice@10.0.0.10","callee":"sip:bob@10.0.0.11"},"id":"831717ed97e5","jsonrpc":"2.0"}"#).unwrap();
        assert_eq!(call.kind, CommandKind::CallStart);
        assert_eq!(call.id, Some(json!("831717ed97e5")));
        let call = parse(r#"{"method":"CallAttendedTransfer","params":{"callid_a":"431fc357.a3e3.49c2@127.0.0.1","leg_a":"caller","callid_b":"0ba2cf53","leg_b":"callee","destination":"sip:cindy@10.0.0.11"},"id":1,"jsonrpc":"2.0"}"#).unwrap();
        let Command::AttendedTransfer(a) = call.command else {
            panic!()
        };
        assert_eq!(
            (a.leg_a, a.leg_b),
            (pb::Leg::Caller as i32, pb::Leg::Callee as i32)
        );
        let call = parse(r#"{"method":"CallAttendedTransfer","params":{"callidA":"a","legA":"caller","callidB":"b","legB":"callee"},"id":1,"jsonrpc":"2.0"}"#).unwrap();
        assert!(matches!(call.command, Command::AttendedTransfer(_)));
        let call = parse(r#"{"method":"CallHold","params":{"callid":"x"},"id":2,"jsonrpc":"2.0"}"#)
            .unwrap();
        let Command::Hold(h) = call.command else {
            panic!()
        };
        assert_eq!(h.leg, pb::Leg::Unspecified as i32);
        assert!(parse(r#"{"method":"CallUnhold","params":{"callid":"x","cmd_id":"mine"},"id":2,"jsonrpc":"2.0"}"#).is_ok());
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
    fn notifications_without_id_are_silent_on_error() {
        assert!(err(r#"{"jsonrpc":"2.0","method":"Nope"}"#).silent);
        assert!(!err(r#"{"jsonrpc":"2.0","method":"Nope","id":null}"#).silent);
    }

    #[test]
    fn notification_json_matches_the_document() {
        let kind = pb::notification::Kind::Event(pb::CommandEvent {
            name: "CALL_START".into(),
            callid: "Y".into(),
            ..Default::default()
        });
        let v: Value = serde_json::from_str(&notification("c1", &kind)).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","method":"Event","params":{"cmd_id":"c1","data":"CALL_START","callid":"Y"}})
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
        let v: Value = serde_json::from_str(&started(&json!("831717ed97e5"), "b8")).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":"831717ed97e5","result":{"cmd_id":"b8","status":"Started"}})
        );
    }
}
