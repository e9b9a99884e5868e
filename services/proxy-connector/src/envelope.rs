//! The MI JSON-RPC 2.0 envelope: building requests and reading replies, without I/O.

use serde_json::{Value, json};

/// What OpenSIPS answered to one MI request.
#[derive(Debug, Clone, PartialEq)]
pub enum MiOutcome {
    /// The `result` member.
    Result(Value),
    /// The `error` member.
    Error {
        /// JSON-RPC or module (SIP-like) error code.
        code: i64,
        /// Error message.
        message: String,
        /// Optional `data` member.
        data: Option<Value>,
    },
}

/// Checks an MI command name. OpenSIPS 4.0.1 crashes on a request without a string method over
/// mi_datagram, so nothing leaves the connector without a sane one.
pub fn check_method(method: &str) -> Result<(), String> {
    let sane = !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
    if sane {
        Ok(())
    } else {
        Err(format!("refusing MI method {method:?}: not a command name"))
    }
}

/// Parses the `params_json` of an `MiRequest`: empty means no params; else an object or array.
pub fn parse_params(params_json: &str) -> Result<Option<Value>, String> {
    if params_json.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(params_json) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => Ok(Some(value)),
        Ok(_) => Err("MI params must be a JSON object or array".to_owned()),
        Err(err) => Err(format!("MI params are not JSON: {err}")),
    }
}

/// Serialises one JSON-RPC request.
pub fn build_request(id: u64, method: &str, params: Option<&Value>) -> Result<Vec<u8>, String> {
    check_method(method)?;
    let mut request = json!({"jsonrpc": "2.0", "method": method, "id": id});
    if let (Some(params), Value::Object(map)) = (params, &mut request) {
        map.insert("params".to_owned(), params.clone());
    }
    serde_json::to_vec(&request).map_err(|e| e.to_string())
}

/// Reads one JSON-RPC reply: its numeric id (if any) and outcome.
pub fn parse_reply(bytes: &[u8]) -> Result<(Option<u64>, MiOutcome), String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        format!("OpenSIPS answered a non-JSON reply: {text:?}")
    })?;
    let id = value.get("id").and_then(Value::as_u64);
    if let Some(error) = value.get("error") {
        let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let data = error.get("data").cloned();
        return Ok((
            id,
            MiOutcome::Error {
                code,
                message,
                data,
            },
        ));
    }
    match value.get("result") {
        Some(result) => Ok((id, MiOutcome::Result(result.clone()))),
        None => Err("OpenSIPS reply has neither result nor error".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_always_carry_a_method() {
        assert!(build_request(1, "", None).is_err());
        assert!(build_request(1, "dlg_list\"x", None).is_err());
        let bytes = build_request(7, "dlg_list", Some(&json!({"callid": "a@b"}))).unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            json!({"jsonrpc":"2.0","method":"dlg_list","id":7,"params":{"callid":"a@b"}})
        );
        assert!(build_request(1, "callops:hold", None).is_ok());
    }

    #[test]
    fn replies_as_opensips_sends_them() {
        let (id, outcome) =
            parse_reply(br#"{"jsonrpc": "2.0", "result": "OK", "id": 31}"#).unwrap();
        assert_eq!(id, Some(31));
        assert_eq!(outcome, MiOutcome::Result(json!("OK")));
        let (_, outcome) = parse_reply(
            br#"{"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params", "data": "Too few or too many parameters"}, "id": 24}"#,
        )
        .unwrap();
        assert_eq!(
            outcome,
            MiOutcome::Error {
                code: -32602,
                message: "Invalid params".into(),
                data: Some(json!("Too few or too many parameters"))
            }
        );
        assert!(parse_reply(b"400 Parse_error").is_err());
        assert!(parse_reply(br#"{"jsonrpc":"2.0","id":1}"#).is_err());
    }

    #[test]
    fn params_must_be_structured() {
        assert_eq!(parse_params("").unwrap(), None);
        assert!(parse_params("\"x\"").is_err());
        assert!(parse_params("{").is_err());
        assert_eq!(parse_params("[1]").unwrap(), Some(json!([1])));
    }
}
