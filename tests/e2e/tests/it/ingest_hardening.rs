//! End-to-end tests of event-ingest against forged and oversized events (issue 8).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use callapi_e2e::client::shape;
use callapi_e2e::{Service, Stack, StackOptions};
use callapi_kit::subjects;
use callapi_proto::v1::{OpensipsEvent, opensips_event};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::commands::call;
use crate::events::{LoneTcpIngest, lone_tcp_ingest};

/// What event-ingest's drop report says about datagrams from a stranger: `N datagram(s) from
/// IP (sender not in ...`.
const NOT_ALLOWED: (&str, &str) = ("datagram(s)", "sender not in `senders`");
/// What it says about unusable events.
const UNUSABLE: (&str, &str) = ("event(s)", "unusable");
/// What it says about connections from strangers.
const REFUSED: (&str, &str) = ("connection(s)", "peer not in `senders`");

/// The UDP address of event-ingest's socket.
fn event_addr(stack: &Stack) -> String {
    stack
        .event_socket
        .strip_prefix("udp:")
        .expect("udp event socket")
        .to_owned()
}

/// A UDP socket sending from `ip` (any 127/8 address works on the Linux loopback).
fn socket_on(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip, 0)).expect("bind a loopback address")
}

/// Sends `count` datagrams, pausing briefly every hundred so the receive buffer keeps up.
async fn send_many(socket: &UdpSocket, to: &str, datagram: &[u8], count: usize) {
    for n in 0..count {
        socket.send_to(datagram, to).expect("send datagram");
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// An `E_CALL_TRANSFER` as OpenSIPS raises it when the transfer target answered.
fn transfer_ok(callid: &str) -> String {
    json!({"jsonrpc": "2.0", "method": "E_CALL_TRANSFER", "params": {
        "callid": callid, "leg": "callee", "transfer_callid": "x",
        "destination": "sip:bob@127.0.0.1:5072", "state": "ok", "status": "200 OK"}})
    .to_string()
}

/// The next event on `subscription` whose Call-ID is one of `callids` (others are skipped).
async fn next_about(
    subscription: &mut async_nats::Subscriber,
    callids: &[&str],
    within: Duration,
) -> (String, OpensipsEvent) {
    let until = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(until, subscription.next())
            .await
            .expect("event in time")
            .expect("subscription open");
        let event = OpensipsEvent::decode(message.payload.as_ref()).expect("OpensipsEvent");
        if callids.contains(&event.callid.as_str()) {
            return (message.subject.to_string(), event);
        }
    }
}

/// The WARN lines of `logs` about `what` (unit, reason) from `ip`, and the count they add up
/// to.
fn reported(logs: &str, (unit, reason): (&str, &str), ip: &str) -> (usize, u64) {
    let pattern = format!(" {unit} from {ip} ({reason}");
    let mut lines = 0;
    let mut total = 0;
    for line in logs.lines().filter(|l| l.contains("WARN")) {
        let mut rest = line;
        let mut counted = false;
        while let Some(at) = rest.find(&pattern) {
            let digits: String = rest[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            total += digits
                .chars()
                .rev()
                .collect::<String>()
                .parse::<u64>()
                .unwrap_or(0);
            counted = true;
            rest = &rest[at + pattern.len()..];
        }
        lines += usize::from(counted);
    }
    (lines, total)
}

/// Waits until the WARN lines of `service` report `expected` drops of `what` from `ip`;
/// returns how many lines it took.
async fn wait_reported(service: &Service, what: (&str, &str), ip: &str, expected: u64) -> usize {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (lines, total) = reported(&service.logs(), what, ip);
        if total >= expected {
            assert_eq!(total, expected, "{}", service.logs());
            return lines;
        }
        assert!(
            Instant::now() < until,
            "only {total} of {expected} drops reported:\n{}",
            service.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn forged_datagrams_from_other_addresses_are_dropped_and_counted() {
    // Default `senders` (the loopback addresses 127.0.0.1 and ::1).
    let stack = Stack::with(StackOptions {
        ingest_toml: "drop_report_interval_ms = 1000".into(),
        ..StackOptions::default()
    })
    .await;
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let mut events =
        callapi_e2e::subscribe_ready(&nats, "callapi.v1.event.>", "callapi.v1.event.probe").await;
    let to = event_addr(&stack);
    let forged_callid = format!("forged-{}@127.0.0.1", uuid::Uuid::new_v4().simple());
    let stranger = socket_on("127.0.0.2");
    stranger
        .send_to(transfer_ok(&forged_callid).as_bytes(), &to)
        .unwrap();

    // A real call's events, raised by the emulator after the forged datagram, are published;
    // the forged one, received before them, is not.
    let mut client = stack.client().await;
    let real_callid = call(&mut client, "alice", "bob").await;
    let (_, event) = next_about(
        &mut events,
        &[&forged_callid, &real_callid],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(event.callid, real_callid, "a forged event was published");

    // A flood of forged datagrams: a few WARN lines that add up to all of them.
    send_many(
        &stranger,
        &to,
        transfer_ok(&forged_callid).as_bytes(),
        1_000,
    )
    .await;
    let lines = wait_reported(&stack.ingest, NOT_ALLOWED, "127.0.0.2", 1_001).await;
    assert!(lines <= 3, "{lines} WARN lines:\n{}", stack.ingest.logs());

    // Nothing forged was published, and real events still are.
    let notes = client.run("CallHold", json!({"callid": real_callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"]);
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        let event = OpensipsEvent::decode(message.payload.as_ref()).unwrap();
        assert_ne!(event.callid, forged_callid, "a forged event was published");
    }
}

#[tokio::test]
async fn event_stream_connections_from_other_addresses_are_closed() {
    let LoneTcpIngest {
        dir,
        nats_server: _nats_server,
        ingest,
        addr,
        mut events,
        nats: _nats,
    } = lone_tcp_ingest(
        "drop_report_interval_ms = 300",
        "senders = [\"127.0.0.1/32\"]",
    )
    .await;

    let forged_callid = "forged-stream@127.0.0.2";
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stranger = socket.connect(addr).await.unwrap();
    let _ = stranger
        .write_all(transfer_ok(forged_callid).as_bytes())
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut buf))
        .await
        .expect("the connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let real_callid = "55254bf3893eb48e";
    let mut allowed = tokio::net::TcpStream::connect(addr).await.unwrap();
    allowed
        .write_all(transfer_ok(real_callid).as_bytes())
        .await
        .unwrap();
    let (_, event) = next_about(
        &mut events,
        &[forged_callid, real_callid],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(event.callid, real_callid, "a forged event was published");
    wait_reported(&ingest, REFUSED, "127.0.0.2", 1).await;
    drop(ingest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_long_callid_is_published_under_a_hash_without_breaking_the_nats_connection() {
    let stack = Stack::with(StackOptions {
        ingest_node_toml: "senders = [\"127.0.0.1\"]".into(),
        ..StackOptions::default()
    })
    .await;
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let long_callid = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        "c".repeat(3_100 - 32)
    );
    let probe = subjects::event("default", "probe", "E_PROBE", &long_callid).unwrap();
    let mut watcher = callapi_e2e::subscribe_ready(
        &nats,
        &subjects::events_for_callid("default", &long_callid),
        &probe,
    )
    .await;
    let connection_events = |logs: &str| logs.matches("NATS connection event").count();
    let before = connection_events(&stack.ingest.logs());

    let opensips = socket_on("127.0.0.1");
    let to = event_addr(&stack);
    let datagram = transfer_ok(&long_callid);
    opensips.send_to(datagram.as_bytes(), &to).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), watcher.next())
        .await
        .expect("the long Call-ID's event in time")
        .expect("subscription open");
    let expected =
        subjects::event("default", "opensips1", "E_CALL_TRANSFER", &long_callid).unwrap();
    assert_eq!(message.subject.as_str(), expected);
    assert!(
        expected.ends_with(&format!(
            ".~{}",
            &subjects::encode_callid(&long_callid)[1..]
        )),
        "{expected}"
    );
    assert_eq!(
        expected.len(),
        "callapi.v1.event.default.opensips1.E_CALL_TRANSFER.".len() + 65
    );
    let event = OpensipsEvent::decode(message.payload.as_ref()).unwrap();
    assert_eq!(event.callid, long_callid);
    let Some(opensips_event::Body::CallTransfer(transfer)) = event.body else {
        panic!("not a transfer event: {event:?}")
    };
    assert_eq!(transfer.state(), callapi_proto::v1::TransferState::Ok);

    // As in the hostile run: many of them. Then real events still arrive promptly.
    send_many(&opensips, &to, datagram.as_bytes(), 130).await;
    let started = Instant::now();
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for _ in 0..130 {
        tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .expect("every long Call-ID event")
            .expect("subscription open");
    }
    let logs = stack.ingest.logs();
    assert_eq!(
        connection_events(&logs),
        before,
        "event-ingest's NATS connection dropped:\n{logs}"
    );
    assert!(!logs.contains("disconnected"), "{logs}");
    let nats_log = std::fs::read_to_string(stack.dir.join("nats-server.log")).unwrap_or_default();
    assert!(
        !nats_log.to_lowercase().contains("control line"),
        "{nats_log}"
    );
}

#[tokio::test]
async fn bad_event_names_and_garbage_from_the_allowed_sender_are_refused_and_counted() {
    let stack = Stack::with(StackOptions {
        ingest_toml: "drop_report_interval_ms = 500".into(),
        ingest_node_toml: "senders = [\"127.0.0.0/24\"]".into(),
        ..StackOptions::default()
    })
    .await;
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let mut events =
        callapi_e2e::subscribe_ready(&nats, "callapi.v1.event.>", "callapi.v1.event.probe").await;
    let opensips = socket_on("127.0.0.1");
    let to = event_addr(&stack);
    let callid = format!("named-{}@127.0.0.1", uuid::Uuid::new_v4().simple());

    send_many(&opensips, &to, b"400 Parse_error", 300).await;
    let long_name = "E".repeat(5_000);
    for name in ["E_X.evil", "E_*", "E_>", ">", long_name.as_str()] {
        let datagram = json!({"jsonrpc": "2.0", "method": name, "params": {"callid": callid}});
        opensips
            .send_to(datagram.to_string().as_bytes(), &to)
            .unwrap();
    }
    let good = json!({"jsonrpc": "2.0", "method": "E_CALL_HOLD", "params": {
        "callid": callid, "leg": "caller", "action": "hold", "state": "ok"}});
    opensips.send_to(good.to_string().as_bytes(), &to).unwrap();

    // Only the well-named event, sent last, is published.
    let (subject, event) = next_about(&mut events, &[&callid], Duration::from_secs(5)).await;
    assert_eq!(event.name, "E_CALL_HOLD");
    assert_eq!(
        subject,
        subjects::event("default", "opensips1", "E_CALL_HOLD", &callid).unwrap()
    );
    let lines = wait_reported(&stack.ingest, UNUSABLE, "127.0.0.1", 305).await;
    assert!(lines <= 3, "{lines} WARN lines:\n{}", stack.ingest.logs());
    let logs = stack.ingest.logs();
    assert!(logs.contains("(5000 bytes) is not 1-64 letters"), "{logs}");
    assert!(
        !logs.contains(&"E".repeat(100)),
        "the log quotes the whole name"
    );
}
