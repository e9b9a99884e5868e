//! Normalised call events (issue 12): one model of a call's life on the tenant's JetStream
//! stream `CALLAPI_CALLS_<tenant>`, read back by a consumer as another service would, with
//! duplicates removed and the tenant's events numbered with no gap.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use callapi_e2e::Stack;
use callapi_e2e::client::shape;
use callapi_proto::v1::{CallEvent, CallEventKind};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::json;

use crate::commands::call;
use crate::event_fanout::inject;

/// A consumer of `tenant`'s call events from the start of the stream.
async fn consumer(
    stack: &Stack,
    tenant: &str,
) -> async_nats::jetstream::consumer::Consumer<pull::Config> {
    let nats = callapi_e2e::process::connect_nats(&stack.nats.url).await;
    let jetstream = async_nats::jetstream::new(nats);
    let stream = jetstream
        .get_stream(format!("CALLAPI_CALLS_{tenant}"))
        .await
        .expect("stream");
    stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer")
}

/// Every event the consumer has, until none comes for `quiet`: (stream sequence, subject, event).
async fn drain(
    consumer: &async_nats::jetstream::consumer::Consumer<pull::Config>,
    quiet: Duration,
) -> Vec<(u64, String, CallEvent)> {
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, messages.next()).await {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event = CallEvent::decode(message.payload.as_ref()).expect("CallEvent");
        out.push((sequence, message.subject.to_string(), event));
        let _ = message.ack().await;
    }
    out
}

fn kinds_of(events: &[(u64, String, CallEvent)], callid: &str) -> Vec<CallEventKind> {
    events
        .iter()
        .filter(|(_, _, e)| e.callid == callid)
        .map(|(_, _, e)| e.kind())
        .collect()
}

#[tokio::test]
async fn a_calls_life_is_one_ordered_stream_of_normalised_events() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    for method in ["CallHold", "CallUnHold", "CallEnd"] {
        let notes = client.run(method, json!({"callid": callid})).await;
        assert!(!notes.iter().any(|n| n["method"] == "Error"), "{notes:#?}");
        assert_eq!(shape(&notes).last().map(String::as_str), Some("Ended"));
    }
    let consumer = consumer(&stack, "default").await;
    let mut events = Vec::new();
    for _ in 0..20 {
        events.extend(drain(&consumer, Duration::from_millis(300)).await);
        if kinds_of(&events, &callid).contains(&CallEventKind::Ended) {
            break;
        }
    }
    // The tenant's sequence numbers each event, one after the other: no gap.
    assert!(
        events.windows(2).all(|w| w[0].0 + 1 == w[1].0) && events[0].0 == 1,
        "{events:#?}"
    );
    // The call the client talks on (the REFER's new call): its whole life, in order.
    assert_eq!(
        kinds_of(&events, &callid),
        [
            CallEventKind::Created,
            CallEventKind::Ringing,
            CallEventKind::Answered,
            CallEventKind::Held,
            CallEventKind::Held,
            CallEventKind::Resumed,
            CallEventKind::Resumed,
            CallEventKind::Ended,
        ],
        "{events:#?}"
    );
    let ours: Vec<&CallEvent> = events
        .iter()
        .map(|(_, _, e)| e)
        .filter(|e| e.callid == callid)
        .collect();
    assert!(
        ours.iter()
            .all(|e| e.tenant == "default" && e.node_id == "opensips1")
    );
    assert_eq!(ours.last().unwrap().cause, "hangup");
    // The click-to-dial's first call was transferred to it, and it joined that call's session.
    let started = events
        .iter()
        .map(|(_, _, e)| e)
        .find(|e| e.kind() == CallEventKind::TransferStarted && e.transfer_callid == callid)
        .expect("the first call's transfer");
    assert_eq!(started.session_id, ours[0].session_id);
    assert!(
        events
            .iter()
            .any(|(_, subject, e)| e.kind() == CallEventKind::Answered
                && subject == "callapi.v1.calls.default.answered")
    );
}

#[tokio::test]
async fn an_event_received_twice_even_by_another_process_is_kept_once() {
    let mut stack = Stack::start().await;
    let to = |stack: &Stack| {
        stack
            .event_socket
            .strip_prefix("udp:")
            .expect("udp event socket")
            .to_owned()
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let rejected = json!({"jsonrpc": "2.0", "method": "E_DLG_STATE_CHANGED", "params": {
        "id": "1.2", "db_id": "9", "callid": "twice@example", "from_tag": "a", "to_tag": "",
        "old_state": 1, "new_state": 5}})
    .to_string();
    // Twice to the same event-ingest, then again to a restarted one, which has no memory of
    // it: the stream keeps one copy of each event, by its id.
    socket.send_to(rejected.as_bytes(), to(&stack)).unwrap();
    socket.send_to(rejected.as_bytes(), to(&stack)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.restart_ingest().await;
    socket.send_to(rejected.as_bytes(), to(&stack)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let consumer = consumer(&stack, "default").await;
    let events = drain(&consumer, Duration::from_millis(500)).await;
    assert_eq!(
        kinds_of(&events, "twice@example"),
        [CallEventKind::Created, CallEventKind::Ended],
        "{events:#?}"
    );
    let ended = events
        .iter()
        .rev()
        .find(|(_, _, e)| e.callid == "twice@example")
        .expect("an event");
    assert_eq!(ended.2.cause, "not_answered");
}

/// `CallEvent` notifications, in order, until the `ended` of `callid`.
async fn events_until_ended(
    client: &mut callapi_e2e::Client,
    callid: &str,
) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    loop {
        let note = client.take(|m| m["method"] == "CallEvent").await;
        let done = note["params"]["callid"] == callid && note["params"]["kind"] == "ended";
        got.push(note["params"].clone());
        if done {
            return got;
        }
    }
}

async fn ask(
    client: &mut callapi_e2e::Client,
    method: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let id = client.request(method, params).await;
    client.reply(&id).await
}

#[tokio::test]
async fn a_subscriber_resumes_after_a_disconnect_with_no_gap_and_no_duplicate() {
    let stack = Stack::start().await;
    let mut watcher = stack.client().await;
    let reply = ask(&mut watcher, "Subscribe", json!({})).await;
    assert_eq!(reply["result"]["subscribed"], true, "{reply}");
    let mut client = stack.client().await;
    let first = call(&mut client, "alice", "bob").await;
    client.run("CallEnd", json!({"callid": first})).await;
    let before = events_until_ended(&mut watcher, &first).await;
    let last_seq = before.last().unwrap()["seq"].as_u64().unwrap();

    // Away: a second call lives and ends meanwhile.
    drop(watcher);
    let second = call(&mut client, "cindy", "dave").await;
    client.run("CallEnd", json!({"callid": second})).await;

    // Back, resuming after the last sequence received.
    let mut watcher = stack.client().await;
    let reply = ask(&mut watcher, "Subscribe", json!({"since": last_seq})).await;
    assert_eq!(reply["result"]["next_seq"], last_seq + 1, "{reply}");
    assert_eq!(reply["result"]["missed"], false, "{reply}");
    let after = events_until_ended(&mut watcher, &second).await;
    let kinds: Vec<&str> = after
        .iter()
        .filter(|e| e["callid"] == second)
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["created", "ringing", "answered", "ended"],
        "{after:#?}"
    );

    // No gap, no duplicate: the two feeds together are exactly the tenant's stream so far.
    let mut seqs: Vec<u64> = before
        .iter()
        .chain(after.iter())
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let consumer = consumer(&stack, "default").await;
    let stream: Vec<u64> = drain(&consumer, Duration::from_millis(500))
        .await
        .into_iter()
        .map(|(seq, _, _)| seq)
        .filter(|seq| *seq >= seqs[0] && *seq <= *seqs.last().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate: {seqs:?}"
    );
    seqs.dedup();
    assert_eq!(seqs, stream, "every event of the stream once");

    // A `since` older than the stream keeps: told so, and a snapshot of the sessions first.
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let stream = jetstream.get_stream("CALLAPI_CALLS_default").await.unwrap();
    stream.purge().sequence(last_seq).await.expect("purge");
    let mut late = stack.client().await;
    let reply = ask(&mut late, "Subscribe", json!({"since": 1})).await;
    assert_eq!(reply["result"]["missed"], true, "{reply}");
    assert_eq!(reply["result"]["next_seq"], last_seq, "{reply}");
    let snapshot = late.take(|m| m["method"] == "Snapshot").await;
    assert!(snapshot["params"]["sessions"].is_array(), "{snapshot}");
    let resumed = late.take(|m| m["method"] == "CallEvent").await;
    assert_eq!(resumed["params"]["seq"], last_seq, "{resumed}");
    let off = ask(&mut late, "Unsubscribe", json!({})).await;
    assert_eq!(off["result"]["subscribed"], false, "{off}");
}

/// One Server-Sent Event: its id, event name and data.
type SseEvent = (Option<u64>, String, serde_json::Value);

/// Reads `GET path` as Server-Sent Events (chunked) until `enough` says so or 10 s pass.
async fn sse(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    enough: impl Fn(&[SseEvent]) -> bool,
) -> (String, Vec<SseEvent>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut events = Vec::new();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 16 * 1024];
    while !enough(&events) {
        let Ok(Ok(n)) = tokio::time::timeout_at(give_up, stream.read(&mut buf)).await else {
            break;
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        events = parse_sse(&raw);
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    (head, events)
}

/// The events in a chunked SSE response so far.
fn parse_sse(raw: &[u8]) -> Vec<SseEvent> {
    let text = String::from_utf8_lossy(raw);
    let Some((_, mut rest)) = text.split_once("\r\n\r\n") else {
        return Vec::new();
    };
    let mut body = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || tail.len() < size + 2 {
            break;
        }
        body.push_str(&tail[..size]);
        rest = &tail[size + 2..];
    }
    body.split("\n\n")
        .filter(|block| block.lines().any(|l| l.starts_with("data:")))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            (
                field("id:").and_then(|id| id.parse().ok()),
                field("event:").unwrap_or_default(),
                serde_json::from_str(&field("data:").unwrap_or_default()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn server_sent_events_resume_with_last_event_id() {
    let stack = Stack::start().await;
    let addr = stack.http_addr();
    let mut client = stack.client().await;
    let first = call(&mut client, "alice", "bob").await;
    client.run("CallEnd", json!({"callid": first})).await;
    let ended = |callid: String| {
        move |events: &[SseEvent]| {
            events
                .iter()
                .any(|(_, name, data)| name == "ended" && data["callid"] == callid.as_str())
        }
    };
    let (head, before) = sse(&addr, "/api/events?since=0", &[], ended(first.clone())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let ids: Vec<u64> = before.iter().filter_map(|(id, _, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(before.iter().all(
        |(id, name, data)| Some(data["seq"].as_u64().unwrap()) == *id
            && data["kind"] == name.as_str()
    ));
    let last = *ids.last().unwrap();

    // Another call meanwhile; the stream resumes after the last id received.
    let second = call(&mut client, "cindy", "dave").await;
    client.run("CallEnd", json!({"callid": second})).await;
    let last_id = last.to_string();
    let (_, after) = sse(
        &addr,
        "/api/events",
        &[("Last-Event-ID", &last_id)],
        ended(second.clone()),
    )
    .await;
    assert_eq!(
        after.first().and_then(|(id, _, _)| *id),
        Some(last + 1),
        "{after:#?}"
    );
    let kinds: Vec<&str> = after
        .iter()
        .filter(|(_, _, data)| data["callid"] == second.as_str())
        .map(|(_, name, _)| name.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["created", "ringing", "answered", "ended"],
        "{after:#?}"
    );
    // Only the session asked for.
    let (_, one) = sse(
        &addr,
        &format!("/api/events?since=0&callid={second}"),
        &[],
        ended(second.clone()),
    )
    .await;
    assert!(
        one.iter()
            .all(|(_, _, data)| data["callid"] == second.as_str()
                || data["transfer_callid"] == second.as_str()),
        "{one:#?}"
    );
    let bad = callapi_e2e::http::request(&addr, "GET", "/api/events?since=-1", None).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[tokio::test]
async fn a_nats_restart_under_steady_event_load_loses_no_stream_event() {
    const DIALOGS: usize = 1_500;
    let mut stack = Stack::start().await;
    // A steady load: a dialog rejected (two call events: created, ended) every 2 ms, about
    // 3 s in all, while nats-server is killed after 1 s and started again 1 s later.
    let sender = inject(&stack, "load", DIALOGS, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.nats.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.nats.restart().await;
    tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    assert_stream_holds_every_dialog(&stack, "load", DIALOGS).await;
}

/// Asserts that the default tenant's stream holds the two events (created, ended) of every
/// dialog `<prefix>-<n>@example` [`inject`] sent, once each, numbered with no gap.
async fn assert_stream_holds_every_dialog(stack: &Stack, prefix: &str, dialogs: usize) {
    let mut events = Vec::new();
    for _ in 0..60 {
        if let Ok(consumer) =
            tokio::time::timeout(Duration::from_secs(5), consumer(stack, "default")).await
        {
            events = drain(&consumer, Duration::from_millis(500)).await;
            if events.len() >= 2 * dialogs {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seqs: Vec<u64> = events.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let mut per_dialog: std::collections::HashMap<&str, Vec<CallEventKind>> =
        std::collections::HashMap::new();
    for (_, _, event) in &events {
        per_dialog
            .entry(event.callid.as_str())
            .or_default()
            .push(event.kind());
    }
    let missing: Vec<String> = (0..dialogs)
        .map(|i| format!("{prefix}-{i}@example"))
        .filter(|callid| {
            per_dialog.get(callid.as_str()).map(Vec::as_slice)
                != Some(&[CallEventKind::Created, CallEventKind::Ended][..])
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {dialogs} dialogs without exactly created, ended: {:?}; ingest log: {}",
        missing.len(),
        &missing[..missing.len().min(10)],
        stack.ingest.logs()
    );
}

#[tokio::test]
async fn a_three_node_jetstream_cluster_loses_no_event_while_each_node_restarts_in_turn() {
    const DIALOGS: usize = 1_500;
    let mut stack = Stack::with(callapi_e2e::StackOptions {
        nats_cluster: 3,
        ingest_toml: "[calls_stream]\nreplicas = 3\n[sessions]\nreplicas = 3".to_owned(),
        gateway_toml: "[command_log]\nreplicas = 3".to_owned(),
        ..Default::default()
    })
    .await;
    // A steady load, about 6 s, while each of the three servers is killed and started again
    // in turn (whichever one event-ingest is connected to, and the streams' leaders, go too).
    let sender = inject(&stack, "cluster", DIALOGS, Duration::from_millis(4));
    for n in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let server = if n == 0 {
            &mut stack.nats
        } else {
            &mut stack.nats_peers[n - 1]
        };
        server.stop().await;
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        server.restart().await;
    }
    tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();

    // Every dialog's two events are in the replicated stream, once each, with no gap.
    assert_stream_holds_every_dialog(&stack, "cluster", DIALOGS).await;
    let logs = stack.ingest.logs();
    eprintln!(
        "event-ingest: {} NATS disconnections, {} rounds of unacknowledged events sent again",
        logs.matches("event: disconnected").count(),
        logs.matches("sending them again").count()
    );
}
