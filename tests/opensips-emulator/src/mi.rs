//! The MI JSON-RPC envelope and parameter matching, as OpenSIPS does them (no I/O).
//!
//! OpenSIPS matches named params against each command's "recipes" (accepted name sets): no
//! recipe with as many params → -32602 "Too few or too many parameters"; some with that many but
//! none with those names → -32602 "Named parameters do not match". Positional params (an array)
//! take the recipe of their length.

use serde_json::{Map, Value, json};

use crate::Version;

/// An error answered as a JSON-RPC `error` object.
#[derive(Debug, Clone, PartialEq)]
pub struct MiError {
    /// Code (JSON-RPC or SIP-like).
    pub code: i64,
    /// Message.
    pub message: String,
    /// Optional data.
    pub data: Option<String>,
}

impl MiError {
    /// A module error (SIP-like code).
    pub fn new(code: i64, message: &str) -> Self {
        Self {
            code,
            message: message.to_owned(),
            data: None,
        }
    }

    /// -32602 Invalid params with `data`.
    pub fn invalid_params(data: &str) -> Self {
        Self {
            code: -32602,
            message: "Invalid params".to_owned(),
            data: Some(data.to_owned()),
        }
    }

    /// -32000 Server error / Failed to handle parameter.
    pub fn bad_value() -> Self {
        Self {
            code: -32000,
            message: "Server error".to_owned(),
            data: Some("Failed to handle parameter".to_owned()),
        }
    }

    /// -32000 Server error / Command handler returned null: what the MI core answers when a
    /// command's handler built no response (e.g. callops could not send its SIP request for
    /// want of shared memory).
    pub fn command_null() -> Self {
        Self {
            code: -32000,
            message: "Server error".to_owned(),
            data: Some("Command handler returned null".to_owned()),
        }
    }

    /// -32601 Method not found.
    pub fn no_method() -> Self {
        Self::new(-32601, "Method not found")
    }

    /// -32600 Invalid Request.
    pub fn invalid_request() -> Self {
        Self::new(-32600, "Invalid Request")
    }
}

/// A reply body: `result` or `error`.
pub type MiResult = Result<Value, MiError>;

/// Serialises a reply for request `id`.
pub fn reply(id: &Value, result: &MiResult) -> Vec<u8> {
    let body = match result {
        Ok(value) => json!({"jsonrpc": "2.0", "result": value, "id": id}),
        Err(error) => {
            let mut err = json!({"code": error.code, "message": error.message});
            if let (Some(data), Some(map)) = (&error.data, err.as_object_mut()) {
                map.insert("data".into(), data.clone().into());
            }
            json!({"jsonrpc": "2.0", "error": err, "id": id})
        }
    };
    body.to_string().into_bytes()
}

/// What a raw request turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// Not JSON: OpenSIPS answers the plain text `400 Parse_error`.
    ParseError,
    /// A request without a string method (crashes OpenSIPS 4.0.1 over mi_datagram).
    NoMethod {
        /// The id, if any.
        id: Option<Value>,
    },
    /// Invalid envelope: -32600 (answered only if it has an id).
    Invalid {
        /// The id, if any.
        id: Option<Value>,
    },
    /// A request to run.
    Call {
        /// The id (`None`: run, answer nothing).
        id: Option<Value>,
        /// Method name.
        method: String,
        /// Params (`Null` when absent).
        params: Value,
    },
}

/// Reads one request.
pub fn envelope(bytes: &[u8]) -> Envelope {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return Envelope::ParseError;
    };
    let Value::Object(map) = value else {
        return Envelope::Invalid { id: None };
    };
    let id = map.get("id").cloned();
    let method = match map.get("method") {
        Some(Value::String(m)) => m.clone(),
        _ => return Envelope::NoMethod { id },
    };
    if map.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Envelope::Invalid { id };
    }
    let params = map.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Envelope::Invalid { id };
    }
    Envelope::Call { id, method, params }
}

/// Matches `params` against `recipes` and returns them by name.
pub fn match_params(params: &Value, recipes: &[&[&str]]) -> Result<Map<String, Value>, MiError> {
    match params {
        Value::Null => match_named(&Map::new(), recipes),
        Value::Object(map) => match_named(map, recipes),
        Value::Array(list) => {
            let recipe = recipes
                .iter()
                .find(|r| r.len() == list.len())
                .ok_or_else(|| MiError::invalid_params("Too few or too many parameters"))?;
            Ok(recipe
                .iter()
                .zip(list)
                .map(|(name, value)| ((*name).to_owned(), value.clone()))
                .collect())
        }
        _ => Err(MiError::invalid_request()),
    }
}

fn match_named(
    map: &Map<String, Value>,
    recipes: &[&[&str]],
) -> Result<Map<String, Value>, MiError> {
    let same_len: Vec<&&[&str]> = recipes.iter().filter(|r| r.len() == map.len()).collect();
    if same_len.is_empty() {
        return Err(MiError::invalid_params("Too few or too many parameters"));
    }
    if same_len
        .iter()
        .any(|r| r.iter().all(|name| map.contains_key(*name)))
    {
        Ok(map.clone())
    } else {
        Err(MiError::invalid_params("Named parameters do not match"))
    }
}

/// A param as text: strings as they are, numbers printed (OpenSIPS converts them).
pub fn text(params: &Map<String, Value>, name: &str) -> Option<String> {
    match params.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The MI commands OpenSIPS 4.0.1 lists with `which` (mi_names).
pub const NAMES_40: [&str; 79] = [
    "statistics:get",
    "statistics:list",
    "statistics:reset",
    "statistics:reset_all",
    "core:uptime",
    "core:version",
    "core:pwd",
    "core:arg",
    "core:which",
    "core:ps",
    "core:kill",
    "core:log_level",
    "core:xlog_level",
    "core:profiling_proc",
    "core:log_level_filter",
    "core:log_mute_state",
    "core:reload_routes",
    "core:help",
    "tcp:list",
    "tcp:close",
    "mem:shm_check",
    "mem:pkg_dump",
    "mem:shm_dump",
    "mem:rpm_dump",
    "cache:store",
    "cache:fetch",
    "cache:remove",
    "status_report:get",
    "status_report:status",
    "status_report:reports",
    "status_report:identifiers",
    "evi:subscribe",
    "evi:list",
    "evi:subscribers",
    "evi:raise",
    "blacklists:list",
    "blacklists:check_all",
    "blacklists:check",
    "blacklists:add_rule",
    "blacklists:del_rule",
    "tcp:trace",
    "tm:uac_dlg",
    "tm:uac_cancel",
    "tm:hash",
    "tm:reply",
    "cfgutils:rand_set_prob",
    "cfgutils:rand_reset_prob",
    "cfgutils:rand_get_prob",
    "cfgutils:get_config_hash",
    "cfgutils:check_config_hash",
    "cfgutils:shv_get",
    "cfgutils:shv_set",
    "dialog:list",
    "dialog:list_ctx",
    "dialog:end_dlg",
    "dialog:db_sync",
    "dialog:restore_db",
    "dialog:cluster_sync",
    "dialog:profile_get_size",
    "dialog:profile_list_dlgs",
    "dialog:profile_get_values",
    "dialog:list_all_profiles",
    "dialog:profile_end_dlgs",
    "dialog:push_var",
    "dialog:send_sequential",
    "dialog:set_profile",
    "dialog:unset_profile",
    "callops:transfer",
    "callops:hold",
    "callops:unhold",
    "usrloc:rm",
    "usrloc:rm_contact",
    "usrloc:dump",
    "usrloc:flush",
    "usrloc:add",
    "usrloc:show_contact",
    "usrloc:sync",
    "usrloc:cluster_sync",
    "httpd:list_root_path",
];

/// The MI commands this node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `version` / `core:version`.
    Version,
    /// `which` / `core:which` (4.0.1 only).
    Which,
    /// `help` / `core:help`.
    Help,
    /// `events_list` / `evi:list`.
    EventsList,
    /// `event_subscribe` / `evi:subscribe`.
    EventSubscribe,
    /// `subscribers_list` / `evi:subscribers`.
    SubscribersList,
    /// `t_uac_dlg` / `tm:uac_dlg`.
    UacDlg,
    /// `call_transfer` / `callops:transfer`.
    Transfer,
    /// `call_hold` / `callops:hold`.
    Hold,
    /// `call_unhold` / `callops:unhold`.
    Unhold,
    /// `dlg_end_dlg` / `dialog:end_dlg`.
    EndDlg,
    /// `dlg_list`, `dlg_list_ctx` / `dialog:list`, `dialog:list_ctx`.
    DlgList,
    /// `dlg_push_var` / `dialog:push_var`.
    PushVar,
}

impl Command {
    /// Whether OpenSIPS runs the command asynchronously (`MI_ASYNC_RPL_FLAG`): its reply comes
    /// through an async handler in shared memory once the SIP side is done. Of the commands
    /// emulated only `t_uac_dlg` is (OpenSIPS's others are `dlg_send_sequential`,
    /// `pua_publish` and rtp_relay's, none of them emulated).
    pub fn is_async(self) -> bool {
        self == Command::UacDlg
    }

    /// The module that exports the command (`help`'s "Exported by").
    pub fn module(self) -> &'static str {
        match self {
            Command::Version
            | Command::Which
            | Command::Help
            | Command::EventsList
            | Command::EventSubscribe
            | Command::SubscribersList => "core",
            Command::UacDlg => "tm",
            Command::Transfer | Command::Hold | Command::Unhold => "callops",
            Command::EndDlg | Command::DlgList | Command::PushVar => "dialog",
        }
    }
}

/// The 3.x name of each command.
fn plain(name: &str) -> Option<Command> {
    Some(match name {
        "version" => Command::Version,
        "help" => Command::Help,
        "events_list" => Command::EventsList,
        "event_subscribe" => Command::EventSubscribe,
        "subscribers_list" => Command::SubscribersList,
        "t_uac_dlg" => Command::UacDlg,
        "call_transfer" => Command::Transfer,
        "call_hold" => Command::Hold,
        "call_unhold" => Command::Unhold,
        "dlg_end_dlg" => Command::EndDlg,
        "dlg_list" | "dlg_list_ctx" => Command::DlgList,
        "dlg_push_var" => Command::PushVar,
        _ => return None,
    })
}

/// The 4.0 namespaced name of each command.
fn namespaced(name: &str) -> Option<Command> {
    Some(match name {
        "core:version" => Command::Version,
        "core:which" => Command::Which,
        "core:help" => Command::Help,
        "evi:list" => Command::EventsList,
        "evi:subscribe" => Command::EventSubscribe,
        "evi:subscribers" => Command::SubscribersList,
        "tm:uac_dlg" => Command::UacDlg,
        "callops:transfer" => Command::Transfer,
        "callops:hold" => Command::Hold,
        "callops:unhold" => Command::Unhold,
        "dialog:end_dlg" => Command::EndDlg,
        "dialog:list" | "dialog:list_ctx" => Command::DlgList,
        "dialog:push_var" => Command::PushVar,
        _ => return None,
    })
}

/// Finds the command a method name means: 3.x names on both versions; on 4.0 also the
/// namespaced names and unambiguous short names (`hold` → `callops:hold`; an ambiguous one →
/// -32001 "Method ambiguous"). Anything else → -32601 "Method not found".
pub fn resolve(version: Version, name: &str) -> Result<Command, MiError> {
    if let Some(command) = plain(name) {
        return Ok(command);
    }
    if version == Version::V3_6 {
        return Err(MiError::no_method());
    }
    if name.contains(':') {
        return namespaced(name).ok_or_else(MiError::no_method);
    }
    let mut matching = NAMES_40
        .iter()
        .filter(|full| full.split_once(':').is_some_and(|(_, short)| short == name));
    match (matching.next(), matching.next()) {
        (Some(full), None) => namespaced(full).ok_or_else(MiError::no_method),
        (Some(_), Some(_)) => Err(MiError::new(-32001, "Method ambiguous")),
        _ => Err(MiError::no_method()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSFER: &[&[&str]] = &[
        &["callid", "leg", "destination"],
        &["callid", "leg", "transfer_callid", "transfer_leg"],
    ];

    #[test]
    fn recipes_as_g_errors_shows() {
        assert_eq!(
            match_params(&json!({"callid": "x", "leg": "callee"}), TRANSFER)
                .unwrap_err()
                .data
                .as_deref(),
            Some("Too few or too many parameters")
        );
        assert_eq!(
            match_params(
                &json!({"callid": "x", "leg": "callee", "destination": "d", "bogus": 1}),
                TRANSFER
            )
            .unwrap_err()
            .data
            .as_deref(),
            Some("Named parameters do not match")
        );
        let named = match_params(&json!(["x", "callee", "sip:c@d"]), TRANSFER).unwrap();
        assert_eq!(named["destination"], "sip:c@d");
        assert!(match_params(&Value::Null, &[&["callid"]]).is_err());
        assert!(match_params(&Value::Null, &[&[]]).is_ok());
    }

    #[test]
    fn envelopes_as_g_errors_shows() {
        assert_eq!(
            envelope(b"{\"jsonrpc\":\"2.0\",\"method\":\"version\",\"id\":\"r1\""),
            Envelope::ParseError
        );
        assert_eq!(
            envelope(br#"{"method":"version","id":"r2"}"#),
            Envelope::Invalid {
                id: Some(json!("r2"))
            }
        );
        assert_eq!(
            envelope(br#"{"jsonrpc":"2.0","id":"r3"}"#),
            Envelope::NoMethod {
                id: Some(json!("r3"))
            }
        );
        assert_eq!(
            envelope(br#"{"jsonrpc":"1.0","method":"version","id":"r4"}"#),
            Envelope::Invalid {
                id: Some(json!("r4"))
            }
        );
        assert_eq!(
            envelope(br#"{"jsonrpc":"2.0","method":"version","params":"str","id":"r5"}"#),
            Envelope::Invalid {
                id: Some(json!("r5"))
            }
        );
        assert!(matches!(
            envelope(br#"{"jsonrpc":"2.0","method":"version"}"#),
            Envelope::Call { id: None, .. }
        ));
        assert_eq!(
            envelope(br#"{"jsonrpc":"2.0","method":42,"id":"r7"}"#),
            Envelope::NoMethod {
                id: Some(json!("r7"))
            }
        );
    }

    #[test]
    fn names_per_version() {
        assert_eq!(resolve(Version::V3_6, "call_hold"), Ok(Command::Hold));
        assert_eq!(
            resolve(Version::V3_6, "callops:hold").err().map(|e| e.code),
            Some(-32601)
        );
        assert_eq!(resolve(Version::V4_0, "callops:hold"), Ok(Command::Hold));
        assert_eq!(resolve(Version::V4_0, "call_hold"), Ok(Command::Hold));
        assert_eq!(
            resolve(Version::V4_0, "dialog:end_dlg"),
            Ok(Command::EndDlg)
        );
        assert_eq!(
            resolve(Version::V4_0, "evi:subscribers"),
            Ok(Command::SubscribersList)
        );
        assert_eq!(resolve(Version::V4_0, "uac_dlg"), Ok(Command::UacDlg));
        assert_eq!(
            resolve(Version::V4_0, "callops:call_hold")
                .err()
                .map(|e| e.code),
            Some(-32601)
        );
        assert_eq!(
            resolve(Version::V4_0, "list").err().map(|e| e.code),
            Some(-32001)
        );
        assert_eq!(resolve(Version::V4_0, "which"), Ok(Command::Which));
        assert_eq!(
            resolve(Version::V3_6, "which").err().map(|e| e.code),
            Some(-32601)
        );
        assert_eq!(
            resolve(Version::V4_0, "no_such_command")
                .err()
                .map(|e| e.code),
            Some(-32601)
        );
    }
}
