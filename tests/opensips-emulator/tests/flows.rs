//! Flows the MI replay does not cover: calls phones place on their own (i_dlg_lifecycle),
//! mi_http (`POST /mi`, `POST /emulator/call`), event_stream over TCP (k_event_stream), and the
//! OpenSIPS 4.0.1 crash as seen from HTTP and from the event subscriber.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use opensips_emulator::{Emulator, EmulatorConfig, Version};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

async fn emulator(version: Version) -> Emulator {
    opensips_emulator::start(EmulatorConfig {
        version,
        answer_delay: Duration::from_millis(5),
        ring_timeout: Duration::from_millis(300),
        dead_timeout: Duration::from_millis(200),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator")
}

async fn mi_udp(emulator: &Emulator, request: Value) -> Option<Value> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket
        .send_to(
            request.to_string().as_bytes(),
            emulator.mi_udp_addr().expect("mi_udp"),
        )
        .await
        .expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf)).await {
        Ok(Ok(len)) => serde_json::from_slice(&buf[..len]).ok(),
        _ => None,
    }
}

/// A minimal HTTP/1.1 POST; returns (status, body), or None if there was no answer in time.
async fn post(addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
    common::http(addr, "POST", path, body, Duration::from_secs(2)).await
}

async fn post_json(addr: SocketAddr, path: &str, body: Value) -> Option<Value> {
    let (status, body) = post(addr, path, &body.to_string()).await?;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).ok()
}

/// A UDP event subscriber collecting (callid, old→new) of E_DLG_STATE_CHANGED.
struct Subscriber {
    socket: UdpSocket,
}

impl Subscriber {
    async fn new(emulator: &Emulator, events: &[&str]) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        for event in events {
            let reply = mi_udp(
                emulator,
                json!({"jsonrpc": "2.0", "method": "event_subscribe", "id": 1,
                    "params": {"event": event, "socket": format!("udp:{addr}")}}),
            )
            .await;
            assert_eq!(reply.map(|r| r["result"].clone()), Some(json!("OK")));
        }
        Self { socket }
    }

    /// Events received within `wait`.
    async fn collect(&self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_535];
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(len)) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await
        {
            if let Ok(value) = serde_json::from_slice::<Value>(&buf[..len]) {
                out.push(value);
            }
        }
        out
    }
}

fn transitions(events: &[Value], callid: &str) -> Vec<(i64, i64)> {
    events
        .iter()
        .filter(|e| e["method"] == "E_DLG_STATE_CHANGED" && e["params"]["callid"] == callid)
        .map(|e| {
            (
                e["params"]["old_state"].as_i64().unwrap_or(-1),
                e["params"]["new_state"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// Each dialog's transitions in i_dlg_lifecycle, in order of appearance.
fn recorded_lifecycle(version: &str) -> Vec<Vec<(i64, i64)>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(version)
        .join("i_dlg_lifecycle.jsonl");
    let text = std::fs::read_to_string(&path).expect("transcript");
    let mut dialogs: Vec<(String, Vec<(i64, i64)>)> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let line: Value = serde_json::from_str(line).expect("json line");
        let p = &line["data"]["params"];
        let callid = p["callid"].as_str().unwrap_or_default().to_owned();
        let step = (
            p["old_state"].as_i64().unwrap_or(-1),
            p["new_state"].as_i64().unwrap_or(-1),
        );
        match dialogs.iter_mut().find(|(c, _)| *c == callid) {
            Some((_, steps)) => steps.push(step),
            None => dialogs.push((callid, vec![step])),
        }
    }
    dialogs.into_iter().map(|(_, steps)| steps).collect()
}

async fn lifecycle(version: Version, recorded: &str) {
    let emulator = emulator(version).await;
    let events = Subscriber::new(&emulator, &["E_DLG_STATE_CHANGED"]).await;
    // answered, callee BYE; rejected 486; ringing then caller CANCEL; ringing then timeout.
    let answered = emulator.place_call("alice", "bob").await;
    assert!(emulator.hang_up(&answered));
    let rejected = emulator.place_call("alice", "busy").await;
    let cancelled = emulator.place_call("alice", "noanswer").await;
    assert!(emulator.hang_up(&cancelled));
    let timed_out = emulator.place_call("alice", "noanswer").await;
    assert!(timed_out.ends_with("@pyua-alice"), "{timed_out}");
    let received = events.collect(Duration::from_millis(600)).await;
    let ours: Vec<Vec<(i64, i64)>> = [answered, rejected, cancelled, timed_out]
        .iter()
        .map(|c| transitions(&received, c))
        .collect();
    let mut want = recorded_lifecycle(recorded);
    let mut got = ours.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(!emulator.hang_up("no-such-call"));
}

#[tokio::test]
async fn phone_calls_follow_i_dlg_lifecycle_36() {
    lifecycle(Version::V3_6, "3.6").await;
}

#[tokio::test]
async fn phone_calls_follow_i_dlg_lifecycle_40() {
    lifecycle(Version::V4_0, "4.0").await;
}

#[tokio::test]
async fn mi_over_http_and_the_call_hook() {
    let emulator = emulator(Version::V3_6).await;
    let http = emulator.mi_http_addr().expect("mi_http");
    let events = Subscriber::new(&emulator, &["E_DLG_STATE_CHANGED", "E_CALL_HOLD"]).await;
    let version = post_json(
        http,
        "/mi",
        json!({"jsonrpc": "2.0", "method": "version", "id": 1}),
    )
    .await;
    assert_eq!(
        version.map(|v| v["result"]["Server"].clone()),
        Some(json!("OpenSIPS (3.6.8 (x86_64/linux))"))
    );
    // A CallStart leg over HTTP: the reply comes after the answer, with the recorded keys.
    let uac = post_json(
        http,
        "/mi",
        json!({"jsonrpc": "2.0", "method": "t_uac_dlg", "id": 2, "params": {
            "method": "INVITE", "ruri": "sip:alice@127.0.0.1",
            "headers": "From: <sip:alice@127.0.0.1>\r\nTo: <sip:bob@127.0.0.1>\r\nCall-Id: http-1\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\n",
            "body": "v=0\r\n"}}),
    )
    .await
    .expect("t_uac_dlg reply");
    let mut keys: Vec<&String> = uac["result"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    keys.sort();
    assert_eq!(keys, ["Message", "Next-hop", "RURI", "Routes", "Status"]);
    assert_eq!(uac["result"]["Status"], "200 Answering");
    // Missing method over HTTP: -32600, even on 3.6.
    let invalid = post_json(http, "/mi", json!({"jsonrpc": "2.0", "id": 3})).await;
    assert_eq!(
        invalid.map(|v| v["error"]["code"].clone()),
        Some(json!(-32600))
    );
    // No id: run, nothing to answer (mi_http: 202, empty).
    let (status, body) = post(http, "/mi", r#"{"jsonrpc":"2.0","method":"version"}"#)
        .await
        .expect("answer");
    assert_eq!((status, body.as_str()), (202, ""));
    // Not JSON.
    let (status, body) = post(http, "/mi", "{nope").await.expect("answer");
    assert_eq!((status, body.as_str()), (200, "400 Parse_error"));
    // A phone-placed call through the hook, then held over HTTP.
    let call = post_json(
        http,
        "/emulator/call",
        json!({"from": "dave", "to": "cindy"}),
    )
    .await
    .expect("call");
    let callid = call["callid"].as_str().expect("callid").to_owned();
    assert!(callid.ends_with("@pyua-dave"));
    let held = post_json(
        http,
        "/mi",
        json!({"jsonrpc": "2.0", "method": "call_hold", "id": 4, "params": {"callid": callid}}),
    )
    .await;
    assert_eq!(held.map(|v| v["result"].clone()), Some(json!("OK")));
    let received = events.collect(Duration::from_millis(300)).await;
    assert_eq!(transitions(&received, &callid), [(1, 2), (2, 3), (3, 4)]);
    assert_eq!(transitions(&received, "http-1"), [(1, 2), (2, 3), (3, 4)]);
    let holds = received
        .iter()
        .filter(|e| e["method"] == "E_CALL_HOLD" && e["params"]["callid"] == callid.as_str())
        .count();
    assert_eq!(holds, 4);
    let (status, _) = post(http, "/emulator/call", "{}").await.expect("answer");
    assert_eq!(status, 400);
}

#[tokio::test]
async fn event_stream_writes_notifications_back_to_back() {
    let emulator = emulator(Version::V3_6).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let socket = format!("tcp:{}", listener.local_addr().expect("addr"));
    for event in ["E_DLG_STATE_CHANGED", "E_CALL_HOLD"] {
        let reply = mi_udp(
            &emulator,
            json!({"jsonrpc": "2.0", "method": "event_subscribe", "id": 1,
                "params": {"event": event, "socket": socket, "expire": 120}}),
        )
        .await;
        assert_eq!(reply.map(|r| r["result"].clone()), Some(json!("OK")));
    }
    let list = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "subscribers_list", "id": 2, "params": {"event": "E_CALL_HOLD"}}),
    )
    .await
    .expect("list");
    assert_eq!(
        list["result"]["Event"]["Subscribers"][0],
        json!({"socket": socket, "expire": 120, "ttl": 120})
    );
    let callid = emulator.place_call("alice", "bob").await;
    let reply = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "call_hold", "id": 3, "params": {"callid": callid}}),
    )
    .await;
    assert_eq!(reply.map(|r| r["result"].clone()), Some(json!("OK")));
    let (mut stream, _) = tokio::time::timeout(Duration::from_secs(2), listener.accept())
        .await
        .expect("connected in time")
        .expect("accept");
    // k_event_stream: 3 state changes + 4 hold events, JSON objects back to back.
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut objects: Vec<Value> = Vec::new();
    while objects.len() < 7 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => break,
        }
        objects = serde_json::Deserializer::from_slice(&bytes)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .collect();
    }
    let methods: Vec<&str> = objects
        .iter()
        .filter_map(|o| o["method"].as_str())
        .collect();
    assert_eq!(
        methods
            .iter()
            .filter(|m| **m == "E_DLG_STATE_CHANGED")
            .count(),
        3
    );
    assert_eq!(methods.iter().filter(|m| **m == "E_CALL_HOLD").count(), 4);
    assert!(objects.iter().all(|o| o["jsonrpc"] == "2.0"));
}

#[tokio::test]
async fn crashed_40_node_goes_silent_everywhere() {
    let emulator = emulator(Version::V4_0).await;
    let http = emulator.mi_http_addr().expect("mi_http");
    let events = Subscriber::new(&emulator, &["E_DLG_STATE_CHANGED"]).await;
    // Over HTTP a method-less request is only -32600.
    let invalid = post_json(http, "/mi", json!({"jsonrpc": "2.0", "id": "h1"})).await;
    assert_eq!(
        invalid.map(|v| v["error"]["code"].clone()),
        Some(json!(-32600))
    );
    assert!(!emulator.crashed());
    // Over mi_datagram it kills the node.
    let crashed = mi_udp(&emulator, json!({"jsonrpc": "2.0", "id": "r3"})).await;
    assert!(crashed.is_none());
    assert!(emulator.crashed());
    let after = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "version", "id": "post"}),
    )
    .await;
    assert!(after.is_none());
    assert!(
        post(
            http,
            "/mi",
            &json!({"jsonrpc": "2.0", "method": "version", "id": 1}).to_string()
        )
        .await
        .is_none()
    );
    emulator.place_call("alice", "bob").await;
    assert!(events.collect(Duration::from_millis(200)).await.is_empty());
}

#[tokio::test]
async fn method_less_request_does_not_crash_36() {
    let emulator = emulator(Version::V3_6).await;
    let reply = mi_udp(&emulator, json!({"jsonrpc": "2.0", "id": "r3"})).await;
    assert_eq!(
        reply.map(|r| r["error"]["code"].clone()),
        Some(json!(-32600))
    );
    let reply = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "version", "id": "post"}),
    )
    .await;
    assert!(reply.is_some());
}

#[tokio::test]
async fn odd_requests_never_take_the_node_down() {
    let emulator = emulator(Version::V3_6).await;
    let odd = [
        json!({"jsonrpc": "2.0", "method": "event_subscribe", "id": 1,
            "params": {"event": "E_CALL_HOLD", "socket": "udp:127.0.0.1:9", "expire": 9_223_372_036_854_775_807_i64}}),
        json!({"jsonrpc": "2.0", "method": "event_subscribe", "id": 2,
            "params": ["E_CALL_HOLD", "udp:127.0.0.1:9", "x"]}),
        json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 3, "params": {"index": -1, "counter": "z"}}),
        json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 4, "params": {"index": 18_446_744_073_709_551_615_u64, "counter": 1}}),
        json!({"jsonrpc": "2.0", "method": "t_uac_dlg", "id": 5, "params": [null, {}, []]}),
        json!({"jsonrpc": "2.0", "method": "t_uac_dlg", "id": 6, "params": {"method": "INVITE", "ruri": "sip:\u{e9}@x", "headers": "From:\r\n<\r\n>"}}),
        json!({"jsonrpc": "2.0", "method": "call_transfer", "id": 7, "params": [1, 2, 3, 4, 5]}),
        json!({"jsonrpc": "2.0", "method": "call_hold", "id": 8, "params": [[]]}),
        json!({"jsonrpc": "2.0", "method": "dlg_end_dlg", "id": 9, "params": {"dialog_id": {"a": 1}}}),
        json!({"jsonrpc": "2.0", "method": "subscribers_list", "id": 10, "params": {"event": "E_NOPE"}}),
        json!({"jsonrpc": "2.0", "method": "help", "id": 11, "params": {"mi_cmd": 5}}),
        json!([1, 2, 3]),
        json!("version"),
        json!({"jsonrpc": "2.0", "method": "", "id": null}),
    ];
    for request in odd {
        let _ = mi_udp(&emulator, request).await;
    }
    let version = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "version", "id": "still"}),
    )
    .await;
    assert_eq!(version.map(|v| v["id"].clone()), Some(json!("still")));
}

/// Issue 8, as real OpenSIPS 3.6.8 and 4.0.1 do it: a REFER to a user the proxy does not know
/// is "Accepted", the new INVITE gets 404 at once, and no E_CALL_TRANSFER is raised at all; the
/// call that was to be transferred stays up.
async fn refer_to_unknown_user_raises_nothing(version: Version) {
    let emulator = emulator(version).await;
    let events = Subscriber::new(&emulator, &["E_CALL_TRANSFER"]).await;
    let callid = emulator.place_call("alice", "bob").await;
    let reply = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "call_transfer", "id": 2,
            "params": {"callid": callid, "leg": "callee", "destination": "sip:nobody@127.0.0.1"}}),
    )
    .await
    .expect("reply");
    assert_eq!(reply["result"], "Accepted", "{reply}");
    let received = events.collect(Duration::from_millis(500)).await;
    assert!(received.is_empty(), "{received:#?}");
    let listed = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 3, "params": {"callid": callid}}),
    )
    .await
    .expect("reply");
    assert_eq!(listed["result"]["Dialog"]["state"], 4, "{listed}");
}

#[tokio::test]
async fn refer_to_unknown_user_raises_no_event_36() {
    refer_to_unknown_user_raises_nothing(Version::V3_6).await;
}

#[tokio::test]
async fn refer_to_unknown_user_raises_no_event_40() {
    refer_to_unknown_user_raises_nothing(Version::V4_0).await;
}

/// OpenSIPS goes on with a `t_uac_dlg` whose mi_http client went away: the phone still rings
/// and answers, and the dialog is confirmed (what a lost MI reply leaves behind).
#[tokio::test]
async fn t_uac_dlg_goes_on_when_its_http_client_goes_away() {
    let emulator = opensips_emulator::start(EmulatorConfig {
        answer_delay: Duration::from_millis(400),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let callid = "lost-reply-1@test";
    let headers = format!(
        "From: <sip:alice@127.0.0.1>\r\nTo: <sip:bob@127.0.0.1>\r\nContact: <sip:alice@127.0.0.1>\r\nContent-Type: application/sdp\r\nCSeq: 1 INVITE\r\nCall-Id: {callid}\r\n"
    );
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "t_uac_dlg", "params": {
        "method": "INVITE", "ruri": "sip:alice@127.0.0.1", "headers": headers,
        "body": "v=0\r\no=x 0 0 IN IP4 0.0.0.0\r\ns=s\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n"}})
    .to_string();
    let addr = emulator.mi_http_addr().expect("mi_http");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /mi HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let listed = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 3, "params": {"callid": callid}}),
    )
    .await
    .expect("reply");
    assert_eq!(listed["result"]["Dialog"]["state"], 4, "{listed}");
}

/// The SIP requests the emulator sent for `callid` (all when empty).
async fn sent(emulator: &Emulator, callid: &str) -> Vec<Value> {
    let addr = emulator.mi_http_addr().expect("mi_http");
    let path = if callid.is_empty() {
        "/emulator/sip".to_owned()
    } else {
        format!("/emulator/sip?callid={callid}")
    };
    let (status, body) = common::http(addr, "GET", &path, "", Duration::from_secs(2))
        .await
        .expect("GET /emulator/sip");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<Value>>(&body).expect("a list")
}

fn header<'a>(request: &'a Value, name: &str) -> Option<&'a str> {
    request["headers"].as_array()?.iter().find_map(|line| {
        let (key, value) = line.as_str()?.split_once(':')?;
        key.eq_ignore_ascii_case(name).then_some(value.trim())
    })
}

/// A click-to-dial first leg to alice, with the shipped script's instructions for the INVITE
/// its transfer makes pushed on it; returns (first Call-ID, E_CALL_TRANSFER states seen).
async fn click_to_dial_with(
    emulator: &Emulator,
    callee: &str,
    instructions: &str,
) -> (String, Vec<String>) {
    let subscriber = Subscriber::new(emulator, &["E_CALL_TRANSFER"]).await;
    let callid = format!("x-{}", uuid::Uuid::new_v4());
    let headers = format!(
        "From: \"Desk\" <sip:1001@127.0.0.1>\r\nTo: <{callee}>\r\nCall-Id: {callid}\r\nCSeq: 1 INVITE\r\nAnswer-Mode: Auto\r\n"
    );
    let reply = mi_udp(
        emulator,
        json!({"jsonrpc": "2.0", "id": 1, "method": "t_uac_dlg",
            "params": {"method": "INVITE", "ruri": "sip:alice@127.0.0.1", "headers": headers}}),
    )
    .await
    .expect("t_uac_dlg answer");
    assert!(
        reply["result"]["Status"]
            .as_str()
            .unwrap_or_default()
            .starts_with("200"),
        "{reply}"
    );
    let reply = mi_udp(
        emulator,
        json!({"jsonrpc": "2.0", "id": 2, "method": "dlg_push_var",
            "params": {"dlg_val_name": "callapi_callee", "dlg_val_value": instructions, "DID": [callid]}}),
    )
    .await
    .expect("dlg_push_var answer");
    assert_eq!(reply["result"], "OK", "{reply}");
    let reply = mi_udp(
        emulator,
        json!({"jsonrpc": "2.0", "id": 3, "method": "call_transfer",
            "params": {"callid": callid, "leg": "callee", "destination": callee}}),
    )
    .await
    .expect("call_transfer answer");
    assert_eq!(reply["result"], "Accepted", "{reply}");
    let states = subscriber
        .collect(Duration::from_millis(600))
        .await
        .iter()
        .filter(|e| e["params"]["callid"] == callid.as_str())
        .filter_map(|e| e["params"]["state"].as_str().map(str::to_owned))
        .collect();
    (callid, states)
}

#[tokio::test]
async fn the_shipped_script_shapes_the_invite_a_refer_makes_and_routes_trunks() {
    let emulator = opensips_emulator::start(EmulatorConfig {
        answer_delay: Duration::from_millis(5),
        dead_timeout: Duration::from_millis(200),
        trunk_gateways: vec!["127.0.0.1:5090".to_owned()],
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");

    // The first INVITE goes out as t_uac_dlg was told: no body (late offer), our headers.
    let instructions = r#"{"hdrs":"Alert-Info: info=intercom\r\n","from_display":"\"Sales\"","pai_user":"4930","du":"sip:127.0.0.1:5090","trunk":"carrier"}"#;
    let (x, states) = click_to_dial_with(&emulator, "sip:+4930123@127.0.0.1", instructions).await;
    assert_eq!(states, ["start", "notify", "ok", "notify"]);
    let first = sent(&emulator, &x).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["method"], "INVITE");
    assert_eq!(first[0]["body"], Value::Null);
    assert_eq!(header(&first[0], "Answer-Mode"), Some("Auto"));
    assert_eq!(
        header(&first[0], "From"),
        Some("\"Desk\" <sip:1001@127.0.0.1>")
    );

    // The phone's INVITE toward the callee, after the script: through the trunk, reshaped.
    let all = sent(&emulator, "").await;
    let second = all
        .iter()
        .find(|r| r["callid"] != x.as_str() && r["ruri"] == "sip:+4930123@127.0.0.1")
        .expect("the INVITE the REFER made");
    assert_eq!(second["destination"], "sip:127.0.0.1:5090");
    assert_eq!(header(second, "Alert-Info"), Some("info=intercom"));
    assert_eq!(
        header(second, "P-Asserted-Identity"),
        Some("<sip:4930@127.0.0.1>")
    );
    assert!(
        header(second, "From").is_some_and(|f| f.starts_with("\"Sales\" <sip:alice@127.0.0.1>"))
    );
    assert!(
        second["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("v=0"))
    );

    // A trunk nobody answers at: the transfer fails as a dead destination does.
    let down = r#"{"du":"sip:127.0.0.1:5999","trunk":"broken"}"#;
    let (_, states) = click_to_dial_with(&emulator, "sip:+4930124@127.0.0.1", down).await;
    assert_eq!(states, ["start", "fail"]);

    // Bad DID shapes are refused as OpenSIPS does; an unknown dialog is no error.
    let reply = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "id": 4, "method": "dlg_push_var",
            "params": {"dlg_val_name": "a", "dlg_val_value": "b", "DID": "not-an-array"}}),
    )
    .await
    .expect("answer");
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let reply = mi_udp(
        &emulator,
        json!({"jsonrpc": "2.0", "id": 5, "method": "dlg_push_var",
            "params": {"dlg_val_name": "a", "dlg_val_value": "b", "DID": ["nope"]}}),
    )
    .await
    .expect("answer");
    assert_eq!(reply["result"], "OK", "{reply}");
}
