//! The REST API's OpenAPI document: served, rendered, and checked by schemathesis against the
//! live stack (every operation, positive and negative data, stateful sequences).

use std::time::Duration;

use callapi_e2e::http::request;
use callapi_e2e::{Stack, StackOptions};

#[tokio::test]
async fn the_document_and_its_page_are_served() {
    let stack = Stack::start().await;
    let doc = request(&stack.http_addr(), "GET", "/api/openapi.json", None).await;
    assert_eq!(
        (doc.status, doc.content_type.as_str()),
        (200, "application/json")
    );
    assert_eq!(doc.json["openapi"], "3.1.0");
    assert!(doc.json["paths"]["/api/sessions/{id}/attended_refer"]["post"].is_object());
    let page = request(&stack.http_addr(), "GET", "/api/docs", None).await;
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"), "{page:?}");
    assert!(page.body.contains("/api/openapi.json"), "{page:?}");
}

/// schemathesis (`SCHEMATHESIS_BIN`, which `make test` installs) finds no failure. Left out:
/// `GET /sessions/directly` (an extension's password, which this stack without tenants does
/// not have: a documented 501), `GET /api/events` (a stream lasting 25 s), and schemathesis's coverage phase, which crashes inside schemathesis 4.32.5 itself
/// (a KeyError in hypothesis's repr of a filtered strategy).
#[tokio::test]
async fn schemathesis_finds_nothing_wrong() {
    let st = std::env::var("SCHEMATHESIS_BIN").expect(
        "SCHEMATHESIS_BIN must name schemathesis's `st` (make test sets it: deploy/local/schemathesis.sh)",
    );
    let stack = Stack::with(StackOptions {
        emulator_args: vec![
            "--extra-phones=1001,1002,1003".into(),
            "--trunk-gateways=127.0.0.1:5090".into(),
        ],
        gateway_toml: "[[trunks]]\nname = \"carrier\"\nuri = \"sip:127.0.0.1:5090\"\n".into(),
        ..Default::default()
    })
    .await;
    let url = format!("http://{}/api/openapi.json", stack.http_addr());
    let run = tokio::process::Command::new(&st)
        .args([
            "run",
            &url,
            "--checks",
            "all",
            "--phases",
            "examples,fuzzing,stateful",
            "--exclude-path",
            "/api/sessions/directly",
            "--exclude-path",
            "/api/events",
            "--max-examples",
            "30",
            "--workers",
            "2",
            "--seed",
            "1",
        ])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("schemathesis finished within 5 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
