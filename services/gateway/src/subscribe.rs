//! `Subscribe`: a WebSocket client's feed of its tenant's call events, read from the tenant's
//! JetStream stream `CALLAPI_CALLS_<tenant>` by an ordered consumer. Each event goes out as a
//! `CallEvent` notification with its stream sequence (`seq`: the tenant's events are numbered
//! 1, 2, 3… with no gap); a client that reconnects
//! and subscribes with `since` = the last `seq` it got resumes with no gap and no duplicate.
//! When `since` is older than what the stream still holds, the reply says `missed` and a
//! `Snapshot` of the tenant's current sessions comes first. A client too slow to take them is
//! disconnected by its bounded queue, like any other, and resumes with `since`.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use callapi_proto::v1::CallEvent;
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::outbox::{Outbox, Outgoing};
use crate::params::EventFilter;
use crate::rpc::{self, RpcId, code};
use crate::sessions::{self, SessionView};

/// Live call events shared by every subscriber of a tenant on this gateway: one ordered
/// consumer per tenant, each event decoded and rendered once, then handed to every subscriber
/// (a subscriber resuming with `since` reads its own consumer instead; one that falls behind
/// the shared feed goes on from its own consumer, losing nothing). Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Hub {
    feeds: std::sync::Arc<std::sync::Mutex<HashMap<String, broadcast::Sender<Arc<Item>>>>>,
}

/// One event of a shared feed.
pub(crate) struct Item {
    seq: u64,
    event: CallEvent,
    /// The `CallEvent` notification, as every subscriber sends it.
    text: String,
}

/// Events a subscriber may be behind the shared feed before it goes on from its own consumer.
const HUB_BACKLOG: usize = 8_192;

impl Hub {
    /// A receiver of `tenant`'s live events, starting the shared consumer if none runs.
    fn receiver(&self, nats: &async_nats::Client, tenant: &str) -> broadcast::Receiver<Arc<Item>> {
        let Ok(mut feeds) = self.feeds.lock() else {
            // A poisoned lock: a feed of its own.
            return broadcast::channel(1).1;
        };
        if let Some(sender) = feeds.get(tenant) {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(HUB_BACKLOG);
        feeds.insert(tenant.to_owned(), sender.clone());
        tokio::spawn(self.clone().share(nats.clone(), tenant.to_owned(), sender));
        receiver
    }

    /// Reads `tenant`'s new events and hands them out until no one listens (or the stream
    /// ends: then the receivers see the feed closed and go on alone).
    async fn share(
        self,
        nats: async_nats::Client,
        tenant: String,
        sender: broadcast::Sender<Arc<Item>>,
    ) {
        let from_now = EventFilter {
            session_id: None,
            callid: None,
            since: None,
            extension: None,
        };
        let Ok(mut opened) = open(nats, &tenant, &from_now).await else {
            self.forget(&tenant, &sender, true);
            return;
        };
        let mut idle = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            tokio::select! {
                next = opened.next_raw() => match next {
                    Some((seq, event)) => {
                        let text = json!({"jsonrpc": "2.0", "method": "CallEvent", "params": event_json(seq, &event)})
                            .to_string();
                        // No receiver left: looked at below.
                        let _ = sender.send(Arc::new(Item { seq, event, text }));
                    }
                    None => {
                        self.forget(&tenant, &sender, true);
                        return;
                    }
                },
                _ = idle.tick() => {}
            }
            if sender.receiver_count() == 0 && self.forget(&tenant, &sender, false) {
                return;
            }
        }
    }

    /// Removes `tenant`'s feed if it is `sender`'s and (unless `always`) no one listens; true
    /// if removed. Receivers are made under the same lock, so none is made meanwhile.
    fn forget(&self, tenant: &str, sender: &broadcast::Sender<Arc<Item>>, always: bool) -> bool {
        let Ok(mut feeds) = self.feeds.lock() else {
            return true;
        };
        let ours = feeds.get(tenant).is_some_and(|s| s.same_channel(sender));
        if ours && (always || sender.receiver_count() == 0) {
            feeds.remove(tenant);
            return true;
        }
        !ours
    }
}

/// The last sequence `tenant`'s stream holds now.
async fn last_seq(nats: async_nats::Client, tenant: &str) -> Result<u64, &'static str> {
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream
        .get_stream(callapi_kit::calls::calls_stream(tenant))
        .await
        .map_err(|_| "call events are unavailable: the tenant has no call events stream yet (is event-ingest running with calls_stream?)")?;
    let info = stream
        .info()
        .await
        .map_err(|_| "call events are unavailable now; try again later")?;
    Ok(info.state.last_sequence)
}

/// What a subscription needs.
pub(crate) struct Feed {
    pub nats: async_nats::Client,
    pub hub: Hub,
    pub tenant: String,
    pub filter: EventFilter,
    pub reply_id: Option<RpcId>,
    pub outbox: Outbox,
    pub view: Option<SessionView>,
    pub stop: CancellationToken,
}

/// A feed open on the stream: where it starts, whether events asked for were gone already,
/// and the consumer's messages.
pub(crate) struct Opened {
    /// The first sequence it delivers (for a feed from now: the next one the stream will get).
    pub next: u64,
    /// `since` was older than what the stream keeps: the client missed events.
    pub missed: bool,
    messages: async_nats::jetstream::consumer::pull::Ordered,
}

/// Opens `tenant`'s feed after `filter.since` (or from now); the error is for the client.
pub(crate) async fn open(
    nats: async_nats::Client,
    tenant: &str,
    filter: &EventFilter,
) -> Result<Opened, &'static str> {
    const UNAVAILABLE: &str = "call events are unavailable now; try again later";
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream
        .get_stream(callapi_kit::calls::calls_stream(tenant))
        .await
        .map_err(|err| {
            tracing::debug!(%err, "no call events stream");
            "call events are unavailable: the tenant has no call events stream yet (is event-ingest running with calls_stream?)"
        })?;
    let info = stream.info().await.map_err(|err| {
        tracing::debug!(%err, "cannot read the call events stream");
        UNAVAILABLE
    })?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    // Where the feed starts, and whether events the client asked for are gone already.
    let (deliver_policy, next, missed) = match filter.since {
        Some(since) if since.saturating_add(1) < first => (
            DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            first,
            true,
        ),
        Some(since) => (
            DeliverPolicy::ByStartSequence {
                start_sequence: since.saturating_add(1),
            },
            since.saturating_add(1),
            false,
        ),
        None => (DeliverPolicy::New, last.saturating_add(1), false),
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|err| {
            tracing::debug!(%err, "cannot follow the call events stream");
            UNAVAILABLE
        })?;
    let messages = consumer.messages().await.map_err(|err| {
        tracing::debug!(%err, "cannot follow the call events stream");
        UNAVAILABLE
    })?;
    Ok(Opened {
        next,
        missed,
        messages,
    })
}

impl Opened {
    /// The next event, whatever it is; `None` once the feed ended.
    async fn next_raw(&mut self) -> Option<(u64, CallEvent)> {
        loop {
            let Some(Ok(message)) = self.messages.next().await else {
                return None;
            };
            let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            if let Ok(event) = CallEvent::decode(message.payload.as_ref()) {
                return Some((seq, event));
            }
        }
    }

    /// The next event the filter picks, with its sequence; `None` once the feed ended. An
    /// extension's calls are known from the session store (`view`).
    pub(crate) async fn next_event(
        &mut self,
        filter: &EventFilter,
        view: Option<&SessionView>,
    ) -> Option<(u64, CallEvent)> {
        loop {
            let Some((seq, event)) = self.next_raw().await else {
                tracing::debug!("call events feed ended");
                return None;
            };
            if picks(filter, &event, view, true).await {
                return Some((seq, event));
            }
        }
    }
}

/// The current sessions of `tenant`, as `CallList` gives them (what a feed that missed
/// events starts with).
pub(crate) fn snapshot(view: Option<&SessionView>, tenant: &str) -> Value {
    let now = callapi_kit::unix_ms();
    let sessions: Vec<Value> = view
        .map(|v| v.list(tenant))
        .unwrap_or_default()
        .iter()
        .map(|s| sessions::to_json(s, now))
        .collect();
    json!({"sessions": sessions})
}

/// Answers the `Subscribe`, then forwards the events until `stop`, the client's queue refusing
/// more, or the stream going away.
pub(crate) async fn run(feed: Feed) {
    let Feed {
        nats,
        hub,
        tenant,
        mut filter,
        reply_id,
        outbox,
        view,
        stop,
    } = feed;
    let reply = |text: String| outbox.push(Outgoing::Reply(text)).is_ok();
    let refuse = |message: &str| {
        if let Some(id) = &reply_id {
            let _ = outbox.push(Outgoing::Reply(rpc::error(id, code::UNAVAILABLE, message)));
        }
    };
    if filter.since.is_none() {
        // From now on: the tenant's shared feed, from right after what the stream holds now
        // (the receiver exists first, so nothing after that is missed).
        let mut receiver = hub.receiver(&nats, &tenant);
        let last = match last_seq(nats.clone(), &tenant).await {
            Ok(last) => last,
            Err(message) => return refuse(message),
        };
        if let Some(id) = &reply_id
            && !reply(rpc::result(
                id,
                &json!({"subscribed": true, "next_seq": last + 1, "missed": false}),
            ))
        {
            return;
        }
        let mut done = last;
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = receiver.recv() => item,
            };
            let item = match item {
                Ok(item) => item,
                // Behind the shared feed, or it ended: on alone, right after the last one.
                Err(_) => break,
            };
            if item.seq <= done {
                continue;
            }
            if item.seq > done + 1 {
                // The shared feed began after this subscriber's start: the ones between come
                // from its own consumer.
                break;
            }
            done = item.seq;
            // Behind the feed, a subscriber does not wait for parties: it would fall further
            // behind.
            let may_wait = receiver.len() < 64;
            let picked = picks(&filter, &item.event, view.as_ref(), may_wait).await;
            if picked && !reply(item.text.clone()) {
                return;
            }
        }
        filter.since = Some(done);
        let mut opened = match open(nats, &tenant, &filter).await {
            Ok(opened) => opened,
            Err(_) => return,
        };
        return forward(&mut opened, &filter, view.as_ref(), &outbox, &stop).await;
    }
    let mut opened = match open(nats, &tenant, &filter).await {
        Ok(opened) => opened,
        Err(message) => return refuse(message),
    };
    if let Some(id) = &reply_id
        && !reply(rpc::result(
            id,
            &json!({"subscribed": true, "next_seq": opened.next, "missed": opened.missed}),
        ))
    {
        return;
    }
    if opened.missed {
        let snapshot = json!({"jsonrpc": "2.0", "method": "Snapshot", "params": snapshot(view.as_ref(), &tenant)});
        if !reply(snapshot.to_string()) {
            return;
        }
    }
    forward(&mut opened, &filter, view.as_ref(), &outbox, &stop).await;
}

/// Sends the events of a subscriber's own consumer until `stop`, the client's queue refusing
/// more, or the stream going away.
async fn forward(
    opened: &mut Opened,
    filter: &EventFilter,
    view: Option<&SessionView>,
    outbox: &Outbox,
    stop: &CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = opened.next_event(filter, view) => next,
        };
        let Some((seq, event)) = next else { return };
        let note =
            json!({"jsonrpc": "2.0", "method": "CallEvent", "params": event_json(seq, &event)});
        if outbox.push(Outgoing::Reply(note.to_string())).is_err() {
            return;
        }
    }
}

/// Longest wait, at a call's `created`, for its parties to reach the session store (the
/// feed waits with it, to keep its order).
const PARTIES_WAIT: std::time::Duration = std::time::Duration::from_millis(600);

/// Whether `extension` is a party of the call `event` is about (or of the new call of its
/// transfer), as the session store says. At a call's creation its parties are waited for a
/// moment if `may_wait` (event-ingest asks the node for them); a call whose parties are still
/// unknown then is not the extension's.
async fn involves(
    view: Option<&SessionView>,
    event: &CallEvent,
    extension: &str,
    may_wait: bool,
) -> bool {
    let Some(view) = view else { return false };
    let party = |callid: &str| -> Option<bool> {
        let record = view.recent_call(&event.tenant, callid)?;
        if record.caller_uri.is_empty() && record.callee_uri.is_empty() {
            return None;
        }
        Some(
            [&record.caller_uri, &record.callee_uri]
                .iter()
                .any(|uri| sessions::user_part(uri) == extension),
        )
    };
    let callids: Vec<&str> = [event.callid.as_str(), event.transfer_callid.as_str()]
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    let wait = may_wait && event.kind() == callapi_proto::v1::CallEventKind::Created;
    let until = tokio::time::Instant::now() + PARTIES_WAIT;
    loop {
        let known: Vec<Option<bool>> = callids.iter().map(|c| party(c)).collect();
        if known.contains(&Some(true)) {
            return true;
        }
        if !wait || !known.contains(&None) || tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Whether the filter picks `event`, its extension (if any) as the session store knows the
/// call's parties (waited for at the call's creation if `may_wait`).
async fn picks(
    filter: &EventFilter,
    event: &CallEvent,
    view: Option<&SessionView>,
    may_wait: bool,
) -> bool {
    wanted(filter, event)
        && match &filter.extension {
            None => true,
            Some(extension) => involves(view, event, extension, may_wait).await,
        }
}

/// Whether `event` is one the filter picks (all but the extension).
fn wanted(filter: &EventFilter, event: &CallEvent) -> bool {
    filter.session_id.is_none_or(|id| event.session_id == id)
        && filter
            .callid
            .as_ref()
            .is_none_or(|c| event.callid == *c || event.transfer_callid == *c)
}

/// What a client gets of `event`, at stream sequence `seq` (a `CallEvent` notification's
/// params, an SSE event's data).
pub(crate) fn event_json(seq: u64, event: &CallEvent) -> Value {
    let mut params = json!({
        "seq": seq,
        "kind": event.kind().protocol_name(),
        "session_id": event.session_id.to_string(),
        "callid": event.callid,
        "node": event.node_id,
        "at_ms": event.at_ms,
    });
    if let Some(map) = params.as_object_mut() {
        let leg = event.leg().protocol_name();
        for (name, value) in [
            ("leg", leg),
            ("transfer_callid", event.transfer_callid.as_str()),
            ("sip_status", event.sip_status.as_str()),
            ("cause", event.cause.as_str()),
        ] {
            if !value.is_empty() {
                map.insert(name.to_owned(), value.into());
            }
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1::CallEventKind;

    #[test]
    fn a_filter_picks_a_session_or_a_callid_and_its_transfers() {
        let event = CallEvent {
            session_id: 7,
            callid: "x".into(),
            transfer_callid: "y".into(),
            kind: CallEventKind::TransferStarted as i32,
            ..Default::default()
        };
        let filter = |session_id, callid: Option<&str>| EventFilter {
            session_id,
            callid: callid.map(str::to_owned),
            since: None,
            extension: None,
        };
        assert!(wanted(&filter(None, None), &event));
        assert!(wanted(&filter(Some(7), None), &event));
        assert!(!wanted(&filter(Some(8), None), &event));
        assert!(wanted(&filter(None, Some("y")), &event));
        assert!(!wanted(&filter(None, Some("z")), &event));
        let note = event_json(12, &event);
        assert_eq!(note["seq"], 12);
        assert_eq!(note["kind"], "transfer_started");
        assert_eq!(note["session_id"], "7");
        assert!(note.get("cause").is_none());
    }
}
