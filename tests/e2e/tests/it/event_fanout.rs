//! Call events to many subscribers (issue 12): a subscriber that disconnects resumes with
//! `since` and loses and duplicates nothing across 1,000 events; a subscriber that does not
//! read is cut off without slowing the others; `Subscribe {extension}` picks one extension's
//! calls. Events are injected as OpenSIPS would send them (event_datagram), thousands at a
//! time.

use std::collections::BTreeSet;
use std::time::Duration;

use callapi_e2e::{Client, Stack, StackOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::commands::call;
use crate::gateway_hardening::{client_frame, gateway_addr, upgrade};

/// Sends `count` rejected dialogs `<prefix>-<n>@example` (two call events each: created,
/// ended) to event-ingest, one every `pace`, from a thread of its own.
pub(crate) fn inject(
    stack: &Stack,
    prefix: &str,
    count: usize,
    pace: Duration,
) -> std::thread::JoinHandle<()> {
    let to = stack
        .event_socket
        .strip_prefix("udp:")
        .expect("udp event socket")
        .to_owned();
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..count {
            let datagram = json!({"jsonrpc": "2.0", "method": "E_DLG_STATE_CHANGED", "params": {
                "id": format!("7.{i}"), "db_id": "9", "callid": format!("{prefix}-{i}@example"),
                "from_tag": "a", "to_tag": "", "old_state": 1, "new_state": 5}})
            .to_string();
            socket.send_to(datagram.as_bytes(), &to).unwrap();
            if !pace.is_zero() {
                std::thread::sleep(pace);
            }
        }
    })
}

async fn subscribe(client: &mut Client, params: Value) -> Value {
    let id = client.request("Subscribe", params).await;
    let reply = client.reply(&id).await;
    assert_eq!(reply["result"]["subscribed"], true, "{reply}");
    reply
}

/// The next `CallEvent`'s params, if one comes within `within`.
async fn next_event(client: &mut Client, within: Duration) -> Option<Value> {
    tokio::time::timeout(within, client.take(|m| m["method"] == "CallEvent"))
        .await
        .ok()
        .map(|note| note["params"].clone())
}

#[tokio::test]
async fn a_subscriber_resumes_with_since_losing_and_duplicating_nothing_of_1000_events() {
    let stack = Stack::start().await;
    let mut watcher = stack.client().await;
    subscribe(&mut watcher, json!({})).await;
    let sender = inject(&stack, "resume", 500, Duration::from_millis(1));

    // A third of the way, the subscriber's connection drops.
    let mut seqs = Vec::new();
    while seqs.len() < 333 {
        let event = next_event(&mut watcher, Duration::from_secs(10))
            .await
            .expect("events keep coming");
        seqs.push(event["seq"].as_u64().unwrap());
    }
    drop(watcher);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // It comes back and resumes after the last sequence it got, while events still flow.
    let mut watcher = stack.client().await;
    let last = *seqs.last().unwrap();
    let reply = subscribe(&mut watcher, json!({"since": last})).await;
    assert_eq!(reply["result"]["next_seq"], last + 1, "{reply}");
    while seqs.len() < 1_000 {
        match next_event(&mut watcher, Duration::from_secs(10)).await {
            Some(event) => seqs.push(event["seq"].as_u64().unwrap()),
            None => break,
        }
    }
    tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        seqs,
        (1..=1_000).collect::<Vec<u64>>(),
        "no gap, no duplicate"
    );
    assert!(
        next_event(&mut watcher, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing more than the 1,000 events"
    );
}

/// Reads `count` distinct events.
async fn take_all(client: &mut Client, count: usize) {
    let mut seen = BTreeSet::new();
    while seen.len() < count {
        let event = next_event(client, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("only {} events of {count}", seen.len()));
        assert!(seen.insert(event["seq"].as_u64().unwrap()), "{event}");
    }
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_is_cut_off_without_slowing_the_others() {
    let stack = Stack::with(StackOptions {
        // Queues deep enough for a test reader sharing two cores with the whole stack: what
        // cuts the stuck one off is its write not taken within 2 s.
        gateway_toml:
            "connection_queue = 100000\nconnection_queue_bytes = 67108864\nwrite_timeout_ms = 2000"
                .to_owned(),
        ..StackOptions::default()
    })
    .await;
    // A subscriber that never reads, with a small receive buffer.
    let addr = gateway_addr(&stack);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(addr.parse().unwrap()).await.unwrap();
    upgrade(&mut slow, &addr).await;
    slow.write_all(&client_frame(
        0x1,
        br#"{"jsonrpc":"2.0","method":"Subscribe","params":{},"id":1}"#,
    ))
    .await
    .unwrap();
    // And two that read.
    let mut fast = stack.client().await;
    subscribe(&mut fast, json!({})).await;
    let mut other = stack.client().await;
    subscribe(&mut other, json!({})).await;

    // More than the kernel buffers between the gateway and the stuck client hold.
    const DIALOGS: usize = 12_000;
    let sender = inject(&stack, "burst", DIALOGS, Duration::from_micros(100));
    // Both readers take every event, each at its own pace, while the third is stuck.
    tokio::join!(
        take_all(&mut fast, 2 * DIALOGS),
        take_all(&mut other, 2 * DIALOGS)
    );
    tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();

    // The one that did not read is disconnected (its queue full, in messages or bytes, or a
    // write it did not take in time: whichever comes first), and the gateway says why.
    let cut = |logs: &str| {
        logs.contains("client too slow (too many") || logs.contains("client took no data")
    };
    for _ in 0..100 {
        if cut(&stack.gateways[0].logs()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut(&stack.gateways[0].logs()), "the cut-off is logged");
    // Its connection really ends: what was in flight, then the end.
    let mut buffer = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the slow subscriber's connection stayed open"
    );
}

#[tokio::test]
async fn a_subscriber_to_an_extension_gets_only_its_calls() {
    let stack = Stack::start().await;
    let mut watcher = stack.client().await;
    subscribe(&mut watcher, json!({"extension": "dave"})).await;
    let mut client = stack.client().await;
    let bobs = call(&mut client, "alice", "bob").await;
    let daves = call(&mut client, "cindy", "dave").await;
    // Calls last: event-ingest asks the node for a dialog's parties once it lived 250 ms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for callid in [&bobs, &daves] {
        client.run("CallEnd", json!({"callid": callid})).await;
    }
    let mut got = Vec::new();
    while let Some(event) = next_event(&mut watcher, Duration::from_secs(3)).await {
        let done = event["callid"] == daves.as_str() && event["kind"] == "ended";
        got.push(event);
        if done {
            break;
        }
    }
    let kinds: Vec<&str> = got
        .iter()
        .filter(|e| e["callid"] == daves.as_str())
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["created", "ringing", "answered", "ended"],
        "{got:#?}"
    );
    assert!(
        !got.iter().any(|e| e["callid"] == bobs.as_str()),
        "{got:#?}"
    );
    let id = watcher
        .request("Subscribe", json!({"extension": "a@b"}))
        .await;
    let reply = watcher.reply(&id).await;
    assert_eq!(reply["error"]["data"]["field"], "extension", "{reply}");
}
