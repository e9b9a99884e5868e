//! The emulator is as unkind as a real OpenSIPS under load (issue 9): mi_http answers an
//! asynchronous command (`t_uac_dlg`) only at its next 500 ms poll step and serves one request
//! at a time, while mi_datagram answers at once and concurrently; and a shared-memory budget
//! past which MI requests get `500 Internal error` and BYEs fail, recovering once load eases.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opensips_emulator::{Emulator, EmulatorConfig, Stats};
use serde_json::{Value, json};
use tokio::net::UdpSocket;

async fn emulator(config: EmulatorConfig) -> Emulator {
    opensips_emulator::start(config).await.expect("emulator")
}

/// One raw MI request over UDP; the raw reply, or None if none came within 3 s.
async fn udp_raw(emulator: &Emulator, request: &Value) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket
        .send_to(
            request.to_string().as_bytes(),
            emulator.mi_udp_addr().expect("mi_udp"),
        )
        .await
        .expect("send");
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf)).await {
        Ok(Ok(len)) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

async fn udp(emulator: &Emulator, request: &Value) -> Value {
    let raw = udp_raw(emulator, request).await.expect("an MI reply");
    serde_json::from_slice(&raw).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&raw)))
}

/// A minimal HTTP/1.1 request; returns (status, body), or None without an answer in 5 s.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    common::http(addr, method, path, body, Duration::from_secs(5)).await
}

async fn http_mi(emulator: &Emulator, request: &Value) -> (u16, String) {
    http(
        emulator.mi_http_addr().expect("mi_http"),
        "POST",
        "/mi",
        &request.to_string(),
    )
    .await
    .expect("an HTTP answer")
}

async fn stats(emulator: &Emulator) -> Stats {
    let (status, body) = http(
        emulator.mi_http_addr().expect("mi_http"),
        "GET",
        "/emulator/stats",
        "",
    )
    .await
    .expect("stats");
    assert_eq!(status, 200, "{body}");
    let value: Value = serde_json::from_str(&body).expect("stats JSON");
    let number = |name: &str| {
        value[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    let served = Stats {
        in_flight: number("in_flight") as usize,
        high_water: number("high_water") as usize,
        budget: number("budget") as usize,
        refused: number("refused"),
    };
    assert_eq!(served, emulator.stats());
    served
}

/// CallStart's first leg: a `t_uac_dlg` INVITE to `user`.
fn invite(id: u64, user: &str, callid: &str) -> Value {
    json!({"jsonrpc": "2.0", "method": "t_uac_dlg", "id": id, "params": {
        "method": "INVITE", "ruri": format!("sip:{user}@127.0.0.1"),
        "headers": format!("From: <sip:{user}@127.0.0.1>\r\nTo: <sip:bob@127.0.0.1>\r\nContact: <sip:{user}@127.0.0.1>\r\nCall-Id: {callid}\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\n"),
        "body": "v=0\r\n"}})
}

fn quick(answer_delay: Duration) -> EmulatorConfig {
    EmulatorConfig {
        answer_delay,
        ring_timeout: Duration::from_millis(300),
        dead_timeout: Duration::from_millis(200),
        ..EmulatorConfig::default()
    }
}

#[tokio::test]
async fn t_uac_dlg_over_http_waits_for_the_500_ms_poll_step_over_udp_not() {
    let emulator = emulator(quick(Duration::ZERO)).await;
    let started = Instant::now();
    let (status, body) = http_mi(&emulator, &invite(1, "alice", "poll-http@test")).await;
    let over_http = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(reply["result"]["Status"], "200 Answering", "{reply}");
    assert!(
        over_http >= Duration::from_millis(500) && over_http < Duration::from_millis(600),
        "{over_http:?}"
    );

    let started = Instant::now();
    let reply = udp(&emulator, &invite(2, "alice", "poll-udp@test")).await;
    let over_udp = started.elapsed();
    assert_eq!(reply["result"]["Status"], "200 Answering", "{reply}");
    assert!(over_udp < Duration::from_millis(100), "{over_udp:?}");
}

#[tokio::test]
async fn an_async_reply_goes_out_at_the_first_poll_step_after_it_completed() {
    let emulator = emulator(EmulatorConfig {
        mi_http_poll: Duration::from_millis(100),
        ..quick(Duration::from_millis(250))
    })
    .await;
    let started = Instant::now();
    let (status, _) = http_mi(&emulator, &invite(1, "alice", "steps@test")).await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    // Completed at 250 ms: checked at 100, 200, answered at 300.
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(380),
        "{waited:?}"
    );
    // A t_uac_dlg refused before it started (bad R-URI) is synchronous: no poll step.
    let mut bad = invite(2, "alice", "bad@test");
    bad["params"]["ruri"] = json!("nonsense");
    let started = Instant::now();
    let (status, body) = http_mi(&emulator, &bad).await;
    assert_eq!(status, 200);
    assert!(body.contains("Invalid ruri"), "{body}");
    assert!(started.elapsed() < Duration::from_millis(80));
}

#[tokio::test]
async fn mi_http_serves_one_request_at_a_time() {
    let emulator = emulator(quick(Duration::ZERO)).await;
    let started = Instant::now();
    let uac = tokio::spawn({
        let addr = emulator.mi_http_addr().expect("mi_http");
        async move {
            let answer = http(
                addr,
                "POST",
                "/mi",
                &invite(1, "alice", "first@test").to_string(),
            )
            .await;
            (answer, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // mi_datagram is not held up by the waiting httpd.
    let list = json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 2});
    let before = Instant::now();
    let reply = udp(&emulator, &list).await;
    assert!(reply["result"]["Dialogs"].is_array(), "{reply}");
    assert!(before.elapsed() < Duration::from_millis(100));
    // A fast synchronous command over HTTP waits for the t_uac_dlg ahead of it.
    let (status, body) = http_mi(&emulator, &list).await;
    let listed_at = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("first@test"), "{body}");
    let (answer, answered_at) = uac.await.expect("t_uac_dlg task");
    assert_eq!(answer.map(|(status, _)| status), Some(200));
    assert!(answered_at >= Duration::from_millis(500), "{answered_at:?}");
    // Sent at 50 ms, answered only once the httpd was done with the t_uac_dlg (its reply went
    // out at the 500 ms step), then at once.
    assert!(listed_at >= Duration::from_millis(500), "{listed_at:?}");
    assert!(listed_at < Duration::from_millis(650), "{listed_at:?}");
}

#[tokio::test]
async fn past_the_shm_budget_requests_fail_as_on_opensips_then_recover() {
    let emulator = emulator(EmulatorConfig {
        shm_budget: 2,
        ..quick(Duration::from_millis(400))
    })
    .await;
    // A call in progress, placed before the load (its ringing took a slot for a moment).
    let call = emulator.place_call("dave", "cindy").await;
    // Two t_uac_dlg ringing fill the budget.
    let mut ringing = Vec::new();
    for n in 0..2 {
        let request = invite(n, "alice", &format!("load-{n}@test"));
        let emulator_udp = emulator.mi_udp_addr().expect("mi_udp");
        ringing.push(tokio::spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            socket
                .send_to(request.to_string().as_bytes(), emulator_udp)
                .await
                .expect("send");
            let mut buf = vec![0u8; 65_535];
            let len = tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf))
                .await
                .expect("in time")
                .expect("recv");
            serde_json::from_slice::<Value>(&buf[..len]).expect("json")
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stats(&emulator).await,
        Stats {
            in_flight: 2,
            high_water: 2,
            budget: 2,
            refused: 0
        }
    );
    // The next t_uac_dlg over mi_datagram: plain text, no JSON, no id.
    let refused = udp_raw(&emulator, &invite(7, "alice", "refused@test")).await;
    assert_eq!(refused.as_deref(), Some(&b"500 Internal error"[..]));
    // Over mi_http: HTTP 500 with an empty body, at once.
    let started = Instant::now();
    let (status, body) = http_mi(&emulator, &invite(8, "alice", "refused-http@test")).await;
    assert_eq!((status, body.as_str()), (500, ""));
    assert!(started.elapsed() < Duration::from_millis(100));
    // Hold and transfer cannot send their requests: the handler returns nothing (-32000).
    let hold = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "call_hold", "id": 9, "params": {"callid": call}}),
    )
    .await;
    assert_eq!(hold["error"]["code"], -32000, "{hold}");
    assert_eq!(hold["error"]["data"], "Command handler returned null");
    let transfer = json!({"jsonrpc": "2.0", "method": "call_transfer", "id": 10,
        "params": {"callid": call, "leg": "callee", "destination": "sip:alice@127.0.0.1"}});
    let refused_transfer = udp(&emulator, &transfer).await;
    assert_eq!(
        refused_transfer["error"]["code"], -32000,
        "{refused_transfer}"
    );
    // Commands that send nothing still work.
    let listed = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 11, "params": {"callid": call}}),
    )
    .await;
    assert_eq!(listed["result"]["Dialog"]["state"], 4, "{listed}");
    let refused_so_far = stats(&emulator).await;
    assert_eq!(
        (refused_so_far.in_flight, refused_so_far.refused),
        (2, 4),
        "{refused_so_far:?}"
    );
    // The ringing calls end; the node recovers.
    for call in ringing {
        let reply = call.await.expect("t_uac_dlg task");
        assert_eq!(reply["result"]["Status"], "200 Answering", "{reply}");
    }
    let after = udp(&emulator, &invite(12, "alice", "after@test")).await;
    assert_eq!(after["result"]["Status"], "200 Answering", "{after}");
    // Hold works again, and the refused transfer left no 491 behind.
    let hold = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "call_hold", "id": 13, "params": {"callid": call}}),
    )
    .await;
    assert_eq!(hold["result"], "OK", "{hold}");
    let transfer = udp(&emulator, &transfer).await;
    assert_eq!(transfer["result"], "Accepted", "{transfer}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = stats(&emulator).await;
    assert_eq!(
        end,
        Stats {
            in_flight: 0,
            high_water: 2,
            budget: 2,
            refused: 4
        }
    );
}

#[tokio::test]
async fn past_the_shm_budget_dlg_end_dlg_fails_to_send_the_bye() {
    let emulator = emulator(EmulatorConfig {
        shm_budget: 1,
        ..quick(Duration::from_millis(300))
    })
    .await;
    let call = emulator.place_call("dave", "cindy").await;
    let busy = tokio::spawn({
        let request = invite(1, "alice", "busy-slot@test");
        let addr = emulator.mi_udp_addr().expect("mi_udp");
        async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            socket
                .send_to(request.to_string().as_bytes(), addr)
                .await
                .expect("send");
            let mut buf = vec![0u8; 65_535];
            tokio::time::timeout(Duration::from_secs(3), socket.recv(&mut buf))
                .await
                .is_ok()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let end = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "dlg_end_dlg", "id": 2, "params": {"dialog_id": call}}),
    )
    .await;
    assert_eq!(
        end["error"],
        json!({"code": 500, "message": "Operation failed"})
    );
    // OpenSIPS ends the dialog locally all the same (the phones were never told).
    let listed = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "dlg_list", "id": 3, "params": {"callid": call}}),
    )
    .await;
    assert_eq!(listed["result"]["Dialog"]["state"], 5, "{listed}");
    assert!(busy.await.expect("task"));
    // Below the budget again: BYEs go out.
    let second = emulator.place_call("dave", "cindy").await;
    let end = udp(
        &emulator,
        &json!({"jsonrpc": "2.0", "method": "dlg_end_dlg", "id": 4, "params": {"dialog_id": second}}),
    )
    .await;
    assert_eq!(end["result"], "OK", "{end}");
    assert_eq!(stats(&emulator).await.refused, 1);
    assert_eq!(stats(&emulator).await.high_water, 1);
}

#[tokio::test]
async fn an_unlimited_budget_only_counts() {
    let emulator = emulator(quick(Duration::from_millis(200))).await;
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let addr = emulator.mi_udp_addr().expect("mi_udp");
            let request = invite(n, "alice", &format!("many-{n}@test"));
            tokio::spawn(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
                socket
                    .send_to(request.to_string().as_bytes(), addr)
                    .await
                    .expect("send");
                let mut buf = vec![0u8; 65_535];
                let len = socket.recv(&mut buf).await.expect("recv");
                serde_json::from_slice::<Value>(&buf[..len]).expect("json")
            })
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("task");
        assert_eq!(reply["result"]["Status"], "200 Answering", "{reply}");
    }
    let stats = stats(&emulator).await;
    assert_eq!(
        (
            stats.in_flight,
            stats.high_water,
            stats.budget,
            stats.refused
        ),
        (0, 20, 0, 0)
    );
}
