//! Tenants and authentication (issue 11), from the outside: sign-in as PortSIP does it, tokens
//! on every REST request and WebSocket upgrade, scopes, and two tenants (`acme`, `globex`, from
//! `deploy/local/tenants.toml`) on one node, neither able to see or touch the other's calls.
//! The node's calls are acme's here (event-ingest gives the node one tenant until it resolves
//! tenants by SIP domain).

use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::http::{authed, post_form, request};
use callapi_e2e::{Client, Stack, StackOptions};
use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::commands::call;

const TOKEN_PATH: &str = "/api/login/oauth/token";
const REVOKE_PATH: &str = "/api/login/oauth/revoke";
const ALLOWED_ORIGIN: &str = "https://desk.acme.example";

/// A form's fields.
type Form<'a> = &'a [(&'a str, &'a str)];

/// The local stack's tenants file.
pub(crate) fn local_tenants() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/local/tenants.toml")
        .canonicalize()
        .expect("deploy/local/tenants.toml")
}

/// The gateway's `[auth]`: the local tenants file, two keys (the second signs), tokens living
/// `access_ttl` seconds.
fn auth_toml(access_ttl: u64) -> String {
    auth_toml_with(&local_tenants(), access_ttl)
}

/// As [`auth_toml`] with another tenants file.
pub(crate) fn auth_toml_with(tenants: &std::path::Path, access_ttl: u64) -> String {
    format!(
        r#"[auth]
tenants_file = "{}"
active_key = "k2"
access_token_ttl_secs = {access_ttl}
allowed_origins = ["{ALLOWED_ORIGIN}"]
[[auth.signing_keys]]
kid = "k1"
secret = "an-older-test-secret-of-at-least-32-bytes"
[[auth.signing_keys]]
kid = "k2"
secret_env = "CALLAPI_TEST_SIGNING_KEY"
"#,
        tenants.display()
    )
}

/// A stack whose gateway has `gateway_toml` (an `[auth]`) and the signing key it names.
pub(crate) fn auth_options(gateway_toml: String) -> StackOptions {
    StackOptions {
        gateway_toml,
        node_tenant: "acme",
        service_env: vec![(SIGNING_KEY_ENV.into(), SIGNING_KEY.into())],
        ..StackOptions::default()
    }
}

/// The environment variable the test gateways read their active key from, and the key.
const SIGNING_KEY_ENV: &str = "CALLAPI_TEST_SIGNING_KEY";
const SIGNING_KEY: &str = "the-current-test-secret-of-at-least-32-bytes";

async fn stack_with_auth(access_ttl: u64) -> Stack {
    Stack::with(auth_options(auth_toml(access_ttl))).await
}

/// A user's sign-in (password grant, the tenant named by `domain`); the whole answer.
async fn user_sign_in(stack: &Stack, username: &str, password: &str, domain: &str) -> Value {
    post_form(
        &stack.http_addr(),
        TOKEN_PATH,
        &[],
        &[
            ("grant_type", "password"),
            ("username", username),
            ("password", password),
            ("domain", domain),
        ],
    )
    .await
    .json
}

/// An API client's sign-in (client credentials); the whole answer.
async fn client_token(stack: &Stack, id: &str, secret: &str) -> Value {
    let reply = post_form(
        &stack.http_addr(),
        TOKEN_PATH,
        &[],
        &[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json
}

pub(crate) async fn access_token(stack: &Stack, id: &str, secret: &str) -> String {
    client_token(stack, id, secret).await["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn ws_url(stack: &Stack) -> String {
    stack.url().to_owned()
}

/// Sends a request over WebSocket and returns its reply.
async fn ask(client: &mut Client, method: &str, params: Value) -> Value {
    let id = client.request(method, params).await;
    client.reply(&id).await
}

#[tokio::test]
async fn sign_in_refresh_and_revoke_as_portsip_does() {
    let stack = stack_with_auth(3600).await;
    let addr = stack.http_addr();

    // An API client: a token without a refresh token, never cached.
    let reply = post_form(
        &addr,
        TOKEN_PATH,
        &[],
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "crm"),
            ("client_secret", "acme-crm-secret"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json["token_type"], "Bearer");
    assert_eq!(reply.json["expires_in"], 3600);
    assert_eq!(reply.json["scope"], "calls:read calls:control");
    assert!(reply.json["refresh_token"].is_null(), "{}", reply.body);
    assert_eq!(reply.header("cache-control"), "no-store");
    // The same with HTTP Basic client authentication (RFC 6749 section 2.3.1).
    let basic = post_form(
        &addr,
        TOKEN_PATH,
        &[("Authorization", "Basic Y3JtOmFjbWUtY3JtLXNlY3JldA==")],
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(basic.status, 200, "{}", basic.body);

    // A tenant's user, PortSIP's password grant: the tenant named by its SIP domain.
    let form = [
        ("grant_type", "password"),
        ("username", "wallboard"),
        ("password", "acme-wallboard-password"),
        ("domain", "acme.localhost"),
        ("scope", "all"),
        ("client_id", "9d806019-75b2-4b3d-bb8b-f5a3a412cc0a"),
    ];
    let signed_in = post_form(&addr, TOKEN_PATH, &[], &form).await;
    assert_eq!(signed_in.status, 200, "{}", signed_in.body);
    assert_eq!(signed_in.json["scope"], "calls:read");
    let access = signed_in.json["access_token"].as_str().unwrap().to_owned();
    let refresh = signed_in.json["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(
        authed(&addr, &access, "GET", "/api/sessions", None)
            .await
            .status,
        200
    );

    // Wrong credentials, missing fields, other grants: OAuth's errors.
    let cases: [(Form, u16, &str); 6] = [
        (
            &[
                ("grant_type", "password"),
                ("username", "wallboard"),
                ("password", "wrong"),
                ("domain", "acme.localhost"),
            ],
            400,
            "invalid_grant",
        ),
        (
            &[
                ("grant_type", "password"),
                ("username", "wallboard"),
                ("password", "acme-wallboard-password"),
                ("domain", "globex.localhost"),
            ],
            400,
            "invalid_grant",
        ),
        (
            &[
                ("grant_type", "password"),
                ("username", "wallboard"),
                ("password", "acme-wallboard-password"),
            ],
            400,
            "invalid_request",
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "crm"),
                ("client_secret", "globex-dialer-secret"),
            ],
            401,
            "invalid_client",
        ),
        (
            &[("grant_type", "authorization_code"), ("code", "x")],
            400,
            "unsupported_grant_type",
        ),
        (
            &[
                ("grant_type", "password"),
                ("username", "wallboard"),
                ("password", "acme-wallboard-password"),
                ("domain", "acme.localhost"),
                ("scope", "calls:control"),
            ],
            400,
            "invalid_scope",
        ),
    ];
    for (form, status, error) in cases {
        let reply = post_form(&addr, TOKEN_PATH, &[], form).await;
        assert_eq!(reply.status, status, "{form:?}: {}", reply.body);
        assert_eq!(reply.json["error"], error, "{form:?}: {}", reply.body);
        assert!(
            !reply.body.contains("acme-wallboard-password"),
            "a password echoed back"
        );
    }
    let json_body = callapi_e2e::http::send(
        &addr,
        "POST",
        TOKEN_PATH,
        &[],
        "application/json",
        r#"{"grant_type":"client_credentials"}"#,
    )
    .await;
    assert_eq!(json_body.status, 400, "{}", json_body.body);
    assert_eq!(json_body.json["error"], "invalid_request");

    // Refresh: new tokens, the refresh token rotated.
    let refreshed = post_form(
        &addr,
        TOKEN_PATH,
        &[],
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let access2 = refreshed.json["access_token"].as_str().unwrap().to_owned();
    let refresh2 = refreshed.json["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh2, refresh);
    assert_eq!(
        authed(&addr, &access2, "GET", "/api/sessions", None)
            .await
            .status,
        200
    );
    // The old refresh token again: replayed or stolen, so the whole sign-in ends.
    let replayed = post_form(
        &addr,
        TOKEN_PATH,
        &[],
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert_eq!(replayed.status, 400, "{}", replayed.body);
    assert_eq!(replayed.json["error"], "invalid_grant");
    let after_replay = authed(&addr, &access2, "GET", "/api/sessions", None).await;
    assert_eq!(after_replay.status, 401, "{}", after_replay.body);
    let refresh_after = post_form(
        &addr,
        TOKEN_PATH,
        &[],
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh2),
        ],
    )
    .await;
    assert_eq!(refresh_after.json["error"], "invalid_grant");

    // Revoke (PortSIP: the access token of the Authorization header): refused at once, over
    // REST and at a WebSocket upgrade.
    let token = access_token(&stack, "crm", "acme-crm-secret").await;
    assert_eq!(
        authed(&addr, &token, "GET", "/api/sessions", None)
            .await
            .status,
        200
    );
    let bearer = format!("Bearer {token}");
    let revoked = post_form(&addr, REVOKE_PATH, &[("Authorization", &bearer)], &[]).await;
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    let refused = authed(&addr, &token, "GET", "/api/sessions", None).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.json["code"], "UNAUTHORIZED");
    let upgrade = Client::try_connect(&ws_url(&stack), &[("Authorization", &bearer)]).await;
    assert_eq!(upgrade.err().map(|(status, _)| status), Some(401));
}

#[tokio::test]
async fn every_request_needs_a_valid_token_but_health_the_api_document_and_directly() {
    let stack = stack_with_auth(3600).await;
    let addr = stack.http_addr();
    for (method, path) in [
        ("GET", "/api/sessions"),
        ("GET", "/api/sessions/1"),
        ("POST", "/api/sessions"),
        ("POST", "/api/sessions/1/destroy"),
        ("POST", "/api/sessions/1/hold"),
        ("POST", "/api/sessions/1/unhold"),
        ("POST", "/api/sessions/1/refer"),
        ("POST", "/api/sessions/1/attended_refer"),
    ] {
        let body = (method == "POST").then_some("{}");
        let reply = request(&addr, method, path, body).await;
        assert_eq!(reply.status, 401, "{method} {path}: {}", reply.body);
        assert_eq!(reply.content_type, "application/problem+json");
        assert!(
            reply.header("www-authenticate").starts_with("Bearer"),
            "{method} {path}"
        );
    }
    assert_eq!(request(&addr, "GET", "/healthz", None).await.status, 200);
    let document = request(&addr, "GET", "/api/openapi.json", None).await;
    assert_eq!(document.status, 200);
    assert_eq!(
        document.json["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_ne!(
        request(&addr, "GET", "/api/sessions/directly", None)
            .await
            .status,
        401
    );

    // Forged, tampered and foreign tokens.
    let token = access_token(&stack, "crm", "acme-crm-secret").await;
    let parts: Vec<&str> = token.split('.').collect();
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let mut claims: Value = {
        use base64::Engine as _;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap()
    };
    claims["tenant"] = json!("globex");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    );
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"k2"}"#),
        parts[1]
    );
    let garbage = "not-a-token".to_owned();
    for bad in [&tampered, &unsigned, &garbage] {
        let reply = authed(&addr, bad, "GET", "/api/sessions", None).await;
        assert_eq!(reply.status, 401, "{bad}: {}", reply.body);
        let upgrade =
            Client::try_connect(&format!("{}?access_token={bad}", ws_url(&stack)), &[]).await;
        assert_eq!(upgrade.err().map(|(status, _)| status), Some(401), "{bad}");
    }
    // No token at the upgrade: 401 before upgrading; a browser page of an origin not allowed:
    // 403 even with a token.
    let upgrade = Client::try_connect(&ws_url(&stack), &[]).await;
    assert_eq!(upgrade.err().map(|(status, _)| status), Some(401));
    let bearer = format!("Bearer {token}");
    let upgrade = Client::try_connect(
        &ws_url(&stack),
        &[
            ("Authorization", &bearer),
            ("Origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(upgrade.err().map(|(status, _)| status), Some(403));
    // The allowed origin, with the token in the query as a browser sends it.
    let mut browser = Client::try_connect(
        &format!("{}?access_token={token}", ws_url(&stack)),
        &[("Origin", ALLOWED_ORIGIN)],
    )
    .await
    .expect("upgrade");
    let listed = ask(&mut browser, "CallList", json!({})).await;
    assert_eq!(listed["result"]["count"], 0, "{listed}");
}

#[tokio::test]
async fn a_wallboard_reads_but_cannot_control() {
    let stack = stack_with_auth(3600).await;
    let addr = stack.http_addr();
    let signed_in = user_sign_in(
        &stack,
        "wallboard",
        "acme-wallboard-password",
        "acme.localhost",
    )
    .await;
    let token = signed_in["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        authed(&addr, &token, "GET", "/api/sessions", None)
            .await
            .status,
        200
    );
    let create = authed(
        &addr,
        &token,
        "POST",
        "/api/sessions",
        Some(r#"{"caller":"1001","callee":"1002"}"#),
    )
    .await;
    assert_eq!(create.status, 403, "{}", create.body);
    assert_eq!(create.json["code"], "FORBIDDEN");
    let mut wallboard = Client::connect_with_token(&ws_url(&stack), &token).await;
    let listed = ask(&mut wallboard, "CallList", json!({})).await;
    assert!(listed["result"].is_object(), "{listed}");
    let start = ask(
        &mut wallboard,
        "CallStart",
        json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
    )
    .await;
    assert_eq!(start["error"]["code"], -32005, "{start}");
}

#[tokio::test]
async fn a_tenant_never_sees_or_touches_another_tenants_calls() {
    let stack = stack_with_auth(3600).await;
    let addr = stack.http_addr();
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;

    // acme places a call; it is acme's to list and read.
    let mut acme_ws = Client::connect_with_token(&ws_url(&stack), &acme).await;
    let callid = call(&mut acme_ws, "alice", "bob").await;
    let listed = authed(&addr, &acme, "GET", "/api/sessions", None).await;
    assert_eq!(listed.json["count"], 1, "{}", listed.body);
    let id = listed.json["items"][0]["id"]
        .as_str()
        .expect("session id")
        .to_owned();

    // globex sees nothing of it, by session id or Call-ID, over REST or WebSocket, and gets
    // the answer it would get for a call that does not exist.
    let globex_list = authed(&addr, &globex, "GET", "/api/sessions", None).await;
    assert_eq!(globex_list.json["count"], 0, "{}", globex_list.body);
    let filtered = authed(
        &addr,
        &globex,
        "GET",
        &format!("/api/sessions?filter={callid}"),
        None,
    )
    .await;
    assert_eq!(filtered.json["count"], 0, "{}", filtered.body);
    let unknown_id = "1234567890123";
    for path in [
        format!("/api/sessions/{id}"),
        format!("/api/sessions/{unknown_id}"),
    ] {
        let reply = authed(&addr, &globex, "GET", &path, None).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
    }
    let controls: [(&str, Value); 5] = [
        ("destroy", json!({})),
        ("hold", json!({"extension_number": "1001"})),
        ("unhold", json!({"extension_number": "1001"})),
        (
            "refer",
            json!({"extension_number": "1001", "refer_to": "1003"}),
        ),
        ("attended_refer", json!({"session_1": id, "session_2": id})),
    ];
    for (operation, body) in &controls {
        for session in [id.as_str(), unknown_id] {
            let path = format!("/api/sessions/{session}/{operation}");
            let body = if *operation == "attended_refer" {
                json!({"extension_number": "1001", "refer_to_1": "1002", "session_1": session, "refer_to_2": "1003", "session_2": session})
            } else {
                body.clone()
            };
            let reply = authed(&addr, &globex, "POST", &path, Some(&body.to_string())).await;
            assert_eq!(reply.status, 404, "{path}: {}", reply.body);
            assert_eq!(reply.json["code"], "NOT_FOUND", "{path}: {}", reply.body);
        }
    }
    let mut globex_ws = Client::connect_with_token(&ws_url(&stack), &globex).await;
    let listed = ask(&mut globex_ws, "CallList", json!({})).await;
    assert_eq!(listed["result"]["count"], 0, "{listed}");
    for key in [json!({"session_id": id}), json!({"callid": callid})] {
        let got = ask(&mut globex_ws, "CallGet", key.clone()).await;
        assert_eq!(got["error"]["code"], -32004, "{key}: {got}");
    }
    let commands = [
        ("CallEnd", json!({"callid": callid})),
        ("CallHold", json!({"callid": callid})),
        ("CallUnHold", json!({"callid": callid})),
        (
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "caller", "destination": "sip:cindy@globex.localhost"}),
        ),
        (
            "CallAttendedTransfer",
            json!({"callid_a": callid, "leg_a": "caller", "callid_b": callid, "leg_b": "callee"}),
        ),
    ];
    for (method, params) in &commands {
        let reply = ask(&mut globex_ws, method, params.clone()).await;
        assert_eq!(reply["error"]["code"], -32004, "{method}: {reply}");
        let unknown = ask(
            &mut globex_ws,
            method,
            serde_json::from_str(&params.to_string().replace(&callid, "no-such-call@x")).unwrap(),
        )
        .await;
        assert_eq!(
            unknown["error"],
            reply["error"]
                .clone()
                .as_object()
                .map(|e| {
                    let mut e = e.clone();
                    e.insert(
                        "message".into(),
                        json!("no call with Call-ID no-such-call@x"),
                    );
                    Value::Object(e)
                })
                .unwrap(),
            "{method}: the same answer as for a call that does not exist"
        );
    }
    // The call is untouched: still up, and acme ends it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(crate::commands::dialog_state(&stack, &callid), Some(4));
    let notes = acme_ws.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
}

#[tokio::test]
async fn a_connection_whose_token_expires_is_closed_with_a_reason() {
    let stack = stack_with_auth(2).await;
    let token = access_token(&stack, "crm", "acme-crm-secret").await;
    let mut client = Client::connect_with_token(&ws_url(&stack), &token).await;
    let listed = ask(&mut client, "CallList", json!({})).await;
    assert!(listed["result"].is_object(), "{listed}");
    let close = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .expect("closed within the token's life and a bit");
    assert_eq!(close.0, 4001, "{close:?}");
    assert!(close.1.contains("expired"), "{close:?}");
    let reply = authed(&stack.http_addr(), &token, "GET", "/api/sessions", None).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
}

#[tokio::test]
async fn two_tenants_share_a_node_and_each_sees_only_its_own_calls_and_events() {
    let tenants_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/local/tenants.toml")
        .canonicalize()
        .expect("deploy/local/tenants.toml");
    let stack = Stack::with(StackOptions {
        gateway_toml: auth_toml(3600),
        ingest_toml: format!("tenants_file = \"{}\"", tenants_file.display()),
        service_env: vec![(SIGNING_KEY_ENV.into(), SIGNING_KEY.into())],
        ..StackOptions::default()
    })
    .await;
    let addr = stack.http_addr();
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let mut globex_events = nats.subscribe("callapi.v1.event.globex.>").await.unwrap();
    nats.flush().await.unwrap();
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;

    // Each places a call in its own domain, on the one node, at the same time.
    let mut acme_ws = Client::connect_with_token(&ws_url(&stack), &acme).await;
    let mut globex_ws = Client::connect_with_token(&ws_url(&stack), &globex).await;
    let (acme_call, notes) = tokio::join!(
        call(&mut acme_ws, "alice", "bob"),
        globex_ws.run(
            "CallStart",
            json!({"caller": "sip:cindy@globex.localhost", "callee": "sip:dave@globex.localhost"}),
        )
    );
    assert_eq!(shape(&notes), crate::commands::CALL_START_OK, "{notes:#?}");
    let globex_call = notes[2]["params"]["callid"].as_str().unwrap().to_owned();
    // Each WebSocket got its own command's notifications and nothing of the other's.
    for (client, other) in [(&mut acme_ws, &globex_call), (&mut globex_ws, &acme_call)] {
        let stray = client.pending(Duration::from_millis(300)).await;
        assert!(
            !stray.iter().any(|m| m.to_string().contains(other.as_str())),
            "{stray:#?}"
        );
    }
    assert!(
        !notes
            .iter()
            .any(|m| m.to_string().contains(acme_call.as_str())),
        "{notes:#?}"
    );

    // Each lists its own call only.
    for (token, own, other) in [
        (&acme, &acme_call, &globex_call),
        (&globex, &globex_call, &acme_call),
    ] {
        let listed = authed(&addr, token, "GET", "/api/sessions", None).await;
        assert_eq!(listed.json["count"], 1, "{}", listed.body);
        assert!(listed.body.contains(own.as_str()), "{}", listed.body);
        assert!(!listed.body.contains(other.as_str()), "{}", listed.body);
    }
    let got = ask(&mut globex_ws, "CallGet", json!({"callid": acme_call})).await;
    assert_eq!(got["error"]["code"], -32004, "{got}");
    let mut got = Value::Null;
    for _ in 0..40 {
        got = ask(&mut globex_ws, "CallGet", json!({"callid": globex_call})).await;
        if got["result"].is_object() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listed = ask(&mut globex_ws, "CallList", json!({})).await;
    assert!(got["result"].is_object(), "{got} {listed} {globex_call}");

    // globex's event subjects carried globex's calls, none of acme's.
    let mut seen = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), globex_events.next()).await
    {
        seen.push(message.subject.to_string());
    }
    let token_of = |callid: &str| callapi_kit::subjects::encode_callid(callid);
    assert!(
        seen.iter().any(|s| s.ends_with(&token_of(&globex_call))),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|s| s.ends_with(&token_of(&acme_call))),
        "{seen:#?}"
    );

    // Each ends its own.
    let notes = globex_ws
        .run("CallEnd", json!({"callid": globex_call}))
        .await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    let notes = acme_ws.run("CallEnd", json!({"callid": acme_call})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");

    // Each tenant's call events are in its own stream, numbered 1, 2, 3… with no gap although
    // the two calls' events came interleaved from one node.
    let jetstream = async_nats::jetstream::new(nats);
    for (tenant, own, other) in [
        ("acme", &acme_call, &globex_call),
        ("globex", &globex_call, &acme_call),
    ] {
        let mut events = Vec::new();
        for _ in 0..30 {
            events = tenant_call_events(&jetstream, tenant).await;
            let ended = events.iter().any(|(_, e)| {
                e.callid == *own && e.kind() == callapi_proto::v1::CallEventKind::Ended
            });
            if ended {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seqs: Vec<u64> = events.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{tenant}: {events:#?}");
        assert!(
            events.iter().all(|(_, e)| e.tenant == tenant),
            "{events:#?}"
        );
        assert!(events.iter().any(|(_, e)| e.callid == *own), "{events:#?}");
        assert!(
            !events.iter().any(|(_, e)| e.callid == *other),
            "{events:#?}"
        );
    }
}

/// Every call event `tenant`'s stream holds: (sequence, event).
async fn tenant_call_events(
    jetstream: &async_nats::jetstream::Context,
    tenant: &str,
) -> Vec<(u64, callapi_proto::v1::CallEvent)> {
    use prost::Message as _;
    let stream = jetstream
        .get_stream(callapi_kit::calls::calls_stream(tenant))
        .await
        .expect("the tenant's stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(300), messages.next()).await
    {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event = callapi_proto::v1::CallEvent::decode(message.payload.as_ref()).expect("event");
        out.push((seq, event));
        let _ = message.ack().await;
    }
    out
}

#[tokio::test]
async fn parties_outside_the_tenants_domains_are_refused_unless_through_its_trunk() {
    let stack = stack_with_auth(3600).await;
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;
    let mut globex_ws = Client::connect_with_token(&ws_url(&stack), &globex).await;
    // acme's phones are not globex's to call from or to.
    for (params, field) in [
        (
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:dave@globex.localhost"}),
            "caller",
        ),
        (
            json!({"caller": "sip:cindy@globex.localhost", "callee": "sip:bob@127.0.0.1"}),
            "callee",
        ),
    ] {
        let reply = ask(&mut globex_ws, "CallStart", params).await;
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        assert_eq!(reply["error"]["data"]["field"], field, "{reply}");
    }
    let reply = ask(
        &mut globex_ws,
        "CallBlindTransfer",
        json!({"callid": "x@y", "leg": "callee", "destination": "sip:bob@127.0.0.1"}),
    )
    .await;
    assert_eq!(reply["error"]["data"]["field"], "destination", "{reply}");
    // acme's callee outside its domains goes out through acme's trunk: not refused.
    let mut acme_ws = Client::connect_with_token(&ws_url(&stack), &acme).await;
    let reply = ask(
        &mut acme_ws,
        "CallStart",
        json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:+15551234@carrier.example", "trunk": "carrier"}),
    )
    .await;
    assert_eq!(reply["result"]["status"], "Started", "{reply}");
    // The trunk allows rewriting From and P-Asserted-Identity, not Remote-Party-ID.
    let reply = ask(
        &mut acme_ws,
        "CallStart",
        json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:+15551234@carrier.example", "trunk": "carrier", "rewrite_rpi": "4930"}),
    )
    .await;
    assert_eq!(reply["error"]["data"]["field"], "rewrite_rpi", "{reply}");
    let reply = ask(
        &mut acme_ws,
        "CallStart",
        json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:+15551234@carrier.example", "trunk": "carrier", "rewrite_pai": "4930"}),
    )
    .await;
    assert_eq!(reply["result"]["status"], "Started", "{reply}");
    let rest = authed(
        &stack.http_addr(),
        &acme,
        "POST",
        "/api/sessions",
        Some(r#"{"caller":"1001","callee":"+15551234","send_sdp":true,"trunk":"carrier","rewrite_rpi":"4930"}"#),
    )
    .await;
    assert_eq!(rest.status, 400, "{}", rest.body);
    assert_eq!(rest.json["field"], "rewrite_rpi", "{}", rest.body);
}

#[tokio::test]
async fn over_a_tenants_limits_requests_are_refused_with_stable_codes() {
    // The local tenants with small limits: acme one active call, globex two WebSockets, two
    // commands and three REST requests per second.
    let text = std::fs::read_to_string(local_tenants())
        .unwrap()
        .replace(
            "limits = { websocket_connections = 200, commands_per_second = 50, rest_requests_per_second = 100, active_calls = 500 }",
            "limits = { active_calls = 1 }",
        )
        .replace(
            "limits = { websocket_connections = 50, commands_per_second = 20, rest_requests_per_second = 50, active_calls = 100 }",
            "limits = { websocket_connections = 2, commands_per_second = 2, rest_requests_per_second = 3 }",
        );
    assert!(text.contains("active_calls = 1 }") && text.contains("rest_requests_per_second = 3 }"));
    let path = std::env::temp_dir().join(format!("callapi-limits-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let stack = Stack::with(auth_options(auth_toml_with(&path, 3600))).await;
    let addr = stack.http_addr();
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;

    // WebSocket connections: the third is refused before upgrading; one closed frees a place.
    let first = Client::connect_with_token(&ws_url(&stack), &globex).await;
    let mut second = Client::connect_with_token(&ws_url(&stack), &globex).await;
    let bearer = format!("Bearer {globex}");
    let third = Client::try_connect(&ws_url(&stack), &[("Authorization", &bearer)]).await;
    let (status, body) = third.err().expect("refused");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("TOO_MANY_CONNECTIONS"), "{body}");
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match Client::try_connect(&ws_url(&stack), &[("Authorization", &bearer)]).await {
            Ok(client) => {
                reopened = Some(client);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(reopened.is_some(), "a closed connection frees its place");

    // Commands per second: two go through, the third at once is refused with a retry time.
    let ids = [
        second.request("CallHold", json!({"callid": "a@x"})).await,
        second.request("CallHold", json!({"callid": "b@x"})).await,
        second.request("CallHold", json!({"callid": "c@x"})).await,
    ];
    let replies = [
        second.reply(&ids[0]).await,
        second.reply(&ids[1]).await,
        second.reply(&ids[2]).await,
    ];
    assert_eq!(replies[0]["error"]["code"], -32004, "{}", replies[0]);
    assert_eq!(replies[1]["error"]["code"], -32004, "{}", replies[1]);
    assert_eq!(replies[2]["error"]["code"], -32006, "{}", replies[2]);
    assert!(
        replies[2]["error"]["data"]["retry_after_ms"]
            .as_u64()
            .unwrap()
            > 0
    );

    // REST requests per second: 429 with Retry-After past three.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let reply = authed(&addr, &globex, "GET", "/api/sessions", None).await;
        statuses.push(reply.status);
        last = Some(reply);
    }
    let last = last.unwrap();
    assert_eq!(statuses, [200, 200, 200, 429], "{}", last.body);
    assert_eq!(last.json["code"], "RATE_LIMITED");
    assert!(last.header("retry-after").parse::<u64>().unwrap() >= 1);

    // Active calls: with its one call up, acme's next CallStart is refused, over WebSocket and
    // REST alike.
    let mut acme_ws = Client::connect_with_token(&ws_url(&stack), &acme).await;
    let callid = call(&mut acme_ws, "alice", "bob").await;
    let mut refused = Value::Null;
    for _ in 0..50 {
        refused = ask(
            &mut acme_ws,
            "CallStart",
            json!({"caller": "sip:cindy@127.0.0.1", "callee": "sip:dave@127.0.0.1"}),
        )
        .await;
        if refused["error"]["code"] == -32007 {
            break;
        }
        // The first call may not be in the live view yet: the started one is ended again.
        if let Some(cmd_id) = refused["result"]["cmd_id"].as_str() {
            let notes = acme_ws.until_ended(cmd_id).await;
            if let Some(started) = notes.iter().find(|n| n["params"]["data"] == "CALL_START") {
                let other = started["params"]["callid"].as_str().unwrap().to_owned();
                acme_ws.run("CallEnd", json!({"callid": other})).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused["error"]["code"], -32007, "{refused}");
    let created = authed(
        &addr,
        &acme,
        "POST",
        "/api/sessions",
        Some(r#"{"caller":"1001","callee":"1002","send_sdp":true}"#),
    )
    .await;
    assert_eq!(created.status, 429, "{}", created.body);
    assert_eq!(created.json["code"], "CALL_LIMIT");
    let notes = acme_ws.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn directly_takes_an_extensions_password_counts_failures_and_never_logs_it() {
    let stack = Stack::with(StackOptions {
        gateway_toml: auth_toml(3600),
        emulator_args: vec!["--extra-phones".into(), "2001,2002".into()],
        service_env: vec![
            (SIGNING_KEY_ENV.into(), SIGNING_KEY.into()),
            ("RUST_LOG".into(), "debug".into()),
        ],
        ingest_toml: format!("tenants_file = \"{}\"", local_tenants().display()),
        ..StackOptions::default()
    })
    .await;
    let addr = stack.http_addr();
    let directly = |number: &str, password: &str, caller: &str| {
        format!(
            "/api/sessions/directly?extension_number={number}&password={password}&domain=globex.localhost&caller={caller}&callee=2002&send_sdp=true"
        )
    };
    // The right password: the call is placed, as POST /api/sessions would, and is globex's.
    let created = request(
        &addr,
        "GET",
        &directly("2001", "globex-2001-password", "2001"),
        None,
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.json["id"].as_str().expect("id").to_owned();
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;
    let mut found = None;
    for _ in 0..50 {
        let got = authed(&addr, &globex, "GET", &format!("/api/sessions/{id}"), None).await;
        if got.status == 200 {
            found = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found.is_some(), "the session is globex's");
    // Calling from another extension than one's own is refused.
    let spoofed = request(
        &addr,
        "GET",
        &directly("2001", "globex-2001-password", "2002"),
        None,
    )
    .await;
    assert_eq!(spoofed.status, 403, "{}", spoofed.body);
    // Wrong passwords: 401, then after five of them 429 with Retry-After, even for the right
    // password.
    for attempt in 0..5 {
        let wrong = request(
            &addr,
            "GET",
            &directly("2001", &format!("guess-{attempt}"), "2001"),
            None,
        )
        .await;
        assert_eq!(wrong.status, 401, "{}", wrong.body);
    }
    let locked = request(
        &addr,
        "GET",
        &directly("2001", "globex-2001-password", "2001"),
        None,
    )
    .await;
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert_eq!(locked.json["code"], "TOO_MANY_FAILURES");
    assert!(locked.header("retry-after").parse::<u64>().unwrap() >= 1);
    // Another extension is not locked by it.
    let other = request(&addr, "GET", &directly("2002", "wrong", "2002"), None).await;
    assert_eq!(other.status, 401, "{}", other.body);

    // The same for sign-in: five wrong passwords, then the account must wait.
    let form = |password: &'static str| {
        [
            ("grant_type", "password"),
            ("username", "wallboard"),
            ("password", password),
            ("domain", "acme.localhost"),
        ]
    };
    for _ in 0..5 {
        let wrong = post_form(&addr, TOKEN_PATH, &[], &form("nope")).await;
        assert_eq!(wrong.json["error"], "invalid_grant", "{}", wrong.body);
    }
    let slowed = post_form(&addr, TOKEN_PATH, &[], &form("acme-wallboard-password")).await;
    assert_eq!(slowed.status, 429, "{}", slowed.body);
    assert_eq!(slowed.json["error"], "slow_down");
    assert!(slowed.header("retry-after").parse::<u64>().unwrap() >= 1);

    // No password, right or wrong, reached the gateway's debug log.
    let log = std::fs::read_dir(&stack.dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("gateway-"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        log.contains("directly"),
        "the log is the gateway's debug log"
    );
    for secret in [
        "globex-2001-password",
        "guess-0",
        "acme-wallboard-password",
        "nope",
    ] {
        assert!(!log.contains(secret), "{secret} in the gateway's log");
    }
}

#[tokio::test]
async fn tokens_of_another_key_expired_or_of_no_tenant_are_refused_and_the_old_key_still_verifies()
{
    let stack = stack_with_auth(3600).await;
    let addr = stack.http_addr();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |kid: &str, secret: &str, tenant: &str, exp: u64| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(kid.to_owned());
        let claims = json!({
            "iss": "callapi", "sub": "client:crm", "tenant": tenant,
            "scope": "calls:read calls:control", "iat": now, "exp": exp,
            "jti": "j", "sid": "0123456789abcdef0123456789abcdef",
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let current = SIGNING_KEY;
    let old = "an-older-test-secret-of-at-least-32-bytes";
    // Signed by the gateway's keys, valid: the active one and the older one (rotation).
    for token in [
        sign("k2", current, "acme", now + 600),
        sign("k1", old, "acme", now + 600),
    ] {
        let reply = authed(&addr, &token, "GET", "/api/sessions", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // Refused: expired, another secret under a known kid, an unknown kid, a tenant that does
    // not exist, an issuer not ours.
    let mut foreign_issuer = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    foreign_issuer.kid = Some("k2".into());
    let other_issuer = jsonwebtoken::encode(
        &foreign_issuer,
        &json!({"iss": "someone", "sub": "client:crm", "tenant": "acme", "scope": "calls:read",
                "iat": now, "exp": now + 600, "jti": "j", "sid": "0123456789abcdef0123456789abcdef"}),
        &jsonwebtoken::EncodingKey::from_secret(current.as_bytes()).unwrap(),
    )
    .unwrap();
    for (what, token) in [
        ("expired", sign("k2", current, "acme", now - 10)),
        (
            "wrong key",
            sign(
                "k2",
                "a-forgers-secret-of-at-least-32-bytes!!",
                "acme",
                now + 600,
            ),
        ),
        ("unknown kid", sign("k9", current, "acme", now + 600)),
        ("no such tenant", sign("k2", current, "initech", now + 600)),
        ("other issuer", other_issuer),
    ] {
        let reply = authed(&addr, &token, "GET", "/api/sessions", None).await;
        assert_eq!(reply.status, 401, "{what}: {}", reply.body);
        let bearer = format!("Bearer {token}");
        let upgrade = Client::try_connect(&ws_url(&stack), &[("Authorization", &bearer)]).await;
        assert_eq!(upgrade.err().map(|(status, _)| status), Some(401), "{what}");
    }
}

#[tokio::test]
async fn with_require_origin_an_upgrade_without_origin_is_refused() {
    let stack = Stack::with(auth_options(auth_toml(3600).replacen(
        "[[auth.signing_keys]]",
        "require_origin = true\n[[auth.signing_keys]]",
        1,
    )))
    .await;
    let token = access_token(&stack, "crm", "acme-crm-secret").await;
    let bearer = format!("Bearer {token}");
    let missing = Client::try_connect(&ws_url(&stack), &[("Authorization", &bearer)]).await;
    let (status, body) = missing.err().expect("refused");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    let allowed = Client::try_connect(
        &ws_url(&stack),
        &[("Authorization", &bearer), ("Origin", ALLOWED_ORIGIN)],
    )
    .await;
    assert!(allowed.is_ok());
}

#[tokio::test]
async fn a_sighup_reloads_the_tenants_an_account_removed_is_cut_off_at_once() {
    let path = std::env::temp_dir().join(format!("callapi-reload-{}.toml", std::process::id()));
    let original = std::fs::read_to_string(local_tenants()).unwrap();
    std::fs::write(&path, &original).unwrap();
    let stack = Stack::with(auth_options(auth_toml_with(&path, 3600))).await;
    let addr = stack.http_addr();
    let token = access_token(&stack, "dialer", "globex-dialer-secret").await;
    assert_eq!(
        authed(&addr, &token, "GET", "/api/sessions", None)
            .await
            .status,
        200
    );
    let hup = |stack: &Stack| {
        let pid = stack.gateways[0].pid().expect("gateway pid");
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    // A broken file is refused whole: the tenants in force stay.
    std::fs::write(&path, "[[tenants]]\nid = \"\"\n").unwrap();
    hup(&stack);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        authed(&addr, &token, "GET", "/api/sessions", None)
            .await
            .status,
        200,
        "kept"
    );
    // globex's API client removed: its token stops working, no sign-in needed.
    let without_dialer = original.replacen("client_id = \"dialer\"", "client_id = \"dialer-2\"", 1);
    assert_ne!(without_dialer, original);
    std::fs::write(&path, &without_dialer).unwrap();
    hup(&stack);
    let mut status = 0;
    for _ in 0..50 {
        status = authed(&addr, &token, "GET", "/api/sessions", None)
            .await
            .status;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 401, "the removed client's token is refused");
    // The renamed client signs in with the same secret.
    access_token(&stack, "dialer-2", "globex-dialer-secret").await;
    let _ = std::fs::remove_file(path);
}
