//! The live view of every active call, as every gateway replica sees it: a copy of the session
//! store (the `callapi_calls` key-value bucket, written by event-ingest) kept up to date by a
//! watch, grouped into sessions, and the JSON clients get for them (the same for WebSocket
//! `CallList`/`CallGet` and the REST API).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use callapi_kit::calls;
use callapi_proto::v1::{CallRecord, DialogState, SessionMeta};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::Value;

/// One session: the dialogs that share a session id.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Session id.
    pub id: u64,
    /// Its dialogs, oldest first.
    pub calls: Vec<CallRecord>,
    /// What its creator said about it (REST-created sessions only).
    pub meta: Option<SessionMeta>,
}

pub(crate) type Entries<T> = Arc<RwLock<HashMap<String, T>>>;

/// The live view. Cheap to clone.
#[derive(Clone, Default)]
pub struct SessionView {
    /// Call records by key.
    records: Entries<CallRecord>,
    /// Session metadata by key.
    meta: Entries<SessionMeta>,
    /// The metadata bucket, for [`SessionView::remember`].
    meta_kv: Option<kv::Store>,
    /// Keys of the metadata this gateway wrote (it removes them once their session is over).
    own: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// When a call of each session with metadata was last written to the store, by metadata
    /// key: such a session has been placed, so once its calls are gone it is over.
    seen: Entries<u64>,
    /// The last record of every call seen, by `<tenant>/<Call-ID>`, kept [`RECENT_MS`] after
    /// the call left the store (what a webhook's CDR tells of a call that just ended).
    recent: Entries<CallRecord>,
    /// When each call of `recent` was first seen gone from the store, Unix milliseconds.
    gone_at: Entries<u64>,
}

/// How long a call's last record is kept after it left the store.
const RECENT_MS: u64 = 300_000;

/// How long a session's metadata is kept once the session has no call left (or before its
/// first call shows up).
const META_GRACE_MS: u64 = 60_000;

/// How often metadata of sessions that are over is looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Longest wait at start for a bucket's current content.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Copies bucket `kv` into `entries` and keeps it up to date until `shutdown` (watching again
/// from scratch if the watch ends); returns once the current content is in (or [`CATCH_UP`]).
pub(crate) async fn follow<T: prost::Message + Default + Send + Sync + 'static>(
    kv: kv::Store,
    name: &'static str,
    entries: Entries<T>,
    on_put: OnPut<T>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let pending = kv
        .status()
        .await
        .map_err(|e| format!("key-value bucket {name}: {e}"))?
        .values();
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| format!("cannot watch key-value bucket {name}: {e}"))?;
    let (caught_up, caught_up_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut caught_up = (pending > 0).then_some(caught_up);
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => break,
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    apply(&entries, &entry, on_put.as_ref());
                    if entry.delta == 0
                        && let Some(done) = caught_up.take()
                    {
                        let _ = done.send(());
                    }
                }
                // After an error the watch may be finished: polling it again would panic
                // (async-nats), so it is made again, as when it ends.
                Some(Err(_)) | None => {
                    if let Some(Err(err)) = entry {
                        tracing::warn!(%err, bucket = name, "key-value watch error; following it again");
                    } else {
                        tracing::warn!(bucket = name, "key-value watch ended; following it again");
                    }
                    // Never the finished watch again: made anew, every second until it is.
                    let again = loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break None,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        match kv.watch_with_history(">").await {
                            Ok(again) => break Some(again),
                            Err(err) => tracing::warn!(%err, bucket = name, "cannot watch"),
                        }
                    };
                    let Some(again) = again else { break };
                    if let Ok(mut map) = entries.write() {
                        map.clear();
                    }
                    watch = again;
                }
            }
        }
    });
    if pending > 0 {
        let _ = tokio::time::timeout(CATCH_UP, caught_up_rx).await;
    }
    Ok(())
}

/// What to do with each value put in a followed bucket, besides keeping it.
pub(crate) type OnPut<T> = Arc<dyn Fn(&T) + Send + Sync>;

fn apply<T: prost::Message + Default>(
    entries: &Entries<T>,
    entry: &kv::Entry,
    on_put: &(dyn Fn(&T) + Send + Sync),
) {
    let Ok(mut map) = entries.write() else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => match T::decode(entry.value.as_ref()) {
            Ok(value) => {
                on_put(&value);
                map.insert(entry.key.clone(), value);
            }
            Err(err) => tracing::warn!(%err, key = %entry.key, "undecodable record"),
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            map.remove(&entry.key);
        }
    }
}

impl SessionView {
    /// Opens the buckets (creating them if no one did yet), loads what they hold, and
    /// follows them until `shutdown`.
    pub async fn start(
        jetstream: &async_nats::jetstream::Context,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Self, String> {
        let calls_kv = calls::open_existing(jetstream).await?;
        let meta_kv = calls::open_meta(jetstream).await?;
        let view = Self {
            meta_kv: Some(meta_kv.clone()),
            ..Self::default()
        };
        let (meta, seen, recent) = (view.meta.clone(), view.seen.clone(), view.recent.clone());
        let on_call: OnPut<CallRecord> = Arc::new(move |record: &CallRecord| {
            if let Ok(mut recent) = recent.write() {
                recent.insert(recent_key(&record.tenant, &record.callid), record.clone());
            }
            let key = calls::meta_key(&record.tenant, record.session_id);
            let has_meta = meta.read().is_ok_and(|m| m.contains_key(&key));
            if has_meta && let Ok(mut seen) = seen.write() {
                seen.insert(key, callapi_kit::unix_ms());
            }
        });
        follow(
            calls_kv,
            calls::BUCKET,
            view.records.clone(),
            on_call,
            shutdown.clone(),
        )
        .await?;
        follow(
            meta_kv,
            calls::META_BUCKET,
            view.meta.clone(),
            Arc::new(|_: &SessionMeta| {}),
            shutdown.clone(),
        )
        .await?;
        let pruner = view.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => pruner.prune(callapi_kit::unix_ms()).await,
                }
            }
        });
        Ok(view)
    }

    /// Forgets the metadata of sessions over for [`META_GRACE_MS`] (no call in the store, and
    /// none written for that long, or never one since the metadata was written that long ago);
    /// what this gateway wrote is removed from the bucket too.
    async fn prune(&self, now_ms: u64) {
        let live_calls: std::collections::HashSet<String> = match self.records.read() {
            Ok(records) => records
                .values()
                .map(|r| recent_key(&r.tenant, &r.callid))
                .collect(),
            Err(_) => return,
        };
        if let (Ok(mut recent), Ok(mut gone_at)) = (self.recent.write(), self.gone_at.write()) {
            recent.retain(|key, _| {
                if live_calls.contains(key) {
                    gone_at.remove(key);
                    return true;
                }
                let gone = *gone_at.entry(key.clone()).or_insert(now_ms);
                now_ms.saturating_sub(gone) <= RECENT_MS
            });
            gone_at.retain(|key, _| recent.contains_key(key));
        }
        let live: std::collections::HashSet<String> = match self.records.read() {
            Ok(records) => records
                .values()
                .map(|r| calls::meta_key(&r.tenant, r.session_id))
                .collect(),
            Err(_) => return,
        };
        let mut gone = Vec::new();
        if let (Ok(mut meta), Ok(mut seen)) = (self.meta.write(), self.seen.write()) {
            meta.retain(|key, m| {
                let last = seen.get(key).copied().unwrap_or(0).max(m.created_at_ms);
                let keep = live.contains(key) || now_ms.saturating_sub(last) <= META_GRACE_MS;
                if !keep {
                    gone.push(key.clone());
                }
                keep
            });
            seen.retain(|key, _| meta.contains_key(key));
        }
        let own: Vec<String> = match self.own.lock() {
            Ok(mut own) => gone.into_iter().filter(|key| own.remove(key)).collect(),
            Err(_) => Vec::new(),
        };
        if let Some(kv) = &self.meta_kv {
            for key in own {
                if let Err(err) = kv.purge(&key).await {
                    tracing::debug!(%err, %key, "cannot remove a session's metadata");
                }
            }
        }
    }

    /// Forgets a session's metadata at once (its create failed), here and in the bucket.
    pub async fn forget(&self, tenant: &str, id: u64) {
        let key = calls::meta_key(tenant, id);
        if let Ok(mut meta) = self.meta.write() {
            meta.remove(&key);
        }
        let own = self.own.lock().is_ok_and(|mut own| own.remove(&key));
        if own && let Some(kv) = &self.meta_kv {
            let _ = kv.purge(&key).await;
        }
    }

    /// Stores what a client said about a session it creates, for every gateway to show.
    pub async fn remember(&self, meta: SessionMeta) -> Result<(), String> {
        let key = calls::meta_key(&meta.tenant, meta.session_id);
        let bytes = meta.encode_to_vec();
        // Here first: this gateway shows it at once, whatever the bucket's echo does.
        if let Ok(mut map) = self.meta.write() {
            map.insert(key.clone(), meta);
        }
        if let Some(kv) = &self.meta_kv {
            if let Ok(mut own) = self.own.lock() {
                own.insert(key.clone());
            }
            kv.put(&key, bytes.into())
                .await
                .map_err(|e| format!("key-value bucket {}: {e}", calls::META_BUCKET))?;
        }
        Ok(())
    }

    /// Session `id` of `tenant` once it is over (no call left), while its metadata is kept: a
    /// session with no calls.
    pub fn ended(&self, tenant: &str, id: u64) -> Option<Session> {
        let meta = self.meta_of(tenant, id)?;
        let key = calls::meta_key(tenant, id);
        // Placed (a call of it was seen) or failed: not merely not reported yet.
        let placed = self.seen.read().is_ok_and(|seen| seen.contains_key(&key));
        if !placed && meta.end_code.is_empty() {
            return None;
        }
        let live = self.records.read().ok().is_some_and(|records| {
            records
                .values()
                .any(|r| r.tenant == tenant && r.session_id == id)
        });
        (!live).then(|| Session {
            id,
            calls: Vec::new(),
            meta: Some(meta),
        })
    }

    /// Stores that the CallStart of a session failed, and why.
    pub async fn record_failure(
        &self,
        mut meta: SessionMeta,
        error: &callapi_proto::v1::CommandError,
    ) -> Result<(), String> {
        meta.end_code = error.code().protocol_name().to_owned();
        meta.end_message = error.message.clone();
        meta.end_sip_code = error.sip_code;
        // The minute it is shown for counts from now.
        meta.created_at_ms = callapi_kit::unix_ms();
        self.remember(meta).await
    }

    /// The last record of `tenant`'s call `callid`: live, or gone from the store less than
    /// five minutes ago.
    pub fn recent_call(&self, tenant: &str, callid: &str) -> Option<CallRecord> {
        let recent = self.recent.read().ok()?;
        recent.get(&recent_key(tenant, callid)).cloned()
    }

    /// The metadata of session `id` of `tenant`.
    pub fn meta_of(&self, tenant: &str, id: u64) -> Option<SessionMeta> {
        let map = self.meta.read().ok()?;
        map.get(&calls::meta_key(tenant, id))
            .filter(|m| m.tenant == tenant)
            .cloned()
    }

    /// How many dialogs each node holds now (every tenant's).
    pub fn dialogs_per_node(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        if let Ok(records) = self.records.read() {
            for record in records.values() {
                *counts.entry(record.node_id.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Every session of `tenant`, newest first.
    pub fn list(&self, tenant: &str) -> Vec<Session> {
        let Ok(records) = self.records.read() else {
            return Vec::new();
        };
        let prefix = format!("{tenant}.");
        let mut sessions: BTreeMap<u64, Vec<CallRecord>> = BTreeMap::new();
        for (key, record) in records.iter() {
            if key.starts_with(&prefix) && record.tenant == tenant {
                sessions
                    .entry(record.session_id)
                    .or_default()
                    .push(record.clone());
            }
        }
        let mut sessions: Vec<Session> = sessions
            .into_iter()
            .map(|(id, mut calls)| {
                calls.sort_by_key(|c| (c.started_at_ms, c.callid.clone()));
                Session {
                    id,
                    calls,
                    meta: self.meta_of(tenant, id),
                }
            })
            .collect();
        sessions.sort_by_key(|s| std::cmp::Reverse(s.calls.first().map_or(0, |c| c.started_at_ms)));
        sessions
    }

    /// One session of `tenant` by id.
    pub fn get(&self, tenant: &str, id: u64) -> Option<Session> {
        self.list(tenant).into_iter().find(|s| s.id == id)
    }

    /// The session of `tenant` holding the dialog `callid`.
    pub fn by_callid(&self, tenant: &str, callid: &str) -> Option<Session> {
        self.list(tenant)
            .into_iter()
            .find(|s| s.calls.iter().any(|c| c.callid == callid))
    }
}

/// What to remember of a CallStart whose first leg is `first_callid` (the options SIP does not
/// tell back), if there is anything (`always`: even if not, so its end can be shown).
pub fn meta_of_start(
    tenant: &str,
    first_callid: &str,
    options: &callapi_proto::v1::CallOptions,
    always: bool,
) -> Option<SessionMeta> {
    let trunk = options
        .trunk
        .as_ref()
        .map(|t| t.name.clone())
        .unwrap_or_default();
    if !always
        && options.caller_display_name.is_empty()
        && trunk.is_empty()
        && options.user_data.is_empty()
    {
        return None;
    }
    Some(SessionMeta {
        tenant: tenant.to_owned(),
        session_id: calls::session_id(tenant, first_callid),
        first_callid: first_callid.to_owned(),
        caller_display_name: options.caller_display_name.clone(),
        trunk,
        user_data: options.user_data.clone(),
        created_at_ms: callapi_kit::unix_ms(),
        ..Default::default()
    })
}

/// RFC 3339 UTC, to the second (`2026-12-01T10:00:00Z`), or none for 0.
fn time(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

fn recent_key(tenant: &str, callid: &str) -> String {
    format!("{tenant}/{callid}")
}

/// The user part of a SIP URI (the number or extension PortSIP shows), or the URI itself.
pub fn user_part(uri: &str) -> &str {
    let rest = uri
        .strip_prefix("sips:")
        .or_else(|| uri.strip_prefix("sip:"))
        .or_else(|| uri.strip_prefix("tel:"))
        .unwrap_or(uri);
    let user = rest.split(['@', ';', '?']).next().unwrap_or(rest);
    if user.is_empty() { uri } else { user }
}

/// The state of one dialog in words.
fn state(call: &CallRecord) -> &'static str {
    match call.state() {
        _ if !call.transferred_to.is_empty() => "transferring",
        DialogState::Unspecified | DialogState::Unconfirmed => "trying",
        DialogState::Early => "ringing",
        DialogState::ConfirmedNotAcked | DialogState::Confirmed => "answered",
        DialogState::Deleted => "ended",
    }
}

/// One call (dialog) of a session as clients get it: PortSIP's fields, then ours.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct CallItem {
    /// Caller number (the user part of the From URI); null until known.
    pub caller: Option<String>,
    /// Caller display name (null: not known).
    pub caller_display_name: Option<String>,
    /// Callee number (the user part of the To URI); null until known.
    pub callee: Option<String>,
    /// Trunk name (null: not known).
    pub trunk: Option<String>,
    /// When the call was first seen, RFC 3339 UTC.
    pub started_at: Option<String>,
    /// Seconds since it was answered (0 before).
    pub talking_time: u64,
    /// SIP Call-ID.
    pub callid: String,
    /// From URI.
    pub caller_uri: Option<String>,
    /// To URI.
    pub callee_uri: Option<String>,
    /// `trying`, `ringing`, `answered` or `transferring`.
    pub state: &'static str,
    /// When it was answered, RFC 3339 UTC (null before).
    pub answered_at: Option<String>,
    /// Whether OpenSIPS re-INVITEd the caller's leg to hold.
    pub caller_held: bool,
    /// Whether OpenSIPS re-INVITEd the callee's leg to hold.
    pub callee_held: bool,
    /// The Call-ID of the call a transfer of this one made (null if none).
    pub transferred_to: Option<String>,
}

/// A session as clients get it: PortSIP's `{id, calls}` (the id a decimal string), and the
/// node it is on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct SessionItem {
    /// Session id: an int64 in decimal.
    pub id: String,
    /// The OpenSIPS node.
    pub node: Option<String>,
    /// The `user_data` it was created with (null: none).
    pub user_data: Option<String>,
    /// `active`, or `ended` for a session created through callapi shown for a minute after its
    /// last call went.
    pub state: &'static str,
    /// Why it ended, if its CallStart failed (null otherwise).
    pub end_cause: Option<EndCause>,
    /// Its calls, oldest first.
    pub calls: Vec<CallItem>,
}

/// Why a session's CallStart failed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct EndCause {
    /// The command error code (`CALL_FAILED`, `TIMEOUT`…, docs/protocol.md).
    pub code: String,
    /// What happened.
    pub message: String,
    /// The SIP status behind it (0: none).
    pub sip_code: i32,
}

/// `GET /sessions`: PortSIP's `{count, items}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct SessionList {
    /// Sessions matching (before `skip` and `top`).
    pub count: usize,
    /// The page asked for.
    pub items: Vec<SessionItem>,
}

fn text(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// Whether none of the session's calls is left.
pub fn is_over(session: &Session) -> bool {
    session
        .calls
        .iter()
        .all(|c| c.state() == DialogState::Deleted)
}

/// What a list selection picks (WebSocket `CallList`, REST `GET /api/sessions`): the number of
/// sessions matching its filter, and the page asked for, ordered by the first call's start.
pub fn select(
    mut sessions: Vec<Session>,
    selection: &crate::params::ListSelection,
) -> (usize, Vec<Session>) {
    if let Some(filter) = selection.filter.as_deref() {
        sessions.retain(|s| {
            s.calls.iter().any(|c| {
                c.caller_uri.contains(filter) || c.callee_uri.contains(filter) || c.callid == filter
            })
        });
    }
    sessions.sort_by_key(|s| (s.calls.first().map_or(0, |c| c.started_at_ms), s.id));
    if selection.descending {
        sessions.reverse();
    }
    let count = sessions.len();
    let page = sessions
        .into_iter()
        .skip(selection.skip)
        .take(selection.top)
        .collect();
    (count, page)
}

/// A session as clients get it (the same for WebSocket `CallList`/`CallGet` and REST).
pub fn item(session: &Session, now_ms: u64) -> SessionItem {
    let meta = session.meta.as_ref();
    let calls = session
        .calls
        .iter()
        .map(|call| CallItem {
            caller: text(user_part(&call.caller_uri)),
            caller_display_name: meta.and_then(|m| text(&m.caller_display_name)),
            callee: text(user_part(&call.callee_uri)),
            // The callee's call went through the trunk, not the caller's first one.
            trunk: meta
                .filter(|m| m.first_callid != call.callid)
                .and_then(|m| text(&m.trunk)),
            started_at: time(call.started_at_ms),
            talking_time: match call.answered_at_ms {
                0 => 0,
                at => now_ms.saturating_sub(at) / 1000,
            },
            callid: call.callid.clone(),
            caller_uri: text(&call.caller_uri),
            callee_uri: text(&call.callee_uri),
            state: state(call),
            answered_at: time(call.answered_at_ms),
            caller_held: call.caller_held,
            callee_held: call.callee_held,
            transferred_to: text(&call.transferred_to),
        })
        .collect();
    SessionItem {
        id: session.id.to_string(),
        node: session.calls.first().map(|c| c.node_id.clone()),
        user_data: meta.and_then(|m| text(&m.user_data)),
        state: if is_over(session) { "ended" } else { "active" },
        end_cause: meta
            .filter(|m| !m.end_code.is_empty() && is_over(session))
            .map(|m| EndCause {
                code: m.end_code.clone(),
                message: m.end_message.clone(),
                sip_code: m.end_sip_code,
            }),
        calls,
    }
}

/// [`item`] as JSON.
pub fn to_json(session: &Session, now_ms: u64) -> Value {
    serde_json::to_value(item(session, now_ms)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, session_id: u64, callid: &str, started: u64) -> CallRecord {
        CallRecord {
            tenant: tenant.into(),
            node_id: "n1".into(),
            session_id,
            callid: callid.into(),
            caller_uri: "sip:1001@pbx.example.com".into(),
            callee_uri: "sip:+15551234@pbx.example.com;user=phone".into(),
            state: DialogState::Confirmed as i32,
            started_at_ms: started,
            answered_at_ms: started + 2_000,
            ..Default::default()
        }
    }

    fn view(records: Vec<CallRecord>) -> SessionView {
        let view = SessionView::default();
        if let Ok(mut map) = view.records.write() {
            for r in records {
                map.insert(calls::key(&r.tenant, &r.node_id, &r.callid), r);
            }
        }
        view
    }

    #[test]
    fn records_group_into_sessions_per_tenant() {
        let v = view(vec![
            record("acme", 7, "Y", 2_000),
            record("acme", 7, "X", 1_000),
            record("acme", 9, "Z", 5_000),
            record("other", 7, "W", 1_000),
        ]);
        let list = v.list("acme");
        assert_eq!(list.iter().map(|s| s.id).collect::<Vec<_>>(), [9, 7]);
        let calls: Vec<&str> = list[1].calls.iter().map(|c| c.callid.as_str()).collect();
        assert_eq!(calls, ["X", "Y"]);
        assert_eq!(v.by_callid("acme", "Y").map(|s| s.id), Some(7));
        assert_eq!(v.by_callid("acme", "W"), None);
        assert_eq!(v.get("other", 7).map(|s| s.calls.len()), Some(1));
    }

    #[tokio::test]
    async fn metadata_of_sessions_that_are_over_is_forgotten() {
        let v = view(vec![record("acme", 7, "X", 1_000)]);
        let meta = |id: u64, created_at_ms: u64| SessionMeta {
            tenant: "acme".into(),
            session_id: id,
            user_data: "u".into(),
            created_at_ms,
            ..Default::default()
        };
        for m in [meta(7, 0), meta(8, 0), meta(9, 100_000)] {
            v.remember(m).await.unwrap();
        }
        // 8 has no call and is old; 7 still has one; 9 is recent.
        v.prune(120_000).await;
        assert!(v.meta_of("acme", 7).is_some());
        assert!(v.meta_of("acme", 8).is_none());
        assert!(v.meta_of("acme", 9).is_some());
        if let Ok(mut records) = v.records.write() {
            records.clear();
        }
        v.prune(120_000).await;
        assert!(v.meta_of("acme", 7).is_none());
        v.prune(161_000).await;
        assert!(v.meta_of("acme", 9).is_none());
    }

    #[tokio::test]
    async fn a_session_reads_as_ended_only_once_placed_or_failed() {
        let v = view(vec![]);
        let meta = SessionMeta {
            tenant: "acme".into(),
            session_id: 7,
            created_at_ms: callapi_kit::unix_ms(),
            ..Default::default()
        };
        v.remember(meta.clone()).await.unwrap();
        // Not reported yet: not ended, and another tenant never sees it.
        assert_eq!(v.ended("acme", 7), None);
        let failure = callapi_proto::v1::CommandError {
            code: callapi_proto::v1::ErrorCode::CallFailed as i32,
            message: "the callee did not answer: 408 Request Timeout".into(),
            sip_code: 408,
        };
        v.record_failure(meta, &failure).await.unwrap();
        let ended = v.ended("acme", 7).expect("ended");
        let json = to_json(&ended, 0);
        assert_eq!(json["state"], "ended");
        assert_eq!(json["calls"], serde_json::json!([]));
        assert_eq!(json["end_cause"]["code"], "CALL_FAILED");
        assert_eq!(json["end_cause"]["sip_code"], 408);
        assert_eq!(v.ended("other", 7), None);
        // A call of it in the store: active, and no cause shown.
        if let Ok(mut map) = v.records.write() {
            let r = record("acme", 7, "X", 1_000);
            map.insert(calls::key(&r.tenant, &r.node_id, &r.callid), r);
        }
        assert_eq!(v.ended("acme", 7), None);
        let live = v.get("acme", 7).expect("live");
        assert_eq!(to_json(&live, 2_000)["end_cause"], Value::Null);
    }

    #[test]
    fn the_json_has_portsips_fields_and_ours() {
        let session = Session {
            id: 884_757_570_370_146_304,
            calls: vec![record("acme", 1, "X", 1_764_583_200_000)],
            meta: None,
        };
        let json = to_json(&session, 1_764_583_212_000);
        assert_eq!(json["id"], "884757570370146304");
        let call = &json["calls"][0];
        assert_eq!(call["caller"], "1001");
        assert_eq!(call["callee"], "+15551234");
        assert_eq!(call["caller_display_name"], Value::Null);
        assert_eq!(call["trunk"], Value::Null);
        assert_eq!(call["started_at"], "2025-12-01T10:00:00Z");
        assert_eq!(call["talking_time"], 10);
        assert_eq!(call["state"], "answered");
        assert_eq!(call["transferred_to"], Value::Null);
        assert_eq!(json["user_data"], Value::Null);
    }

    #[test]
    fn what_the_creator_said_shows_on_its_calls() {
        let session = Session {
            id: 7,
            calls: vec![record("acme", 7, "X", 1_000), record("acme", 7, "Y", 2_000)],
            meta: Some(SessionMeta {
                tenant: "acme".into(),
                session_id: 7,
                first_callid: "X".into(),
                caller_display_name: "Sales".into(),
                trunk: "carrier".into(),
                user_data: "crm-42".into(),
                ..Default::default()
            }),
        };
        let json = to_json(&session, 3_000);
        assert_eq!(json["user_data"], "crm-42");
        assert_eq!(json["calls"][0]["caller_display_name"], "Sales");
        assert_eq!(json["calls"][1]["caller_display_name"], "Sales");
        assert_eq!(json["calls"][0]["trunk"], Value::Null);
        assert_eq!(json["calls"][1]["trunk"], "carrier");
    }
}
