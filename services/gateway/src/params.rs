//! The params of each command as typed serde structs, checked the same way whatever carries
//! them (JSON-RPC params today, REST bodies next): unknown fields refused, the Go call-api's
//! spellings accepted as aliases, SIP URIs and Call-IDs checked as they are read, and every
//! error naming its field. No I/O here.

use std::fmt;

use callapi_kit::subjects::CommandKind;
use callapi_kit::validate;
use callapi_proto::v1::{self as pb, command_request::Command};
use serde::de::{self, Deserializer};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// A checked SIP URI (see `callapi_kit::sip_uri`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri(pub String);

/// A checked SIP Call-ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallId(pub String);

/// A string checked by `check` as it is read; "a string" is what serde says it expected.
fn checked_string<'de, D: Deserializer<'de>>(
    deserializer: D,
    what: &'static str,
    check: fn(&str) -> Result<(), &'static str>,
) -> Result<String, D::Error> {
    struct Visitor {
        what: &'static str,
        check: fn(&str) -> Result<(), &'static str>,
    }
    impl de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.what)
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<String, E> {
            (self.check)(value).map_err(E::custom)?;
            Ok(value.to_owned())
        }
    }
    deserializer.deserialize_str(Visitor { what, check })
}

impl<'de> Deserialize<'de> for SipUri {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_string(deserializer, "a SIP URI string", validate::sip_uri).map(Self)
    }
}

impl<'de> Deserialize<'de> for CallId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_string(deserializer, "a Call-ID string", validate::callid).map(Self)
    }
}

/// The party of a dialog a transfer acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", expecting = "\"caller\" or \"callee\"")]
pub enum Party {
    /// The dialog's caller.
    Caller,
    /// The dialog's callee.
    Callee,
}

impl From<Party> for pb::Leg {
    fn from(party: Party) -> Self {
        match party {
            Party::Caller => pb::Leg::Caller,
            Party::Callee => pb::Leg::Callee,
        }
    }
}

/// The leg(s) a hold or unhold acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(
    rename_all = "lowercase",
    expecting = "\"caller\", \"callee\" or \"both\""
)]
pub enum HoldLeg {
    /// The caller's leg.
    Caller,
    /// The callee's leg.
    Callee,
    /// Both legs.
    Both,
}

/// The leg of a hold or unhold: none given means both, as OpenSIPS 3.x always does.
fn hold_leg(leg: Option<HoldLeg>) -> pb::Leg {
    match leg {
        None => pb::Leg::Unspecified,
        Some(HoldLeg::Caller) => pb::Leg::Caller,
        Some(HoldLeg::Callee) => pb::Leg::Callee,
        Some(HoldLeg::Both) => pb::Leg::Both,
    }
}

/// `CallStart`: a call from `caller` to `callee` (click-to-dial); its other params are
/// [`StartOptions`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallStartParams {
    /// Called first; when it answers, it is transferred to the callee.
    pub caller: SipUri,
    /// Called once the caller answered.
    pub callee: SipUri,
}

/// The header `additional_header` names (PortSIP's enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AdditionalHeader {
    /// `Answer-Mode: Auto`.
    AnswerMode,
    /// `Call-Info: <sip:DOMAIN>;answer-after=0`.
    CallInfo,
    /// `Alert-Info: <sip:DOMAIN>;info=alert-autoanswer;delay=0`.
    AlertInfoAutoAnswerDelay0,
    /// `Alert-Info: info=Auto Answer`.
    AlertInfoAutoAnswer,
    /// `Alert-Info: info=intercom`.
    AlertInfoIntercom,
}

impl From<AdditionalHeader> for pb::AutoAnswer {
    fn from(header: AdditionalHeader) -> Self {
        match header {
            AdditionalHeader::AnswerMode => Self::AnswerMode,
            AdditionalHeader::CallInfo => Self::CallInfo,
            AdditionalHeader::AlertInfoAutoAnswerDelay0 => Self::AlertInfoDelay0,
            AdditionalHeader::AlertInfoAutoAnswer => Self::AlertInfo,
            AdditionalHeader::AlertInfoIntercom => Self::AlertInfoIntercom,
        }
    }
}

/// Which INVITE(s) of a click-to-dial get `additional_header` (PortSIP's enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HeaderDirection {
    /// The caller's (the default).
    Caller,
    /// The callee's.
    Callee,
    /// Both.
    All,
}

impl From<HeaderDirection> for pb::HeaderDirection {
    fn from(direction: HeaderDirection) -> Self {
        match direction {
            HeaderDirection::Caller => Self::Caller,
            HeaderDirection::Callee => Self::Callee,
            HeaderDirection::All => Self::All,
        }
    }
}

/// PortSIP's optional create fields (docs/rest.md, "What each field does"), as REST
/// `POST /api/sessions` and WebSocket `CallStart` take them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartOptions {
    /// `send_sdp` (absent: true).
    pub send_sdp: Option<bool>,
    /// `caller_display_name`.
    pub caller_display_name: Option<String>,
    /// `trunk`: the name of a configured trunk.
    pub trunk: Option<String>,
    /// `rewrite_from`.
    pub rewrite_from: Option<String>,
    /// `rewrite_pai`.
    pub rewrite_pai: Option<String>,
    /// `rewrite_rpi`.
    pub rewrite_rpi: Option<String>,
    /// `user_data`.
    pub user_data: Option<String>,
    /// `target`.
    pub target: Option<String>,
    /// `target_instance_id`.
    pub target_instance_id: Option<String>,
    /// `target_extension_number`.
    pub target_extension_number: Option<String>,
    /// `additional_header`.
    pub additional_header: Option<AdditionalHeader>,
    /// `header_direction`.
    pub header_direction: Option<HeaderDirection>,
}

impl StartOptions {
    /// The options as commands take them, through `trunk` (already looked up); the error
    /// names the field.
    pub fn to_proto(&self, trunk: Option<pb::Trunk>) -> Result<pb::CallOptions, ParamsError> {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let options = pb::CallOptions {
            caller_display_name: text(&self.caller_display_name),
            late_offer: self.send_sdp == Some(false),
            trunk,
            rewrite_from: text(&self.rewrite_from),
            rewrite_pai: text(&self.rewrite_pai),
            rewrite_rpi: text(&self.rewrite_rpi),
            user_data: text(&self.user_data),
            auto_answer: self
                .additional_header
                .map_or(pb::AutoAnswer::Unspecified, pb::AutoAnswer::from)
                as i32,
            // Only says where additional_header goes: ignored without it.
            header_direction: self
                .header_direction
                .filter(|_| self.additional_header.is_some())
                .map_or(pb::HeaderDirection::Unspecified, pb::HeaderDirection::from)
                as i32,
            target: text(&self.target),
            target_instance_id: text(&self.target_instance_id),
            target_extension_number: text(&self.target_extension_number),
        };
        validate::call_options(&options).map_err(|why| match why.split_once(' ') {
            Some((field, reason)) => error(field, reason.to_owned()),
            None => error("params", why),
        })?;
        Ok(options)
    }
}

/// The trunk called `name` among `trunks`.
pub fn find_trunk(trunks: &[crate::TrunkConfig], name: &str) -> Option<pb::Trunk> {
    trunks.iter().find(|t| t.name == name).map(|t| pb::Trunk {
        name: t.name.clone(),
        uri: t.uri.clone(),
    })
}

/// A CallStart's trunk, named by the client, as configured; the error names the field.
pub fn resolve_trunk(
    command: &mut Command,
    trunks: &[crate::TrunkConfig],
) -> Result<(), ParamsError> {
    let Command::CallStart(start) = command else {
        return Ok(());
    };
    let Some(trunk) = start.options.as_mut().and_then(|o| o.trunk.as_mut()) else {
        return Ok(());
    };
    match find_trunk(trunks, &trunk.name) {
        Some(found) => {
            *trunk = found;
        }
        None => return Err(error("trunk", "names no configured trunk".to_owned())),
    }
    match start.options.as_deref() {
        Some(options) => check_rewrites(trunks, options),
        None => Ok(()),
    }
}

/// The identities a call through its trunk rewrites must be ones the trunk allows (a
/// tenant's trunk lists them; a trunk of the gateway's own configuration allows all).
pub fn check_rewrites(
    trunks: &[crate::TrunkConfig],
    options: &pb::CallOptions,
) -> Result<(), ParamsError> {
    use callapi_kit::tenants::Rewrite;
    let Some(trunk) = &options.trunk else {
        return Ok(());
    };
    let Some(allowed) = trunks
        .iter()
        .find(|t| t.name == trunk.name)
        .and_then(|t| t.rewrites.as_ref())
    else {
        return Ok(());
    };
    for (field, value, rewrite) in [
        ("rewrite_from", &options.rewrite_from, Rewrite::From),
        ("rewrite_pai", &options.rewrite_pai, Rewrite::Pai),
        ("rewrite_rpi", &options.rewrite_rpi, Rewrite::Rpi),
    ] {
        if !value.is_empty() && !allowed.contains(&rewrite) {
            return Err(error(
                field,
                format!(
                    "is not allowed through trunk {}",
                    crate::rpc::clip(&trunk.name)
                ),
            ));
        }
    }
    Ok(())
}

/// With tenants, the parties a command names must be in the tenant's SIP `domains`: the
/// caller of a `CallStart`, its callee unless the call goes out through a trunk, and a blind
/// transfer's destination. `domains` empty: no check (no tenants configured).
pub fn check_domains(command: &Command, domains: &[String]) -> Result<(), ParamsError> {
    if domains.is_empty() {
        return Ok(());
    }
    let outside = |field: &'static str, uri: &str| -> Result<(), ParamsError> {
        let host = host_of(uri);
        if domains.iter().any(|d| d.eq_ignore_ascii_case(&host)) {
            return Ok(());
        }
        Err(error(
            field,
            format!(
                "must be in one of the tenant's SIP domains ({}), not {}",
                domains.join(", "),
                crate::rpc::clip(&host)
            ),
        ))
    };
    match command {
        Command::CallStart(start) => {
            outside("caller", &start.caller)?;
            let via_trunk = start.options.as_ref().is_some_and(|o| o.trunk.is_some());
            if !via_trunk {
                outside("callee", &start.callee)?;
            }
            Ok(())
        }
        Command::BlindTransfer(transfer) => outside("destination", &transfer.destination),
        _ => Ok(()),
    }
}

/// The host of a SIP URI, lower case ("" if it has none).
fn host_of(uri: &str) -> String {
    use callapi_kit::sip_uri::{Host, Uri, parse};
    match parse(uri) {
        Ok(Uri::Sip(sip)) => match sip.host {
            Host::Name(name) => name.to_ascii_lowercase(),
            Host::V4(ip) => ip.to_string(),
            Host::V6(ip) => ip.to_string(),
        },
        _ => String::new(),
    }
}

/// `CallBlindTransfer`: send one party of a call to `destination`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlindTransferParams {
    /// The call.
    pub callid: CallId,
    /// The party transferred.
    pub leg: Party,
    /// Where it goes.
    pub destination: SipUri,
}

/// `CallAttendedTransfer`: connect a party of call A with a party of call B.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttendedTransferParams {
    /// Call A.
    #[serde(alias = "callidA")]
    pub callid_a: CallId,
    /// The party of call A that is transferred.
    #[serde(alias = "legA")]
    pub leg_a: Party,
    /// Call B.
    #[serde(alias = "callidB")]
    pub callid_b: CallId,
    /// The party of call B it is connected with.
    #[serde(alias = "legB")]
    pub leg_b: Party,
    /// Optional: the URI of that party, if OpenSIPS cannot find it itself.
    #[serde(default)]
    pub destination: Option<SipUri>,
}

/// `CallHold` and `CallUnHold`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldParams {
    /// The call.
    pub callid: CallId,
    /// Which leg(s); none means both.
    #[serde(default)]
    pub leg: Option<HoldLeg>,
}

/// `CallEnd`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndParams {
    /// The call.
    pub callid: CallId,
}

/// `CallGet`: one session, by its id or by the SIP Call-ID of one of its dialogs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// Session id (decimal, as `CallList` gives it).
    #[serde(default)]
    pub session_id: Option<String>,
    /// Or the Call-ID of one of its dialogs.
    #[serde(default)]
    pub callid: Option<CallId>,
}

/// `CallList`: PortSIP v22's list parameters, as `GET /api/sessions` takes them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Text a session's caller or callee URI contains, or one of its Call-IDs.
    #[serde(default)]
    pub filter: Option<String>,
    /// `started_at` (ascending, the default), `started_at asc` or `started_at desc`.
    #[serde(default)]
    pub orderby: Option<String>,
    /// Sessions to skip (0 to 2147483647).
    #[serde(default)]
    pub skip: Option<u64>,
    /// Sessions to return (1 to 100).
    #[serde(default)]
    pub top: Option<u64>,
}

/// Which sessions a list returns, in which order, which page: the same for WebSocket
/// `CallList` and REST `GET /api/sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSelection {
    /// Only sessions a caller or callee URI of which contains this, or with this Call-ID.
    pub filter: Option<String>,
    /// Newest first.
    pub descending: bool,
    /// Sessions skipped.
    pub skip: usize,
    /// Most sessions returned.
    pub top: usize,
}

/// Longest list `filter`, in characters (as the OpenAPI document's `maxLength` counts).
pub const MAX_FILTER_LEN: usize = 256;

/// Most sessions a list returns (and `top`'s default).
pub const MAX_TOP: u64 = 100;

impl ListParams {
    /// The selection these params make, or the field at fault.
    pub fn selection(self) -> Result<ListSelection, ParamsError> {
        let top = self.top.unwrap_or(MAX_TOP);
        if !(1..=MAX_TOP).contains(&top) {
            return Err(error("top", "must be an integer from 1 to 100".to_owned()));
        }
        let skip = self.skip.unwrap_or(0);
        if skip > i32::MAX as u64 {
            return Err(error(
                "skip",
                "must be an integer from 0 to 2147483647".to_owned(),
            ));
        }
        let descending = match self.orderby.as_deref().map(str::trim) {
            None | Some("started_at") | Some("started_at asc") => false,
            Some("started_at desc") => true,
            Some(_) => {
                return Err(error(
                    "orderby",
                    "must be \"started_at\", \"started_at asc\" or \"started_at desc\"".to_owned(),
                ));
            }
        };
        if self
            .filter
            .as_ref()
            .is_some_and(|f| f.chars().count() > MAX_FILTER_LEN)
        {
            return Err(error("filter", "is longer than 256 characters".to_owned()));
        }
        Ok(ListSelection {
            filter: self.filter.filter(|f| !f.is_empty()),
            descending,
            skip: skip as usize,
            top: top as usize,
        })
    }
}

/// Which session a `CallGet` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKey {
    /// By session id.
    Id(u64),
    /// By the Call-ID of one of its dialogs.
    Callid(String),
}

/// The session `CallGet` params name.
pub fn session_key(params: Map<String, Value>) -> Result<SessionKey, ParamsError> {
    let p: GetParams = typed(params, &[])?;
    match (p.session_id, p.callid) {
        (Some(_), Some(_)) => Err(error(
            "session_id",
            "and callid cannot both be given".to_owned(),
        )),
        (Some(id), None) => id
            .parse::<u64>()
            .ok()
            .filter(|id| *id > 0 && *id <= i64::MAX as u64)
            .map(SessionKey::Id)
            .ok_or_else(|| {
                error(
                    "session_id",
                    "must be a session id (a positive int64 in decimal)".to_owned(),
                )
            }),
        (None, Some(callid)) => Ok(SessionKey::Callid(callid.0)),
        (None, None) => Err(error("session_id", "is required (or callid)".to_owned())),
    }
}

/// `Subscribe`: the tenant's call events, all or one session's or one Call-ID's, from after
/// stream sequence `since` (or from now).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Only this session's events (decimal, as `CallList` gives it).
    #[serde(default)]
    pub session_id: Option<String>,
    /// Only this Call-ID's events (and those naming it as a transfer's new call).
    #[serde(default)]
    pub callid: Option<CallId>,
    /// Resume after this event sequence (the last one received); none: from now.
    #[serde(default)]
    pub since: Option<u64>,
    /// Only the events of calls this extension (a SIP URI's user part, e.g. `1001`) is a party
    /// of.
    #[serde(default)]
    pub extension: Option<String>,
}

/// Whether `text` may be a `cmd_id`: 1 to 128 printable ASCII characters.
pub fn is_cmd_id(text: &str) -> bool {
    !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_graphic())
}

/// `CommandAttach`: the command to re-attach to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    /// Its `cmd_id`.
    pub cmd_id: String,
}

/// The `cmd_id` `CommandAttach` params name.
pub fn attach(params: Map<String, Value>) -> Result<String, ParamsError> {
    let p: AttachParams = typed(params, &[])?;
    if is_cmd_id(&p.cmd_id) {
        Ok(p.cmd_id)
    } else {
        Err(error(
            "cmd_id",
            "must be 1 to 128 printable ASCII characters".to_owned(),
        ))
    }
}

/// What a `Subscribe` picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter {
    /// Only this session's.
    pub session_id: Option<u64>,
    /// Only this Call-ID's.
    pub callid: Option<String>,
    /// Resume after this sequence.
    pub since: Option<u64>,
    /// Only the calls of this extension.
    pub extension: Option<String>,
}

/// The filter `Subscribe` params make.
pub fn subscription(params: Map<String, Value>) -> Result<EventFilter, ParamsError> {
    let p: SubscribeParams = typed(params, &[])?;
    let session_id = p
        .session_id
        .map(|id| {
            id.parse::<u64>()
                .ok()
                .filter(|id| *id > 0 && *id <= i64::MAX as u64)
                .ok_or_else(|| {
                    error(
                        "session_id",
                        "must be a session id (a positive int64 in decimal)".to_owned(),
                    )
                })
        })
        .transpose()?;
    let extension = p
        .extension
        .map(|ext| {
            let fits = (1..=64).contains(&ext.len())
                && ext
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b':' | b';'));
            if fits {
                Ok(ext)
            } else {
                Err(error(
                    "extension",
                    "must be 1 to 64 printable characters, without @, : or ; (a SIP user part such as 1001)"
                        .to_owned(),
                ))
            }
        })
        .transpose()?;
    Ok(EventFilter {
        session_id,
        callid: p.callid.map(|c| c.0),
        since: p.since,
        extension,
    })
}

/// The selection `CallList` params make.
pub fn list(params: Map<String, Value>) -> Result<ListSelection, ParamsError> {
    typed::<ListParams>(params, &[])?.selection()
}

/// Why params were refused: the field at fault (`params` for the whole object) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamsError {
    /// The field, as the client spelled it.
    pub field: String,
    /// Why, in a few words (bounded: never echoes long client text).
    pub reason: String,
}

/// Longest reason given; serde quotes client values (an unknown enum variant, say).
const MAX_REASON: usize = 160;

/// The command `params` describe for `kind`.
pub fn command(kind: CommandKind, params: Map<String, Value>) -> Result<Command, ParamsError> {
    Ok(match kind {
        CommandKind::CallStart => {
            let (parties, rest): (Map<String, Value>, Map<String, Value>) = params
                .into_iter()
                .partition(|(key, _)| key == "caller" || key == "callee");
            let p: CallStartParams = typed(parties, &[])?;
            let options: StartOptions = typed(rest, &[])?;
            // The trunk's address is filled in by [`resolve_trunk`].
            let trunk = options.trunk.clone().map(|name| pb::Trunk {
                name,
                uri: String::new(),
            });
            let options = (options != StartOptions::default())
                .then(|| options.to_proto(trunk))
                .transpose()?
                .map(Box::new);
            Command::CallStart(pb::CallStart {
                caller: p.caller.0,
                callee: p.callee.0,
                callid: String::new(),
                options,
            })
        }
        CommandKind::BlindTransfer => {
            let p: BlindTransferParams = typed(params, &[])?;
            Command::BlindTransfer(pb::CallBlindTransfer {
                callid: p.callid.0,
                leg: pb::Leg::from(p.leg) as i32,
                destination: p.destination.0,
            })
        }
        CommandKind::AttendedTransfer => {
            let aliases = [
                ("callid_a", "callidA"),
                ("leg_a", "legA"),
                ("callid_b", "callidB"),
                ("leg_b", "legB"),
            ];
            let p: AttendedTransferParams = typed(params, &aliases)?;
            Command::AttendedTransfer(pb::CallAttendedTransfer {
                callid_a: p.callid_a.0,
                leg_a: pb::Leg::from(p.leg_a) as i32,
                callid_b: p.callid_b.0,
                leg_b: pb::Leg::from(p.leg_b) as i32,
                destination: p.destination.map(|uri| uri.0).unwrap_or_default(),
            })
        }
        CommandKind::Hold | CommandKind::Unhold => {
            let p: HoldParams = typed(params, &[])?;
            let (callid, leg) = (p.callid.0, hold_leg(p.leg) as i32);
            if kind == CommandKind::Hold {
                Command::Hold(pb::CallHold { callid, leg })
            } else {
                Command::Unhold(pb::CallUnhold { callid, leg })
            }
        }
        CommandKind::End => {
            let p: EndParams = typed(params, &[])?;
            Command::End(pb::CallEnd { callid: p.callid.0 })
        }
    })
}

/// Reads `params` as `T`, naming the field of any error. `aliases` pairs each field with its
/// other spelling: both given is an error on the field.
fn typed<T: DeserializeOwned>(
    mut params: Map<String, Value>,
    aliases: &[(&str, &str)],
) -> Result<T, ParamsError> {
    for (field, alias) in aliases {
        if params.contains_key(*field) && params.contains_key(*alias) {
            return Err(error(field, format!("is given twice (also as {alias})")));
        }
    }
    // An explicit null is the same as leaving a field out.
    params.retain(|_, value| !value.is_null());
    serde_path_to_error::deserialize(Value::Object(params)).map_err(|err| {
        let mut refused = serde_error(&err, "is not a parameter of this method");
        if refused.field == "." {
            refused.field = "params".to_owned();
        }
        refused
    })
}

/// The field at fault and why, from serde's error reading one of our param or body structs
/// (`.` for the value as a whole); `unknown` is what an unknown field is told. The JSON-RPC
/// params and the REST bodies both read their errors here.
pub fn serde_error<E: std::fmt::Display>(
    err: &serde_path_to_error::Error<E>,
    unknown: &str,
) -> ParamsError {
    let inner = err.inner().to_string();
    // serde_json's position ("… at line 1 column 9") says nothing the field does not.
    let inner = inner
        .rsplit_once(" at line ")
        .map_or(inner.as_str(), |(message, _)| message);
    // serde reports these on the object, naming the field in its message.
    for (prefix, reason) in [
        ("missing field `", "is required"),
        ("unknown field `", unknown),
    ] {
        if let Some((field, _)) = inner
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
        {
            return error(field, reason.to_owned());
        }
    }
    error(&err.path().to_string(), describe(inner))
}

fn error(field: &str, reason: String) -> ParamsError {
    ParamsError {
        field: crate::rpc::clip(field).into_owned(),
        reason,
    }
}

/// serde's message in our words: "must be …" for a wrong type, else as it is, bounded.
fn describe(inner: &str) -> String {
    let text = match inner.strip_prefix("invalid type: ") {
        Some(rest) => match rest.split_once(", expected ") {
            Some((got, expected)) => format!("must be {expected}, not {}", got_kind(got)),
            None => inner.to_owned(),
        },
        None => match inner.strip_prefix("unknown variant ") {
            Some(rest) => match rest.split_once(", expected ") {
                Some((_, expected)) => format!("must be {}", expected.replace('`', "\"")),
                None => inner.to_owned(),
            },
            None => inner.to_owned(),
        },
    };
    crate::rpc::clip_to(&text, MAX_REASON).into_owned()
}

/// "integer `5`" → "a number": the kind of JSON value, never the value.
fn got_kind(got: &str) -> &'static str {
    match got.split([' ', '`']).next().unwrap_or_default() {
        "integer" | "floating" => "a number",
        "boolean" => "a boolean",
        "string" => "a string",
        "sequence" => "an array",
        "map" => "an object",
        "null" | "unit" => "null",
        _ => "this",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parties_must_be_in_the_tenants_domains_but_a_trunks_callee() {
        let domains = ["acme.example".to_owned(), "10.0.0.1".to_owned()];
        let start = |caller: &str, callee: &str, trunk: bool| {
            Command::CallStart(pb::CallStart {
                caller: caller.into(),
                callee: callee.into(),
                options: trunk.then(|| {
                    Box::new(pb::CallOptions {
                        trunk: Some(pb::Trunk::default()),
                        ..Default::default()
                    })
                }),
                ..Default::default()
            })
        };
        let field = |result: Result<(), ParamsError>| result.err().map(|e| e.field);
        let ok = start("sip:1001@ACME.example", "sip:1002@10.0.0.1:5060", false);
        assert_eq!(field(check_domains(&ok, &domains)), None);
        let foreign_caller = start("sip:1001@globex.example", "sip:1002@acme.example", false);
        assert_eq!(
            field(check_domains(&foreign_caller, &domains)),
            Some("caller".into())
        );
        let outside = start("sip:1001@acme.example", "sip:+15551234@carrier.net", false);
        assert_eq!(
            field(check_domains(&outside, &domains)),
            Some("callee".into())
        );
        let via_trunk = start("sip:1001@acme.example", "sip:+15551234@carrier.net", true);
        assert_eq!(field(check_domains(&via_trunk, &domains)), None);
        let transfer = Command::BlindTransfer(pb::CallBlindTransfer {
            destination: "sip:x@evil.example".into(),
            ..Default::default()
        });
        assert_eq!(
            field(check_domains(&transfer, &domains)),
            Some("destination".into())
        );
        assert_eq!(field(check_domains(&transfer, &[])), None, "no tenants");
    }

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn refused(kind: CommandKind, value: Value) -> ParamsError {
        command(kind, params(value)).expect_err("refused")
    }

    #[test]
    fn call_start_takes_portsips_create_fields() {
        let start = command(
            CommandKind::CallStart,
            params(
                json!({"caller": "sip:a@h", "callee": "sip:b@h", "send_sdp": false,
                "user_data": "crm-1", "trunk": "carrier", "rewrite_pai": "4930",
                "additional_header": "ANSWER_MODE", "header_direction": "CALLEE"}),
            ),
        );
        let Ok(Command::CallStart(start)) = start else {
            panic!("{start:?}")
        };
        let options = start.options.expect("options");
        assert!(options.late_offer);
        assert_eq!(options.user_data, "crm-1");
        assert_eq!(options.rewrite_pai, "4930");
        assert_eq!(options.auto_answer(), pb::AutoAnswer::AnswerMode);
        assert_eq!(options.header_direction(), pb::HeaderDirection::Callee);
        let mut start_command = Command::CallStart(pb::CallStart {
            options: Some(options),
            ..Default::default()
        });
        let trunks = [crate::TrunkConfig {
            name: "carrier".into(),
            uri: "sip:203.0.113.7".into(),
            rewrites: None,
        }];
        assert_eq!(resolve_trunk(&mut start_command, &trunks), Ok(()));
        let Command::CallStart(resolved) = &start_command else {
            panic!()
        };
        assert_eq!(
            resolved.options.as_ref().and_then(|o| o.trunk.clone()),
            Some(pb::Trunk {
                name: "carrier".into(),
                uri: "sip:203.0.113.7".into()
            })
        );
        assert_eq!(
            resolve_trunk(&mut start_command, &[]).map_err(|e| e.field),
            Err("trunk".to_owned())
        );
        let bad = command(
            CommandKind::CallStart,
            params(json!({"caller": "sip:a@h", "callee": "sip:b@h", "user_data": "a\r\nb"})),
        );
        assert_eq!(bad.map_err(|e| e.field), Err("user_data".to_owned()));
    }

    #[test]
    fn the_documents_params_give_their_commands() {
        let start = command(
            CommandKind::CallStart,
            params(json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"})),
        );
        assert_eq!(
            start,
            Ok(Command::CallStart(pb::CallStart {
                caller: "sip:alice@127.0.0.1".into(),
                callee: "sip:bob@127.0.0.1".into(),
                callid: String::new(),
                options: None,
            }))
        );
        let attended = command(
            CommandKind::AttendedTransfer,
            params(json!({"callidA": "a", "legA": "caller", "callid_b": "b", "leg_b": "callee"})),
        );
        assert_eq!(
            attended,
            Ok(Command::AttendedTransfer(pb::CallAttendedTransfer {
                callid_a: "a".into(),
                leg_a: pb::Leg::Caller as i32,
                callid_b: "b".into(),
                leg_b: pb::Leg::Callee as i32,
                destination: String::new(),
            }))
        );
        let hold = command(
            CommandKind::Unhold,
            params(json!({"callid": "x", "leg": null})),
        );
        assert_eq!(
            hold,
            Ok(Command::Unhold(pb::CallUnhold {
                callid: "x".into(),
                leg: pb::Leg::Unspecified as i32,
            }))
        );
    }

    #[test]
    fn every_error_names_its_field_in_plain_words() {
        let cases = [
            (
                CommandKind::CallStart,
                json!({"caller": 1, "callee": "sip:b@c"}),
                "caller",
                "must be a SIP URI string, not a number",
            ),
            (
                CommandKind::CallStart,
                json!({"caller": "sip:a@b"}),
                "callee",
                "is required",
            ),
            (
                CommandKind::CallStart,
                json!({"caller": "sip:a@b", "callee": null}),
                "callee",
                "is required",
            ),
            (
                CommandKind::CallStart,
                json!({"caller": "sip:a@b", "callee": "bob"}),
                "callee",
                "",
            ),
            (
                CommandKind::CallStart,
                json!({"caller": "sip:a@b", "callee": "sip:b@c", "extra": true}),
                "extra",
                "is not a parameter of this method",
            ),
            (
                CommandKind::BlindTransfer,
                json!({"callid": "x", "leg": "sideways", "destination": "sip:c@d"}),
                "leg",
                "must be \"caller\" or \"callee\"",
            ),
            (
                CommandKind::Hold,
                json!({"callid": "x", "leg": 3}),
                "leg",
                "must be",
            ),
            (
                CommandKind::AttendedTransfer,
                json!({"callid_a": "a", "callidA": "a", "leg_a": "caller", "callid_b": "b", "leg_b": "callee"}),
                "callid_a",
                "is given twice (also as callidA)",
            ),
            (
                CommandKind::End,
                json!({"callid": ""}),
                "callid",
                "must not be empty",
            ),
            (
                CommandKind::End,
                json!({"callid": ["x"]}),
                "callid",
                "not an array",
            ),
        ];
        for (kind, value, field, reason) in cases {
            let err = refused(kind, value.clone());
            assert_eq!(err.field, field, "{value}");
            assert!(
                err.reason.starts_with(reason) || err.reason.contains(reason),
                "{value}: {}",
                err.reason
            );
        }
    }

    #[test]
    fn client_text_in_errors_is_bounded() {
        let long = "x".repeat(10_000);
        let err = refused(
            CommandKind::CallStart,
            json!({"caller": "sip:a@b", "callee": "sip:b@c", long.clone(): 1}),
        );
        assert!(err.field.len() < 100, "{}", err.field);
        let err = refused(
            CommandKind::BlindTransfer,
            json!({"callid": "x", "leg": long, "destination": "sip:c@d"}),
        );
        assert!(err.reason.len() <= MAX_REASON + 20, "{}", err.reason);
    }
}
