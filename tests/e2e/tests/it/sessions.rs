//! The live view of every active call: `CallList` / `CallGet` over WebSocket, fed by
//! event-ingest into the session store (JetStream key-value), including calls not made through
//! callapi, and right after every service restarted.

use std::time::Duration;

use callapi_e2e::{Client, Stack};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::commands::call;

const OFFER: &str = "v=0\r\no=operator 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

/// Places a call from `from` to `to` straight on the emulator (an operator's MI request, not
/// callapi), with Call-ID `callid`.
fn call_on_the_node(stack: &Stack, from: &str, to: &str, callid: &str) {
    let headers = format!(
        "From: <sip:{from}@127.0.0.1>\r\nTo: <sip:{to}@127.0.0.1>\r\nContact: <sip:{from}@127.0.0.1>\r\nContent-Type: application/sdp\r\nCSeq: 1 INVITE\r\nCall-Id: {callid}\r\n"
    );
    let reply = stack.mi(
        "t_uac_dlg",
        json!({"method": "INVITE", "ruri": format!("sip:{to}@127.0.0.1"), "headers": headers, "body": OFFER}),
    );
    assert!(reply.get("result").is_some(), "{reply}");
}

async fn ask(client: &mut Client, method: &str, params: Value) -> Value {
    let id = client.request(method, params).await;
    client.reply(&id).await
}

async fn sessions(client: &mut Client) -> Vec<Value> {
    let reply = ask(client, "CallList", json!({})).await;
    let result = &reply["result"];
    let items = result["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(result["count"], json!(items.len()), "{reply}");
    items
}

/// The session holding dialog `callid`, once `ready` holds for it (within 10 s).
async fn wait_for(client: &mut Client, callid: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let found = sessions(client)
            .await
            .into_iter()
            .find(|s| calls_of(s).iter().any(|c| c["callid"] == callid));
        match found {
            Some(session) if ready(&session) => return session,
            other if Instant::now() > until => {
                panic!("session of {callid} not as expected: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until no session holds dialog `callid`.
async fn wait_gone(client: &mut Client, callid: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = sessions(client)
            .await
            .into_iter()
            .any(|s| calls_of(&s).iter().any(|c| c["callid"] == callid));
        if !left {
            return;
        }
        assert!(Instant::now() < until, "{callid} still listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn calls_of(session: &Value) -> Vec<Value> {
    session["calls"].as_array().cloned().unwrap_or_default()
}

fn call_of<'a>(session: &'a Value, callid: &str) -> &'a Value {
    session["calls"]
        .as_array()
        .and_then(|calls| calls.iter().find(|c| c["callid"] == callid))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_call_made_directly_on_the_node_is_listed_until_it_ends() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    call_on_the_node(&stack, "cindy", "alice", "direct-1@operator");
    let session = wait_for(&mut client, "direct-1@operator", |s| {
        call_of(s, "direct-1@operator")["caller"] == "cindy"
    })
    .await;
    let listed = call_of(&session, "direct-1@operator");
    assert_eq!(listed["callee"], "alice", "{session}");
    assert_eq!(listed["caller_uri"], "sip:cindy@127.0.0.1");
    assert_eq!(listed["state"], "answered");
    assert_eq!(listed["caller_display_name"], Value::Null);
    assert!(
        listed["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{listed}"
    );
    let id = session["id"].as_str().expect("string id").to_owned();
    assert!(id.parse::<i64>().is_ok_and(|id| id > 0), "{id}");
    assert_eq!(session["node"], "opensips1");

    // CallGet finds it by session id and by Call-ID; an unknown id is -32004.
    let by_id = ask(&mut client, "CallGet", json!({"session_id": id})).await;
    assert_eq!(by_id["result"]["id"], json!(id), "{by_id}");
    let by_callid = ask(
        &mut client,
        "CallGet",
        json!({"callid": "direct-1@operator"}),
    )
    .await;
    assert_eq!(by_callid["result"]["id"], json!(id), "{by_callid}");
    let unknown = ask(&mut client, "CallGet", json!({"session_id": "12345"})).await;
    assert_eq!(unknown["error"]["code"], -32004, "{unknown}");

    // REST lists it too, the same session.
    let rest = callapi_e2e::http::request(
        &stack.http_addr(),
        "GET",
        "/api/sessions?filter=direct-1@operator",
        None,
    )
    .await;
    assert_eq!(rest.json["count"], 1, "{rest:?}");
    assert_eq!(rest.json["items"][0]["id"], json!(id), "{rest:?}");
    assert_eq!(rest.json["items"][0]["calls"][0]["caller"], "cindy");

    let ended = stack.mi("dlg_end_dlg", json!({"dialog_id": "direct-1@operator"}));
    assert!(ended.get("result").is_some(), "{ended}");
    wait_gone(&mut client, "direct-1@operator").await;
    let rest = callapi_e2e::http::request(&stack.http_addr(), "GET", "/api/sessions", None).await;
    assert_eq!(rest.json["count"], 0, "{rest:?}");
}

#[tokio::test]
async fn a_click_to_dial_is_one_session_and_its_holds_show() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    // The caller's first leg ends once the transfer is done: the session keeps the new call.
    let session = wait_for(&mut client, &callid, |s| {
        calls_of(s).len() == 1 && call_of(s, &callid)["callee"] == "bob"
    })
    .await;
    assert_eq!(call_of(&session, &callid)["state"], "answered", "{session}");
    // callops' ;osid= (on the To of a transfer's new call) stays inside event-ingest.
    assert_eq!(
        call_of(&session, &callid)["callee_uri"],
        "sip:bob@127.0.0.1",
        "{session}"
    );
    let hold = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(hold.last().unwrap()["method"], "Ended", "{hold:?}");
    wait_for(&mut client, &callid, |s| {
        call_of(s, &callid)["caller_held"] == true && call_of(s, &callid)["callee_held"] == true
    })
    .await;
    client.run("CallEnd", json!({"callid": callid})).await;
    wait_gone(&mut client, &callid).await;
}

#[tokio::test]
async fn another_tenants_calls_are_not_listed() {
    let stack = Stack::start().await;
    let mut ours = stack.client_of(0).await;
    call_on_the_node(&stack, "cindy", "dave", "tenant-check@operator");
    wait_for(&mut ours, "tenant-check@operator", |_| true).await;
    // A gateway of another tenant, on the same NATS and store, sees none of them.
    let other = stack.extra_gateway("tenant = \"other\"").await;
    let mut theirs = Client::connect(&other.1).await;
    assert!(sessions(&mut theirs).await.is_empty());
    let get = ask(
        &mut theirs,
        "CallGet",
        json!({"callid": "tenant-check@operator"}),
    )
    .await;
    assert_eq!(get["error"]["code"], -32004, "{get}");
    drop(other);
}

#[tokio::test]
async fn the_list_is_right_after_every_service_restarted_mid_call() {
    let mut stack = Stack::start().await;
    let mut client = stack.client().await;
    call_on_the_node(&stack, "cindy", "alice", "kept@operator");
    call_on_the_node(&stack, "dave", "bob", "ended-while-down@operator");
    wait_for(&mut client, "kept@operator", |_| true).await;
    wait_for(&mut client, "ended-while-down@operator", |_| true).await;

    stack.restart_services().await;
    let mut client = stack.client().await;
    let kept = wait_for(&mut client, "kept@operator", |_| true).await;
    assert_eq!(call_of(&kept, "kept@operator")["state"], "answered");

    // A call that ends while event-ingest is down leaves no ghost: the restarted ingest
    // compares the store with the node's dialogs.
    stack.ingest.kill().await;
    let ended = stack.mi(
        "dlg_end_dlg",
        json!({"dialog_id": "ended-while-down@operator"}),
    );
    assert!(ended.get("result").is_some(), "{ended}");
    // And a call that begins while it is down is not missing once it is back.
    call_on_the_node(&stack, "eve", "bob", "started-while-down@operator");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sessions(&mut client).await.iter().any(|s| calls_of(s)
            .iter()
            .any(|c| c["callid"] == "ended-while-down@operator")),
        "nobody removed it yet"
    );
    // A record the store holds but no dialog backs (a delete lost while JetStream was away)
    // is removed too: the restarted ingest compares the store with what it knows.
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let stray = callapi_proto::v1::CallRecord {
        tenant: "default".into(),
        node_id: "opensips1".into(),
        session_id: 42,
        callid: "stray@nowhere".into(),
        state: callapi_proto::v1::DialogState::Confirmed as i32,
        started_at_ms: 1,
        ..Default::default()
    };
    let key = callapi_kit::calls::key("default", "opensips1", "stray@nowhere");
    nats.publish(
        callapi_kit::calls::subject(&key),
        prost::Message::encode_to_vec(&stray).into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    wait_for(&mut client, "stray@nowhere", |_| true).await;

    stack.restart_ingest().await;
    wait_gone(&mut client, "ended-while-down@operator").await;
    wait_gone(&mut client, "stray@nowhere").await;
    wait_for(&mut client, "kept@operator", |_| true).await;
    let started = wait_for(&mut client, "started-while-down@operator", |_| true).await;
    assert_eq!(
        call_of(&started, "started-while-down@operator")["caller"],
        "eve",
        "{started}"
    );
    // REST shows the same list as the WebSocket.
    let rest = callapi_e2e::http::request(&stack.http_addr(), "GET", "/api/sessions", None).await;
    let callids: Vec<Value> = rest.json["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(calls_of)
        .map(|c| c["callid"].clone())
        .collect();
    let mut expected = vec![json!("kept@operator"), json!("started-while-down@operator")];
    let mut got = callids.clone();
    got.sort_by_key(Value::to_string);
    expected.sort_by_key(Value::to_string);
    assert_eq!(got, expected, "{rest:?}");
}
