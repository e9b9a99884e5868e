//! Replicas, subscriptions and failures of the parts around the services.

use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::{Stack, StackOptions};
use serde_json::json;

use crate::commands::{CALL_START_OK, call};

#[tokio::test]
async fn two_gateways_and_two_commands_replicas_route_notifications_to_the_right_client() {
    let stack = Stack::with(StackOptions {
        gateways: 2,
        commands: 2,
        ..StackOptions::default()
    })
    .await;
    let mut clients = [
        stack.client_of(0).await,
        stack.client_of(1).await,
        stack.client_of(0).await,
        stack.client_of(1).await,
    ];
    let callers = ["alice", "bob", "cindy", "dave"];
    let mut cmd_ids = Vec::new();
    for (client, caller) in clients.iter_mut().zip(callers) {
        let cmd_id = client
            .start(
                "CallStart",
                json!({"caller": format!("sip:{caller}@127.0.0.1"), "callee": "sip:eve@127.0.0.1"}),
            )
            .await;
        cmd_ids.push(cmd_id);
    }
    for ((client, cmd_id), caller) in clients.iter_mut().zip(&cmd_ids).zip(callers) {
        let notes = client.until_ended(cmd_id).await;
        assert_eq!(shape(&notes), CALL_START_OK, "{caller}: {notes:#?}");
        assert_eq!(
            notes[0]["params"]["destination"],
            format!("sip:{caller}@127.0.0.1")
        );
    }
    // The replicas share the work (queue group): with 16 more commands, the chance that NATS
    // gives them all to one replica is 2^-15.
    for n in 0..16 {
        let notes = clients[n % 4]
            .run("CallEnd", json!({"callid": format!("gone-{n}@x")}))
            .await;
        assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
    }
    for commands in &stack.commands {
        assert!(
            commands.logs().contains("command accepted"),
            "a commands replica took no work"
        );
    }
}

#[tokio::test]
async fn event_subscriptions_are_refreshed_before_they_expire() {
    let stack = Stack::with(StackOptions {
        expire_secs: 3,
        check_interval_ms: 500,
        ..StackOptions::default()
    })
    .await;
    // Well past the lifetime of the first subscription, events still flow.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ttl = stack.subscription_ttl("E_CALL_TRANSFER");
    assert!(ttl.is_some_and(|t| t >= 1), "subscription lapsed: {ttl:?}");
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"]);
}

#[tokio::test]
async fn opensips_down_gives_a_clear_error() {
    let mut stack = Stack::start().await;
    let mut client = stack.client().await;
    stack.emulator.kill().await;
    let notes = client.run("CallEnd", json!({"callid": "any@x"})).await;
    assert_eq!(
        shape(&notes),
        ["Error:NODE_UNREACHABLE", "Ended"],
        "{notes:#?}"
    );
}

#[tokio::test]
async fn no_commands_replica_gives_a_clear_error() {
    let mut stack = Stack::start().await;
    for commands in &mut stack.commands {
        commands.kill().await;
    }
    let mut client = stack.client().await;
    let id = client.request("CallEnd", json!({"callid": "x"})).await;
    let reply = client.reply(&id).await;
    assert_eq!(reply["error"]["code"], -32000, "{reply}");
}

#[tokio::test]
async fn mi_over_datagram_works_too() {
    let stack = Stack::with(StackOptions {
        mi_transport: "udp",
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"]);
}

#[tokio::test]
async fn after_opensips_restarts_events_are_subscribed_again() {
    let mut stack = Stack::start().await;
    stack.restart_emulator().await;
    // The new node knows no subscription; event-ingest notices within its check interval.
    stack.wait_subscribed(Duration::from_secs(10));
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"]);
}

#[tokio::test]
async fn a_crashed_opensips_40_node_is_survived() {
    let mut stack = Stack::with(StackOptions {
        opensips_version: "4.0",
        deadlines_ms: (4_000, 4_000, 3_000, 3_000),
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    // Someone else's malformed datagram crashes OpenSIPS 4.0.1 (g2_mi_no_method_crash).
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .send_to(br#"{"jsonrpc":"2.0","id":"boom"}"#, &stack.emulator_mi_udp)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(
        shape(&notes),
        ["Error:NODE_UNREACHABLE", "Ended"],
        "{notes:#?}"
    );
    // OpenSIPS comes back (empty); everything works again, events included.
    stack.restart_emulator().await;
    stack.wait_subscribed(Duration::from_secs(10));
    let callid = call(&mut client, "cindy", "dave").await;
    let notes = client
        .run("CallHold", json!({"callid": callid, "leg": "callee"}))
        .await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"], "{notes:#?}");
}

#[tokio::test]
async fn services_carry_on_after_nats_restarts() {
    let mut stack = Stack::start().await;
    let mut client = stack.client().await;
    call(&mut client, "alice", "bob").await;
    stack.nats.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.nats.restart().await;
    // The services reconnect on their own; the client's WebSocket stayed up.
    let mut last = Vec::new();
    for _ in 0..40 {
        let id = client
            .request(
                "CallStart",
                json!({"caller": "sip:cindy@127.0.0.1", "callee": "sip:dave@127.0.0.1"}),
            )
            .await;
        let reply = client.reply(&id).await;
        if let Some(cmd_id) = reply["result"]["cmd_id"].as_str() {
            last = client.until_ended(cmd_id).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(shape(&last), CALL_START_OK, "{last:#?}");
}

#[tokio::test]
async fn a_command_whose_commands_replica_dies_still_ends() {
    let mut stack = Stack::with(StackOptions {
        deadlines_ms: (15_000, 2_000, 5_000, 5_000),
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    // No event ever comes for a transfer to an unknown user: the command stays in flight.
    let cmd_id = client
        .start(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:nobody@127.0.0.1"}),
        )
        .await;
    let accepted = client
        .take(|m| {
            m["params"]["cmd_id"] == cmd_id.as_str() && m["params"]["data"] == "TRANSFER_ACCEPT"
        })
        .await;
    assert_eq!(accepted["method"], "Event");
    for commands in &mut stack.commands {
        commands.kill().await;
    }
    let started = std::time::Instant::now();
    let notes = client.until_ended(&cmd_id).await;
    assert_eq!(shape(&notes), ["Error:COMMAND_LOST", "Ended"], "{notes:#?}");
    // deadline 2 s + driver grace 2 s + gateway margin 3 s
    assert!(started.elapsed() < Duration::from_secs(9));
}

/// A stack whose phones answer after 3 s (commands replicas configured with `commands_toml`,
/// scanning for checkpoints every 300 ms), and a CallStart whose callee rings: the caller
/// answered and the REFER's call started, so the flow is mid-transfer.
async fn callee_ringing(commands_toml: &str) -> (Stack, callapi_e2e::Client, String) {
    let stack = Stack::with(StackOptions {
        answer_delay_ms: 3_000,
        commands_toml: format!("{commands_toml}\n[takeover]\nscan_interval_ms = 300"),
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let cmd_id = client
        .start(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    let started = client
        .take(|m| m["params"]["cmd_id"] == cmd_id.as_str() && m["params"]["data"] == "CALL_START")
        .await;
    assert_eq!(started["method"], "Event");
    (stack, client, cmd_id)
}

#[tokio::test]
async fn a_command_whose_replica_is_killed_mid_transfer_is_finished_by_another() {
    // Phones answer after 3 s: the callee rings while the replica running the CallStart dies.
    let (mut stack, mut client, cmd_id) = callee_ringing("").await;
    // A second replica joins; the one running the command is killed (SIGKILL).
    let spare = stack.start_commands().await;
    stack.commands[0].kill().await;

    // The other replica takes the command over and finishes it: the callee answers, and the
    // client gets the rest of the story (after what came before CALL_START), then Ended.
    let rest = client.until_ended(&cmd_id).await;
    assert_eq!(
        shape(&rest),
        [
            "Event:CALL_ANSWER",
            "Event:TRANSFER_ACCEPT",
            "Event:CALL_ANSWER",
            "Ended"
        ],
        "{rest:#?}"
    );
    assert_eq!(rest[2]["params"]["leg"], "callee", "{rest:#?}");
    assert!(
        spare
            .logs()
            .contains("took over a command whose replica is gone"),
        "{}",
        spare.logs()
    );
    // The call is up, and ends normally.
    let callid = rest[2]["params"]["callid"].as_str().unwrap().to_owned();
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
}

#[tokio::test]
async fn a_command_running_when_its_replica_is_stopped_is_handed_over_and_finished() {
    // The callee rings 3 s; the replica running the CallStart gets SIGTERM with a 200 ms grace.
    let (mut stack, mut client, cmd_id) = callee_ringing("shutdown_grace_ms = 200").await;
    let spare = stack.start_commands().await;
    let stopping = std::time::Instant::now();
    let status = stack.commands[0].terminate(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        stack.commands[0].logs()
    );
    // Stopped within its grace and the hand-over, not at the command's end.
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        stack.commands[0].logs().contains("command handed over"),
        "{}",
        stack.commands[0].logs()
    );
    let rest = client.until_ended(&cmd_id).await;
    assert_eq!(
        shape(&rest),
        [
            "Event:CALL_ANSWER",
            "Event:TRANSFER_ACCEPT",
            "Event:CALL_ANSWER",
            "Ended"
        ],
        "{rest:#?}"
    );
    assert!(
        spare
            .logs()
            .contains("took over a command handed over by a stopping replica"),
        "{}",
        spare.logs()
    );
    let callid = rest[2]["params"]["callid"].as_str().unwrap().to_owned();
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
}
