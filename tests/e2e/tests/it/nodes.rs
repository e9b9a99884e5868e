//! Many OpenSIPS nodes (issues 11 and 12): a tenant's new calls go to its nodes by its policy,
//! every command on an existing call goes to the node holding its dialog, and a node that stops
//! answering gets no new calls until it answers again.

use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::{Client, Service, Stack, StackOptions, mi_udp, start_emulator};
use serde_json::json;

use crate::commands::call;
use crate::tenants::{access_token, auth_options, auth_toml_with, local_tenants};

/// Live (state 4) dialogs on the emulator at `mi`.
fn live_dialogs(mi: &str) -> Vec<String> {
    let listed = mi_udp(mi, "dlg_list", json!({}));
    listed["result"]["Dialogs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|d| d["state"] == 4)
        .filter_map(|d| d["callid"].as_str().map(str::to_owned))
        .collect()
}

/// Whether event-ingest is subscribed on the emulator at `mi`.
fn subscribed(mi: &str) -> bool {
    let listed = mi_udp(mi, "subscribers_list", json!({"event": "E_CALL_TRANSFER"}));
    listed["result"]["Event"]["Subscribers"]
        .as_array()
        .is_some_and(|s| !s.is_empty())
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 10 s");
}

/// Starts the second node's emulator with the stack's phone settings.
async fn second_node(dir: &std::path::Path, udp: &str) -> (Service, String) {
    let emulator = start_emulator(dir, &StackOptions::default(), udp, "127.0.0.1:0").await;
    let mi = emulator.ready_field("mi_udp").expect("mi_udp");
    (emulator, mi)
}

#[tokio::test]
async fn new_calls_follow_the_tenants_policy_and_skip_a_node_that_stopped_answering() {
    let dir = std::env::temp_dir().join(format!("callapi-nodes-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut emulator2, mi2) = second_node(&dir, "127.0.0.1:0").await;
    // acme uses both nodes in turn.
    let tenants = std::fs::read_to_string(local_tenants()).unwrap().replacen(
        "nodes = [\"opensips1\"]\nnode_policy = \"first\"",
        "nodes = [\"opensips1\", \"opensips2\"]\nnode_policy = \"round_robin\"",
        1,
    );
    assert!(tenants.contains("round_robin"), "the file changed");
    let tenants_path = dir.join("tenants.toml");
    std::fs::write(&tenants_path, tenants).unwrap();
    let stack = Stack::with(StackOptions {
        connector_node_toml: format!(
            "health_interval_ms = 200\n[[nodes]]\nid = \"opensips2\"\nmi = \"udp:{mi2}\"\ndefault_timeout_ms = 5000\nhealth_interval_ms = 200\n"
        ),
        ingest_toml: format!("tenants_file = \"{}\"", tenants_path.display()),
        ingest_node_toml: "[[nodes]]\nid = \"opensips2\"\nlisten = \"127.0.0.1:0\"\n".into(),
        ..auth_options(auth_toml_with(&tenants_path, 3600))
    })
    .await;
    let mi1 = stack.emulator_mi_udp.clone();
    wait_for("event-ingest subscribed on node 2", || subscribed(&mi2)).await;
    let token = access_token(&stack, "crm", "acme-crm-secret").await;
    let mut client = Client::connect_with_token(stack.url(), &token).await;

    // Round robin: one call on each node.
    let first = call(&mut client, "alice", "bob").await;
    let second = call(&mut client, "cindy", "dave").await;
    let (on1, on2) = (live_dialogs(&mi1), live_dialogs(&mi2));
    assert_eq!(on1.len() + on2.len(), 2, "{on1:?} {on2:?}");
    assert_eq!(on1.len(), 1, "{on1:?} {on2:?}");
    assert!(on1.contains(&first) || on1.contains(&second));
    // Commands on each call reach the node that holds it.
    for callid in [&first, &second] {
        let notes = client.run("CallHold", json!({"callid": callid})).await;
        assert!(!notes.iter().any(|n| n["method"] == "Error"), "{notes:#?}");
        let notes = client.run("CallEnd", json!({"callid": callid})).await;
        assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    }
    assert!(live_dialogs(&mi1).is_empty() && live_dialogs(&mi2).is_empty());

    // Node 2 stops answering: once proxy-connector says so, every new call goes to node 1.
    emulator2.kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut placed = Vec::new();
    for (caller, callee) in [("alice", "bob"), ("cindy", "dave"), ("eve", "bob")] {
        placed.push(call(&mut client, caller, callee).await);
    }
    let on1 = live_dialogs(&mi1);
    for callid in &placed {
        assert!(on1.contains(callid), "{callid} not on node 1: {on1:?}");
    }
    for callid in &placed {
        let notes = client.run("CallEnd", json!({"callid": callid})).await;
        assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    }

    // It answers again (same address): it takes new calls again by itself.
    let (_emulator2, mi2) = second_node(&dir, &mi2).await;
    wait_for("event-ingest subscribed again on node 2", || {
        subscribed(&mi2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut on2 = Vec::new();
    for _ in 0..2 {
        let callid = call(&mut client, "alice", "bob").await;
        if live_dialogs(&mi2).contains(&callid) {
            on2.push(callid.clone());
        }
        let notes = client.run("CallEnd", json!({"callid": callid})).await;
        assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    }
    assert_eq!(on2.len(), 1, "one of two calls on the node that came back");
}
