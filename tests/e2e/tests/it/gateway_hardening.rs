//! End-to-end tests of the gateway under hostile or unlucky clients (issue 8): slow readers,
//! floods of commands, half-open and silent connections, peers that never answer pings, NATS
//! going away, JSON-RPC corner cases and broken WebSocket frames.

use std::time::{Duration, Instant};

use callapi_e2e::client::shape;
use callapi_e2e::{Stack, StackOptions};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

fn stack_with_gateway(toml: &str) -> StackOptions {
    StackOptions {
        gateway_toml: toml.to_owned(),
        ..StackOptions::default()
    }
}

/// `127.0.0.1:PORT` of the first gateway.
pub(crate) fn gateway_addr(stack: &Stack) -> String {
    stack
        .url()
        .trim_start_matches("ws://")
        .trim_end_matches("/call-api")
        .to_owned()
}

/// Performs the WebSocket handshake by hand on a raw TCP stream.
pub(crate) async fn upgrade(stream: &mut TcpStream, addr: &str) {
    let request = format!(
        "GET /call-api HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("handshake reply in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// A final client frame (masked with a zero key, so the payload is sent as is).
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=65_535 => {
            frame.push(0x80 | 126);
            frame.extend((len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend((len as u64).to_be_bytes());
        }
    }
    frame.extend([0, 0, 0, 0]);
    frame.extend(payload);
    frame
}

/// Reads (and discards) until the peer closes the connection; how long that took, or `None`
/// if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let outcome = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    outcome.ok().map(|()| start.elapsed())
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(stack: &Stack) -> Ws {
    tokio_tungstenite::connect_async(stack.url())
        .await
        .expect("connect")
        .0
}

/// The next text message, as sent.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .expect("WebSocket ok");
        if let Message::Text(text) = message {
            return text.to_string();
        }
    }
}

/// The close frame's code the gateway sends, reading past anything else.
async fn close_code(
    ws: &mut (impl futures::Stream<Item = Result<Message, impl std::fmt::Debug>> + Unpin),
) -> CloseCode {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close frame in time")
            .expect("a close frame before the connection ends");
        match message {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("close frame without a code"),
            Ok(_) => continue,
            Err(err) => panic!("connection ended without a close frame: {err:?}"),
        }
    }
}

/// Sends requests on a raw WebSocket with a small receive buffer, never reading, until the
/// gateway closes the connection; asserts it did, that its memory stayed small and that it
/// logged `logged`.
async fn never_reading_client_is_cut_off(gateway_toml: &str, logged: &str) {
    let stack = Stack::with(stack_with_gateway(gateway_toml)).await;
    let pid = stack.gateways[0].pid().expect("gateway pid");
    let rss_before = rss_kib(pid);
    let addr = gateway_addr(&stack);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    upgrade(&mut stream, &addr).await;
    // 60 KB method names first (each used to be echoed whole), then many small bad requests.
    let big = client_frame(
        0x1,
        format!(
            r#"{{"jsonrpc":"2.0","method":"{}","id":1}}"#,
            "M".repeat(60_000)
        )
        .as_bytes(),
    );
    let small = client_frame(0x1, b"{}");
    let mut closed = None;
    let start = Instant::now();
    for n in 0.. {
        if start.elapsed() > Duration::from_secs(20) {
            break;
        }
        let frame = if n < 1_100 { &big } else { &small };
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed = Some(n);
                break;
            }
            Err(_) => panic!(
                "after {n} requests the gateway stopped reading but kept the connection open"
            ),
        }
    }
    let sent = closed
        .expect("the gateway did not close the connection of a client that does not read in 20 s");
    let rss_after = rss_kib(pid);
    eprintln!("closed after {sent} requests; gateway RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "gateway RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        stack.gateways[0].logs().contains(logged),
        "{logged:?} not logged"
    );
    // The gateway still serves others.
    let mut client = stack.client().await;
    let notes = client
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
}

/// Issue 8 item 4: a client that sends and never reads is disconnected once its queue, bounded
/// in bytes, is full; the TCP connection really closes, and the 60 KB method names it sent are
/// not echoed into gateway memory.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_when_its_queue_bytes_are_full() {
    never_reading_client_is_cut_off(
        "connection_queue_bytes = 65536\nwrite_timeout_ms = 60000",
        "client too slow (too many bytes queued)",
    )
    .await;
}

/// Issue 8 item 4: with room in the queue, a write the client does not take within
/// `write_timeout_ms` drops it.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_after_the_write_timeout() {
    never_reading_client_is_cut_off(
        "connection_queue = 1000000\nconnection_queue_bytes = 1000000000\nwrite_timeout_ms = 500",
        "client took no data",
    )
    .await;
}

/// Issue 8 item 5: past `max_commands_per_connection` commands in flight, a request gets
/// -32003 at once; other connections are not affected; once one ends, a new one is accepted.
#[tokio::test]
async fn commands_in_flight_past_the_connection_limit_get_32003() {
    let stack = Stack::with(StackOptions {
        gateway_toml: "max_commands_per_connection = 2".to_owned(),
        ring_timeout_ms: 2_500,
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let ringing = json!({"caller": "sip:noanswer@127.0.0.1", "callee": "sip:bob@127.0.0.1"});
    let first = client.start("CallStart", ringing.clone()).await;
    let _second = client.start("CallStart", ringing.clone()).await;
    let asked = Instant::now();
    let third = client.request("CallStart", ringing.clone()).await;
    let reply = client.reply(&third).await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "not refused at once"
    );
    assert_eq!(reply["error"]["code"], -32003, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("too many commands in flight") && message.contains("limit 2"),
        "{message}"
    );
    // A notification over the limit is not run and not answered.
    client
        .send_text(
            r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"x","cmd_id":"over"}}"#,
        )
        .await;
    // The limit is per connection.
    let mut other = stack.client().await;
    let notes = other
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
    // Once one ends, a new command is accepted.
    let notes = client.until_ended(&first).await;
    assert_eq!(shape(&notes), ["Error:CALL_FAILED", "Ended"]);
    let notes = client
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
    // Nothing was ever sent for the refused notification.
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"Nope","id":"last"}"#)
        .await;
    let last = client.take(|m| m["id"] == "last").await;
    assert_eq!(last["error"]["code"], -32601);
    let over = tokio::time::timeout(
        Duration::from_millis(500),
        client.take(|m| m["params"]["cmd_id"] == "over"),
    )
    .await;
    assert!(over.is_err(), "the refused notification ran: {over:?}");
}

/// Issue 8 item 6: a half-sent upgrade request and a silent TCP connection are closed after
/// `handshake_timeout_ms`; an upgraded WebSocket is not affected.
#[tokio::test]
async fn half_sent_and_silent_connections_are_closed_after_the_handshake_timeout() {
    let stack = Stack::with(stack_with_gateway("handshake_timeout_ms = 500")).await;
    let addr = gateway_addr(&stack);
    let mut client = stack.client().await;
    let mut half = TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /call-api HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (half_closed, silent_closed) = tokio::join!(
        closed_within(&mut half, Duration::from_secs(5)),
        closed_within(&mut silent, Duration::from_secs(5))
    );
    for (what, closed) in [
        ("half-sent request", half_closed),
        ("silent", silent_closed),
    ] {
        let after = closed.unwrap_or_else(|| panic!("{what} connection still open after 5 s"));
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_secs(3),
            "{what} connection closed after {after:?}"
        );
    }
    // The upgraded client outlived the handshake timeout and is still served.
    let notes = client
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
}

/// Issue 8 item 6: a peer that completed the handshake, reads, but never answers the gateway's
/// pings is dropped; a client that answers them is kept.
#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped() {
    let stack = Stack::with(stack_with_gateway(
        "ping_interval_ms = 300\npong_timeout_ms = 300",
    ))
    .await;
    let addr = gateway_addr(&stack);
    let mut mute = TcpStream::connect(&addr).await.unwrap();
    upgrade(&mut mute, &addr).await;
    let mut client = stack.client().await;
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    let mute_read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match mute.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    });
    // Meanwhile a tokio-tungstenite client reads, so it answers the pings: it is kept.
    let (closed, kept) = tokio::join!(
        mute_read,
        tokio::time::timeout(Duration::from_millis(2_000), client.next())
    );
    let after = closed.expect("a peer that never answers pings was kept");
    assert!(
        after >= Duration::from_millis(500),
        "dropped after {after:?}"
    );
    assert_eq!(
        received.first(),
        Some(&0x89),
        "the gateway sent no ping first: {received:?}"
    );
    assert!(kept.is_err(), "unexpected message: {kept:?}");
    let notes = client
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
}

/// Issue 8 item 10: with NATS down, a command gets -32000 saying NATS is unreachable, not that
/// no commands service runs.
#[tokio::test]
async fn nats_down_is_reported_as_nats_unreachable() {
    let mut stack = Stack::with(stack_with_gateway("command_ack_timeout_ms = 1000")).await;
    let mut client = stack.client().await;
    stack.nats.stop().await;
    let until = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let id = client
            .request(
                "CallStart",
                json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
            )
            .await;
        let reply = client.reply(&id).await;
        assert_eq!(reply["error"]["code"], -32000, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        if message.contains("NATS") || Instant::now() > until {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("NATS is unreachable"), "{reply}");
    // Answered at once now that the gateway knows.
    let asked = Instant::now();
    let id = client.request("CallEnd", json!({"callid": "x"})).await;
    let reply = client.reply(&id).await;
    assert!(asked.elapsed() < Duration::from_millis(500), "{reply}");
    assert_eq!(reply["error"]["code"], -32000, "{reply}");
}

/// Issue 8 item 11: invalid requests without an id are answered with `"id": null`; only a
/// well-formed notification stays silent; ids are echoed exactly as sent; the method name is
/// not echoed unbounded.
#[tokio::test]
async fn json_rpc_ids_and_invalid_requests_without_id() {
    let stack = Stack::start().await;
    let mut ws = ws_connect(&stack).await;
    for text in [
        "{}",
        r#"{"jsonrpc":"2.0"}"#,
        r#"{"jsonrpc":"1.0","method":"CallEnd","params":{"callid":"x"}}"#,
        r#"{"jsonrpc":"2.0","method":5}"#,
        r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"x"},"extra":1}"#,
    ] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let reply: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(reply["error"]["code"], -32600, "{text}: {reply}");
        assert!(
            reply.as_object().unwrap().get("id") == Some(&Value::Null),
            "{text}: {reply}"
        );
    }
    // A well-formed notification with an unknown method: silent. The next reply is the next
    // request's, whose huge id comes back exactly.
    ws.send(Message::Text(r#"{"jsonrpc":"2.0","method":"Nope"}"#.into()))
        .await
        .unwrap();
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"Nope","id":18446744073709551616}"#.into(),
    ))
    .await
    .unwrap();
    let reply = next_text(&mut ws).await;
    assert!(reply.contains(r#""id":18446744073709551616"#), "{reply}");
    assert!(reply.contains("-32601"), "{reply}");
    ws.send(Message::Text(
        r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"no-such-call"},"id":-123456789012345678901234567890}"#.into(),
    ))
    .await
    .unwrap();
    let started = next_text(&mut ws).await;
    assert!(
        started.contains(r#""id":-123456789012345678901234567890"#) && started.contains("Started"),
        "{started}"
    );
    // A 60 KB method name is not echoed back.
    let long = format!(
        r#"{{"jsonrpc":"2.0","method":"{}","id":7}}"#,
        "M".repeat(60_000)
    );
    ws.send(Message::Text(long.into())).await.unwrap();
    let reply = loop {
        let text = next_text(&mut ws).await;
        if text.contains(r#""id":7"#) {
            break text;
        }
    };
    assert!(reply.len() < 512, "{} bytes", reply.len());
    assert!(reply.contains("-32601"), "{reply}");
}

/// Issue 8 item 12: invalid UTF-8 in a text frame closes with 1007, a frame over the hard
/// limit with 1009, each with a close frame.
#[tokio::test]
async fn bad_utf8_and_oversized_frames_close_with_1007_and_1009() {
    let stack = Stack::start().await;
    let mut ws = ws_connect(&stack).await;
    ws.send(Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    )))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, CloseCode::Invalid);

    let (mut sink, mut stream) = ws_connect(&stack).await.split();
    let sender = tokio::spawn(async move {
        let _ = sink
            .send(Message::Binary(vec![b'x'; 1024 * 1024 + 1].into()))
            .await;
        sink
    });
    assert_eq!(close_code(&mut stream).await, CloseCode::Size);
    let _ = sender.await;
}
