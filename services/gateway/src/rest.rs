//! The REST API under `/api`, PortSIP PBX v22's sessions API path for path
//! (`../shared/seeds/portsip-sessions-api-v22.md`): a thin adapter over the command core and
//! the live view, as the WebSocket one is. Errors are RFC 9457 problem+json with a stable
//! `code` (the WebSocket error codes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use callapi_kit::subjects::CommandKind;
use callapi_kit::validate;
use callapi_proto::v1::{self as pb, command_request::Command, notification};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::core::{Attachment, CommandClient, NotificationSink, SubmitError};
use crate::sessions::{self, Session, SessionView};

/// An RFC 9457 problem: status, a stable code, and what went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    field: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            field: None,
        }
    }

    fn field(field: &str, reason: impl std::fmt::Display) -> Self {
        let field = crate::rpc::clip(field).into_owned();
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "INVALID_FIELD",
            detail: format!("{field} {reason}"),
            field: Some(field),
        }
    }

    /// The problem for a command's `Error`.
    fn of_command(error: &pb::CommandError) -> Self {
        use pb::ErrorCode as E;
        let status = match error.code() {
            E::DialogNotFound => StatusCode::NOT_FOUND,
            E::TransferPending | E::AlreadyHeld | E::NotHeld | E::DialogNotReady => {
                StatusCode::CONFLICT
            }
            E::NotSupported => StatusCode::UNPROCESSABLE_ENTITY,
            E::NodeUnreachable | E::NodeOverloaded => StatusCode::SERVICE_UNAVAILABLE,
            E::Timeout => StatusCode::GATEWAY_TIMEOUT,
            E::InternalError | E::Unspecified => StatusCode::INTERNAL_SERVER_ERROR,
            E::CallFailed
            | E::TransferFailed
            | E::HoldFailed
            | E::OpensipsError
            | E::CommandLost => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, error.code().protocol_name(), error.message.clone())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let mut body = json!({
            "type": format!("urn:callapi:error:{}", self.code),
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if let (Some(field), Some(map)) = (self.field, body.as_object_mut()) {
            map.insert("field".into(), field.into());
        }
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// Where the first notification of each REST command goes, for the handler waiting for it.
#[derive(Default)]
struct Waiters {
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<notification::Kind>>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<notification::Kind>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl NotificationSink for Waiters {
    fn deliver(&self, cmd_id: String, kind: notification::Kind) {
        if let Some(waiter) = self.lock().get(&cmd_id) {
            let _ = waiter.send(kind);
        }
    }
}

/// What the REST handlers share.
pub struct Rest {
    commands: CommandClient,
    attachment: Attachment,
    waiters: Arc<Waiters>,
    sessions: Option<SessionView>,
    sip_domain: String,
    outcome_wait: Duration,
}

impl Rest {
    /// REST for clients of `tenant` (until authentication names it per request).
    pub fn new(
        commands: CommandClient,
        sessions: Option<SessionView>,
        tenant: &str,
        sip_domain: &str,
        outcome_wait: Duration,
    ) -> Self {
        let waiters = Arc::new(Waiters::default());
        let attachment = commands.attach(tenant, waiters.clone());
        Self {
            commands,
            attachment,
            waiters,
            sessions,
            sip_domain: sip_domain.to_owned(),
            outcome_wait,
        }
    }

    fn view(&self) -> Result<&SessionView, Problem> {
        self.sessions.as_ref().ok_or_else(|| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the session store is not available on this gateway",
            )
        })
    }

    fn tenant(&self) -> &str {
        self.attachment.origin().tenant()
    }

    fn session(&self, id: &str) -> Result<Session, Problem> {
        let id = session_id(id).ok_or_else(|| {
            Problem::field("id", "must be a session id (a positive int64 in decimal)")
        })?;
        self.view()?.get(self.tenant(), id).ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                format!("no session {id}"),
            )
        })
    }

    /// Submits a command; waits (a little) for its first notification so a failure known at
    /// once is the answer; otherwise the command was accepted.
    async fn run(&self, kind: CommandKind, command: Command) -> Result<(), Problem> {
        let cmd_id = uuid::Uuid::new_v4().to_string();
        let (waiter, mut first) = mpsc::unbounded_channel();
        self.waiters.lock().insert(cmd_id.clone(), waiter);
        let outcome = self.wait_first(&cmd_id, kind, command, &mut first).await;
        self.waiters.lock().remove(&cmd_id);
        outcome
    }

    async fn wait_first(
        &self,
        cmd_id: &str,
        kind: CommandKind,
        command: Command,
        first: &mut mpsc::UnboundedReceiver<notification::Kind>,
    ) -> Result<(), Problem> {
        self.commands
            .submit(self.attachment.origin(), cmd_id, kind, command)
            .await
            .map_err(|err| match err {
                SubmitError::Unavailable(reason) => {
                    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", reason)
                }
                SubmitError::Refused(reason) => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "REFUSED", reason)
                }
            })?;
        match tokio::time::timeout(self.outcome_wait, first.recv()).await {
            Ok(Some(notification::Kind::Error(error))) => Err(Problem::of_command(&error)),
            _ => Ok(()),
        }
    }

    /// A number (extension or PSTN) as a SIP URI in the tenant's domain; a SIP URI as it is.
    fn uri_of(&self, field: &str, number: &str) -> Result<String, Problem> {
        let uri = if number.starts_with("sip:")
            || number.starts_with("sips:")
            || number.starts_with("tel:")
        {
            number.to_owned()
        } else {
            format!("sip:{number}@{}", self.sip_domain)
        };
        validate::sip_uri(&uri).map_err(|why| Problem::field(field, why))?;
        Ok(uri)
    }
}

fn session_id(text: &str) -> Option<u64> {
    text.parse::<u64>()
        .ok()
        .filter(|id| *id > 0 && *id <= i64::MAX as u64)
}

/// The routes under `/api`.
pub fn router(rest: Arc<Rest>) -> axum::Router {
    axum::Router::new()
        .route("/api/sessions", get(list).post(create))
        .route("/api/sessions/directly", get(directly))
        .route("/api/sessions/{id}", get(get_one))
        .route("/api/sessions/{id}/destroy", post(destroy))
        .route("/api/sessions/{id}/hold", post(hold))
        .route("/api/sessions/{id}/unhold", post(unhold))
        .route("/api/sessions/{id}/refer", post(refer))
        .route("/api/sessions/{id}/attended_refer", post(attended_refer))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such resource") })
        .with_state(rest)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The query of `GET /sessions` (v22 list parameters).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    filter: Option<String>,
    orderby: Option<String>,
    skip: Option<String>,
    top: Option<String>,
}

fn query_problem(rejection: QueryRejection) -> Problem {
    let text = rejection.body_text();
    match text
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
    {
        Some((field, _)) => Problem::field(field, "is not a parameter of this operation"),
        None => Problem::field("query", crate::rpc::clip_to(&text, 160)),
    }
}

async fn list(
    State(rest): State<Arc<Rest>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let Query(query) = query.map_err(query_problem)?;
    let top = match query.top.as_deref() {
        None => 100,
        Some(top) => top
            .parse::<usize>()
            .ok()
            .filter(|t| (1..=100).contains(t))
            .ok_or_else(|| Problem::field("top", "must be an integer from 1 to 100"))?,
    };
    let skip = match query.skip.as_deref() {
        None => 0,
        Some(skip) => skip
            .parse::<u32>()
            .ok()
            .filter(|s| i32::try_from(*s).is_ok())
            .ok_or_else(|| Problem::field("skip", "must be an integer from 0 to 2147483647"))?
            as usize,
    };
    let descending = match query.orderby.as_deref().map(str::trim) {
        None | Some("started_at") | Some("started_at asc") => false,
        Some("started_at desc") => true,
        Some(_) => {
            return Err(Problem::field(
                "orderby",
                "must be \"started_at\", \"started_at asc\" or \"started_at desc\"",
            ));
        }
    };
    if query.filter.as_ref().is_some_and(|f| f.len() > 256) {
        return Err(Problem::field("filter", "is longer than 256 characters"));
    }
    let mut found: Vec<Session> = rest.view()?.list(rest.tenant());
    if let Some(filter) = query.filter.as_deref().filter(|f| !f.is_empty()) {
        found.retain(|s| {
            s.calls.iter().any(|c| {
                c.caller_uri.contains(filter) || c.callee_uri.contains(filter) || c.callid == filter
            })
        });
    }
    // The view lists newest first.
    if !descending {
        found.reverse();
    }
    let now = now_ms();
    let items: Vec<Value> = found
        .iter()
        .skip(skip)
        .take(top)
        .map(|s| sessions::to_json(s, now))
        .collect();
    Ok(Json(json!({"count": found.len(), "items": items})))
}

async fn get_one(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let session = rest.session(&id)?;
    Ok(Json(sessions::to_json(&session, now_ms())))
}

async fn directly() -> Problem {
    Problem::new(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "GET /api/sessions/directly authenticates with an extension's password, which needs tenants and their extensions (not configured in this version): use POST /api/sessions",
    )
}

/// `POST /sessions`: PortSIP's table B.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    caller: String,
    callee: String,
    send_sdp: bool,
    caller_display_name: Option<String>,
    trunk: Option<String>,
    rewrite_from: Option<String>,
    rewrite_pai: Option<String>,
    rewrite_rpi: Option<String>,
    user_data: Option<String>,
    target: Option<String>,
    target_instance_id: Option<String>,
    target_extension_number: Option<String>,
    additional_header: Option<AdditionalHeader>,
    header_direction: Option<HeaderDirection>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum AdditionalHeader {
    AnswerMode,
    CallInfo,
    AlertInfoAutoAnswerDelay0,
    AlertInfoAutoAnswer,
    AlertInfoIntercom,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum HeaderDirection {
    Caller,
    Callee,
    All,
}

fn json_problem(rejection: JsonRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BODY_TOO_LARGE",
            "the body is larger than 64 KiB",
        );
    }
    let text = rejection.body_text();
    if matches!(rejection, JsonRejection::MissingJsonContentType(_)) {
        return Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "INVALID_BODY",
            "the body must be JSON (Content-Type: application/json)",
        );
    }
    // serde's words name the field: "missing field `x`", "unknown field `x`", "... at line".
    for (prefix, reason) in [
        ("missing field `", "is required"),
        ("unknown field `", "is not a field of this operation"),
    ] {
        if let Some((field, _)) = text
            .split_once(prefix)
            .and_then(|(_, rest)| rest.split_once('`'))
        {
            return Problem::field(field, reason);
        }
    }
    Problem::new(
        StatusCode::BAD_REQUEST,
        "INVALID_BODY",
        crate::rpc::clip_to(&text, 200).into_owned(),
    )
}

/// Checks a string field's length (in characters) against PortSIP's limits.
fn bounded(field: &str, value: &Option<String>, min: usize, max: usize) -> Result<(), Problem> {
    match value {
        Some(v) if v.chars().count() < min || v.chars().count() > max => Err(Problem::field(
            field,
            format!("must be {min} to {max} characters"),
        )),
        _ => Ok(()),
    }
}

fn extension(field: &str, value: &str) -> Result<(), Problem> {
    if (3..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Problem::field(field, "must be 3 to 64 digits"))
    }
}

async fn create(
    State(rest): State<Arc<Rest>>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Json<Value>, Problem> {
    let Json(body) = body.map_err(json_problem)?;
    bounded("caller", &Some(body.caller.clone()), 1, 256)?;
    bounded("callee", &Some(body.callee.clone()), 1, 256)?;
    bounded("caller_display_name", &body.caller_display_name, 0, 1024)?;
    bounded("trunk", &body.trunk, 1, 64)?;
    bounded("rewrite_from", &body.rewrite_from, 1, 16)?;
    bounded("rewrite_pai", &body.rewrite_pai, 1, 16)?;
    bounded("rewrite_rpi", &body.rewrite_rpi, 1, 16)?;
    bounded("user_data", &body.user_data, 0, 128)?;
    bounded("target", &body.target, 0, 128)?;
    bounded("target_instance_id", &body.target_instance_id, 0, 128)?;
    bounded(
        "target_extension_number",
        &body.target_extension_number,
        0,
        128,
    )?;
    let caller = rest.uri_of("caller", &body.caller)?;
    let callee = rest.uri_of("callee", &body.callee)?;
    // Fields whose SIP effect needs what this version does not have yet are refused, not
    // silently ignored.
    let not_yet = [
        ("trunk", body.trunk.is_some()),
        ("rewrite_from", body.rewrite_from.is_some()),
        ("rewrite_pai", body.rewrite_pai.is_some()),
        ("rewrite_rpi", body.rewrite_rpi.is_some()),
        ("user_data", body.user_data.is_some()),
        ("target", body.target.is_some()),
        ("target_instance_id", body.target_instance_id.is_some()),
        (
            "target_extension_number",
            body.target_extension_number.is_some(),
        ),
        ("additional_header", body.additional_header.is_some()),
        ("caller_display_name", body.caller_display_name.is_some()),
        ("send_sdp", !body.send_sdp),
    ];
    // header_direction only says where additional_header goes: ignored without it (PortSIP).
    let _ = body.header_direction;
    if let Some((field, _)) = not_yet.iter().find(|(_, given)| *given) {
        return Err(Problem {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "NOT_SUPPORTED",
            detail: format!("{field} is not supported by this version yet"),
            field: Some((*field).to_owned()),
        });
    }
    let callid = uuid::Uuid::new_v4().to_string();
    let id = callapi_kit::calls::session_id(rest.tenant(), &callid);
    let command = Command::CallStart(pb::CallStart {
        caller,
        callee,
        callid,
    });
    let cmd_id = uuid::Uuid::new_v4().to_string();
    rest.commands
        .submit(
            rest.attachment.origin(),
            &cmd_id,
            CommandKind::CallStart,
            command,
        )
        .await
        .map_err(|err| match err {
            SubmitError::Unavailable(reason) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", reason)
            }
            SubmitError::Refused(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "REFUSED", reason)
            }
        })?;
    Ok(Json(json!({"id": id.to_string()})))
}

/// Bodies naming the extension on whose behalf an operation is done.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtensionBody {
    extension_number: String,
}

/// The live dialogs of a session, newest first.
fn live_calls(session: &Session) -> Vec<&pb::CallRecord> {
    let mut live: Vec<&pb::CallRecord> = session
        .calls
        .iter()
        .filter(|c| c.state() != pb::DialogState::Deleted)
        .collect();
    live.reverse();
    live
}

/// In the session's answered dialogs, the one where `extension` is a party, and which party
/// it is.
fn party_of<'a>(
    session: &'a Session,
    extension: &str,
) -> Result<(&'a pb::CallRecord, pb::Leg), Problem> {
    for call in live_calls(session) {
        if sessions::user_part(&call.caller_uri) == extension {
            return Ok((call, pb::Leg::Caller));
        }
        if sessions::user_part(&call.callee_uri) == extension {
            return Ok((call, pb::Leg::Callee));
        }
    }
    Err(Problem {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "NOT_A_PARTY",
        detail: format!("extension {extension} is not a party of this session"),
        field: Some("extension_number".to_owned()),
    })
}

fn other(leg: pb::Leg) -> pb::Leg {
    match leg {
        pb::Leg::Caller => pb::Leg::Callee,
        _ => pb::Leg::Caller,
    }
}

async fn destroy(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let session = rest.session(&id)?;
    let live = live_calls(&session);
    if live.is_empty() {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "the session has ended",
        ));
    }
    for call in live {
        let end = Command::End(pb::CallEnd {
            callid: call.callid.clone(),
        });
        match rest.run(CommandKind::End, end).await {
            // Ended meanwhile: that is what was asked.
            Err(problem) if problem.code == "DIALOG_NOT_FOUND" => {}
            other => other?,
        }
    }
    Ok(StatusCode::OK)
}

async fn hold_or_unhold(
    rest: &Rest,
    id: &str,
    body: Result<Json<ExtensionBody>, JsonRejection>,
    hold: bool,
) -> Result<StatusCode, Problem> {
    let Json(body) = body.map_err(json_problem)?;
    extension("extension_number", &body.extension_number)?;
    let session = rest.session(id)?;
    let (call, holder) = party_of(&session, &body.extension_number)?;
    // The extension holds the call: the other party is put on hold.
    let (callid, leg) = (call.callid.clone(), other(holder) as i32);
    let (kind, command) = if hold {
        (
            CommandKind::Hold,
            Command::Hold(pb::CallHold { callid, leg }),
        )
    } else {
        (
            CommandKind::Unhold,
            Command::Unhold(pb::CallUnhold { callid, leg }),
        )
    };
    rest.run(kind, command).await?;
    Ok(StatusCode::OK)
}

async fn hold(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
    body: Result<Json<ExtensionBody>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    hold_or_unhold(&rest, &id, body, true).await
}

async fn unhold(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
    body: Result<Json<ExtensionBody>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    hold_or_unhold(&rest, &id, body, false).await
}

/// `POST /sessions/{id}/refer`: the extension transfers the call: the other party goes to
/// `refer_to`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferBody {
    extension_number: String,
    refer_to: String,
}

async fn refer(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
    body: Result<Json<ReferBody>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let Json(body) = body.map_err(json_problem)?;
    extension("extension_number", &body.extension_number)?;
    bounded("refer_to", &Some(body.refer_to.clone()), 1, 256)?;
    let destination = rest.uri_of("refer_to", &body.refer_to)?;
    let session = rest.session(&id)?;
    let (call, transferor) = party_of(&session, &body.extension_number)?;
    let command = Command::BlindTransfer(pb::CallBlindTransfer {
        callid: call.callid.clone(),
        leg: other(transferor) as i32,
        destination,
    });
    rest.run(CommandKind::BlindTransfer, command).await?;
    Ok(StatusCode::OK)
}

/// `POST /sessions/{id}/attended_refer` (PortSIP's table E).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttendedReferBody {
    extension_number: String,
    refer_to_1: String,
    session_1: Option<String>,
    refer_to_2: String,
    session_2: Option<String>,
}

/// In `session`, the party `number` talks with `extension` in, and its leg.
fn counterpart<'a>(
    session: &'a Session,
    extension: &str,
    number: &str,
) -> Option<(&'a pb::CallRecord, pb::Leg)> {
    live_calls(session).into_iter().find_map(|call| {
        let (caller, callee) = (
            sessions::user_part(&call.caller_uri),
            sessions::user_part(&call.callee_uri),
        );
        if caller == extension && callee == number {
            Some((call, pb::Leg::Callee))
        } else if callee == extension && caller == number {
            Some((call, pb::Leg::Caller))
        } else {
            None
        }
    })
}

async fn attended_refer(
    State(rest): State<Arc<Rest>>,
    Path(id): Path<String>,
    body: Result<Json<AttendedReferBody>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let Json(body) = body.map_err(json_problem)?;
    extension("extension_number", &body.extension_number)?;
    bounded("refer_to_1", &Some(body.refer_to_1.clone()), 1, 256)?;
    bounded("refer_to_2", &Some(body.refer_to_2.clone()), 1, 256)?;
    let find = |number: &str, session: Option<&str>, field: &'static str| {
        let sessions: Vec<Session> = match session {
            Some(id) => vec![rest.session(id)?],
            None => rest.view()?.list(rest.tenant()),
        };
        sessions
            .iter()
            .find_map(|s| {
                counterpart(s, &body.extension_number, number)
                    .map(|(call, leg)| (call.callid.clone(), leg))
            })
            .ok_or_else(|| Problem {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "NOT_A_PARTY",
                detail: format!(
                    "no call between extension {} and {number} found",
                    body.extension_number
                ),
                field: Some(field.to_owned()),
            })
    };
    let session_1 = body.session_1.clone().unwrap_or(id);
    let (callid_a, leg_a) = find(&body.refer_to_1, Some(&session_1), "refer_to_1")?;
    let (callid_b, leg_b) = find(&body.refer_to_2, body.session_2.as_deref(), "refer_to_2")?;
    let command = Command::AttendedTransfer(pb::CallAttendedTransfer {
        callid_a,
        leg_a: leg_a as i32,
        callid_b,
        leg_b: leg_b as i32,
        destination: String::new(),
    });
    rest.run(CommandKind::AttendedTransfer, command).await?;
    Ok(StatusCode::OK)
}
