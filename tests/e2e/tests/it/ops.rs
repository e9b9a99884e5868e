//! Every service's operations endpoint (issue 13): `/healthz`, `/readyz` (ready only while it
//! can do its job) and `/metrics` in Prometheus text, read as Kubernetes and Prometheus would.

use std::time::Duration;

use callapi_e2e::Stack;
use callapi_e2e::client::shape;
use callapi_e2e::http::request;
use serde_json::json;

use crate::commands::call;

/// The operations address of each service: connector, ingest, commands (from their READY
/// lines), gateway (its own listener).
fn ops_addrs(stack: &Stack) -> Vec<(&'static str, String)> {
    vec![
        (
            "proxy-connector",
            stack.connector.ready_field("ops").expect("connector ops"),
        ),
        (
            "event-ingest",
            stack.ingest.ready_field("ops").expect("ingest ops"),
        ),
        (
            "commands",
            stack.commands[0].ready_field("ops").expect("commands ops"),
        ),
        ("gateway", stack.http_addr()),
    ]
}

/// `/readyz`'s status once it is `want`, or the last one seen after 10 s.
async fn readiness_becomes(addr: &str, want: u16) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..100 {
        let answer = request(addr, "GET", "/readyz", None).await;
        last = (answer.status, answer.body);
        if last.0 == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test]
async fn every_service_says_it_is_alive_ready_and_what_it_did() {
    let mut stack = Stack::start().await;
    let addrs = ops_addrs(&stack);
    for (service, addr) in &addrs {
        let alive = request(addr, "GET", "/healthz", None).await;
        assert_eq!((alive.status, alive.body.trim()), (200, "ok"), "{service}");
        let (status, body) = readiness_becomes(addr, 200).await;
        assert_eq!(status, 200, "{service}: {body}");
    }

    // A call, held and ended: each service counts its part.
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    for (service, metric) in [
        (
            "commands",
            "callapi_commands_ended_total{kind=\"call_start\"}",
        ),
        (
            "commands",
            "callapi_command_duration_seconds_bucket{kind=\"end\"",
        ),
        ("proxy-connector", "callapi_mi_requests_total{"),
        (
            "proxy-connector",
            "callapi_node_reachable{node=\"opensips1\"} 1",
        ),
        (
            "event-ingest",
            "callapi_events_received_total{node=\"opensips1\"}",
        ),
        ("event-ingest", "callapi_call_events_published_total"),
        ("gateway", "callapi_websocket_connections 1"),
    ] {
        let addr = &addrs.iter().find(|(s, _)| *s == service).unwrap().1;
        let mut body = String::new();
        for _ in 0..30 {
            let scraped = request(addr, "GET", "/metrics", None).await;
            assert_eq!(scraped.status, 200, "{service}");
            body = scraped.body;
            if body.contains(metric) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(body.contains(metric), "{service} has no {metric}:\n{body}");
    }

    // The OpenSIPS node stops answering: proxy-connector is not ready, and says why.
    stack.emulator.kill().await;
    let connector = &addrs[0].1;
    let (status, body) = readiness_becomes(connector, 503).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("OpenSIPS node opensips1 does not answer"),
        "{body}"
    );
    // It answers again: ready again, by itself.
    stack.restart_emulator().await;
    let (status, body) = readiness_becomes(connector, 200).await;
    assert_eq!(status, 200, "{body}");

    // NATS goes away: no service is ready, though all are alive; back, all are ready again.
    stack.nats.stop().await;
    for (service, addr) in &addrs {
        let (status, body) = readiness_becomes(addr, 503).await;
        assert_eq!(status, 503, "{service}: {body}");
        assert!(body.contains("not connected to NATS"), "{service}: {body}");
        let alive = request(addr, "GET", "/healthz", None).await;
        assert_eq!(alive.status, 200, "{service}");
    }
    stack.nats.restart().await;
    for (service, addr) in &addrs {
        let (status, body) = readiness_becomes(addr, 200).await;
        assert_eq!(status, 200, "{service}: {body}");
    }
}

#[tokio::test]
async fn with_log_format_json_every_line_a_service_logs_is_a_json_object() {
    let stack = Stack::with(callapi_e2e::StackOptions {
        service_env: vec![("CALLAPI_LOG_FORMAT".into(), "json".into())],
        ..callapi_e2e::StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    for (service, logs) in [
        ("gateway", stack.gateways[0].logs()),
        ("commands", stack.commands[0].logs()),
        ("proxy-connector", stack.connector.logs()),
        ("event-ingest", stack.ingest.logs()),
    ] {
        let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() > 2, "{service}: {logs}");
        for line in lines {
            let entry: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{service}: not JSON ({e}): {line}"));
            assert!(entry["level"].is_string(), "{service}: {line}");
            assert!(entry["timestamp"].is_string(), "{service}: {line}");
            assert!(entry["fields"]["message"].is_string(), "{service}: {line}");
        }
    }
}

#[tokio::test]
async fn a_stopping_gateway_is_not_ready_then_tells_its_clients_to_connect_again() {
    let mut stack = callapi_e2e::Stack::with(callapi_e2e::StackOptions {
        gateway_toml: "drain_delay_ms = 1500".to_owned(),
        ..callapi_e2e::StackOptions::default()
    })
    .await;
    let addr = stack.http_addr();
    let mut client = stack.client().await;
    let pid = stack.gateways[0].pid().expect("gateway runs");
    let signalled = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    // During the drain delay: still serving, its WebSockets too, but not ready.
    let (status, body) = readiness_becomes(&addr, 503).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let alive = request(&addr, "GET", "/healthz", None).await;
    assert_eq!(alive.status, 200);
    let id = client.request("CallList", json!({})).await;
    let listed = client.reply(&id).await;
    assert!(listed.get("result").is_some(), "{listed}");
    // Then every WebSocket is closed with 1001 and what to do, after the delay.
    let (code, reason) = client.closed().await;
    assert!(
        signalled.elapsed() >= Duration::from_millis(1_200),
        "closed {:?} after SIGTERM, before the drain delay",
        signalled.elapsed()
    );
    assert_eq!(code, 1001, "{reason}");
    assert_eq!(
        reason,
        "gateway shutting down: connect again and CommandAttach to your commands in flight"
    );
    let status = stack.gateways[0].terminate(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test]
async fn a_service_still_waiting_for_nats_stops_at_once_on_sigterm() {
    // Nothing listens on this port: the service keeps trying to connect, with nothing in flight.
    let port = callapi_e2e::free_port();
    let mut child = tokio::process::Command::new(callapi_e2e::bin_path("commands"))
        .env("CALLAPI_NATS__URL", format!("nats://127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn commands");
    // Its signal handler is in place once it tries NATS.
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("connecting to NATS") {
                return;
            }
        }
    })
    .await
    .expect("commands tries NATS");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = child.id().expect("running");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("it stops within seconds, not at the end of its NATS retries")
        .expect("exit status");
    assert!(status.success(), "{status:?}");
}
