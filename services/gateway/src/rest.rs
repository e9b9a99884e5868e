//! The REST API under `/api`, PortSIP PBX v22's sessions API path for path
//! (`../shared/seeds/portsip-sessions-api-v22.md`): a thin adapter over the command core and
//! the live view, as the WebSocket one is. Errors are RFC 9457 problem+json with a stable
//! `code` (the WebSocket error codes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
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
use crate::params::{self, AdditionalHeader, HeaderDirection, StartOptions};
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

impl From<SubmitError> for Problem {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Unavailable(reason) => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", reason)
            }
            SubmitError::Refused(reason) => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "REFUSED", reason)
            }
        }
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

/// How long a session created over REST is shown from what the gateway knows, while OpenSIPS
/// has not reported its first call yet (or after its command ended without one).
const PROVISIONAL_TTL: Duration = Duration::from_secs(10);

/// How long a create's failure can still be recorded: longer than any CallStart's deadline.
const START_KEPT: Duration = Duration::from_secs(600);

/// A session created here that the store does not show yet.
struct Provisional {
    session: Session,
    cmd_id: String,
    until: std::time::Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// At most this many provisional sessions are kept (creates beyond it are not shown until the
/// store has them).
const MAX_PROVISIONAL: usize = 10_000;

/// Sessions created here that the store does not show yet, by id and by their command.
#[derive(Default)]
struct Provisionals {
    by_id: HashMap<u64, Provisional>,
    by_cmd: HashMap<String, u64>,
}

impl Provisionals {
    fn prune(&mut self, now: std::time::Instant, shown: &std::collections::HashSet<u64>) {
        self.by_id
            .retain(|id, p| p.until > now && !shown.contains(id));
        let by_id = &self.by_id;
        self.by_cmd.retain(|_, id| by_id.contains_key(id));
    }

    fn insert(&mut self, id: u64, entry: Provisional) {
        self.prune(std::time::Instant::now(), &Default::default());
        if self.by_id.len() < MAX_PROVISIONAL {
            self.by_cmd.insert(entry.cmd_id.clone(), id);
            self.by_id.insert(id, entry);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.by_id.remove(&id) {
            self.by_cmd.remove(&entry.cmd_id);
        }
    }
}

/// Where the notifications of REST commands go: the first one to the handler waiting for it;
/// the end of a create to its provisional session (so a call that fails at once shows ended).
#[derive(Default)]
struct Waiters {
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<notification::Kind>>>,
    provisional: Mutex<Provisionals>,
    /// The creates in flight, by command: where a failure is recorded (dropped after
    /// [`START_KEPT`] if no end ever came).
    starts: Mutex<HashMap<String, (pb::SessionMeta, std::time::Instant)>>,
    /// The live view, to record failures in.
    view: Option<SessionView>,
}

impl NotificationSink for Waiters {
    fn deliver(&self, cmd_id: String, _attempt: u64, kind: notification::Kind) {
        let ended = matches!(kind, notification::Kind::Ended(_));
        if let notification::Kind::Error(error) = &kind
            && let Some((meta, _)) = lock(&self.starts).remove(&cmd_id)
            && let Some(view) = self.view.clone()
        {
            let error = error.clone();
            tokio::spawn(async move {
                if let Err(err) = view.record_failure(meta, &error).await {
                    tracing::warn!(%err, "cannot record why a session ended");
                }
            });
        }
        if ended {
            lock(&self.starts).remove(&cmd_id);
        }
        if let Some(waiter) = lock(&self.waiting).get(&cmd_id) {
            let _ = waiter.send(kind);
        }
        if ended {
            let mut provisional = lock(&self.provisional);
            if let Some(id) = provisional.by_cmd.get(&cmd_id).copied()
                && let Some(entry) = provisional.by_id.get_mut(&id)
            {
                for call in &mut entry.session.calls {
                    call.state = pb::DialogState::Deleted as i32;
                }
            }
        }
    }
}

impl Waiters {
    /// The provisional sessions still to show (the store's own take over once it has them).
    fn provisional(&self, view: &SessionView, tenant: &str) -> Vec<Session> {
        let shown: std::collections::HashSet<u64> =
            view.list(tenant).iter().map(|s| s.id).collect();
        let mut provisional = lock(&self.provisional);
        provisional.prune(std::time::Instant::now(), &shown);
        provisional
            .by_id
            .values()
            .filter(|p| p.session.calls.iter().all(|c| c.tenant == tenant))
            .map(|p| p.session.clone())
            .collect()
    }
}

/// Takes a REST command's waiter out of the map however the handler ends (answered, or
/// dropped when its client went away).
struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    cmd_id: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        lock(&self.waiters.waiting).remove(self.cmd_id);
    }
}

/// Who may use the REST API, and the [`Rest`] of each tenant.
pub struct RestState {
    commands: CommandClient,
    sessions: Option<SessionView>,
    outcome_wait: Duration,
    access: Access,
    limits: crate::limits::TenantLimits,
}

enum Access {
    /// No `[auth]`: every request acts for the one configured tenant (development only).
    Open(Arc<Rest>),
    /// Every request needs an access token; its tenant's [`Rest`] is made on first use and
    /// made again when the tenants file changes the tenant.
    Tenants {
        auth: Arc<crate::auth::Auth>,
        rests: TenantRests,
    },
}

/// Each tenant's [`Rest`], with the tenant's settings it was made from.
type TenantRests = Mutex<HashMap<String, (Arc<callapi_kit::tenants::Tenant>, Arc<Rest>)>>;

impl RestState {
    /// REST without authentication, for clients of `tenant` (development only).
    pub fn open(rest: Rest) -> Self {
        Self {
            commands: rest.commands.clone(),
            sessions: rest.sessions.clone(),
            outcome_wait: rest.outcome_wait,
            access: Access::Open(Arc::new(rest)),
            limits: crate::limits::TenantLimits::default(),
        }
    }

    /// REST for the tenants `auth` knows, each request authenticated by its access token.
    pub fn with_auth(
        commands: CommandClient,
        sessions: Option<SessionView>,
        outcome_wait: Duration,
        auth: Arc<crate::auth::Auth>,
        limits: crate::limits::TenantLimits,
    ) -> Self {
        Self {
            commands,
            sessions,
            outcome_wait,
            access: Access::Tenants {
                auth,
                rests: Mutex::new(HashMap::new()),
            },
            limits,
        }
    }

    /// The [`Rest`] a request may use for `scope`: 401 without a valid token, 403 without the
    /// scope.
    fn authorize(
        &self,
        headers: &axum::http::HeaderMap,
        scope: callapi_kit::tenants::Scope,
    ) -> Result<Arc<Rest>, crate::auth::Refusal> {
        use crate::auth::{AuthError, Refusal};
        let auth = match &self.access {
            Access::Open(rest) => return Ok(rest.clone()),
            Access::Tenants { auth, .. } => auth,
        };
        let token = crate::auth::bearer(headers).ok_or(AuthError::Missing)?;
        let identity = auth.authenticate(token, now_ms() / 1000)?;
        if !identity.may(scope) {
            return Err(Refusal::forbidden(format!(
                "this needs the {} scope",
                scope.as_str()
            )));
        }
        let tenants = auth.tenants();
        let tenant = tenants.get(&identity.tenant).ok_or(AuthError::Gone)?;
        self.rest_of(tenant)
    }

    /// The [`Rest`] of `tenant`, once its REST rate allows one more request (429 otherwise).
    fn rest_of(
        &self,
        tenant: &Arc<callapi_kit::tenants::Tenant>,
    ) -> Result<Arc<Rest>, crate::auth::Refusal> {
        use crate::auth::Refusal;
        let rests = match &self.access {
            Access::Open(rest) => return Ok(rest.clone()),
            Access::Tenants { rests, .. } => rests,
        };
        let rate = tenant.limits.rest_requests_per_second;
        if let Err(crate::limits::Over::Rate(wait)) = self.limits.take_rest(&tenant.id, rate) {
            return Err(Refusal::too_many(
                "RATE_LIMITED",
                format!("the tenant's {rate} REST requests per second are used"),
                Some(crate::limits::retry_after_secs(wait)),
            ));
        }
        let mut rests = lock(rests);
        if let Some((known, rest)) = rests.get(&tenant.id)
            && **known == **tenant
        {
            return Ok(rest.clone());
        }
        let mut rest = Rest::new(
            self.commands.clone(),
            self.sessions.clone(),
            &tenant.id,
            tenant.domains.first().map_or("", String::as_str),
            self.outcome_wait,
            crate::TrunkConfig::of_tenant(tenant),
        );
        rest.active_calls = tenant.limits.active_calls;
        let rest = Arc::new(rest);
        rests.insert(tenant.id.clone(), (tenant.clone(), rest.clone()));
        Ok(rest)
    }

    /// The trunks the API document lists: the one tenant's, or `None` (each tenant has its
    /// own).
    fn documented_trunks(&self) -> Option<&[crate::TrunkConfig]> {
        match &self.access {
            Access::Open(rest) => Some(&rest.trunks),
            Access::Tenants { .. } => None,
        }
    }
}

/// A REST request allowed the scope `CONTROL` names (`calls:control` if true, else
/// `calls:read`): the [`Rest`] of its tenant.
pub struct Authorized<const CONTROL: bool>(Arc<Rest>);

/// A request allowed to read calls.
pub type Reader = Authorized<false>;

/// A request allowed to control calls.
pub type Controller = Authorized<true>;

impl<const CONTROL: bool> axum::extract::FromRequestParts<Arc<RestState>> for Authorized<CONTROL> {
    type Rejection = crate::auth::Refusal;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<RestState>,
    ) -> Result<Self, crate::auth::Refusal> {
        use callapi_kit::tenants::Scope;
        let scope = if CONTROL {
            Scope::CallsControl
        } else {
            Scope::CallsRead
        };
        state.authorize(&parts.headers, scope).map(Authorized)
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
    trunks: Vec<crate::TrunkConfig>,
    /// Most active calls of the tenant (0: any).
    active_calls: u32,
}

impl Rest {
    /// REST for clients of `tenant` (until authentication names it per request).
    pub fn new(
        commands: CommandClient,
        sessions: Option<SessionView>,
        tenant: &str,
        sip_domain: &str,
        outcome_wait: Duration,
        trunks: Vec<crate::TrunkConfig>,
    ) -> Self {
        let waiters = Arc::new(Waiters {
            view: sessions.clone(),
            ..Waiters::default()
        });
        let attachment = commands.attach(tenant, waiters.clone());
        Self {
            commands,
            attachment,
            waiters,
            sessions,
            sip_domain: sip_domain.to_owned(),
            outcome_wait,
            trunks,
            active_calls: 0,
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

    /// The session the path's `id` names.
    fn session(&self, id: &str) -> Result<Session, Problem> {
        self.session_named("id", id)
    }

    /// The session a field (the path's `id`, a body's `session_1`…) names.
    fn session_named(&self, field: &str, id: &str) -> Result<Session, Problem> {
        self.session_and_whether_placed(field, id)
            .map(|(session, _)| session)
    }

    /// A session of the tenant, and whether OpenSIPS has reported it yet (not only provisional).
    fn session_and_whether_placed(
        &self,
        field: &str,
        id: &str,
    ) -> Result<(Session, bool), Problem> {
        let id = session_id(id).ok_or_else(|| {
            Problem::field(
                field,
                "must be a session id: 1 to 19 digits, no leading zero",
            )
        })?;
        let view = self.view()?;
        if let Some(session) = view.get(self.tenant(), id) {
            return Ok((session, true));
        }
        let provisional = self.waiters.provisional(view, self.tenant());
        provisional
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| (s, false))
            .ok_or_else(|| {
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
        lock(&self.waiters.waiting).insert(cmd_id.clone(), waiter);
        let _guard = WaiterGuard {
            waiters: &self.waiters,
            cmd_id: &cmd_id,
        };
        self.wait_first(&cmd_id, kind, command, &mut first).await
    }

    async fn wait_first(
        &self,
        cmd_id: &str,
        kind: CommandKind,
        command: Command,
        first: &mut mpsc::UnboundedReceiver<notification::Kind>,
    ) -> Result<(), Problem> {
        self.commands
            .submit(self.attachment.origin(), cmd_id, 0, kind, command)
            .await
            .map_err(Problem::from)?;
        match tokio::time::timeout(self.outcome_wait, first.recv()).await {
            Ok(Some(notification::Kind::Error(error))) => Err(Problem::of_command(&error)),
            _ => Ok(()),
        }
    }

    /// The configured trunk called `name`.
    fn trunk(&self, name: &str) -> Result<pb::Trunk, Problem> {
        params::find_trunk(&self.trunks, name).ok_or_else(|| Problem {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "UNKNOWN_TRUNK",
            detail: format!("no trunk called {name:?} is configured"),
            field: Some("trunk".to_owned()),
        })
    }

    /// A number (an extension or a PSTN number: digits, an optional leading `+`; at most
    /// [`MAX_NUMBER_LEN`] characters, PortSIP's limit) as a SIP URI in the tenant's domain.
    fn uri_of(&self, field: &str, number: &str) -> Result<String, Problem> {
        let digits = number.strip_prefix('+').unwrap_or(number);
        if digits.is_empty()
            || number.len() > MAX_NUMBER_LEN
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Problem::field(
                field,
                "must be a number: 1 to 256 characters, digits optionally after a +",
            ));
        }
        let uri = format!("sip:{number}@{}", self.sip_domain);
        validate::sip_uri(&uri).map_err(|why| Problem::field(field, why))?;
        Ok(uri)
    }
}

/// The longest party number PortSIP takes (`caller`, `callee`, `refer_to`…), in characters.
const MAX_NUMBER_LEN: usize = 256;

/// A session id as the path gives it: 1 to 19 digits, no leading zero (one past int64 is no
/// session: 404, not a malformed id).
fn session_id(text: &str) -> Option<u64> {
    let digits = (1..=19).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || text.starts_with('0') {
        return None;
    }
    text.parse::<u64>().ok()
}

/// The routes under `/api`.
pub fn router(rest: Arc<RestState>) -> axum::Router {
    axum::Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/docs", get(docs))
        .route("/api/sessions", get(list).post(create))
        .route("/api/sessions/directly", get(directly))
        .route("/api/sessions/{id}", get(get_one))
        .route("/api/sessions/{id}/destroy", post(destroy))
        .route("/api/sessions/{id}/hold", post(hold))
        .route("/api/sessions/{id}/unhold", post(unhold))
        .route("/api/sessions/{id}/refer", post(refer))
        .route("/api/sessions/{id}/attended_refer", post(attended_refer))
        .route("/api/events", get(events))
        .route("/api/webhooks/dead_letters", get(dead_letters))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such resource") })
        .with_state(rest)
}

use callapi_kit::unix_ms as now_ms;

/// The query of `GET /api/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only this session's events.
    session_id: Option<String>,
    /// Only this Call-ID's events (and those naming it as a transfer's new call).
    callid: Option<String>,
    /// Resume after this event id (as `Last-Event-ID`, which takes precedence).
    #[param(value_type = Option<i64>, minimum = 0)]
    since: Option<String>,
    /// Only the events of calls this extension (a SIP URI's user part) is a party of.
    extension: Option<String>,
}

/// The query of `GET /api/webhooks/dead_letters`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeadLettersQuery {
    /// The most recent this many (1 to 1000; 100 if absent).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// The tenant's webhook events whose delivery gave up, oldest first.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeadLetterList {
    /// How many are listed.
    count: usize,
    /// Each: `seq` (in the dead letters), `event_seq` (in the tenant's call events),
    /// `event_id`, `kind`, `session_id`, `callid`, `url`, `attempts`, `status` (the receiver's
    /// last HTTP status, null if it never answered), `error`, `failed_at_ms`, `payloads` (the
    /// PortSIP bodies that were to be sent).
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
}

#[utoipa::path(
    get,
    path = "/api/webhooks/dead_letters",
    tag = "webhooks",
    params(DeadLettersQuery),
    responses(
        (status = 200, description = "The tenant's dead letters, oldest first", body = DeadLetterList),
        (status = 400, description = "A bad query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The dead letters are unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn dead_letters(
    Authorized(rest): Reader,
    query: Result<Query<DeadLettersQuery>, QueryRejection>,
) -> Result<Json<DeadLetterList>, Problem> {
    let Query(query) = query.map_err(query_problem)?;
    let limit = match query.limit.as_deref() {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| Problem::field("limit", "must be an integer from 1 to 1000"))?,
    };
    let items = crate::webhooks::dead_letters(rest.commands.nats().clone(), rest.tenant(), limit)
        .await
        .map_err(|err| {
            tracing::warn!(%err, "cannot read the webhook dead letters");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the dead letters cannot be read now; try again later",
            )
        })?;
    Ok(Json(DeadLetterList {
        count: items.len(),
        items,
    }))
}

/// How long one event stream lasts before the gateway ends it; `EventSource` reconnects by
/// itself with `Last-Event-ID` and resumes where it stopped (the gateway's HTTP connections
/// end `handshake_timeout_ms` plus 30 s after they open).
const SSE_WINDOW: Duration = Duration::from_secs(25);

/// The tenant's call events as Server-Sent Events: `id` is the event's sequence, `event` its
/// kind, `data` the JSON of a `CallEvent` notification's params (docs/protocol.md, "Call
/// events"); resumed with `Last-Event-ID`. A `snapshot` event (the current sessions) comes
/// first when the events asked for are older than the stream keeps.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A text/event-stream of the tenant's call events, for 25 s", content_type = "text/event-stream"),
        (status = 400, description = "A bad query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The event stream is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn events(
    Authorized(rest): Reader,
    headers: axum::http::HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt as _;
    let Query(query) = query.map_err(query_problem)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let since = match (&last_event_id, &query.since) {
        (Some(id), _) => Some(("Last-Event-ID", id.clone())),
        (None, Some(since)) => Some(("since", since.clone())),
        (None, None) => None,
    }
    .map(|(field, text)| {
        text.parse::<u64>()
            .map_err(|_| Problem::field(field, "must be an event id (a non-negative integer)"))
    })
    .transpose()?;
    let mut params = serde_json::Map::new();
    if let Some(id) = query.session_id {
        params.insert("session_id".into(), Value::String(id));
    }
    if let Some(callid) = query.callid {
        params.insert("callid".into(), Value::String(callid));
    }
    if let Some(extension) = query.extension {
        params.insert("extension".into(), Value::String(extension));
    }
    let mut filter =
        params::subscription(params).map_err(|e| Problem::field(&e.field, e.reason))?;
    filter.since = since;
    let tenant = rest.tenant().to_owned();
    let opened = crate::subscribe::open(rest.commands.nats().clone(), &tenant, &filter)
        .await
        .map_err(|message| Problem::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message))?;
    let head: Vec<Event> = if opened.missed {
        vec![
            Event::default()
                .event("snapshot")
                .data(crate::subscribe::snapshot(rest.sessions.as_ref(), &tenant).to_string()),
        ]
    } else {
        Vec::new()
    };
    let ends = tokio::time::Instant::now() + SSE_WINDOW;
    let view = rest.sessions.clone();
    let tail = futures::stream::unfold(
        (opened, filter, view),
        move |(mut opened, filter, view)| async move {
            let (seq, event) =
                tokio::time::timeout_at(ends, opened.next_event(&filter, view.as_ref()))
                    .await
                    .ok()
                    .flatten()?;
            let sse = Event::default()
                .id(seq.to_string())
                .event(event.kind().protocol_name())
                .data(crate::subscribe::event_json(seq, &event).to_string());
            Some((sse, (opened, filter, view)))
        },
    );
    let stream = futures::stream::iter(head)
        .chain(tail)
        .map(Ok::<_, std::convert::Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// The query of `GET /sessions` (v22 list parameters).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Text a session's caller or callee URI contains, or one of its Call-IDs (≤ 256).
    #[param(max_length = 256)]
    filter: Option<String>,
    /// `started_at` (ascending, the default), `started_at asc` or `started_at desc`.
    #[param(pattern = "^started_at( asc| desc)?$")]
    orderby: Option<String>,
    /// Sessions to skip, 0 to 2147483647 (default 0).
    #[param(value_type = Option<i32>, minimum = 0)]
    skip: Option<String>,
    /// Sessions to return, 1 to 100 (default 100).
    #[param(value_type = Option<i32>, minimum = 1, maximum = 100)]
    top: Option<String>,
}

/// The answers of the control operations (destroy, hold, unhold, refer, attended_refer), for the
/// OpenAPI document only (the handlers answer `Result<StatusCode, Problem>`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ControlResponses {
    /// Taken, and no failure came back at once.
    #[response(status = 200)]
    Taken,
    /// A bad field.
    #[response(status = 400, content_type = "application/problem+json")]
    BadField(ProblemDoc),
    /// No such session or dialog, or the extension is not a party of it.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemDoc),
    /// A conflict OpenSIPS reported at once.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(ProblemDoc),
    /// Body over 64 KiB.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(ProblemDoc),
    /// Not JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    NotJson(ProblemDoc),
    /// Not supported by the node (one-party hold on OpenSIPS 3.6), or refused.
    #[response(status = 422, content_type = "application/problem+json")]
    NotSupported(ProblemDoc),
    /// No commands replica, NATS or node.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(ProblemDoc),
}

/// The `{id}` of the session paths, for the OpenAPI document (handlers take it as `Path<String>`
/// and check it themselves, to answer with a problem naming the field).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct SessionPath {
    /// Session id: an int64 in decimal.
    #[param(pattern = "^[1-9][0-9]{0,18}$")]
    id: String,
}

/// An RFC 9457 problem, as the API sends it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProblemDoc {
    /// `urn:callapi:error:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong.
    pub detail: String,
    /// Stable code (see docs/rest.md).
    pub code: String,
    /// The field at fault, when there is one.
    pub field: Option<String>,
}

/// `{"id": "…"}`: the new session's id.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Created {
    /// Session id: an int64 in decimal.
    pub id: String,
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

/// The tenant's active sessions.
#[utoipa::path(
    get,
    path = "/api/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, description = "The sessions", body = sessions::SessionList),
        (status = 400, description = "A bad query parameter", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "The session store is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn list(
    Authorized(rest): Reader,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<sessions::SessionList>, Problem> {
    let Query(query) = query.map_err(query_problem)?;
    // Numbers arrive as text: each its own problem, then the same checks as `CallList`'s.
    let number = |field: &str, value: Option<&str>, range: &str| {
        value
            .map(|text| {
                text.parse::<u64>()
                    .map_err(|_| Problem::field(field, format!("must be an integer from {range}")))
            })
            .transpose()
    };
    let selection = params::ListParams {
        filter: query.filter,
        orderby: query.orderby,
        skip: number("skip", query.skip.as_deref(), "0 to 2147483647")?,
        top: number("top", query.top.as_deref(), "1 to 100")?,
    }
    .selection()
    .map_err(|err| Problem::field(&err.field, err.reason))?;
    let view = rest.view()?;
    let mut found: Vec<Session> = view.list(rest.tenant());
    // Only active sessions are listed (GET by id shows an ended one for a while).
    found.extend(
        rest.waiters
            .provisional(view, rest.tenant())
            .into_iter()
            .filter(|s| !sessions::is_over(s)),
    );
    let (count, page) = sessions::select(found, &selection);
    let now = now_ms();
    let items = page.iter().map(|s| sessions::item(s, now)).collect();
    Ok(Json(sessions::SessionList { count, items }))
}

/// One session.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}",
    tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "The session", body = sessions::SessionItem),
        (status = 400, description = "Not a session id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such session", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn get_one(
    Authorized(rest): Reader,
    Path(id): Path<String>,
) -> Result<Json<sessions::SessionItem>, Problem> {
    let session = match rest.session(&id) {
        Ok(session) if !sessions::is_over(&session) => session,
        // Over, but created through callapi a short while ago: how it ended.
        found => session_id(&id)
            .and_then(|id| rest.sessions.as_ref()?.ended(rest.tenant(), id))
            .map_or(found, Ok)?,
    };
    Ok(Json(sessions::item(&session, now_ms())))
}

/// The query of `GET /sessions/directly` (PortSIP's), for the OpenAPI document only: the
/// route answers 501 until extensions and their passwords exist.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct DirectlyQuery {
    /// The extension whose password authenticates the request.
    extension_number: String,
    /// The extension's password (never logged).
    password: String,
    /// The tenant's SIP domain.
    domain: String,
    /// Calling number.
    caller: String,
    /// Called number.
    callee: String,
    /// Whether the caller's INVITE carries an SDP offer.
    send_sdp: bool,
}

/// PortSIP's call creation authenticated by an extension's password instead of a token: the
/// query holds the extension's `extension_number`, `password` and `domain` and the fields of a
/// create body. The extension may only call from itself (`caller` is its number). Failed
/// passwords are counted per extension and per source address: past the limit, 429 with
/// `Retry-After`. The password is never logged.
#[utoipa::path(
    get,
    path = "/api/sessions/directly",
    tag = "sessions",
    params(DirectlyQuery),
    responses(
        (status = 200, description = "The session created", body = Created),
        (status = 400, description = "A bad field", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Wrong extension, password or domain", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "The caller is not the extension", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "Too many failed passwords lately, or the tenant's rate", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 501, description = "No tenants configured", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn directly(
    State(state): State<Arc<RestState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    match directly_create(&state, peer.ip(), query.as_deref().unwrap_or("")).await {
        Ok(created) => created.into_response(),
        Err(refused) => refused,
    }
}

async fn directly_create(
    state: &RestState,
    source: std::net::IpAddr,
    query: &str,
) -> Result<Json<Created>, Response> {
    use crate::auth::{ExtensionRefusal, Refusal};
    let Access::Tenants { auth, .. } = &state.access else {
        return Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "NOT_IMPLEMENTED",
            "GET /api/sessions/directly authenticates with an extension's password: it needs tenants (the gateway's [auth]); use POST /api/sessions",
        )
        .into_response());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "the query is not URL-encoded name=value pairs",
        )
        .into_response()
    })?;
    let mut fields = serde_json::Map::new();
    let (mut number, mut password, mut domain) = (None, None, None);
    for (name, value) in pairs {
        let duplicate = match name.as_str() {
            "extension_number" => number.replace(value).is_some(),
            "password" => password.replace(value).is_some(),
            "domain" => domain.replace(value).is_some(),
            "send_sdp" => {
                let flag = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(
                            Problem::field("send_sdp", "must be true or false").into_response()
                        );
                    }
                };
                fields.insert(name.clone(), Value::Bool(flag)).is_some()
            }
            _ => fields.insert(name.clone(), Value::String(value)).is_some(),
        };
        if duplicate {
            return Err(Problem::field(&name, "is given twice").into_response());
        }
    }
    let number = number
        .filter(|n| (3..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            Problem::field("extension_number", "must be 3 to 64 digits").into_response()
        })?;
    let password =
        password.ok_or_else(|| Problem::field("password", "is required").into_response())?;
    let domain = domain
        .filter(|d| (1..=280).contains(&d.len()))
        .ok_or_else(|| Problem::field("domain", "must be 1 to 280 characters").into_response())?;
    let body: CreateBody =
        serde_path_to_error::deserialize(Value::Object(fields)).map_err(|err| {
            let refused = params::serde_error(&err, "is not a parameter of this operation");
            Problem::field(&refused.field, refused.reason).into_response()
        })?;
    let tenant = match auth
        .check_extension(&domain, &number, password, source)
        .await
    {
        Ok(tenant) => tenant,
        Err(ExtensionRefusal::Wrong) => {
            tracing::info!(%domain, extension = %number, %source, "directly: wrong extension, password or domain");
            return Err(
                Refusal::unauthorized("wrong extension_number, password or domain").into_response(),
            );
        }
        Err(ExtensionRefusal::TooMany(wait)) => {
            let secs = crate::limits::retry_after_secs(wait);
            return Err(Refusal::too_many(
                "TOO_MANY_FAILURES",
                format!("too many failed passwords for this extension or from this address: try again in {secs} s"),
                Some(secs),
            )
            .into_response());
        }
    };
    if body.caller != number {
        return Err(Refusal::forbidden(
            "an extension may only call from itself: caller must be its extension_number",
        )
        .into_response());
    }
    let rest = state
        .rest_of(&tenant)
        .map_err(IntoResponse::into_response)?;
    create_session(&rest, body)
        .await
        .map_err(IntoResponse::into_response)
}

/// `POST /sessions`: PortSIP's table B.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// Calling number: an extension or a PSTN number (digits, an optional leading `+`).
    #[schema(min_length = 1, max_length = 256, pattern = r"^\+?[0-9]{1,256}$")]
    caller: String,
    /// Called number: an extension or a PSTN number.
    #[schema(min_length = 1, max_length = 256, pattern = r"^\+?[0-9]{1,256}$")]
    callee: String,
    /// Whether the caller's INVITE carries an SDP offer (`false`: late offer, the phone
    /// offers in its answer).
    send_sdp: bool,
    /// From display name of both INVITEs; shown as `caller_display_name` by GET.
    #[schema(max_length = 1024, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    caller_display_name: Option<String>,
    /// A configured trunk the callee's INVITE goes out through (unknown: 422 UNKNOWN_TRUNK;
    /// the served document lists the configured ones).
    #[schema(min_length = 1, max_length = 64)]
    trunk: Option<String>,
    /// User part of From of the callee's INVITE (ignored without `trunk`).
    #[schema(min_length = 1, max_length = 16, pattern = r"^[0-9A-Za-z+*._-]{1,16}$")]
    rewrite_from: Option<String>,
    /// User part of P-Asserted-Identity of the callee's INVITE (ignored without `trunk`).
    #[schema(min_length = 1, max_length = 16, pattern = r"^[0-9A-Za-z+*._-]{1,16}$")]
    rewrite_pai: Option<String>,
    /// User part of Remote-Party-ID of the callee's INVITE (ignored without `trunk`).
    #[schema(min_length = 1, max_length = 16, pattern = r"^[0-9A-Za-z+*._-]{1,16}$")]
    rewrite_rpi: Option<String>,
    /// Caller's context: stored with the session (GET shows it) and sent in both INVITEs as
    /// `X-Callapi-User-Data`.
    #[schema(max_length = 128, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    user_data: Option<String>,
    /// The callee contact to ring (a SIP URI), instead of where routing sends the call
    /// (ignored with `trunk`). The pattern is what the document promises to take (user and
    /// host of letters and digits or an IPv4 address, an optional port); any SIP URI of
    /// docs/protocol.md is taken. Empty: none.
    #[schema(
        max_length = 128,
        pattern = r"^(sips?:([A-Za-z0-9]+@)?(([a-z][a-z0-9]*\.)*[a-z][a-z0-9]*|((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]))(:[1-9][0-9]{0,3})?)?$"
    )]
    target: Option<String>,
    /// The callee registration to ring, by its instance id (sent as a GRUU `gr` parameter).
    #[schema(max_length = 128, pattern = r"^[0-9A-Za-z:._-]{0,128}$")]
    target_instance_id: Option<String>,
    /// The extension whose phone rings for the callee (e.g. one member of the group `callee`
    /// names): the Request-URI of the callee's INVITE; its To stays `callee`.
    #[schema(max_length = 128, pattern = r"^[0-9]{1,128}$")]
    target_extension_number: Option<String>,
    /// RFC 5373 auto-answer header to add to the INVITE(s) `header_direction` names.
    additional_header: Option<AdditionalHeader>,
    /// Which INVITE(s) get `additional_header` (default `CALLER`); ignored without it.
    header_direction: Option<HeaderDirection>,
}

/// A JSON request body whose every error is a problem naming its field: serde's path to the
/// value at fault (`additional_header`, `send_sdp`…), a missing or unknown field by its name.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Problem> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| {
                let essence = value.split(';').next().unwrap_or("").trim();
                let essence = essence.to_ascii_lowercase();
                essence == "application/json"
                    || (essence.starts_with("application/") && essence.ends_with("+json"))
            })
            .unwrap_or(false);
        if !json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "INVALID_BODY",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "BODY_TOO_LARGE",
                        "the body is larger than 64 KiB",
                    )
                } else {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "INVALID_BODY",
                        crate::rpc::clip_to(&rejection.body_text(), 200).into_owned(),
                    )
                }
            })?;
        // serde would take a struct from a JSON array too (its fields in order): not here.
        if !bytes.trim_ascii_start().starts_with(b"{") {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "INVALID_BODY",
                "the body must be a JSON object of this operation's fields",
            ));
        }
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(body_problem)?;
        deserializer.end().map_err(|err| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "INVALID_BODY",
                format!("the body is not one JSON document: {err}"),
            )
        })?;
        Ok(Body(parsed))
    }
}

/// The problem for a body serde could not take: the field at fault, as the JSON-RPC params
/// name theirs ([`params::serde_error`]), or the body as a whole.
fn body_problem(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    if !error.inner().is_data() {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            format!(
                "the body is not a JSON document: {}",
                crate::rpc::clip_to(&error.inner().to_string(), 160)
            ),
        );
    }
    let refused = params::serde_error(&error, "is not a field of this operation");
    if refused.field == "." {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            format!(
                "the body must be a JSON object of this operation's fields: {}",
                refused.reason
            ),
        );
    }
    Problem::field(&refused.field, refused.reason)
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

/// Click-to-dial: the caller's phone rings, then calls the callee.
#[utoipa::path(
    post,
    path = "/api/sessions",
    tag = "sessions",
    request_body = CreateBody,
    responses(
        (status = 200, description = "Taken by a commands replica", body = Created),
        (status = 400, description = "A bad field", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "A field not supported yet, or refused", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "No commands replica or NATS", body = ProblemDoc, content_type = "application/problem+json"),
    )
)]
async fn create(
    Authorized(rest): Controller,
    Body(body): Body<CreateBody>,
) -> Result<Json<Created>, Problem> {
    create_session(&rest, body).await
}

/// Places the call a create body asks for (`POST /sessions`, `GET /sessions/directly`).
async fn create_session(rest: &Rest, body: CreateBody) -> Result<Json<Created>, Problem> {
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
    if rest.active_calls > 0 {
        let active = rest.view()?.list(rest.tenant()).len();
        if active >= rest.active_calls as usize {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "CALL_LIMIT",
                format!(
                    "the tenant has {active} active calls, its limit is {}",
                    rest.active_calls
                ),
            ));
        }
    }
    let trunk = body
        .trunk
        .as_deref()
        .map(|name| rest.trunk(name))
        .transpose()?;
    let options = StartOptions {
        send_sdp: Some(body.send_sdp),
        caller_display_name: body.caller_display_name,
        trunk: body.trunk,
        rewrite_from: body.rewrite_from,
        rewrite_pai: body.rewrite_pai,
        rewrite_rpi: body.rewrite_rpi,
        user_data: body.user_data,
        target: body.target,
        target_instance_id: body.target_instance_id,
        target_extension_number: body.target_extension_number,
        additional_header: body.additional_header,
        header_direction: body.header_direction,
    }
    .to_proto(trunk)
    .map_err(|e| Problem::field(&e.field, e.reason))?;
    params::check_rewrites(&rest.trunks, &options)
        .map_err(|e| Problem::field(&e.field, e.reason))?;
    let callid = uuid::Uuid::new_v4().to_string();
    let id = callapi_kit::calls::session_id(rest.tenant(), &callid);
    let cmd_id = uuid::Uuid::new_v4().to_string();
    // Always remembered, so GET can show how the session ended once its calls are gone.
    let meta = sessions::meta_of_start(rest.tenant(), &callid, &options, true);
    if let (Some(meta), Some(view)) = (&meta, &rest.sessions) {
        view.remember(meta.clone()).await.map_err(|err| {
            tracing::warn!(%err, "cannot store a session's metadata");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the session store cannot take this session's data now; try again",
            )
        })?;
    }
    let first_call = pb::CallRecord {
        tenant: rest.tenant().to_owned(),
        session_id: id,
        callid: callid.clone(),
        caller_uri: caller.clone(),
        callee_uri: callee.clone(),
        state: pb::DialogState::Unconfirmed as i32,
        started_at_ms: now_ms(),
        ..Default::default()
    };
    if let Some(meta) = &meta {
        let now = std::time::Instant::now();
        let mut starts = lock(&rest.waiters.starts);
        starts.retain(|_, (_, since)| now.duration_since(*since) < START_KEPT);
        if starts.len() < MAX_PROVISIONAL {
            starts.insert(cmd_id.clone(), (meta.clone(), now));
        }
    }
    lock(&rest.waiters.provisional).insert(
        id,
        Provisional {
            session: Session {
                id,
                calls: vec![first_call],
                meta,
            },
            cmd_id: cmd_id.clone(),
            until: std::time::Instant::now() + PROVISIONAL_TTL,
        },
    );
    let command = Command::CallStart(pb::CallStart {
        caller,
        callee,
        callid,
        options: Some(Box::new(options)),
    });
    let submitted = rest
        .commands
        .submit(
            rest.attachment.origin(),
            &cmd_id,
            0,
            CommandKind::CallStart,
            command,
        )
        .await
        .inspect_err(|_| {
            lock(&rest.waiters.provisional).remove(id);
            lock(&rest.waiters.starts).remove(&cmd_id);
        })
        .map_err(Problem::from);
    if let Err(problem) = submitted {
        if let Some(view) = &rest.sessions {
            view.forget(rest.tenant(), id).await;
        }
        return Err(problem);
    }
    Ok(Json(Created { id: id.to_string() }))
}

/// Bodies naming the extension on whose behalf an operation is done.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ExtensionBody {
    /// The extension (3–64 digits) on whose behalf it is done.
    #[schema(pattern = "^[0-9]{3,64}$")]
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
        status: StatusCode::NOT_FOUND,
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

/// Hangs up every live call of the session.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/destroy",
    tag = "sessions",
    params(SessionPath),
    responses(ControlResponses)
)]
async fn destroy(
    Authorized(rest): Controller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let (session, placed) = rest.session_and_whether_placed("id", &id)?;
    if !placed && !live_calls(&session).is_empty() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "DIALOG_NOT_READY",
            "the call is still being placed (OpenSIPS has not reported it yet); try again in a moment",
        ));
    }
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
    body: ExtensionBody,
    hold: bool,
) -> Result<StatusCode, Problem> {
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

/// The extension holds the call: the other party is put on hold.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/hold",
    tag = "sessions",
    params(SessionPath),
    request_body = ExtensionBody,
    responses(ControlResponses)
)]
async fn hold(
    Authorized(rest): Controller,
    Path(id): Path<String>,
    Body(body): Body<ExtensionBody>,
) -> Result<StatusCode, Problem> {
    hold_or_unhold(&rest, &id, body, true).await
}

/// Undoes a hold by the extension.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/unhold",
    tag = "sessions",
    params(SessionPath),
    request_body = ExtensionBody,
    responses(ControlResponses)
)]
async fn unhold(
    Authorized(rest): Controller,
    Path(id): Path<String>,
    Body(body): Body<ExtensionBody>,
) -> Result<StatusCode, Problem> {
    hold_or_unhold(&rest, &id, body, false).await
}

/// `POST /sessions/{id}/refer`: the extension transfers the call: the other party goes to
/// `refer_to`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReferBody {
    /// The extension transferring the call (3–64 digits).
    #[schema(pattern = "^[0-9]{3,64}$")]
    extension_number: String,
    /// Where the other party goes: a number.
    #[schema(min_length = 1, max_length = 256, pattern = r"^\+?[0-9]{1,256}$")]
    refer_to: String,
}

/// Blind transfer by the extension: the other party goes to `refer_to`.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/refer",
    tag = "sessions",
    params(SessionPath),
    request_body = ReferBody,
    responses(ControlResponses)
)]
async fn refer(
    Authorized(rest): Controller,
    Path(id): Path<String>,
    Body(body): Body<ReferBody>,
) -> Result<StatusCode, Problem> {
    extension("extension_number", &body.extension_number)?;
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AttendedReferBody {
    /// The extension performing the transfer (3–64 digits).
    #[schema(pattern = "^[0-9]{3,64}$")]
    extension_number: String,
    /// The first party (a number), talking with the extension in `session_1`.
    #[schema(min_length = 1, max_length = 256, pattern = r"^\+?[0-9]{1,256}$")]
    refer_to_1: String,
    /// Its session (default: the path's).
    #[schema(pattern = "^[1-9][0-9]{0,18}$")]
    session_1: Option<String>,
    /// The second party (a number), talking with the extension in `session_2`.
    #[schema(min_length = 1, max_length = 256, pattern = r"^\+?[0-9]{1,256}$")]
    refer_to_2: String,
    /// Its session (default: found among the tenant's).
    #[schema(pattern = "^[1-9][0-9]{0,18}$")]
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

/// Attended transfer by the extension: its two counterparts are connected.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/attended_refer",
    tag = "sessions",
    params(SessionPath),
    request_body = AttendedReferBody,
    responses(ControlResponses)
)]
async fn attended_refer(
    Authorized(rest): Controller,
    Path(id): Path<String>,
    Body(body): Body<AttendedReferBody>,
) -> Result<StatusCode, Problem> {
    extension("extension_number", &body.extension_number)?;
    rest.uri_of("refer_to_1", &body.refer_to_1)?;
    rest.uri_of("refer_to_2", &body.refer_to_2)?;
    let find = |number: &str, session: Option<(&'static str, &str)>, field: &'static str| {
        let sessions: Vec<Session> = match session {
            Some((named_by, id)) => vec![rest.session_named(named_by, id)?],
            None => rest.view()?.list(rest.tenant()),
        };
        sessions
            .iter()
            .find_map(|s| {
                counterpart(s, &body.extension_number, number)
                    .map(|(call, leg)| (call.callid.clone(), leg))
            })
            .ok_or_else(|| Problem {
                status: StatusCode::NOT_FOUND,
                code: "NOT_A_PARTY",
                detail: format!(
                    "no call between extension {} and {number} found",
                    body.extension_number
                ),
                field: Some(field.to_owned()),
            })
    };
    let session_1 = match body.session_1.as_deref() {
        Some(named) => ("session_1", named),
        None => ("id", id.as_str()),
    };
    let session_2 = body.session_2.as_deref().map(|named| ("session_2", named));
    let (callid_a, leg_a) = find(&body.refer_to_1, Some(session_1), "refer_to_1")?;
    let (callid_b, leg_b) = find(&body.refer_to_2, session_2, "refer_to_2")?;
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

/// The OpenAPI document of the REST API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "callapi REST API",
        description = "PortSIP PBX v22's sessions API over OpenSIPS (docs/rest.md)."
    ),
    paths(
        list,
        create,
        get_one,
        directly,
        destroy,
        hold,
        unhold,
        refer,
        attended_refer,
        events,
        dead_letters
    ),
    components(schemas(
        ProblemDoc,
        Created,
        sessions::SessionList,
        sessions::SessionItem,
        sessions::CallItem,
        DeadLetterList
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document, with `trunk` listing the configured trunks (absent if there are none).
fn document(trunks: Option<&[crate::TrunkConfig]>) -> Value {
    use utoipa::OpenApi as _;
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    let Some(trunks) = trunks else {
        return with_bearer_auth(doc);
    };
    if let Some(properties) = doc
        .pointer_mut("/components/schemas/CreateBody/properties")
        .and_then(Value::as_object_mut)
    {
        if trunks.is_empty() {
            properties.remove("trunk");
        } else if let Some(Value::Object(trunk)) = properties.get_mut("trunk") {
            let mut names: Vec<Value> = trunks.iter().map(|t| json!(t.name)).collect();
            names.push(Value::Null);
            trunk.insert("enum".to_owned(), Value::Array(names));
        }
    }
    doc
}

/// The document of an API that needs an access token: the bearer scheme, required by every
/// operation but `/directly` (which takes an extension's password).
fn with_bearer_auth(mut doc: Value) -> Value {
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert(
            "securitySchemes".to_owned(),
            json!({"bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An access token from POST /api/login/oauth/token"
            }}),
        );
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            if path.ends_with("/directly") {
                continue;
            }
            if let Some(item) = item.as_object_mut() {
                for operation in item.values_mut().filter_map(Value::as_object_mut) {
                    operation.insert("security".to_owned(), json!([{"bearer": []}]));
                }
            }
        }
    }
    doc
}

/// `GET /api/openapi.json`.
async fn openapi(State(state): State<Arc<RestState>>) -> Response {
    let mut response = document(state.documented_trunks())
        .to_string()
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /api/docs`: the document rendered by Redoc (loaded from its CDN by the browser).
async fn docs() -> Response {
    let mut response = REDOC_PAGE.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

const REDOC_PAGE: &str = r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>callapi REST API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="/api/openapi.json"></redoc>
<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
<noscript>The API document is at <a href="/api/openapi.json">/api/openapi.json</a>.</noscript>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    use utoipa::OpenApi as _;

    #[test]
    fn the_document_is_openapi_3_1_with_every_operation() {
        let doc: Value = serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/api/sessions", "get"),
            ("/api/sessions", "post"),
            ("/api/sessions/{id}", "get"),
            ("/api/sessions/directly", "get"),
            ("/api/sessions/{id}/destroy", "post"),
            ("/api/sessions/{id}/hold", "post"),
            ("/api/sessions/{id}/unhold", "post"),
            ("/api/sessions/{id}/refer", "post"),
            ("/api/sessions/{id}/attended_refer", "post"),
        ] {
            assert!(paths[path].get(method).is_some(), "{method} {path}");
        }
        let create = &doc["components"]["schemas"]["CreateBody"];
        assert_eq!(create["properties"]["caller"]["maxLength"], 256);
        let required: Vec<&str> = create["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(required, ["caller", "callee", "send_sdp"]);
    }

    #[test]
    fn the_served_document_lists_the_configured_trunks() {
        let trunk =
            |doc: &Value| doc["components"]["schemas"]["CreateBody"]["properties"]["trunk"].clone();
        assert_eq!(trunk(&document(Some(&[]))), Value::Null);
        let doc = document(Some(&[crate::TrunkConfig {
            name: "carrier".into(),
            uri: "sip:203.0.113.7".into(),
            rewrites: None,
        }]));
        assert_eq!(trunk(&doc)["enum"], serde_json::json!(["carrier", null]));
        assert_eq!(trunk(&doc)["maxLength"], 64);
    }

    #[test]
    fn with_authentication_every_operation_but_directly_needs_a_bearer_token() {
        let doc = document(None);
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(
            doc["paths"]["/api/sessions"]["get"]["security"],
            serde_json::json!([{"bearer": []}])
        );
        assert_eq!(
            doc["paths"]["/api/sessions/{id}/destroy"]["post"]["security"],
            serde_json::json!([{"bearer": []}])
        );
        assert_eq!(
            doc["paths"]["/api/sessions/directly"]["get"]["security"],
            Value::Null
        );
    }
}
