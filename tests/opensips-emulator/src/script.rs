//! What the OpenSIPS script callapi ships (`deploy/opensips/`) does to SIP, and the log of the
//! SIP requests the node sent, so tests can check a command's effect on the wire (no I/O).
//!
//! The script's part that matters here is `route[callapi_referred]`: the INVITE a phone sends
//! because of a REFER of ours carries callops's `;osid=<dialog id>` in its R-URI; before
//! `create_dialog` the script loads that referring dialog's context, reads the dialog value
//! [`CALLEE_VALUE`] (JSON, pushed by callapi with `dlg_push_var` before the REFER) and applies
//! it to the INVITE toward the callee: headers added, From display name and user, P-Asserted-
//! Identity and Remote-Party-ID users, and where to send it (`$du`: a trunk, or one contact of
//! the callee).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The dialog value holding what to do to the INVITE toward the callee.
pub const CALLEE_VALUE: &str = "callapi_callee";

/// How many sent requests the log keeps (oldest dropped first).
const LOG_CAPACITY: usize = 4096;

/// One SIP request as it left the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentRequest {
    /// Call-ID.
    pub callid: String,
    /// Method.
    pub method: String,
    /// Request-URI.
    pub ruri: String,
    /// Where it went when that is not the R-URI's owner (`$du`: a trunk, a chosen contact).
    pub destination: Option<String>,
    /// Header lines, `Name: value`, in order.
    pub headers: Vec<String>,
    /// Body, if any.
    pub body: Option<String>,
}

impl SentRequest {
    /// The value of the first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|line| {
            line.split_once(':')
                .is_none_or(|(key, _)| !key.trim().eq_ignore_ascii_case(name))
        });
    }

    fn set(&mut self, name: &str, value: String) {
        let line = format!("{name}: {value}");
        match self.headers.iter_mut().find(|l| {
            l.split_once(':')
                .is_some_and(|(key, _)| key.trim().eq_ignore_ascii_case(name))
        }) {
            Some(existing) => *existing = line,
            None => self.headers.push(line),
        }
    }
}

/// Splits CRLF-joined header lines (as `t_uac_dlg` and `append_hf` take them).
pub fn header_lines(text: &str) -> Vec<String> {
    text.split("\r\n")
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The [`CALLEE_VALUE`] dialog value: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CalleeInstructions {
    /// Header lines to append, CRLF-joined and CRLF-terminated.
    pub hdrs: Option<String>,
    /// From display name, as it goes into the header (a quoted-string).
    pub from_display: Option<String>,
    /// From user part.
    pub from_user: Option<String>,
    /// P-Asserted-Identity user part (the header is replaced).
    pub pai_user: Option<String>,
    /// Remote-Party-ID user part (the header is replaced).
    pub rpi_user: Option<String>,
    /// Where to send the INVITE (`$du`).
    pub du: Option<String>,
    /// The Request-URI's user (`$rU`): whose phone rings.
    pub ruri_user: Option<String>,
    /// The trunk's name (only logged by the script).
    pub trunk: Option<String>,
}

impl CalleeInstructions {
    /// Reads the dialog value; the script's `$json` refuses anything but a JSON object.
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// Applies them to `invite` as the script does.
    pub fn apply(&self, invite: &mut SentRequest) {
        let from = invite.header("From").unwrap_or_default().to_owned();
        let host = domain_of(&from);
        if let Some(user) = &self.pai_user {
            invite.remove("P-Asserted-Identity");
            invite
                .headers
                .push(format!("P-Asserted-Identity: <sip:{user}@{host}>"));
        }
        if let Some(user) = &self.rpi_user {
            invite.remove("Remote-Party-ID");
            invite.headers.push(format!(
                "Remote-Party-ID: <sip:{user}@{host}>;party=calling;screen=yes;privacy=off"
            ));
        }
        if let Some(hdrs) = &self.hdrs {
            invite.headers.extend(header_lines(hdrs));
        }
        if self.from_display.is_some() || self.from_user.is_some() {
            invite.set("From", replace_from(&from, self));
        }
        if let Some(du) = &self.du {
            invite.destination = Some(du.clone());
        }
        if let Some(user) = &self.ruri_user {
            invite.ruri = with_user(&invite.ruri, user);
        }
    }
}

/// `uac_replace_from`: a new display name and/or user part, the tag kept.
fn replace_from(from: &str, instructions: &CalleeInstructions) -> String {
    let (uri, tail) = match (from.find('<'), from.find('>')) {
        (Some(open), Some(close)) if open < close => {
            (&from[open + 1..close], from[close + 1..].to_owned())
        }
        _ => {
            let end = from.find(';').unwrap_or(from.len());
            (&from[..end], from[end..].to_owned())
        }
    };
    let uri = match &instructions.from_user {
        Some(user) => format!("sip:{user}@{}", domain_of(uri)),
        None => uri.to_owned(),
    };
    let display = from
        .find('<')
        .map(|open| from[..open].trim().to_owned())
        .unwrap_or_default();
    let display = match &instructions.from_display {
        Some(name) => format!("{name} "),
        None if display.is_empty() => String::new(),
        None => format!("{display} "),
    };
    format!("{display}<{uri}>{tail}")
}

/// `uri` with its user part replaced by `user`.
fn with_user(uri: &str, user: &str) -> String {
    let (scheme, rest) = uri.split_once(':').unwrap_or(("sip", uri));
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}:{user}@{host}")
}

/// The host (and port) of the URI in a header value or of a bare URI.
pub fn host_of(value: &str) -> String {
    let uri = value
        .find('<')
        .map(|open| &value[open + 1..])
        .unwrap_or(value);
    let after = uri.split_once('@').map(|(_, h)| h).unwrap_or(uri);
    let after = after
        .strip_prefix("sip:")
        .or_else(|| after.strip_prefix("sips:"))
        .unwrap_or(after);
    let end = after.find([';', '>', '?']).unwrap_or(after.len());
    after[..end].to_owned()
}

/// The domain of a From header value, as the script's `$fd` gives it (no port).
fn domain_of(value: &str) -> String {
    let host = host_of(value);
    match host.rsplit_once(':') {
        Some((domain, port)) if port.bytes().all(|b| b.is_ascii_digit()) => domain.to_owned(),
        _ => host,
    }
}

/// The SIP requests the node sent, newest last.
#[derive(Debug, Default)]
pub struct SipLog {
    requests: VecDeque<SentRequest>,
}

impl SipLog {
    /// Records one sent request.
    pub fn push(&mut self, request: SentRequest) {
        if self.requests.len() == LOG_CAPACITY {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    /// The requests of `callid` (all when `None`), oldest first.
    pub fn of(&self, callid: Option<&str>) -> Vec<SentRequest> {
        self.requests
            .iter()
            .filter(|r| callid.is_none_or(|c| r.callid == c))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite() -> SentRequest {
        SentRequest {
            callid: "y".into(),
            method: "INVITE".into(),
            ruri: "sip:1002@example.com".into(),
            destination: None,
            headers: vec![
                "From: <sip:1001@example.com>;tag=abc".into(),
                "To: <sip:1002@example.com>".into(),
                "P-Asserted-Identity: <sip:1001@example.com>".into(),
            ],
            body: Some("v=0\r\n".into()),
        }
    }

    #[test]
    fn instructions_change_the_invite_as_the_script_does() {
        let instructions = CalleeInstructions::parse(
            r#"{"hdrs":"Answer-Mode: Auto\r\nX-Callapi-User-Data: crm 7\r\n","from_display":"\"Sales \\\"A\\\"\"","from_user":"555","pai_user":"777","rpi_user":"888","du":"sip:10.0.0.5:5060","trunk":"carrier"}"#,
        )
        .unwrap();
        let mut request = invite();
        instructions.apply(&mut request);
        assert_eq!(
            request.header("From"),
            Some(r#""Sales \"A\"" <sip:555@example.com>;tag=abc"#)
        );
        assert_eq!(
            request.header("P-Asserted-Identity"),
            Some("<sip:777@example.com>")
        );
        assert_eq!(
            request
                .headers
                .iter()
                .filter(|l| l.starts_with("P-Asserted"))
                .count(),
            1
        );
        assert_eq!(
            request.header("Remote-Party-ID"),
            Some("<sip:888@example.com>;party=calling;screen=yes;privacy=off")
        );
        assert_eq!(request.header("Answer-Mode"), Some("Auto"));
        assert_eq!(request.header("x-callapi-user-data"), Some("crm 7"));
        assert_eq!(request.destination.as_deref(), Some("sip:10.0.0.5:5060"));
    }

    #[test]
    fn no_instructions_no_change_and_bad_json_is_ignored() {
        let mut request = invite();
        CalleeInstructions::default().apply(&mut request);
        assert_eq!(request, invite());
        assert_eq!(CalleeInstructions::parse("not json"), None);
        assert_eq!(CalleeInstructions::parse("[1]"), None);
    }

    #[test]
    fn display_name_alone_keeps_the_uri() {
        let mut request = invite();
        CalleeInstructions {
            from_display: Some("\"Desk\"".into()),
            ..Default::default()
        }
        .apply(&mut request);
        assert_eq!(
            request.header("From"),
            Some(r#""Desk" <sip:1001@example.com>;tag=abc"#)
        );
    }

    #[test]
    fn the_request_uri_user_can_change() {
        let mut request = invite();
        CalleeInstructions {
            ruri_user: Some("1003".into()),
            ..Default::default()
        }
        .apply(&mut request);
        assert_eq!(request.ruri, "sip:1003@example.com");
        assert_eq!(request.header("To"), Some("<sip:1002@example.com>"));
        assert_eq!(
            with_user("sip:example.com;gr=x", "7"),
            "sip:7@example.com;gr=x"
        );
    }

    #[test]
    fn hosts() {
        assert_eq!(
            host_of("<sip:1001@example.com:5070>;tag=a"),
            "example.com:5070"
        );
        assert_eq!(host_of("sip:10.0.0.5"), "10.0.0.5");
        assert_eq!(
            domain_of("<sip:1001@example.com:5070>;tag=a"),
            "example.com"
        );
    }

    #[test]
    fn the_log_is_bounded_and_filtered() {
        let mut log = SipLog::default();
        for n in 0..LOG_CAPACITY + 3 {
            let mut request = invite();
            request.callid = format!("c{n}");
            log.push(request);
        }
        assert_eq!(log.of(None).len(), LOG_CAPACITY);
        assert!(log.of(Some("c0")).is_empty());
        assert_eq!(log.of(Some("c5")).len(), 1);
    }
}
