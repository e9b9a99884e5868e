//! Keeps the session store (the `callapi_calls` key-value bucket) in step with one node: a task
//! per node owns the node's [`Book`], feeds it the node's events, asks the node (`dlg_list`,
//! through proxy-connector) for the parties of each new dialog, reconciles with the node's full
//! list at start and then periodically, and writes what the book says.
//!
//! Writes are plain NATS publishes on the bucket's subjects (`$KV.callapi_calls.<key>`; a
//! removal is a purge whose marker expires after a minute, `kit::calls::removal_headers`), in order on one connection and without waiting for
//! JetStream's acknowledgement, so the store keeps up with thousands of events a second. A
//! write lost meanwhile (JetStream unavailable) is repaired by the next reconciliation, which
//! compares the node with the book and then the store's keys with the book.
//!
//! Two things keep the store's cost low when calls are many and short: writes wait up to
//! [`FLUSH_AFTER`] and only the last one per dialog goes out (a dialog that starts and ends
//! within it costs nothing), and a new dialog's parties are asked for only if it still lives
//! [`PARTIES_AFTER`] later.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use callapi_kit::mi::{MiAnswer, MiCall, MiClient};
use callapi_kit::{bus, calls};
use callapi_proto::v1::{CallRecord, OpensipsEvent};
use futures::StreamExt as _;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::calls::{Book, Listed, Write, parse_listing};

/// Events queued for the recorder of one node; past it they are counted and dropped (the next
/// reconciliation repairs the view).
const QUEUE: usize = 16_384;
/// Dialogs asked for per `dlg_list` page while reconciling.
const PAGE: usize = 100;
/// Longest wait for one `dlg_list`.
const MI_TIMEOUT: Duration = Duration::from_secs(4);
/// How long writes are gathered before they go out.
pub const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// How long a new dialog must live before its parties are asked of the node.
pub const PARTIES_AFTER: Duration = Duration::from_millis(250);

/// Writes waiting for the next flush: the last one per key wins, and a record put and deleted
/// again before the store ever had it costs nothing.
#[derive(Debug, Default)]
struct Pending {
    writes: HashMap<String, Write>,
    /// Keys the store holds (as far as this recorder wrote or loaded them).
    stored: HashSet<String>,
}

impl Pending {
    fn add(&mut self, write: Write) {
        let key = key_of(&write);
        if matches!(write, Write::Delete { .. }) && !self.stored.contains(&key) {
            self.writes.remove(&key);
            return;
        }
        self.writes.insert(key, write);
    }

    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    fn take(&mut self) -> Vec<Write> {
        let writes: Vec<Write> = self.writes.drain().map(|(_, write)| write).collect();
        for write in &writes {
            match write {
                Write::Put(_) => self.stored.insert(key_of(write)),
                Write::Delete { .. } => self.stored.remove(&key_of(write)),
            };
        }
        writes
    }
}

fn key_of(write: &Write) -> String {
    match write {
        Write::Put(record) => calls::key(&record.tenant, &record.node_id, &record.callid),
        Write::Delete {
            tenant,
            node_id,
            callid,
        } => calls::key(tenant, node_id, callid),
    }
}

/// Settings of the session store.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    /// Keep the session store up to date (false: events are only published).
    pub enabled: bool,
    /// How often each node's dialogs are compared with the store, milliseconds (and once at
    /// start).
    pub reconcile_interval_ms: u64,
    /// Replicas of the bucket when it is created (3 in a JetStream cluster).
    pub replicas: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reconcile_interval_ms: 30_000,
            replicas: 1,
        }
    }
}

/// Hands a node's events to its recorder; never waits.
#[derive(Clone)]
pub struct Recorder {
    events: mpsc::Sender<OpensipsEvent>,
}

impl Recorder {
    /// Queues `event`; false if the queue is full (the event is not recorded).
    pub fn record(&self, event: OpensipsEvent) -> bool {
        self.events.try_send(event).is_ok()
    }
}

use callapi_kit::unix_ms as now_ms;

/// Which of a node's listed dialogs are the recorder's tenant's (a node serving many tenants:
/// [`crate::tenancy`]).
pub type Belongs = std::sync::Arc<dyn Fn(&Listed) -> bool + Send + Sync>;

/// Starts the recorder of node `node_id` of `tenant`: loads what the store holds for the node,
/// reconciles it with the node (only the dialogs `belongs` accepts, when given), then follows
/// the node's events until `shutdown`.
pub fn start(
    mi: MiClient,
    kv: async_nats::jetstream::kv::Store,
    tenant: &str,
    node_id: &str,
    config: &StoreConfig,
    belongs: Option<Belongs>,
    shutdown: CancellationToken,
) -> (Recorder, tokio::task::JoinHandle<()>) {
    let (events, queue) = mpsc::channel(QUEUE);
    let task = Task {
        nats: mi.nats().clone(),
        mi,
        kv,
        book: Book::new(tenant, node_id),
        tenant: tenant.to_owned(),
        node_id: node_id.to_owned(),
        reconcile_every: Duration::from_millis(config.reconcile_interval_ms.max(1_000)),
        belongs,
    };
    let handle = tokio::spawn(task.run(queue, shutdown));
    (Recorder { events }, handle)
}

struct Task {
    nats: async_nats::Client,
    mi: MiClient,
    kv: async_nats::jetstream::kv::Store,
    book: Book,
    tenant: String,
    node_id: String,
    reconcile_every: Duration,
    belongs: Option<Belongs>,
}

impl Task {
    async fn run(mut self, mut queue: mpsc::Receiver<OpensipsEvent>, shutdown: CancellationToken) {
        let mut pending = Pending::default();
        self.load(&mut pending).await;
        let (parties_tx, mut parties) = mpsc::unbounded_channel::<Listed>();
        let (due_tx, mut due) = mpsc::unbounded_channel::<String>();
        let mut reconcile = tokio::time::interval(self.reconcile_every);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let flush = tokio::time::sleep(FLUSH_AFTER);
        tokio::pin!(flush);
        // Reconciliation asks the node and the store in a task of its own, so events keep
        // flowing meanwhile; what it finds comes back here, in order.
        let (found_tx, mut found) = mpsc::unbounded_channel::<Found>();
        let mut reconciling = false;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                () = &mut flush, if !pending.is_empty() => {
                    for write in pending.take() {
                        self.write(write).await;
                    }
                    continue;
                }
                event = queue.recv() => match event {
                    Some(event) => self.book.on_event(&event, now_ms()),
                    None => break,
                },
                Some(listed) = parties.recv() => self.book.on_parties(&listed, now_ms()),
                Some(callid) = due.recv() => {
                    if self.book.lacks_parties(&callid) {
                        self.ask_parties(callid, parties_tx.clone());
                    }
                    continue;
                }
                _ = reconcile.tick() => {
                    if !reconciling {
                        reconciling = true;
                        self.list_in_background(found_tx.clone());
                    }
                    continue;
                }
                Some(news) = found.recv() => match news {
                    Found::Listing(Ok((mut listed, since))) => {
                        if let Some(belongs) = &self.belongs {
                            listed.retain(|dialog| belongs(dialog));
                        }
                        let mut outcome = self.book.reconcile(&listed, since, now_ms());
                        let suspects = std::mem::take(&mut outcome.suspects);
                        self.check_in_background(suspects, found_tx.clone());
                        outcome
                    }
                    Found::Listing(Err(reason)) => {
                        tracing::debug!(node = %self.node_id, %reason, "cannot list the node's dialogs to reconcile");
                        reconciling = false;
                        continue;
                    }
                    Found::Suspect { callid, listed, asked } => {
                        self.book.on_suspect(&callid, listed.as_ref(), asked)
                    }
                    Found::StoredKeys(stored) => {
                        for write in pending.take() {
                            self.write(write).await;
                        }
                        if let Some(stored) = stored {
                            self.repair_store(stored, &mut pending).await;
                        }
                        reconciling = false;
                        continue;
                    }
                },
            };
            for callid in outcome.ask_parties {
                let due_tx = due_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(PARTIES_AFTER).await;
                    let _ = due_tx.send(callid);
                });
            }
            if pending.is_empty() && !outcome.writes.is_empty() {
                flush
                    .as_mut()
                    .reset(tokio::time::Instant::now() + FLUSH_AFTER);
            }
            for write in outcome.writes {
                pending.add(write);
            }
        }
        for write in pending.take() {
            self.write(write).await;
        }
        let _ = self.nats.flush().await;
    }

    /// Lists the node's dialogs in a task of its own.
    fn list_in_background(&self, found: mpsc::UnboundedSender<Found>) {
        let (mi, node_id) = (self.mi.clone(), self.node_id.clone());
        tokio::spawn(async move {
            let _ = found.send(Found::Listing(list_node(&mi, &node_id).await));
        });
    }

    /// Asks the node about each suspect, then lists the store's keys for the node, in a task
    /// of its own; the answers come back in that order.
    fn check_in_background(&self, suspects: Vec<String>, found: mpsc::UnboundedSender<Found>) {
        let (mi, node_id, kv) = (self.mi.clone(), self.node_id.clone(), self.kv.clone());
        let prefix = format!("{}.{}.", self.tenant, self.node_id);
        tokio::spawn(async move {
            for callid in suspects {
                let asked = now_ms();
                // When the node cannot tell now, the record stays until it can.
                if let Ok(listed) =
                    dlg_list(&mi, &node_id, serde_json::json!({ "callid": callid })).await
                {
                    let listed = listed.into_iter().find(|l| l.callid == callid);
                    let _ = found.send(Found::Suspect {
                        callid,
                        listed,
                        asked,
                    });
                }
            }
            let stored = match kv.keys().await {
                Ok(mut keys) => {
                    let mut stored = HashSet::new();
                    while let Some(Ok(key)) = keys.next().await {
                        if key.starts_with(&prefix) {
                            stored.insert(key);
                        }
                    }
                    Some(stored)
                }
                Err(err) => {
                    tracing::debug!(%err, "cannot list the session store's keys");
                    None
                }
            };
            let _ = found.send(Found::StoredKeys(stored));
        });
    }

    /// Makes the store (whose keys for this node are `stored`) hold exactly the book's records.
    async fn repair_store(&mut self, stored: HashSet<String>, pending: &mut Pending) {
        let held = self.book.keys();
        let mut repaired = 0usize;
        for key in stored.difference(&held) {
            let subject = calls::subject(key);
            if bus::publish_with_headers(
                &self.nats,
                subject,
                calls::removal_headers(),
                bytes::Bytes::new(),
            )
            .await
            .is_ok()
            {
                repaired += 1;
            }
        }
        let missing: Vec<CallRecord> = self
            .book
            .records()
            .filter(|r| !stored.contains(&calls::key(&r.tenant, &r.node_id, &r.callid)))
            .cloned()
            .collect();
        repaired += missing.len();
        for record in missing {
            self.write(Write::Put(record)).await;
        }
        pending.stored = held;
        if repaired > 0 {
            tracing::info!(node = %self.node_id, repaired, "session store repaired");
        }
    }

    /// Reads the node's records left in the store (by an earlier run).
    async fn load(&mut self, pending: &mut Pending) {
        let prefix = format!("{}.{}.", self.tenant, self.node_id);
        let mut keys = match self.kv.keys().await {
            Ok(keys) => keys,
            Err(err) => {
                tracing::warn!(%err, "cannot read the session store's keys");
                return;
            }
        };
        let mut loaded = 0usize;
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { break };
            if !key.starts_with(&prefix) {
                continue;
            }
            if let Ok(Some(bytes)) = self.kv.get(key.as_str()).await
                && let Ok(record) = CallRecord::decode(bytes.as_ref())
            {
                self.book.load(record);
                pending.stored.insert(key);
                loaded += 1;
            }
        }
        tracing::info!(node = %self.node_id, loaded, "session store loaded");
    }

    fn ask_parties(&self, callid: String, answers: mpsc::UnboundedSender<Listed>) {
        let mi = self.mi.clone();
        let node_id = self.node_id.clone();
        tokio::spawn(async move {
            let params = serde_json::json!({ "callid": callid });
            if let Ok(listed) = dlg_list(&mi, &node_id, params).await
                && let Some(found) = listed.into_iter().find(|l| l.callid == callid)
            {
                let _ = answers.send(found);
            }
        });
    }

    async fn write(&self, write: Write) {
        let result = match write {
            Write::Put(record) => {
                let subject = subject(&record.tenant, &record.node_id, &record.callid);
                bus::publish(&self.nats, subject, &record).await
            }
            Write::Delete {
                tenant,
                node_id,
                callid,
            } => {
                bus::publish_with_headers(
                    &self.nats,
                    subject(&tenant, &node_id, &callid),
                    calls::removal_headers(),
                    bytes::Bytes::new(),
                )
                .await
            }
        };
        if let Err(err) = result {
            tracing::debug!(%err, "could not write to the session store");
        }
    }
}

/// What reconciliation found, sent back to the recorder's loop.
enum Found {
    /// The node's full list and when it was asked for.
    Listing(Result<(Vec<Listed>, u64), String>),
    /// What the node said of one suspect (`None`: no such dialog), asked at `asked`.
    Suspect {
        callid: String,
        listed: Option<Listed>,
        asked: u64,
    },
    /// The store's keys for the node (`None`: they could not be listed); the last message.
    StoredKeys(Option<HashSet<String>>),
}

/// Every dialog of the node, page by page, and when the listing began.
async fn list_node(mi: &MiClient, node_id: &str) -> Result<(Vec<Listed>, u64), String> {
    let since = now_ms();
    let mut all = Vec::new();
    loop {
        let page = dlg_list(
            mi,
            node_id,
            serde_json::json!({"index": all.len(), "counter": PAGE}),
        )
        .await?;
        let got = page.len();
        all.extend(page);
        if got < PAGE {
            return Ok((all, since));
        }
    }
}

fn subject(tenant: &str, node_id: &str, callid: &str) -> String {
    calls::subject(&calls::key(tenant, node_id, callid))
}

pub(crate) async fn dlg_list(
    mi: &MiClient,
    node_id: &str,
    params: serde_json::Value,
) -> Result<Vec<Listed>, String> {
    let call = MiCall {
        node_id: node_id.to_owned(),
        method: "dlg_list".to_owned(),
        params_json: params.to_string(),
        timeout: MI_TIMEOUT,
        tenant: String::new(),
        client: "event-ingest".to_owned(),
        hold_slot: Duration::ZERO,
    };
    match mi.call(&call, None).await {
        Ok(MiAnswer::Result(json)) => serde_json::from_str(&json)
            .map(|value| parse_listing(&value))
            .map_err(|e| format!("dlg_list: {e}")),
        // 404: no such dialog (it ended meanwhile).
        Ok(MiAnswer::Error { code: 404, .. }) => Ok(Vec::new()),
        Ok(MiAnswer::Error { code, message, .. }) => Err(format!("dlg_list: {code} {message}")),
        Err(err) => Err(format!("dlg_list: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(callid: &str, state: i32) -> Write {
        Write::Put(CallRecord {
            tenant: "t".into(),
            node_id: "n".into(),
            callid: callid.into(),
            state,
            ..Default::default()
        })
    }

    fn delete(callid: &str) -> Write {
        Write::Delete {
            tenant: "t".into(),
            node_id: "n".into(),
            callid: callid.into(),
        }
    }

    #[test]
    fn only_the_last_write_per_dialog_goes_out_and_short_lives_cost_nothing() {
        let mut pending = Pending::default();
        pending.add(put("a", 2));
        pending.add(put("a", 4));
        pending.add(put("b", 2));
        let mut first = pending.take();
        first.sort_by_key(key_of);
        assert_eq!(first, [put("a", 4), put("b", 2)]);
        // a is in the store now: its end goes out; c never reached it: nothing goes out.
        pending.add(put("c", 2));
        pending.add(delete("c"));
        pending.add(delete("a"));
        assert_eq!(pending.take(), [delete("a")]);
        assert!(pending.is_empty());
        // Deleted and gone: deleting again sends nothing.
        pending.add(delete("a"));
        assert!(pending.take().is_empty());
    }
}
