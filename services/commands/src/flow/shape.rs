//! How a CallStart's options shape its SIP (pure).
//!
//! The caller's INVITE is ours (`t_uac_dlg`): its From, headers and body are written here. The
//! callee's INVITE is the caller's phone's, sent because of our REFER; OpenSIPS's script
//! (`deploy/opensips/`, `route[callapi_referred]`) reshapes it from the JSON dialog value
//! [`CALLEE_VALUE`] we push on the first dialog (`dlg_push_var`) before the REFER: headers to
//! add, From display name and user, P-Asserted-Identity and Remote-Party-ID users, and where
//! to send it (`$du`: a trunk, or one contact of the callee).

use callapi_kit::validate;
use callapi_proto::v1 as pb;
use serde_json::{Map, Value, json};

/// The dialog value the shipped script reads on the INVITE a REFER made.
pub const CALLEE_VALUE: &str = "callapi_callee";

/// The header that carries `user_data` in both INVITEs (so it reaches CDRs).
pub const USER_DATA_HEADER: &str = "X-Callapi-User-Data";

/// The SIP of one CallStart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shaped {
    /// `From:` value of the caller's INVITE.
    pub from: String,
    /// Header lines (CRLF-terminated) added to the caller's INVITE.
    pub caller_headers: String,
    /// Whether the caller's INVITE carries the SDP offer.
    pub offer: bool,
    /// The REFER's destination (the callee, maybe with a GRUU `gr` parameter).
    pub destination: String,
    /// The [`CALLEE_VALUE`] to push before the REFER, if the callee's INVITE is reshaped.
    pub callee_instructions: Option<String>,
}

/// A quoted-string display name (RFC 3261 §25.1: `"` and `\` escaped).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The host (and port) of a SIP URI.
fn host_of(uri: &str) -> &str {
    let rest = uri.split_once('@').map_or(uri, |(_, host)| host);
    let rest = rest
        .strip_prefix("sip:")
        .or_else(|| rest.strip_prefix("sips:"))
        .unwrap_or(rest);
    let end = rest.find([';', '?', '>']).unwrap_or(rest.len());
    &rest[..end]
}

fn auto_answer_line(kind: pb::AutoAnswer, domain: &str) -> Option<String> {
    Some(match kind {
        pb::AutoAnswer::Unspecified => return None,
        pb::AutoAnswer::AnswerMode => "Answer-Mode: Auto".to_owned(),
        pb::AutoAnswer::CallInfo => format!("Call-Info: <sip:{domain}>;answer-after=0"),
        pb::AutoAnswer::AlertInfoDelay0 => {
            format!("Alert-Info: <sip:{domain}>;info=alert-autoanswer;delay=0")
        }
        pb::AutoAnswer::AlertInfo => "Alert-Info: info=Auto Answer".to_owned(),
        pb::AutoAnswer::AlertInfoIntercom => "Alert-Info: info=intercom".to_owned(),
    })
}

fn set(map: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        map.insert(key.to_owned(), json!(value));
    }
}

/// Shapes the SIP of a CallStart from `caller` to `callee` with `options` (already checked).
pub fn shape(caller: &str, callee: &str, options: &pb::CallOptions) -> Shaped {
    // The domain in Call-Info / Alert-Info URIs: the caller's, else the callee's.
    let domain = if validate::is_sip_scheme(caller) {
        host_of(caller)
    } else if validate::is_sip_scheme(callee) {
        host_of(callee)
    } else {
        "localhost"
    };
    let from = if options.caller_display_name.is_empty() {
        format!("<{caller}>")
    } else {
        format!("{} <{caller}>", quoted(&options.caller_display_name))
    };
    let mut caller_lines = Vec::new();
    let mut callee_lines = Vec::new();
    if let Some(line) = auto_answer_line(options.auto_answer(), domain) {
        let direction = options.header_direction();
        if matches!(
            direction,
            pb::HeaderDirection::Unspecified
                | pb::HeaderDirection::Caller
                | pb::HeaderDirection::All
        ) {
            caller_lines.push(line.clone());
        }
        if matches!(
            direction,
            pb::HeaderDirection::Callee | pb::HeaderDirection::All
        ) {
            callee_lines.push(line);
        }
    }
    if !options.user_data.is_empty() {
        let line = format!("{USER_DATA_HEADER}: {}", options.user_data);
        caller_lines.push(line.clone());
        callee_lines.push(line);
    }
    let crlf = |lines: &[String]| lines.iter().map(|l| format!("{l}\r\n")).collect::<String>();
    let mut instructions = Map::new();
    set(&mut instructions, "hdrs", &crlf(&callee_lines));
    if !options.caller_display_name.is_empty() {
        // As uac_replace_from writes it: a quoted-string.
        set(
            &mut instructions,
            "from_display",
            &quoted(&options.caller_display_name),
        );
    }
    if let Some(trunk) = &options.trunk {
        set(&mut instructions, "trunk", &trunk.name);
        set(&mut instructions, "du", &trunk.uri);
        set(&mut instructions, "from_user", &options.rewrite_from);
        set(&mut instructions, "pai_user", &options.rewrite_pai);
        set(&mut instructions, "rpi_user", &options.rewrite_rpi);
    } else {
        set(&mut instructions, "du", &options.target);
    }
    set(
        &mut instructions,
        "ruri_user",
        &options.target_extension_number,
    );
    let destination = if options.target_instance_id.is_empty() {
        callee.to_owned()
    } else {
        format!("{callee};gr={}", options.target_instance_id)
    };
    Shaped {
        from,
        caller_headers: crlf(&caller_lines),
        offer: !options.late_offer,
        destination,
        callee_instructions: (!instructions.is_empty())
            .then(|| Value::Object(instructions).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "sip:1001@pbx.example.com";
    const CALLEE: &str = "sip:1002@pbx.example.com";

    fn instructions(shaped: &Shaped) -> Value {
        serde_json::from_str(shaped.callee_instructions.as_deref().unwrap_or("null")).unwrap()
    }

    #[test]
    fn no_options_is_call_api_s_sip() {
        let shaped = shape(CALLER, CALLEE, &pb::CallOptions::default());
        assert_eq!(shaped.from, format!("<{CALLER}>"));
        assert_eq!(shaped.caller_headers, "");
        assert!(shaped.offer);
        assert_eq!(shaped.destination, CALLEE);
        assert_eq!(shaped.callee_instructions, None);
    }

    #[test]
    fn display_name_is_quoted_and_reaches_both_invites() {
        let options = pb::CallOptions {
            caller_display_name: r#"Sales "East" \ 2"#.into(),
            ..Default::default()
        };
        let shaped = shape(CALLER, CALLEE, &options);
        assert_eq!(shaped.from, format!(r#""Sales \"East\" \\ 2" <{CALLER}>"#));
        assert_eq!(
            instructions(&shaped),
            json!({"from_display": r#""Sales \"East\" \\ 2""#})
        );
    }

    #[test]
    fn auto_answer_goes_where_the_direction_says() {
        let with = |kind, direction| pb::CallOptions {
            auto_answer: kind as i32,
            header_direction: direction as i32,
            ..Default::default()
        };
        let shaped = shape(
            CALLER,
            CALLEE,
            &with(pb::AutoAnswer::AnswerMode, pb::HeaderDirection::Unspecified),
        );
        assert_eq!(shaped.caller_headers, "Answer-Mode: Auto\r\n");
        assert_eq!(shaped.callee_instructions, None);
        let shaped = shape(
            CALLER,
            CALLEE,
            &with(pb::AutoAnswer::CallInfo, pb::HeaderDirection::Callee),
        );
        assert_eq!(shaped.caller_headers, "");
        assert_eq!(
            instructions(&shaped),
            json!({"hdrs": "Call-Info: <sip:pbx.example.com>;answer-after=0\r\n"})
        );
        let shaped = shape(
            CALLER,
            CALLEE,
            &with(pb::AutoAnswer::AlertInfoDelay0, pb::HeaderDirection::All),
        );
        let line = "Alert-Info: <sip:pbx.example.com>;info=alert-autoanswer;delay=0\r\n";
        assert_eq!(shaped.caller_headers, line);
        assert_eq!(instructions(&shaped)["hdrs"], line);
        for (kind, line) in [
            (
                pb::AutoAnswer::AlertInfo,
                "Alert-Info: info=Auto Answer\r\n",
            ),
            (
                pb::AutoAnswer::AlertInfoIntercom,
                "Alert-Info: info=intercom\r\n",
            ),
        ] {
            let shaped = shape(CALLER, CALLEE, &with(kind, pb::HeaderDirection::Caller));
            assert_eq!(shaped.caller_headers, line);
        }
    }

    #[test]
    fn trunk_routing_with_rewrites_and_user_data() {
        let options = pb::CallOptions {
            late_offer: true,
            user_data: "crm-42".into(),
            trunk: Some(pb::Trunk {
                name: "carrier".into(),
                uri: "sip:10.0.0.5:5060".into(),
            }),
            rewrite_from: "4930".into(),
            rewrite_pai: "4931".into(),
            rewrite_rpi: "4932".into(),
            ..Default::default()
        };
        let shaped = shape(CALLER, "sip:+4930123@pbx.example.com", &options);
        assert!(!shaped.offer);
        assert_eq!(shaped.caller_headers, "X-Callapi-User-Data: crm-42\r\n");
        assert_eq!(
            instructions(&shaped),
            json!({"hdrs": "X-Callapi-User-Data: crm-42\r\n", "trunk": "carrier",
                "du": "sip:10.0.0.5:5060", "from_user": "4930", "pai_user": "4931", "rpi_user": "4932"})
        );
    }

    #[test]
    fn rewrites_need_a_trunk_and_a_trunk_beats_a_target() {
        let options = pb::CallOptions {
            rewrite_pai: "4931".into(),
            ..Default::default()
        };
        assert_eq!(shape(CALLER, CALLEE, &options).callee_instructions, None);
        let options = pb::CallOptions {
            target: "sip:1002@10.1.2.3".into(),
            trunk: Some(pb::Trunk {
                name: "carrier".into(),
                uri: "sip:10.0.0.5".into(),
            }),
            ..Default::default()
        };
        let shaped = shape(CALLER, CALLEE, &options);
        assert_eq!(instructions(&shaped)["du"], "sip:10.0.0.5");
    }

    #[test]
    fn targets() {
        let options = pb::CallOptions {
            target: "sip:1002@10.1.2.3:5062".into(),
            target_instance_id: "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6".into(),
            ..Default::default()
        };
        let shaped = shape(CALLER, CALLEE, &options);
        assert_eq!(
            shaped.destination,
            format!("{CALLEE};gr=urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
        );
        assert_eq!(
            instructions(&shaped),
            json!({"du": "sip:1002@10.1.2.3:5062"})
        );
        let options = pb::CallOptions {
            target_extension_number: "1003".into(),
            ..Default::default()
        };
        let shaped = shape(CALLER, CALLEE, &options);
        assert_eq!(shaped.destination, CALLEE);
        assert_eq!(instructions(&shaped), json!({"ruri_user": "1003"}));
    }
}
