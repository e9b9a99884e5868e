//! The REST API under `/api`, PortSIP v22's sessions API: every endpoint, its limits and its
//! errors (RFC 9457 problem+json), against the real stack.

use std::time::Duration;

use callapi_e2e::http::{Response, request};
use callapi_e2e::{Stack, StackOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

fn with_extensions(version: &'static str) -> StackOptions {
    StackOptions {
        emulator_args: vec!["--extra-phones=1001,1002,1003".into()],
        opensips_version: version,
        ..Default::default()
    }
}

async fn get(stack: &Stack, path: &str) -> Response {
    request(&stack.http_addr(), "GET", path, None).await
}

async fn post(stack: &Stack, path: &str, body: Value) -> Response {
    request(&stack.http_addr(), "POST", path, Some(&body.to_string())).await
}

fn assert_problem(response: &Response, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(
        response.content_type, "application/problem+json",
        "{response:?}"
    );
    assert_eq!(response.json["status"], status, "{response:?}");
    assert_eq!(response.json["code"], code, "{response:?}");
    assert_eq!(
        response.json["type"],
        format!("urn:callapi:error:{code}"),
        "{response:?}"
    );
    assert!(
        response.json["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{response:?}"
    );
    if let Some(field) = field {
        assert_eq!(response.json["field"], field, "{response:?}");
    }
}

/// Creates a click-to-dial call and waits until its session shows the answered call to
/// `callee`; returns the session id.
async fn established(stack: &Stack, caller: &str, callee: &str) -> String {
    let created = post(
        stack,
        "/api/sessions",
        json!({"caller": caller, "callee": callee, "send_sdp": true}),
    )
    .await;
    assert_eq!(created.status, 200, "{created:?}");
    let id = created.json["id"].as_str().expect("string id").to_owned();
    assert!(id.parse::<i64>().is_ok_and(|n| n > 0), "{id}");
    wait_session(stack, &id, |s| {
        s["calls"].as_array().is_some_and(|calls| {
            calls.len() == 1 && calls[0]["callee"] == callee && calls[0]["state"] == "answered"
        })
    })
    .await
}

async fn wait_session(stack: &Stack, id: &str, ready: impl Fn(&Value) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(stack, &format!("/api/sessions/{id}")).await;
        if got.status == 200 && ready(&got.json) {
            return id.to_owned();
        }
        assert!(
            Instant::now() < until,
            "session {id} not as expected: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn create_list_get_and_destroy_follow_portsip() {
    let stack = Stack::with(with_extensions("3.6")).await;
    let id = established(&stack, "1001", "1002").await;

    let listed = get(&stack, "/api/sessions").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(listed.json["count"], 1, "{listed:?}");
    let item = &listed.json["items"][0];
    assert_eq!(item["id"], json!(id));
    let call = &item["calls"][0];
    for field in [
        "caller",
        "caller_display_name",
        "callee",
        "trunk",
        "started_at",
        "talking_time",
    ] {
        assert!(
            call.get(field).is_some(),
            "PortSIP field {field} missing: {call}"
        );
    }
    assert_eq!(
        (call["caller"].clone(), call["callee"].clone()),
        (json!("1001"), json!("1002"))
    );
    assert_eq!(call["caller_uri"], "sip:1001@127.0.0.1");
    assert_eq!(call["trunk"], Value::Null);
    assert!(call["talking_time"].is_u64());
    let one = get(&stack, &format!("/api/sessions/{id}")).await;
    assert_eq!(one.json, *item);

    // The WebSocket API sees the same session.
    let mut client = stack.client().await;
    let asked = client.request("CallGet", json!({"session_id": id})).await;
    assert_eq!(client.reply(&asked).await["result"]["id"], json!(id));

    let destroyed = post(&stack, &format!("/api/sessions/{id}/destroy"), json!({})).await;
    assert_eq!(
        (destroyed.status, destroyed.body.as_str()),
        (200, ""),
        "{destroyed:?}"
    );
    // Over: GET says so for a minute (no cause: it was hung up), the list no longer has it.
    let ended = wait_session(&stack, &id, |s| s["state"] == "ended").await;
    let ended = get(&stack, &format!("/api/sessions/{ended}")).await.json;
    assert_eq!(
        (ended["calls"].clone(), ended["end_cause"].clone()),
        (json!([]), Value::Null),
        "{ended}"
    );
    assert_eq!(get(&stack, "/api/sessions").await.json["count"], 0);
    let again = post(&stack, &format!("/api/sessions/{id}/destroy"), json!({})).await;
    assert_problem(&again, 404, "NOT_FOUND", None);
}

#[tokio::test]
async fn every_limit_and_bad_input_is_a_problem_naming_its_field() {
    let stack = Stack::with(with_extensions("3.6")).await;
    for (path, field) in [
        ("/api/sessions?top=0", "top"),
        ("/api/sessions?top=101", "top"),
        ("/api/sessions?top=x", "top"),
        ("/api/sessions?skip=-1", "skip"),
        ("/api/sessions?orderby=caller", "orderby"),
        ("/api/sessions?page=2", "page"),
        ("/api/sessions?skip=2147483648", "skip"),
        ("/api/sessions/abc", "id"),
        ("/api/sessions/0", "id"),
    ] {
        assert_problem(&get(&stack, path).await, 400, "INVALID_FIELD", Some(field));
    }
    let long_filter = format!("/api/sessions?filter={}", "f".repeat(257));
    assert_problem(
        &get(&stack, &long_filter).await,
        400,
        "INVALID_FIELD",
        Some("filter"),
    );
    for at_the_limit in [
        "/api/sessions?top=100&skip=0&orderby=started_at%20desc&filter=1001".to_owned(),
        "/api/sessions?top=1&skip=2147483647".to_owned(),
        format!("/api/sessions?filter={}", "f".repeat(256)),
    ] {
        let listed = get(&stack, &at_the_limit).await;
        assert_eq!(listed.status, 200, "{at_the_limit}: {listed:?}");
    }
    assert_problem(
        &get(&stack, "/api/sessions/884757570370146304").await,
        404,
        "NOT_FOUND",
        None,
    );
    assert_problem(&get(&stack, "/api/nothing").await, 404, "NOT_FOUND", None);

    let ok = json!({"caller": "1001", "callee": "1002", "send_sdp": true});
    let with = |key: &str, value: Value| {
        let mut body = ok.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = ok.clone();
        body.as_object_mut().unwrap().remove(key);
        body
    };
    for (body, field) in [
        (without("caller"), "caller"),
        (without("send_sdp"), "send_sdp"),
        (with("caller", json!("1".repeat(257))), "caller"),
        (
            with("caller", json!(format!("+{}", "1".repeat(256)))),
            "caller",
        ),
        (with("callee", json!("")), "callee"),
        (with("callee", json!("+")), "callee"),
        (with("send_sdp", json!("yes")), "send_sdp"),
        (with("caller", json!(1001)), "caller"),
        (
            with("additional_header", json!("LOUD")),
            "additional_header",
        ),
        (with("header_direction", json!("BOTH")), "header_direction"),
        (with("rewrite_from", json!("")), "rewrite_from"),
        (with("rewrite_pai", json!("")), "rewrite_pai"),
        (with("rewrite_rpi", json!("")), "rewrite_rpi"),
        (
            with("caller_display_name", json!("x".repeat(1025))),
            "caller_display_name",
        ),
        (with("trunk", json!("")), "trunk"),
        (with("trunk", json!("t".repeat(65))), "trunk"),
        (with("rewrite_from", json!("1".repeat(17))), "rewrite_from"),
        (with("user_data", json!("u".repeat(129))), "user_data"),
        (with("target", json!("t".repeat(129))), "target"),
        (with("rewrite_pai", json!("1".repeat(17))), "rewrite_pai"),
        (with("rewrite_rpi", json!("1".repeat(17))), "rewrite_rpi"),
        (
            with("target_instance_id", json!("u".repeat(129))),
            "target_instance_id",
        ),
        (
            with("target_extension_number", json!("1".repeat(129))),
            "target_extension_number",
        ),
        (with("extra", json!(1)), "extra"),
        (with("callee", json!("bob@evil?x")), "callee"),
    ] {
        let response = post(&stack, "/api/sessions", body.clone()).await;
        assert_problem(&response, 400, "INVALID_FIELD", Some(field));
    }
    for not_an_object in [
        "{\"caller\":",
        "[\"1001\", \"1002\", true]",
        "{\"caller\":\"1001\",\"callee\":\"1002\",\"send_sdp\":true} {}",
    ] {
        let response = request(
            &stack.http_addr(),
            "POST",
            "/api/sessions",
            Some(not_an_object),
        )
        .await;
        assert_problem(&response, 400, "INVALID_BODY", None);
    }
    // PortSIP's longest numbers are taken: 256 characters.
    let longest = post(
        &stack,
        "/api/sessions",
        json!({"caller": format!("+{}", "1".repeat(255)), "callee": "1".repeat(256), "send_sdp": true}),
    )
    .await;
    assert_eq!(longest.status, 200, "{longest:?}");
    for (body, field) in [
        (with("user_data", json!("crm\r\nVia: x")), "user_data"),
        (
            with("caller_display_name", json!("a\u{7}b")),
            "caller_display_name",
        ),
        (with("target", json!("not a uri")), "target"),
        (
            with("target_instance_id", json!("<urn:uuid:1>")),
            "target_instance_id",
        ),
    ] {
        let response = post(&stack, "/api/sessions", body.clone()).await;
        assert_problem(&response, 400, "INVALID_FIELD", Some(field));
    }
    let unknown_trunk = post(&stack, "/api/sessions", with("trunk", json!("carrier1"))).await;
    assert_problem(&unknown_trunk, 422, "UNKNOWN_TRUNK", Some("trunk"));
    let not_digits = post(
        &stack,
        "/api/sessions",
        with("target_extension_number", json!("10x3")),
    )
    .await;
    assert_problem(
        &not_digits,
        400,
        "INVALID_FIELD",
        Some("target_extension_number"),
    );
    let no_json = request(&stack.http_addr(), "POST", "/api/sessions", None).await;
    assert_eq!(no_json.status, 415, "{no_json:?}");
    let huge = format!("{{\"caller\":\"{}\"}}", "1".repeat(100_000));
    let too_big = request(&stack.http_addr(), "POST", "/api/sessions", Some(&huge)).await;
    assert_eq!(too_big.status, 413, "{too_big:?}");

    let directly = get(&stack, "/api/sessions/directly?extension_number=1001&password=x&caller=1001&callee=1002&domain=test.io&send_sdp=true").await;
    assert_problem(&directly, 501, "NOT_IMPLEMENTED", None);

    let id = established(&stack, "1001", "1002").await;
    for (op, body, field) in [
        ("hold", json!({}), "extension_number"),
        (
            "hold",
            json!({"extension_number": "12"}),
            "extension_number",
        ),
        (
            "hold",
            json!({"extension_number": "10x1"}),
            "extension_number",
        ),
        (
            "unhold",
            json!({"extension_number": "1001", "leg": "caller"}),
            "leg",
        ),
        ("refer", json!({"extension_number": "1001"}), "refer_to"),
        (
            "hold",
            json!({"extension_number": "1".repeat(65)}),
            "extension_number",
        ),
        (
            "refer",
            json!({"extension_number": "1001", "refer_to": "1".repeat(257)}),
            "refer_to",
        ),
        (
            "attended_refer",
            json!({"extension_number": "1001", "refer_to_1": "1".repeat(257), "refer_to_2": "1003"}),
            "refer_to_1",
        ),
        (
            "attended_refer",
            json!({"extension_number": "1001", "refer_to_1": "1002", "refer_to_2": ""}),
            "refer_to_2",
        ),
        (
            "attended_refer",
            json!({"extension_number": "1001", "refer_to_1": "1002", "session_1": "abc", "refer_to_2": "1003"}),
            "session_1",
        ),
        (
            "attended_refer",
            json!({"extension_number": "1001", "refer_to_1": "1002", "refer_to_2": "1003", "session_2": "0"}),
            "session_2",
        ),
    ] {
        let response = post(&stack, &format!("/api/sessions/{id}/{op}"), body).await;
        assert_problem(&response, 400, "INVALID_FIELD", Some(field));
    }
    let stranger = post(
        &stack,
        &format!("/api/sessions/{id}/hold"),
        json!({"extension_number": "1999"}),
    )
    .await;
    assert_problem(&stranger, 404, "NOT_A_PARTY", Some("extension_number"));
    // On OpenSIPS 3.6 one party cannot be held alone: the answer says so, naming the version.
    let one_leg = post(
        &stack,
        &format!("/api/sessions/{id}/hold"),
        json!({"extension_number": "1001"}),
    )
    .await;
    assert_problem(&one_leg, 422, "NOT_SUPPORTED", None);
    assert!(
        one_leg.json["detail"].as_str().unwrap().contains("4.0"),
        "{one_leg:?}"
    );
}

#[tokio::test]
async fn hold_unhold_and_refer_act_for_the_extension_named() {
    let stack = Stack::with(with_extensions("4.0")).await;
    let id = established(&stack, "1001", "1002").await;
    // 1001 holds the call: 1002 is put on hold (OpenSIPS 4.0 re-INVITEs both parties for a
    // one-leg hold, so both legs show as held).
    let hold = |op: &'static str| {
        let path = format!("/api/sessions/{id}/{op}");
        let stack = &stack;
        async move { post(stack, &path, json!({"extension_number": "1001"})).await }
    };
    let held = hold("hold").await;
    assert_eq!(held.status, 200, "{held:?}");
    wait_session(&stack, &id, |s| s["calls"][0]["callee_held"] == true).await;
    // Held already: a conflict known at once.
    let again = hold("hold").await;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(again.json["code"], "ALREADY_HELD", "{again:?}");
    let unheld = hold("unhold").await;
    assert_eq!(unheld.status, 200, "{unheld:?}");
    wait_session(&stack, &id, |s| {
        s["calls"][0]["callee_held"] == false && s["calls"][0]["caller_held"] == false
    })
    .await;

    // 1001 transfers 1002 to 1003: the session goes on with 1002 and 1003.
    let referred = post(
        &stack,
        &format!("/api/sessions/{id}/refer"),
        json!({"extension_number": "1001", "refer_to": "1003"}),
    )
    .await;
    assert_eq!(referred.status, 200, "{referred:?}");
    wait_session(&stack, &id, |s| {
        s["calls"].as_array().is_some_and(|calls| {
            calls
                .iter()
                .any(|c| c["callee"] == "1003" && c["state"] == "answered")
        })
    })
    .await;
}

#[tokio::test]
async fn attended_refer_connects_the_two_parties_the_extension_talks_to() {
    let stack = Stack::with(with_extensions("3.6")).await;
    let first = established(&stack, "1001", "1002").await;
    let second = established(&stack, "1001", "1003").await;
    let bad = post(
        &stack,
        &format!("/api/sessions/{first}/attended_refer"),
        json!({"extension_number": "1001", "refer_to_1": "1002", "refer_to_2": "1999"}),
    )
    .await;
    assert_problem(&bad, 404, "NOT_A_PARTY", Some("refer_to_2"));
    let referred = post(
        &stack,
        &format!("/api/sessions/{first}/attended_refer"),
        json!({"extension_number": "1001", "refer_to_1": "1002", "session_1": first, "refer_to_2": "1003", "session_2": second}),
    )
    .await;
    assert_eq!(referred.status, 200, "{referred:?}");
    // 1002 and 1003 end up talking to each other; 1001 is out of both calls.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = get(&stack, "/api/sessions").await;
        let calls: Vec<Value> = listed.json["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["calls"].as_array().cloned().unwrap_or_default())
            .collect();
        let joined = calls.iter().any(|c| {
            let parties = [c["caller"].clone(), c["callee"].clone()];
            parties.contains(&json!("1002"))
                && parties.contains(&json!("1003"))
                && c["state"] == "answered"
        });
        let agent_left = calls
            .iter()
            .all(|c| c["caller"] != "1001" && c["callee"] != "1001");
        if joined && agent_left {
            break;
        }
        assert!(Instant::now() < until, "not joined: {listed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rest_and_websocket_control_the_same_sessions() {
    let stack = Stack::with(with_extensions("3.6")).await;
    let mut client = stack.client().await;

    // Made over REST, held and ended over WebSocket by its Call-ID.
    let id = established(&stack, "1001", "1002").await;
    let session = get(&stack, &format!("/api/sessions/{id}")).await;
    let callid = session.json["calls"][0]["callid"]
        .as_str()
        .expect("callid")
        .to_owned();
    let held = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(held.last().unwrap()["method"], "Ended", "{held:?}");
    assert!(held.iter().all(|n| n["method"] != "Error"), "{held:?}");
    wait_session(&stack, &id, |s| s["calls"][0]["callee_held"] == true).await;
    let ended = client.run("CallEnd", json!({"callid": callid})).await;
    assert!(ended.iter().all(|n| n["method"] != "Error"), "{ended:?}");

    // Made over WebSocket, found and ended over REST by its session id.
    let callid = crate::commands::call(&mut client, "1001", "1003").await;
    // The store shows it within milliseconds of OpenSIPS's events.
    let until = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let asked = client.request("CallGet", json!({"callid": callid})).await;
        let reply = client.reply(&asked).await;
        if let Some(id) = reply["result"]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < until, "{callid} never listed: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let destroyed = post(&stack, &format!("/api/sessions/{id}/destroy"), json!({})).await;
    assert_eq!(destroyed.status, 200, "{destroyed:?}");
    let until = Instant::now() + Duration::from_secs(10);
    while get(&stack, &format!("/api/sessions/{id}")).await.status != 404 {
        assert!(Instant::now() < until, "session {id} still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stack with extensions, two trunks (one whose gateway answers, one down) and the SIP the
/// emulator sent readable.
fn with_trunks() -> StackOptions {
    StackOptions {
        emulator_args: vec![
            "--extra-phones=1001,1002,1003".into(),
            "--trunk-gateways=127.0.0.1:5090".into(),
        ],
        gateway_toml: "[[trunks]]\nname = \"carrier\"\nuri = \"sip:127.0.0.1:5090\"\n[[trunks]]\nname = \"down\"\nuri = \"sip:127.0.0.1:5999\"\n".into(),
        ..Default::default()
    }
}

/// The SIP requests the emulator sent, oldest first.
async fn sent_sip(stack: &Stack) -> Vec<Value> {
    let got = request(&stack.emulator_mi_http, "GET", "/emulator/sip", None).await;
    assert_eq!(got.status, 200, "{got:?}");
    got.json.as_array().cloned().unwrap_or_default()
}

fn header<'a>(request: &'a Value, name: &str) -> Option<&'a str> {
    request["headers"].as_array()?.iter().find_map(|line| {
        let (key, value) = line.as_str()?.split_once(':')?;
        key.eq_ignore_ascii_case(name).then_some(value.trim())
    })
}

/// The first INVITE sent after the `skip` first requests whose R-URI starts with `ruri`: the
/// one a REFER made (`referred`, it carries Referred-By) or callapi's own.
async fn invite_after(stack: &Stack, skip: usize, ruri: &str, referred: bool) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let found = sent_sip(stack).await.into_iter().skip(skip).find(|r| {
            r["method"] == "INVITE"
                && r["ruri"].as_str().is_some_and(|u| u.starts_with(ruri))
                && header(r, "Referred-By").is_some() == referred
        });
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < until, "no INVITE to {ruri} was sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first INVITE sent whose R-URI starts with `ruri`.
async fn invite_to(stack: &Stack, ruri: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let found = sent_sip(stack).await.into_iter().find(|r| {
            r["method"] == "INVITE" && r["ruri"].as_str().is_some_and(|u| u.starts_with(ruri))
        });
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < until, "no INVITE to {ruri} was sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a call and waits until its session holds only the answered call the REFER made
/// (whose INVITE's R-URI starts with `referred_ruri`); returns the session's JSON, callapi's
/// INVITE to the caller and the referred INVITE.
async fn create_answered(
    stack: &Stack,
    body: Value,
    caller_ruri: &str,
    referred_ruri: &str,
) -> (Value, Value, Value) {
    let before = sent_sip(stack).await.len();
    let created = post(stack, "/api/sessions", body).await;
    assert_eq!(created.status, 200, "{created:?}");
    let id = created.json["id"].as_str().expect("id").to_owned();
    let referred = invite_after(stack, before, referred_ruri, true).await;
    let callid = referred["callid"].clone();
    wait_session(stack, &id, |s| {
        s["calls"].as_array().is_some_and(|calls| {
            calls.len() == 1
                && calls[0]["callid"] == callid
                && calls[0]["state"] == "answered"
                && calls[0]["callee_uri"].is_string()
        })
    })
    .await;
    let session = get(stack, &format!("/api/sessions/{id}")).await.json;
    let caller = invite_after(stack, before, caller_ruri, false).await;
    (session, caller, referred)
}

#[tokio::test]
async fn every_create_field_has_its_sip_effect() {
    let stack = Stack::with(with_trunks()).await;

    // Display name, late offer, user data, an auto-answer header to both sides, one
    // registration of the callee; rewrites without a trunk do nothing.
    let instance = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
    let (session, caller_invite, callee_invite) = create_answered(
        &stack,
        json!({"caller": "1001", "callee": "1002", "send_sdp": false,
            "caller_display_name": "Sales \"East\"", "user_data": "crm-42",
            "additional_header": "ANSWER_MODE", "header_direction": "ALL",
            "target_instance_id": instance, "rewrite_pai": "999"}),
        "sip:1001@127.0.0.1",
        "sip:1002@127.0.0.1",
    )
    .await;
    assert_eq!(
        header(&caller_invite, "From"),
        Some(r#""Sales \"East\"" <sip:1001@127.0.0.1>"#)
    );
    assert_eq!(
        caller_invite["body"],
        Value::Null,
        "late offer: {caller_invite}"
    );
    assert_eq!(header(&caller_invite, "Content-Type"), None);
    assert_eq!(header(&caller_invite, "Answer-Mode"), Some("Auto"));
    assert_eq!(
        header(&caller_invite, "X-Callapi-User-Data"),
        Some("crm-42")
    );
    assert_eq!(
        callee_invite["ruri"],
        format!("sip:1002@127.0.0.1;gr={instance}")
    );
    assert!(
        header(&callee_invite, "From").is_some_and(|f| f.starts_with(r#""Sales \"East\"" <"#)),
        "{callee_invite}"
    );
    assert_eq!(header(&callee_invite, "Answer-Mode"), Some("Auto"));
    assert_eq!(
        header(&callee_invite, "X-Callapi-User-Data"),
        Some("crm-42")
    );
    assert_eq!(header(&callee_invite, "P-Asserted-Identity"), None);
    assert_eq!(callee_invite["destination"], Value::Null);
    assert_eq!(session["user_data"], "crm-42", "{session}");
    assert_eq!(session["state"], "active", "{session}");
    assert_eq!(session["end_cause"], Value::Null, "{session}");
    assert_eq!(session["calls"][0]["caller_display_name"], "Sales \"East\"");
    assert_eq!(session["calls"][0]["trunk"], Value::Null);
    // The WebSocket API shows the same.
    let mut client = stack.client().await;
    let asked = client
        .request("CallGet", json!({"session_id": session["id"]}))
        .await;
    assert_eq!(client.reply(&asked).await["result"]["user_data"], "crm-42");

    // Through a trunk: the callee's INVITE goes to the trunk's gateway (not to `target`), its
    // identities rewritten; the auto-answer header only toward the callee.
    let (session, caller_invite, trunk_invite) = create_answered(
        &stack,
        json!({"caller": "1003", "callee": "+4930123", "send_sdp": true, "trunk": "carrier",
            "rewrite_from": "4930", "rewrite_pai": "4931", "rewrite_rpi": "4932",
            "additional_header": "ALERT_INFO_INTERCOM", "header_direction": "CALLEE",
            "target": "sip:ignored@127.0.0.1"}),
        "sip:1003@127.0.0.1",
        "sip:+4930123@127.0.0.1",
    )
    .await;
    assert_eq!(session["calls"][0]["trunk"], "carrier", "{session}");
    assert_eq!(session["calls"][0]["callee"], "+4930123", "{session}");
    assert_eq!(header(&caller_invite, "Alert-Info"), None);
    assert!(
        caller_invite["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("v=0"))
    );
    assert_eq!(trunk_invite["destination"], "sip:127.0.0.1:5090");
    assert!(
        header(&trunk_invite, "From").is_some_and(|f| f.starts_with("<sip:4930@127.0.0.1>")),
        "{trunk_invite}"
    );
    assert_eq!(
        header(&trunk_invite, "P-Asserted-Identity"),
        Some("<sip:4931@127.0.0.1>")
    );
    assert_eq!(
        header(&trunk_invite, "Remote-Party-ID"),
        Some("<sip:4932@127.0.0.1>;party=calling;screen=yes;privacy=off")
    );
    assert_eq!(header(&trunk_invite, "Alert-Info"), Some("info=intercom"));

    // Another extension's phone rings for the callee: the R-URI changes, To stays; the
    // auto-answer header goes to the caller only when no direction is given.
    let (session, caller_invite, rung) = create_answered(
        &stack,
        json!({"caller": "1002", "callee": "1001", "send_sdp": true,
            "target_extension_number": "1003", "additional_header": "ANSWER_MODE"}),
        "sip:1002@127.0.0.1",
        "sip:1003@127.0.0.1",
    )
    .await;
    assert_eq!(session["calls"][0]["callee"], "1001", "{session}");
    assert_eq!(header(&rung, "To"), Some("<sip:1001@127.0.0.1>"));
    assert_eq!(header(&caller_invite, "Answer-Mode"), Some("Auto"));
    assert_eq!(header(&rung, "Answer-Mode"), None);

    // One contact of the callee: the INVITE goes there, and the phone there answers.
    let contact = "sip:1003@127.0.0.1:5082";
    let (_, _, sent_to_contact) = create_answered(
        &stack,
        json!({"caller": "1002", "callee": "1003", "send_sdp": true, "target": contact}),
        "sip:1002@127.0.0.1",
        "sip:1003@127.0.0.1",
    )
    .await;
    assert_eq!(sent_to_contact["destination"], contact);

    // A trunk that is down: the call fails, its calls go, and GET says how it ended (the list
    // holds only active sessions).
    let created = post(
        &stack,
        "/api/sessions",
        json!({"caller": "1001", "callee": "+4930999", "send_sdp": true, "trunk": "down"}),
    )
    .await;
    assert_eq!(created.status, 200, "{created:?}");
    let id = created.json["id"].as_str().expect("id").to_owned();
    let down_invite = invite_to(&stack, "sip:+4930999@127.0.0.1").await;
    assert_eq!(down_invite["destination"], "sip:127.0.0.1:5999");
    wait_session(&stack, &id, |s| {
        s["state"] == "ended" && s["end_cause"].is_object()
    })
    .await;
    let ended = get(&stack, &format!("/api/sessions/{id}")).await.json;
    assert_eq!(ended["calls"], json!([]), "{ended}");
    assert_eq!(ended["end_cause"]["code"], "CALL_FAILED", "{ended}");
    assert_eq!(ended["end_cause"]["sip_code"], 408, "{ended}");
    let listed = get(&stack, "/api/sessions").await.json;
    assert!(
        listed["items"]
            .as_array()
            .is_some_and(|items| items.iter().all(|i| i["id"] != json!(id))),
        "{listed}"
    );
}

/// WebSocket `CallStart` takes the same optional fields as `POST /api/sessions`, with the same
/// SIP effects and checks.
#[tokio::test]
async fn websocket_call_start_takes_the_create_fields() {
    let stack = Stack::with(with_trunks()).await;
    let mut client = stack.client().await;
    let notes = client
        .run(
            "CallStart",
            json!({"caller": "sip:1001@127.0.0.1", "callee": "sip:1002@127.0.0.1",
                "send_sdp": false, "user_data": "ws-7", "additional_header": "CALL_INFO"}),
        )
        .await;
    assert_eq!(
        callapi_e2e::client::shape(&notes)
            .last()
            .map(String::as_str),
        Some("Ended"),
        "{notes:?}"
    );
    assert!(
        !callapi_e2e::client::shape(&notes)
            .iter()
            .any(|n| n.starts_with("Error")),
        "{notes:?}"
    );
    let caller_invite = invite_to(&stack, "sip:1001@127.0.0.1").await;
    assert_eq!(caller_invite["body"], Value::Null);
    assert_eq!(header(&caller_invite, "X-Callapi-User-Data"), Some("ws-7"));
    // Remembered with the session, as for REST.
    let callid = notes
        .iter()
        .find(|n| n["params"]["data"] == "CALL_START")
        .and_then(|n| n["params"]["callid"].as_str())
        .expect("CALL_START names the new call")
        .to_owned();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let asked = client.request("CallGet", json!({"callid": callid})).await;
        let got = client.reply(&asked).await;
        if got["result"]["user_data"] == "ws-7" {
            break;
        }
        assert!(Instant::now() < until, "no user_data in {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        header(&caller_invite, "Call-Info"),
        Some("<sip:127.0.0.1>;answer-after=0")
    );

    // Through a trunk that is down: the call fails, reported to the client.
    let notes = client
        .run(
            "CallStart",
            json!({"caller": "sip:1003@127.0.0.1", "callee": "sip:+4930999@127.0.0.1",
                "trunk": "down"}),
        )
        .await;
    assert_eq!(
        callapi_e2e::client::shape(&notes)
            .iter()
            .filter(|n| n.starts_with("Error") || *n == "Ended")
            .collect::<Vec<_>>(),
        ["Error:CALL_FAILED", "Ended"],
        "{notes:?}"
    );
    assert_eq!(
        invite_to(&stack, "sip:+4930999@127.0.0.1").await["destination"],
        "sip:127.0.0.1:5999"
    );

    // The same refusals as REST, as -32602 naming the field.
    for (params, field) in [
        (json!({"trunk": "nowhere"}), "trunk"),
        (json!({"user_data": "a\nb"}), "user_data"),
        (json!({"target_instance_id": "<x>"}), "target_instance_id"),
        (json!({"additional_header": "LOUD"}), "additional_header"),
    ] {
        let mut params = params;
        params["caller"] = json!("sip:1001@127.0.0.1");
        params["callee"] = json!("sip:1002@127.0.0.1");
        let id = client.request("CallStart", params).await;
        let reply = client.reply(&id).await;
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        assert_eq!(reply["error"]["data"]["field"], field, "{reply}");
    }
}

fn ids(response: &Response) -> Vec<String> {
    response.json["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| item["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The v22 list parameters select, order and page the sessions, over REST and WebSocket
/// `CallList` alike.
#[tokio::test]
async fn list_parameters_filter_order_and_page() {
    let stack = Stack::with(with_extensions("3.6")).await;
    let first = established(&stack, "1001", "1002").await;
    let second = established(&stack, "1003", "1002").await;

    let all = get(&stack, "/api/sessions").await;
    assert_eq!(all.json["count"], 2, "{all:?}");
    assert_eq!(ids(&all), [first.clone(), second.clone()], "oldest first");
    let newest_first = get(&stack, "/api/sessions?orderby=started_at%20desc").await;
    assert_eq!(ids(&newest_first), [second.clone(), first.clone()]);
    let top = get(&stack, "/api/sessions?top=1").await;
    assert_eq!(
        (top.json["count"].clone(), ids(&top)),
        (json!(2), vec![first.clone()])
    );
    let page = get(&stack, "/api/sessions?top=1&skip=1").await;
    assert_eq!(
        (page.json["count"].clone(), ids(&page)),
        (json!(2), vec![second.clone()])
    );
    let past = get(&stack, "/api/sessions?skip=2").await;
    assert_eq!((past.json["count"].clone(), ids(&past)), (json!(2), vec![]));
    let filtered = get(&stack, "/api/sessions?filter=1003").await;
    assert_eq!(
        (filtered.json["count"].clone(), ids(&filtered)),
        (json!(1), vec![second.clone()])
    );

    // The WebSocket twin takes the same parameters and answers the same.
    let mut client = stack.client().await;
    let mut call_list = async |params: Value| {
        let asked = client.request("CallList", params).await;
        client.reply(&asked).await
    };
    let listed = call_list(json!({"orderby": "started_at desc", "top": 1})).await;
    assert_eq!(listed["result"]["count"], 2, "{listed}");
    assert_eq!(
        listed["result"]["items"][0]["id"],
        json!(second),
        "{listed}"
    );
    let callid = all.json["items"][0]["calls"][0]["callid"].clone();
    let listed = call_list(json!({"filter": callid})).await;
    assert_eq!(listed["result"]["count"], 1, "{listed}");
    assert_eq!(listed["result"]["items"][0]["id"], json!(first), "{listed}");
    let listed = call_list(json!({"skip": 1})).await;
    assert_eq!(
        listed["result"]["items"][0]["id"],
        json!(second),
        "{listed}"
    );
    for (params, field) in [
        (json!({"top": 0}), "top"),
        (json!({"top": 101}), "top"),
        (json!({"skip": 2_147_483_648_u64}), "skip"),
        (json!({"orderby": "callee"}), "orderby"),
        (json!({"filter": "f".repeat(257)}), "filter"),
    ] {
        let refused = call_list(params).await;
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
        assert_eq!(refused["error"]["data"]["field"], field, "{refused}");
    }
}

/// Failures known at once are the answer: a transfer already pending and a session OpenSIPS
/// has not reported yet (409), no commands replica or no NATS (503).
#[tokio::test]
async fn conflicts_and_unavailability_are_answered_at_once() {
    let mut stack = Stack::with(with_extensions("3.6")).await;
    let id = established(&stack, "1001", "1002").await;
    // 1999 has no phone: OpenSIPS takes the REFER and then says nothing, so the transfer is
    // still pending when the next one is asked for.
    let refer = |to: &'static str| {
        let path = format!("/api/sessions/{id}/refer");
        let stack = &stack;
        async move {
            post(
                stack,
                &path,
                json!({"extension_number": "1001", "refer_to": to}),
            )
            .await
        }
    };
    let first = refer("1999").await;
    assert_eq!(first.status, 200, "{first:?}");
    let second = refer("1003").await;
    assert_problem(&second, 409, "TRANSFER_PENDING", None);

    // With event-ingest down OpenSIPS's report of a new call never reaches the store.
    stack.ingest.kill().await;
    let body = json!({"caller": "1003", "callee": "1002", "send_sdp": true});
    let created = post(&stack, "/api/sessions", body.clone()).await;
    assert_eq!(created.status, 200, "{created:?}");
    let new_id = created.json["id"].as_str().expect("id").to_owned();
    let early = post(
        &stack,
        &format!("/api/sessions/{new_id}/destroy"),
        json!({}),
    )
    .await;
    assert_problem(&early, 409, "DIALOG_NOT_READY", None);

    for commands in &mut stack.commands {
        commands.kill().await;
    }
    let no_replica = post(&stack, "/api/sessions", body.clone()).await;
    assert_problem(&no_replica, 503, "UNAVAILABLE", None);
    let hold = post(
        &stack,
        &format!("/api/sessions/{id}/hold"),
        json!({"extension_number": "1001"}),
    )
    .await;
    assert_problem(&hold, 503, "UNAVAILABLE", None);

    stack.nats.stop().await;
    let no_nats = post(&stack, "/api/sessions", body).await;
    assert_problem(&no_nats, 503, "UNAVAILABLE", None);
}

/// Every `additional_header` value reaches the INVITE `header_direction` names, and only it.
#[tokio::test]
async fn every_auto_answer_header_reaches_the_side_named() {
    let stack = Stack::with(with_trunks()).await;
    for (value, name, line) in [
        ("ANSWER_MODE", "Answer-Mode", "Auto"),
        ("CALL_INFO", "Call-Info", "<sip:127.0.0.1>;answer-after=0"),
        (
            "ALERT_INFO_AUTO_ANSWER_DELAY0",
            "Alert-Info",
            "<sip:127.0.0.1>;info=alert-autoanswer;delay=0",
        ),
        ("ALERT_INFO_AUTO_ANSWER", "Alert-Info", "info=Auto Answer"),
        ("ALERT_INFO_INTERCOM", "Alert-Info", "info=intercom"),
    ] {
        for direction in ["CALLER", "CALLEE"] {
            let (session, caller_invite, callee_invite) = create_answered(
                &stack,
                json!({"caller": "1001", "callee": "1002", "send_sdp": true,
                    "additional_header": value, "header_direction": direction}),
                "sip:1001@127.0.0.1",
                "sip:1002@127.0.0.1",
            )
            .await;
            let (with, without) = if direction == "CALLER" {
                (&caller_invite, &callee_invite)
            } else {
                (&callee_invite, &caller_invite)
            };
            assert_eq!(
                header(with, name),
                Some(line),
                "{value} {direction}: {with}"
            );
            assert_eq!(
                header(without, name),
                None,
                "{value} {direction}: {without}"
            );
            let id = session["id"].as_str().expect("id");
            let ended = post(&stack, &format!("/api/sessions/{id}/destroy"), json!({})).await;
            assert_eq!(ended.status, 200, "{ended:?}");
        }
    }
}

/// Writes `raw` on a new connection and returns what comes back until the server closes it
/// (or resets it: what arrived before counts).
async fn raw_exchange(addr: &str, raw: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A request's head is bounded: more than 100 header fields, or more than 32 KiB, is a 431.
#[tokio::test]
async fn oversized_request_heads_get_431() {
    let stack = Stack::with(with_extensions("3.6")).await;
    let many: String = (0..100).map(|i| format!("X-Extra-{i}: {i}\r\n")).collect();
    let answer = raw_exchange(
        &stack.http_addr(),
        &format!("GET /api/sessions HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let big = "b".repeat(40 * 1024);
    let answer = raw_exchange(
        &stack.http_addr(),
        &format!(
            "GET /api/sessions HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Just under both bounds: answered.
    let many: String = (0..90).map(|i| format!("X-Extra-{i}: {i}\r\n")).collect();
    let fine = "f".repeat(20 * 1024);
    let answer = raw_exchange(
        &stack.http_addr(),
        &format!("GET /api/sessions HTTP/1.1\r\nHost: x\r\nX-Fine: {fine}\r\n{many}Connection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn the_callers_invite_goes_to_the_configured_next_hop() {
    // OpenSIPS then need not resolve the caller's domain (deploy/opensips/README.md).
    let stack = Stack::with(StackOptions {
        commands_toml: "invite_next_hop = \"sip:127.0.0.1:5060\"".to_owned(),
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let notes = client
        .run(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        callapi_e2e::client::shape(&notes),
        crate::commands::CALL_START_OK
    );
    let first = notes[0]["params"]["callid"].as_str().expect("callid");
    let sent = sent_sip(&stack).await;
    let invite = sent
        .iter()
        .find(|r| r["method"] == "INVITE" && r["callid"] == first)
        .unwrap_or_else(|| panic!("no INVITE of {first}: {sent:#?}"));
    assert_eq!(invite["destination"], "sip:127.0.0.1:5060", "{invite:#?}");
    // callapi's side of the call is that socket too (the BYE ending it needs no DNS).
    assert_eq!(
        header(invite, "Contact"),
        Some("<sip:alice@127.0.0.1:5060>"),
        "{invite:#?}"
    );
}
