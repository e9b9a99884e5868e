//! Webhooks: each tenant's call events POSTed to its URL in PortSIP's webhook event format
//! (`call_start`, `cdr_target_ringing` / `_answer` / `_end` / `_noanswer`, `call_update_info`,
//! and the CDR `call_cdr` when a call ends), so a CRM integration written for PortSIP works
//! unchanged. Every gateway takes part: they share one durable JetStream consumer (`webhooks`)
//! of the tenant's stream `CALLAPI_CALLS_<tenant>`, so each event is delivered by one of them.
//!
//! A request carries the auth PortSIP offers (none, Basic, Bearer) and, with a secret, an
//! HMAC-SHA256 signature header. One that fails (no answer, not 2xx) is tried again after the
//! tenant's `retry_delays_ms` (JetStream redelivers it, so a gateway that dies mid-try loses
//! nothing); after `max_attempts`, or at once on 404 (PortSIP stops on 404 too), the event goes
//! to the dead letters (stream `CALLAPI_WEBHOOK_DEAD`, subjects
//! `callapi.v1.webhooks.dead.<tenant>`), which `GET /api/webhooks/dead_letters` shows.
//! Delivery is at least once: a receiver tells repeats apart by `X-Callapi-Event-Id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use callapi_kit::tenants::{Tenants, Webhook, WebhookAuth};
use callapi_proto::v1::{CallEvent, CallEventKind, CallRecord, SessionMeta};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::sessions::{self, SessionView};

/// The stream of events whose delivery gave up.
pub const DEAD_STREAM: &str = "CALLAPI_WEBHOOK_DEAD";
/// How long dead letters are kept.
const DEAD_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Dead letters kept per tenant (the oldest leave first).
const DEAD_PER_TENANT: i64 = 10_000;
/// The durable consumer every gateway shares, per tenant stream.
const CONSUMER: &str = "webhooks";
/// Longest wait for a new call's parties to reach the session store before its `call_start`
/// goes without them.
const PARTIES_WAIT: Duration = Duration::from_secs(1);

/// Subject of `tenant`'s dead letters.
pub fn dead_subject(tenant: &str) -> String {
    format!("callapi.v1.webhooks.dead.{tenant}")
}

/// What the session store and the creator of a call tell of it, besides its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFacts {
    /// From URI.
    pub caller: String,
    /// To URI.
    pub callee: String,
    /// What the creator gave as the caller's display name.
    pub caller_display_name: String,
    /// What the creator gave as `user_data`.
    pub user_data: String,
    /// The trunk the call went out through ("" if none).
    pub trunk: String,
    /// First seen, answered (0: not), Unix milliseconds.
    pub started_at_ms: u64,
    /// Answered, Unix milliseconds (0: not answered).
    pub answered_at_ms: u64,
    /// It was transferred away.
    pub transferred: bool,
}

impl CallFacts {
    /// The facts a call's record and its session's metadata give.
    pub fn of(record: Option<&CallRecord>, meta: Option<&SessionMeta>) -> Self {
        let mut facts = Self::default();
        if let Some(r) = record {
            facts.caller = r.caller_uri.clone();
            facts.callee = r.callee_uri.clone();
            facts.started_at_ms = r.started_at_ms;
            facts.answered_at_ms = r.answered_at_ms;
            facts.transferred = !r.transferred_to.is_empty();
        }
        if let Some(m) = meta {
            facts.caller_display_name = m.caller_display_name.clone();
            facts.user_data = m.user_data.clone();
            facts.trunk = m.trunk.clone();
        }
        facts
    }
}

/// The PortSIP webhook bodies one call event makes, in the order they are sent (an `ended`
/// makes the call target's end and then the CDR).
pub fn payloads(event: &CallEvent, facts: &CallFacts) -> Vec<Value> {
    let secs = |ms: u64| (ms / 1000).to_string();
    let direction = if facts.trunk.is_empty() { "ext" } else { "out" };
    let outbound_caller_id = if facts.trunk.is_empty() {
        Value::Null
    } else {
        Value::String(sessions::user_part(&facts.caller).to_owned())
    };
    // What every event of the call carries.
    let common = |event_type: &str| {
        let mut body = Map::new();
        body.insert("event_type".into(), event_type.into());
        body.insert("time".into(), secs(event.at_ms).into());
        body.insert("session_id".into(), event.session_id.to_string().into());
        body.insert(
            "cdr_id".into(),
            callapi_kit::calls::session_id(&event.tenant, &event.callid)
                .to_string()
                .into(),
        );
        body.insert("tenant_id".into(), event.tenant.clone().into());
        body.insert("direction".into(), direction.into());
        body.insert("did".into(), Value::Null);
        body.insert("outbound_caller_id".into(), outbound_caller_id.clone());
        body
    };
    let parties = |body: &mut Map<String, Value>| {
        body.insert("caller".into(), facts.caller.clone().into());
        body.insert(
            "caller_display_name".into(),
            facts.caller_display_name.clone().into(),
        );
        body.insert("callee".into(), facts.callee.clone().into());
        body.insert("callee_display_name".into(), "".into());
    };
    let target = |event_type: &str| {
        let mut body = common(event_type);
        body.insert("caller".into(), facts.caller.clone().into());
        body.insert("destination".into(), facts.callee.clone().into());
        Value::Object(body)
    };
    match event.kind() {
        CallEventKind::Created => {
            let mut body = common("call_start");
            body.insert("call_id".into(), event.callid.clone().into());
            body.insert("user_data".into(), text_or_null(&facts.user_data));
            parties(&mut body);
            vec![Value::Object(body)]
        }
        CallEventKind::Ringing => vec![target("cdr_target_ringing")],
        CallEventKind::Answered => vec![target("cdr_target_answer")],
        CallEventKind::Held
        | CallEventKind::Resumed
        | CallEventKind::TransferStarted
        | CallEventKind::TransferCompleted
        | CallEventKind::TransferFailed => {
            let mut body = common("call_update_info");
            parties(&mut body);
            vec![Value::Object(body)]
        }
        CallEventKind::Ended => {
            let answered = facts.answered_at_ms > 0;
            let end = target(if answered {
                "cdr_target_end"
            } else {
                "cdr_target_noanswer"
            });
            vec![end, cdr(event, facts, common("call_cdr"))]
        }
        CallEventKind::TransferProgress | CallEventKind::Unspecified => Vec::new(),
    }
}

/// The CDR of a call that just ended: PortSIP's `call_cdr`, with its one call target.
fn cdr(event: &CallEvent, facts: &CallFacts, mut body: Map<String, Value>) -> Value {
    let secs = |ms: u64| (ms / 1000).to_string();
    let started = if facts.started_at_ms > 0 {
        facts.started_at_ms
    } else {
        event.at_ms
    };
    let answered = facts.answered_at_ms;
    let ended = event.at_ms.max(started);
    let ring_ms = if answered > 0 { answered } else { ended }.saturating_sub(started);
    let talk_ms = if answered > 0 {
        ended.saturating_sub(answered)
    } else {
        0
    };
    let status = if answered > 0 { "answered" } else { "noanswer" };
    // Who hung up is not something OpenSIPS's dialog events tell: `None` (unknown), as PortSIP
    // writes it, unless the call was transferred away.
    let reason = if facts.transferred {
        "referred"
    } else {
        "None"
    };
    let host = |uri: &str| {
        let rest = uri.split_once('@').map(|(_, h)| h).unwrap_or("");
        rest.split([':', ';', '>']).next().unwrap_or("").to_owned()
    };
    let answered_time = if answered > 0 {
        secs(answered)
    } else {
        "0".to_owned()
    };
    for (key, value) in [
        ("start_time", secs(started)),
        ("ring_time", secs(started)),
        ("answered_time", answered_time.clone()),
        ("ended_time", secs(ended)),
        ("call_id", event.callid.clone()),
        ("caller", facts.caller.clone()),
        ("caller_display_name", facts.caller_display_name.clone()),
        ("caller_domain", host(&facts.caller)),
        ("callee", facts.callee.clone()),
        ("callee_domain", host(&facts.callee)),
        ("call_status", status.to_owned()),
        ("trunk_name", facts.trunk.clone()),
        ("tenant_name", event.tenant.clone()),
        ("status_code", "0".to_owned()),
        ("ended_reason", reason.to_owned()),
        ("end_reason", reason.to_owned()),
        ("ring_duration", (ring_ms / 1000).to_string()),
        ("user_data", facts.user_data.clone()),
    ] {
        body.insert(key.into(), value.into());
    }
    body.insert("talk_duration".into(), (talk_ms / 1000).into());
    body.insert(
        "call_targets".into(),
        json!([{
            "call_type": "normal_call",
            "id": body.get("cdr_id").cloned().unwrap_or(Value::Null),
            "caller": facts.caller,
            "callee": facts.callee,
            "destination": facts.callee,
            "start_time": secs(started),
            "ring_time": secs(started),
            "answered_time": answered_time,
            "ended_time": secs(ended),
            "status": status,
            "status_code": 0,
            "end_reason": reason,
            "ring_duration": (ring_ms / 1000).to_string(),
            "talk_duration": (talk_ms / 1000).to_string(),
            "trunk_name": facts.trunk,
            "did": "",
            "outbound_caller_id": "",
        }]),
    );
    Value::Object(body)
}

fn text_or_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

/// `X-Callapi-Signature`'s value for `body` sent at Unix second `at`: `t=<at>,v1=<hex of
/// HMAC-SHA256(key, "<at>.<body>")>` (the receiver recomputes it and checks `t` is recent).
pub fn signature(key: &[u8], at: u64, body: &[u8]) -> String {
    let hex = hmac_sha256_hex(key, &[at.to_string().as_bytes(), b".", body]);
    format!("t={at},v1={hex}")
}

/// HMAC-SHA256 of `parts` one after the other, in lower-case hex.
fn hmac_sha256_hex(key: &[u8], parts: &[&[u8]]) -> String {
    use hmac::Mac as _;
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC takes a key of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pause before try `attempt + 1` (the last pause repeats).
fn delay_after(webhook: &Webhook, attempt: u64) -> Duration {
    let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
    let ms = webhook
        .retry_delays_ms
        .get(index)
        .or(webhook.retry_delays_ms.last())
        .copied()
        .unwrap_or(5_000);
    Duration::from_millis(ms)
}

/// Why one try failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
struct Failure {
    /// The receiver's HTTP status, if it answered.
    status: Option<u16>,
    reason: String,
}

/// Starts delivering every tenant's webhook events, following the tenants file, until
/// `shutdown`.
pub fn start(
    nats: async_nats::Client,
    tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    view: Option<SessionView>,
    shutdown: CancellationToken,
) {
    tokio::spawn(supervise(nats, tenants, view, shutdown));
}

/// Keeps one delivery task per tenant with an enabled webhook, restarted when its settings
/// change.
async fn supervise(
    nats: async_nats::Client,
    mut tenants: tokio::sync::watch::Receiver<Arc<Tenants>>,
    view: Option<SessionView>,
    shutdown: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .user_agent(concat!("callapi-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            tracing::error!(%err, "webhooks disabled: cannot make an HTTP client");
            return;
        }
    };
    let jetstream = jetstream::new(nats);
    let mut running: HashMap<String, (Webhook, CancellationToken)> = HashMap::new();
    loop {
        let wanted: HashMap<String, Webhook> = tenants
            .borrow_and_update()
            .iter()
            .filter_map(|t| {
                t.webhook
                    .as_ref()
                    .filter(|w| w.enabled)
                    .map(|w| (t.id.clone(), w.clone()))
            })
            .collect();
        running.retain(|tenant, (webhook, stop)| {
            let keep = wanted.get(tenant) == Some(webhook);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (tenant, webhook) in wanted {
            if running.contains_key(&tenant) {
                continue;
            }
            let stop = shutdown.child_token();
            let delivery = Delivery {
                secrets: Secrets::read(&tenant, &webhook),
                tenant: tenant.clone(),
                webhook: webhook.clone(),
                jetstream: jetstream.clone(),
                http: http.clone(),
                view: view.clone(),
            };
            tokio::spawn(delivery.run(stop.clone()));
            running.insert(tenant, (webhook, stop));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = tenants.changed() => if changed.is_err() { return },
        }
    }
}

/// The secrets a tenant's webhook names, read from the environment once when its deliveries
/// start ("" for an unset one: the receiver then refuses, which shows).
struct Secrets {
    password: String,
    token: String,
    signing: Option<String>,
}

impl Secrets {
    /// Reads them, and logs (by name, never value) the variables named but unset.
    fn read(tenant: &str, webhook: &Webhook) -> Self {
        let read = |name: Option<&str>| -> Option<String> {
            let name = name?;
            let value = std::env::var(name).unwrap_or_default();
            if value.is_empty() {
                tracing::error!(%tenant, variable = name, "the webhook names an environment variable this gateway does not have: its requests go without it");
            }
            Some(value)
        };
        Self {
            password: read(webhook.password_env.as_deref()).unwrap_or_default(),
            token: read(webhook.token_env.as_deref()).unwrap_or_default(),
            signing: read(webhook.secret_env.as_deref()),
        }
    }
}

/// One tenant's deliveries on this gateway.
struct Delivery {
    tenant: String,
    webhook: Webhook,
    secrets: Secrets,
    jetstream: jetstream::Context,
    http: reqwest::Client,
    view: Option<SessionView>,
}

impl Delivery {
    /// Takes the tenant's events from the shared consumer until `stop`, opening it again
    /// after an error.
    async fn run(self, stop: CancellationToken) {
        let mut pause = Duration::from_millis(500);
        loop {
            match self.follow(&stop).await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(tenant = %self.tenant, %err, "webhook deliveries interrupted; resuming")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    async fn follow(&self, stop: &CancellationToken) -> Result<(), String> {
        ensure_dead_stream(&self.jetstream).await?;
        let stream = self
            .jetstream
            .get_stream(callapi_kit::calls::calls_stream(&self.tenant))
            .await
            .map_err(|e| format!("no call events stream: {e}"))?;
        let timeout = Duration::from_millis(self.webhook.timeout_ms);
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    description: Some("callapi: webhook deliveries (every gateway)".to_owned()),
                    deliver_policy: jetstream::consumer::DeliverPolicy::New,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // A gateway that dies mid-delivery: another one tries after this.
                    ack_wait: timeout * 3 + Duration::from_secs(5),
                    max_ack_pending: 256,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("webhook consumer: {e}"))?;
        // A few at a time: each waits its turn here, and its ack_wait runs from its delivery.
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(4)
            .messages()
            .await
            .map_err(|e| format!("webhook consumer: {e}"))?;
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                message = messages.next() => message,
            };
            match message {
                Some(Ok(message)) => self.deliver(message).await,
                Some(Err(err)) => return Err(err.to_string()),
                None => return Err("the consumer ended".to_owned()),
            }
        }
    }

    /// Sends one event's bodies; acknowledges it, schedules another try, or gives it up to the
    /// dead letters.
    async fn deliver(&self, message: jetstream::Message) {
        let (attempt, seq) = message
            .info()
            .map(|i| (i.delivered.max(1) as u64, i.stream_sequence))
            .unwrap_or((1, 0));
        let Ok(event) = CallEvent::decode(message.payload.as_ref()) else {
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let facts = self.facts(&event).await;
        let bodies = payloads(&event, &facts);
        let mut outcome = Ok(());
        for (part, body) in bodies.iter().enumerate() {
            outcome = self.post(&event, seq, part, attempt, body).await;
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            Ok(()) => {
                metrics::counter!("callapi_webhook_deliveries_total", "outcome" => "delivered")
                    .increment(1);
                let _ = message.ack().await;
            }
            Err(failure) => {
                let gone = failure.status == Some(404);
                if gone || attempt >= u64::from(self.webhook.max_attempts) {
                    tracing::warn!(tenant = %self.tenant, seq, attempt, %failure, "webhook event given up: dead letter");
                    metrics::counter!("callapi_webhook_deliveries_total", "outcome" => "dead")
                        .increment(1);
                    if self
                        .dead_letter(&event, seq, attempt, &failure, &bodies)
                        .await
                    {
                        let _ = message.ack().await;
                    } else {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(delay_after(&self.webhook, attempt))))
                            .await;
                    }
                } else {
                    let delay = delay_after(&self.webhook, attempt);
                    tracing::info!(tenant = %self.tenant, seq, attempt, %failure, ?delay, "webhook event not taken; trying again");
                    metrics::counter!("callapi_webhook_deliveries_total", "outcome" => "retry")
                        .increment(1);
                    let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
    }

    /// What the store knows of the event's call; a new call's parties are waited for a moment.
    async fn facts(&self, event: &CallEvent) -> CallFacts {
        let Some(view) = &self.view else {
            return CallFacts::default();
        };
        let lookup = || {
            let record = view.recent_call(&event.tenant, &event.callid);
            let meta = view.meta_of(&event.tenant, event.session_id);
            CallFacts::of(record.as_ref(), meta.as_ref())
        };
        let mut facts = lookup();
        if event.kind() == CallEventKind::Created {
            // Counted from the event: a delivery that comes late does not wait again.
            let due_ms = event.at_ms.saturating_add(PARTIES_WAIT.as_millis() as u64);
            let left = Duration::from_millis(due_ms.saturating_sub(callapi_kit::unix_ms()));
            let until = tokio::time::Instant::now() + left.min(PARTIES_WAIT);
            while facts.caller.is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(25)).await;
                facts = lookup();
            }
        }
        facts
    }

    async fn post(
        &self,
        event: &CallEvent,
        seq: u64,
        part: usize,
        attempt: u64,
        body: &Value,
    ) -> Result<(), Failure> {
        let bytes = body.to_string().into_bytes();
        let mut request = self
            .http
            .post(&self.webhook.url)
            .timeout(Duration::from_millis(self.webhook.timeout_ms))
            .header("content-type", "application/json")
            .header("x-callapi-event-id", format!("{}/{part}", event.event_id))
            .header("x-callapi-seq", seq.to_string())
            .header("x-callapi-attempt", attempt.to_string());
        match self.webhook.auth {
            WebhookAuth::None => {}
            WebhookAuth::Basic => {
                let user = self.webhook.username.clone().unwrap_or_default();
                request = request.basic_auth(user, Some(&self.secrets.password));
            }
            WebhookAuth::Bearer => {
                request = request.bearer_auth(&self.secrets.token);
            }
        }
        if let Some(key) = &self.secrets.signing {
            let at = callapi_kit::unix_ms() / 1000;
            request = request.header("x-callapi-signature", signature(key.as_bytes(), at, &bytes));
        }
        let response = request.body(bytes).send().await.map_err(|e| Failure {
            status: None,
            reason: format!("no answer: {}", without_url(&e)),
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure {
                status: Some(status.as_u16()),
                reason: format!("answered {status}"),
            })
        }
    }

    /// Keeps the event's delivery that gave up; false if it could not be kept.
    async fn dead_letter(
        &self,
        event: &CallEvent,
        seq: u64,
        attempts: u64,
        failure: &Failure,
        bodies: &[Value],
    ) -> bool {
        let letter = json!({
            "event_seq": seq,
            "event_id": event.event_id,
            "kind": event.kind().protocol_name(),
            "session_id": event.session_id.to_string(),
            "callid": event.callid,
            "url": without_userinfo(&self.webhook.url),
            "attempts": attempts,
            "status": failure.status,
            "error": failure.reason,
            "failed_at_ms": callapi_kit::unix_ms(),
            "payloads": bodies,
        });
        match self
            .jetstream
            .publish(dead_subject(&self.tenant), letter.to_string().into())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        }
    }
}

/// `url` without user and password, if it carries them.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A request error without the URL (it may hold credentials).
fn without_url(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// Creates the dead-letter stream if it is missing.
async fn ensure_dead_stream(jetstream: &jetstream::Context) -> Result<(), String> {
    if jetstream.get_stream(DEAD_STREAM).await.is_ok() {
        return Ok(());
    }
    let config = jetstream::stream::Config {
        name: DEAD_STREAM.to_owned(),
        description: Some("callapi: webhook events whose delivery gave up".to_owned()),
        subjects: vec!["callapi.v1.webhooks.dead.*".to_owned()],
        max_age: DEAD_MAX_AGE,
        max_messages_per_subject: DEAD_PER_TENANT,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    callapi_kit::calls::ensure_stream(jetstream, config, callapi_kit::calls::STARTUP_ATTEMPTS).await
}

/// `tenant`'s last `limit` dead letters, oldest first, each with its `seq` in the dead-letter
/// stream (none if the stream does not exist yet).
pub async fn dead_letters(
    nats: async_nats::Client,
    tenant: &str,
    limit: usize,
) -> Result<Vec<Value>, String> {
    let jetstream = jetstream::new(nats);
    let Ok(stream) = jetstream.get_stream(DEAD_STREAM).await else {
        return Ok(Vec::new());
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: dead_subject(tenant),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut letters = std::collections::VecDeque::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        let Ok(info) = message.info() else { break };
        let (seq, pending) = (info.stream_sequence, info.pending);
        if let Ok(mut letter) = serde_json::from_slice::<Value>(&message.payload) {
            if let Some(map) = letter.as_object_mut() {
                map.insert("seq".into(), seq.into());
            }
            letters.push_back(letter);
            if letters.len() > limit {
                letters.pop_front();
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(letters.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: CallEventKind, at_ms: u64) -> CallEvent {
        CallEvent {
            tenant: "acme".into(),
            session_id: 42,
            callid: "c1@example".into(),
            node_id: "n1".into(),
            at_ms,
            kind: kind as i32,
            event_id: "c1@example/x".into(),
            ..Default::default()
        }
    }

    fn facts() -> CallFacts {
        CallFacts {
            caller: "sip:101@acme.example".into(),
            callee: "sip:102@acme.example".into(),
            caller_display_name: "Tom".into(),
            user_data: "ticket 7".into(),
            trunk: String::new(),
            started_at_ms: 1_705_051_422_000,
            answered_at_ms: 1_705_051_425_000,
            transferred: false,
        }
    }

    #[test]
    fn a_new_call_is_portsips_call_start() {
        let bodies = payloads(&event(CallEventKind::Created, 1_705_051_422_500), &facts());
        let [body] = &bodies[..] else {
            panic!("{bodies:?}")
        };
        assert_eq!(body["event_type"], "call_start");
        assert_eq!(body["time"], "1705051422");
        assert_eq!(body["session_id"], "42");
        assert_eq!(body["call_id"], "c1@example");
        assert_eq!(body["caller"], "sip:101@acme.example");
        assert_eq!(body["caller_display_name"], "Tom");
        assert_eq!(body["callee"], "sip:102@acme.example");
        assert_eq!(body["direction"], "ext");
        assert_eq!(body["user_data"], "ticket 7");
        assert_eq!(body["tenant_id"], "acme");
        assert!(
            body["cdr_id"]
                .as_str()
                .is_some_and(|id| id.parse::<u64>().is_ok())
        );
    }

    #[test]
    fn targets_ring_and_answer_and_holds_update_the_call() {
        let ringing = payloads(&event(CallEventKind::Ringing, 0), &facts());
        assert_eq!(ringing[0]["event_type"], "cdr_target_ringing");
        assert_eq!(ringing[0]["destination"], "sip:102@acme.example");
        let answered = payloads(&event(CallEventKind::Answered, 0), &facts());
        assert_eq!(answered[0]["event_type"], "cdr_target_answer");
        for kind in [CallEventKind::Held, CallEventKind::TransferCompleted] {
            assert_eq!(
                payloads(&event(kind, 0), &facts())[0]["event_type"],
                "call_update_info"
            );
        }
        assert!(payloads(&event(CallEventKind::TransferProgress, 0), &facts()).is_empty());
    }

    #[test]
    fn an_ended_call_gives_its_target_end_then_the_cdr() {
        let bodies = payloads(&event(CallEventKind::Ended, 1_705_051_446_000), &facts());
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0]["event_type"], "cdr_target_end");
        let cdr = &bodies[1];
        assert_eq!(cdr["event_type"], "call_cdr");
        assert_eq!(cdr["call_status"], "answered");
        assert_eq!(cdr["start_time"], "1705051422");
        assert_eq!(cdr["answered_time"], "1705051425");
        assert_eq!(cdr["ended_time"], "1705051446");
        assert_eq!(cdr["ring_duration"], "3");
        assert_eq!(cdr["talk_duration"], 21);
        assert_eq!(cdr["caller_domain"], "acme.example");
        assert_eq!(cdr["call_targets"][0]["status"], "answered");
        assert_eq!(cdr["call_targets"][0]["status_code"], 0);

        let unanswered = CallFacts {
            answered_at_ms: 0,
            trunk: "carrier".into(),
            ..facts()
        };
        let bodies = payloads(&event(CallEventKind::Ended, 1_705_051_446_000), &unanswered);
        assert_eq!(bodies[0]["event_type"], "cdr_target_noanswer");
        assert_eq!(bodies[1]["call_status"], "noanswer");
        assert_eq!(bodies[1]["answered_time"], "0");
        assert_eq!(bodies[1]["talk_duration"], 0);
        assert_eq!(bodies[1]["direction"], "out");
        assert_eq!(bodies[1]["outbound_caller_id"], "101");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // The well-known HMAC-SHA256 of the pangram under key "key".
        assert_eq!(
            hmac_sha256_hex(
                b"key",
                &[b"The quick brown fox ", b"jumps over the lazy dog"]
            ),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        let signed = signature(b"key", 1_700_000_000, b"{}");
        let expected = hmac_sha256_hex(b"key", &[b"1700000000.{}"]);
        assert_eq!(signed, format!("t=1700000000,v1={expected}"));
    }

    #[test]
    fn dead_letters_show_the_url_without_credentials() {
        assert_eq!(
            without_userinfo("https://crm:s3cret@crm.example/hook?x=a@b"),
            "https://crm.example/hook?x=a@b"
        );
        assert_eq!(
            without_userinfo("https://crm.example/hook"),
            "https://crm.example/hook"
        );
    }

    #[test]
    fn pauses_follow_the_schedule_and_the_last_repeats() {
        let webhook: Webhook =
            serde_json::from_value(json!({"url": "http://x", "retry_delays_ms": [100, 300]}))
                .expect("webhook");
        assert_eq!(delay_after(&webhook, 1), Duration::from_millis(100));
        assert_eq!(delay_after(&webhook, 2), Duration::from_millis(300));
        assert_eq!(delay_after(&webhook, 9), Duration::from_millis(300));
    }
}
