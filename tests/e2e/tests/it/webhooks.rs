//! Webhooks (issue 12): a tenant's call events POSTed to its URL in PortSIP's format, with the
//! auth it configured and an HMAC signature, tried again when the receiver fails, and given up
//! to the dead letters (`GET /api/webhooks/dead_letters`) after the last try; each tenant sees
//! only its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use callapi_e2e::client::shape;
use callapi_e2e::http::authed;
use callapi_e2e::{Client, Stack, StackOptions};
use serde_json::{Value, json};

use crate::commands::call;
use crate::tenants::{access_token, auth_toml_with, local_tenants};

const HOOK_PASSWORD: &str = "acme-hook-password";
const HOOK_SECRET: &str = "acme-hook-signing-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    tenant: String,
    headers: HeaderMap,
    raw: String,
    body: Value,
}

/// A CRM's webhook receiver: acme's endpoint fails its first two requests (500), then takes
/// everything; globex's always fails (503).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
}

async fn hook(
    State(receiver): State<Receiver>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    raw: String,
) -> StatusCode {
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    let mut got = receiver.got.lock().unwrap();
    got.push(Got {
        tenant: tenant.clone(),
        headers,
        raw,
        body,
    });
    let seen = got.iter().filter(|g| g.tenant == tenant).count();
    match tenant.as_str() {
        "acme" if seen <= 2 => StatusCode::INTERNAL_SERVER_ERROR,
        "acme" => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn start_receiver() -> (Receiver, u16) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/hook/{tenant}", axum::routing::post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, port)
}

/// The local tenants file with a webhook for each tenant, written to a file of its own.
fn tenants_with_webhooks(port: u16) -> std::path::PathBuf {
    let text = std::fs::read_to_string(local_tenants()).unwrap();
    let acme = format!(
        "webhook = {{ url = \"http://127.0.0.1:{port}/hook/acme\", auth = \"basic\", username = \"crm\", password_env = \"ACME_HOOK_PASSWORD\", secret_env = \"ACME_HOOK_SECRET\", retry_delays_ms = [200, 400], max_attempts = 5 }}\n"
    );
    let globex = format!(
        "webhook = {{ url = \"http://127.0.0.1:{port}/hook/globex\", auth = \"bearer\", token_env = \"ACME_HOOK_PASSWORD\", retry_delays_ms = [100], max_attempts = 3 }}\n"
    );
    let text = text
        .replacen(
            "node_policy = \"first\"\n",
            &format!("node_policy = \"first\"\n{acme}"),
            1,
        )
        .replacen(
            "domains = [\"globex.localhost\"]\n",
            &format!("domains = [\"globex.localhost\"]\n{globex}"),
            1,
        );
    assert!(text.contains("/hook/acme") && text.contains("/hook/globex"));
    let path = std::env::temp_dir().join(format!(
        "callapi-webhooks-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// What the receiver got so far.
fn got(receiver: &Receiver) -> Vec<Got> {
    receiver.got.lock().unwrap().clone()
}

#[tokio::test]
async fn webhooks_carry_portsips_events_signed_retried_and_dead_lettered_per_tenant() {
    let (receiver, port) = start_receiver().await;
    let tenants = tenants_with_webhooks(port);
    let stack = Stack::with(StackOptions {
        gateway_toml: auth_toml_with(&tenants, 3600),
        ingest_toml: format!("tenants_file = \"{}\"", tenants.display()),
        service_env: vec![
            (
                "CALLAPI_TEST_SIGNING_KEY".into(),
                "the-current-test-secret-of-at-least-32-bytes".into(),
            ),
            ("ACME_HOOK_PASSWORD".into(), HOOK_PASSWORD.into()),
            ("ACME_HOOK_SECRET".into(), HOOK_SECRET.into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;
    let ws = stack.url().to_owned();

    // An acme call, answered and ended.
    let mut client = Client::connect_with_token(&ws, &acme).await;
    let callid = call(&mut client, "alice", "bob").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");

    // Its life reaches acme's receiver as PortSIP's events, the CDR last.
    let mut acme_got = Vec::new();
    for _ in 0..100 {
        acme_got = got(&receiver)
            .into_iter()
            .filter(|g| g.tenant == "acme")
            .collect();
        let cdr = acme_got
            .iter()
            .any(|g| g.body["event_type"] == "call_cdr" && g.body["call_id"] == callid.as_str());
        // The two refused first are taken on a later try.
        let id = |g: &Got| g.headers["x-callapi-event-id"].clone();
        let retried = acme_got.len() > 2
            && acme_got[..2]
                .iter()
                .all(|failed| acme_got[2..].iter().any(|g| id(g) == id(failed)));
        if cdr && retried {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bodies: Vec<&str> = acme_got.iter().map(|g| g.raw.as_str()).collect();
    let taken: Vec<&Got> = acme_got.iter().skip(2).collect();
    let start = taken
        .iter()
        .find(|g| g.body["event_type"] == "call_start" && g.body["call_id"] == callid.as_str())
        .unwrap_or_else(|| panic!("{bodies:#?}"));
    assert!(
        start.body["caller"]
            .as_str()
            .is_some_and(|c| c.starts_with("sip:")),
        "{callid} {bodies:#?}"
    );
    assert_eq!(start.body["tenant_id"], "acme");
    assert!(start.body["session_id"].as_str().is_some(), "{start:#?}");
    // The call's other events name its CDR, as PortSIP's do.
    let of_call = |event_type: &str| {
        taken.iter().find(|g| {
            g.body["event_type"] == event_type && g.body["cdr_id"] == start.body["cdr_id"]
        })
    };
    assert!(of_call("cdr_target_answer").is_some(), "{bodies:#?}");
    assert!(of_call("cdr_target_end").is_some(), "{bodies:#?}");
    let cdr = of_call("call_cdr").unwrap_or_else(|| panic!("{bodies:#?}"));
    assert_eq!(cdr.body["call_id"], callid.as_str());
    assert_eq!(cdr.body["call_status"], "answered", "{cdr:#?}");
    assert!(cdr.body["talk_duration"].is_u64(), "{cdr:#?}");
    assert_eq!(cdr.body["call_targets"][0]["status"], "answered");

    // The first two requests failed: each of their events was tried again, and taken.
    let header = |g: &Got, name: &str| g.headers[name].to_str().unwrap().to_owned();
    for failed in &acme_got[..2] {
        let id = header(failed, "x-callapi-event-id");
        let attempt: u32 = header(failed, "x-callapi-attempt").parse().unwrap();
        let again = acme_got[2..].iter().any(|g| {
            header(g, "x-callapi-event-id") == id
                && header(g, "x-callapi-attempt").parse::<u32>().unwrap() > attempt
        });
        assert!(again, "{id} attempt {attempt} not tried again: {bodies:#?}");
    }
    // Every request: Basic auth as configured, and a signature that checks.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("crm:{HOOK_PASSWORD}"))
    );
    for g in &acme_got {
        assert_eq!(g.headers["authorization"], basic.as_str());
        assert_eq!(g.headers["content-type"], "application/json");
        let signature = g.headers["x-callapi-signature"].to_str().unwrap();
        let (t, v1) = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("{signature}"));
        assert_eq!(v1, hmac_hex(HOOK_SECRET, &format!("{t}.{}", g.raw)));
        let age = callapi_kit::unix_ms() / 1000 - t.parse::<u64>().unwrap();
        assert!(age < 60, "{signature}");
    }

    // A globex call: its receiver always fails, so after three tries its events are dead
    // letters, listed for globex only.
    let mut globex_ws = Client::connect_with_token(&ws, &globex).await;
    let notes = globex_ws
        .run(
            "CallStart",
            json!({"caller": "sip:cindy@globex.localhost", "callee": "sip:dave@globex.localhost"}),
        )
        .await;
    assert_eq!(shape(&notes), crate::commands::CALL_START_OK, "{notes:#?}");
    let addr = stack.http_addr();
    let mut letters = Value::Null;
    for _ in 0..100 {
        letters = authed(&addr, &globex, "GET", "/api/webhooks/dead_letters", None)
            .await
            .json;
        if letters["count"].as_u64().is_some_and(|n| n > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letter = &letters["items"][0];
    assert_eq!(letter["attempts"], 3, "{letters:#}");
    assert_eq!(letter["status"], 503, "{letters:#}");
    assert_eq!(
        letter["url"],
        format!("http://127.0.0.1:{port}/hook/globex")
    );
    assert!(
        letter["payloads"][0]["event_type"].is_string(),
        "{letters:#}"
    );
    let globex_got: Vec<Got> = got(&receiver)
        .into_iter()
        .filter(|g| g.tenant == "globex")
        .collect();
    assert!(
        globex_got.iter().all(|g| g.headers["authorization"]
            == format!("Bearer {HOOK_PASSWORD}").as_str()
            && g.headers.get("x-callapi-signature").is_none()),
        "{globex_got:#?}"
    );
    // acme's receiver took everything: no dead letter of acme's, and none of globex's shown.
    let acme_letters = authed(&addr, &acme, "GET", "/api/webhooks/dead_letters", None).await;
    assert_eq!(acme_letters.json["count"], 0, "{}", acme_letters.body);
    let bad = authed(
        &addr,
        &acme,
        "GET",
        "/api/webhooks/dead_letters?limit=0",
        None,
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let _ = std::fs::remove_file(tenants);
}

fn hmac_hex(key: &str, text: &str) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(text.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
