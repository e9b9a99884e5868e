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

/// `CallEvent`s a subscriber gets until `callids` have all ended (or 10 s of quiet).
async fn events_until_all_ended(client: &mut Client, callids: &[&str]) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    let mut ended = std::collections::HashSet::new();
    while ended.len() < callids.len() {
        let Ok(note) = tokio::time::timeout(
            Duration::from_secs(10),
            client.take(|m| m["method"] == "CallEvent"),
        )
        .await
        else {
            break;
        };
        let event = note["params"].clone();
        if event["kind"] == "ended"
            && let Some(callid) = callids.iter().find(|c| event["callid"] == **c)
        {
            ended.insert(*callid);
        }
        got.push(event);
    }
    got
}

#[tokio::test]
async fn events_of_two_nodes_reach_the_right_clients_on_two_gateways() {
    let dir = std::env::temp_dir().join(format!("callapi-nodes-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_emulator2, mi2) = second_node(&dir, "127.0.0.1:0").await;
    // acme uses both nodes in turn; globex only node 2.
    let tenants = std::fs::read_to_string(local_tenants())
        .unwrap()
        .replacen(
            "nodes = [\"opensips1\"]\nnode_policy = \"first\"",
            "nodes = [\"opensips1\", \"opensips2\"]\nnode_policy = \"round_robin\"",
            1,
        )
        .replacen(
            "domains = [\"globex.localhost\"]\nnodes = [\"opensips1\"]",
            "domains = [\"globex.localhost\"]\nnodes = [\"opensips2\"]",
            1,
        );
    assert!(
        tenants.contains("nodes = [\"opensips2\"]"),
        "the file changed"
    );
    let tenants_path = dir.join("tenants.toml");
    std::fs::write(&tenants_path, tenants).unwrap();
    let stack = Stack::with(StackOptions {
        gateways: 2,
        connector_node_toml: format!(
            "[[nodes]]\nid = \"opensips2\"\nmi = \"udp:{mi2}\"\ndefault_timeout_ms = 5000\n"
        ),
        ingest_toml: format!("tenants_file = \"{}\"", tenants_path.display()),
        ingest_node_toml: "[[nodes]]\nid = \"opensips2\"\nlisten = \"127.0.0.1:0\"\n".into(),
        ..auth_options(auth_toml_with(&tenants_path, 3600))
    })
    .await;
    wait_for("event-ingest subscribed on node 2", || subscribed(&mi2)).await;
    let acme = access_token(&stack, "crm", "acme-crm-secret").await;
    let globex = access_token(&stack, "dialer", "globex-dialer-secret").await;
    let (gateway1, gateway2) = (&stack.gateway_urls[0], &stack.gateway_urls[1]);

    // Each tenant watches on the gateway the other one places its calls through.
    let mut acme_watch = Client::connect_with_token(gateway2, &acme).await;
    let mut globex_watch = Client::connect_with_token(gateway1, &globex).await;
    for watcher in [&mut acme_watch, &mut globex_watch] {
        let id = watcher.request("Subscribe", json!({})).await;
        assert_eq!(watcher.reply(&id).await["result"]["subscribed"], true);
    }
    let mut acme_desk = Client::connect_with_token(gateway1, &acme).await;
    let mut globex_desk = Client::connect_with_token(gateway2, &globex).await;
    // Each command's notifications reach the gateway of the client that sent it, whichever
    // node the call is on.
    let acme_calls = [
        call(&mut acme_desk, "alice", "bob").await,
        call(&mut acme_desk, "cindy", "dave").await,
    ];
    let notes = globex_desk
        .run(
            "CallStart",
            json!({"caller": "sip:cindy@globex.localhost", "callee": "sip:dave@globex.localhost"}),
        )
        .await;
    assert_eq!(shape(&notes), crate::commands::CALL_START_OK, "{notes:#?}");
    let globex_call = notes[2]["params"]["callid"].as_str().unwrap().to_owned();
    for callid in &acme_calls {
        let notes = acme_desk.run("CallEnd", json!({"callid": callid})).await;
        assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    }
    let notes = globex_desk
        .run("CallEnd", json!({"callid": globex_call}))
        .await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");

    // acme's watcher saw both its calls, one from each node, and nothing of globex's.
    let acme_events =
        events_until_all_ended(&mut acme_watch, &[&acme_calls[0], &acme_calls[1]]).await;
    let nodes_of = |events: &[serde_json::Value], callid: &str| -> Vec<String> {
        let mut nodes: Vec<String> = events
            .iter()
            .filter(|e| e["callid"] == callid)
            .map(|e| e["node"].as_str().unwrap_or_default().to_owned())
            .collect();
        nodes.dedup();
        nodes
    };
    let mut acme_nodes: Vec<String> = acme_calls
        .iter()
        .flat_map(|c| nodes_of(&acme_events, c))
        .collect();
    acme_nodes.sort();
    assert_eq!(acme_nodes, ["opensips1", "opensips2"], "{acme_events:#?}");
    assert!(
        !acme_events
            .iter()
            .any(|e| e["callid"] == globex_call.as_str()),
        "{acme_events:#?}"
    );
    // Its events from both nodes are one sequence: rising by one.
    let seqs: Vec<u64> = acme_events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // globex's watcher saw its call, on node 2, and nothing of acme's.
    let globex_events = events_until_all_ended(&mut globex_watch, &[&globex_call]).await;
    assert_eq!(nodes_of(&globex_events, &globex_call), ["opensips2"]);
    assert!(
        !globex_events
            .iter()
            .any(|e| acme_calls.iter().any(|c| e["callid"] == c.as_str())),
        "{globex_events:#?}"
    );
}
