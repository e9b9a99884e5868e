//! Commands that fail after `Started`: a clear error notification, then `Ended`, always.

use callapi_e2e::client::shape;
use callapi_e2e::{Stack, StackOptions};
use serde_json::{Value, json};

use crate::commands::call;

/// The params of the `Error` notification among `notes`.
pub fn error_of(notes: &[Value]) -> &Value {
    &notes
        .iter()
        .find(|n| n["method"] == "Error")
        .expect("an Error notification")["params"]
}

#[tokio::test]
async fn call_start_to_parties_that_do_not_answer() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    for (caller, callee, sip_code) in [
        ("busy", "bob", 486),
        ("noanswer", "bob", 408),
        ("nobody", "bob", 404),
        ("alice", "busy", 486),
    ] {
        let notes = client
            .run(
                "CallStart",
                json!({"caller": format!("sip:{caller}@127.0.0.1"), "callee": format!("sip:{callee}@127.0.0.1")}),
            )
            .await;
        let error = error_of(&notes);
        assert_eq!(
            error["code"], "CALL_FAILED",
            "{caller}->{callee}: {notes:#?}"
        );
        assert_eq!(
            error["sip_code"], sip_code,
            "{caller}->{callee}: {notes:#?}"
        );
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains(&sip_code.to_string())
        );
        assert_eq!(notes.last().unwrap()["method"], "Ended");
    }
}

#[tokio::test]
async fn blind_transfer_to_busy_fails_clearly() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client
        .run(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:busy@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        shape(&notes),
        [
            "Event:TRANSFER_ACCEPT",
            "Event:CALL_START",
            "Error:TRANSFER_FAILED",
            "Ended"
        ],
        "{notes:#?}"
    );
    assert_eq!(error_of(&notes)["sip_code"], 486);
    assert!(
        error_of(&notes)["message"]
            .as_str()
            .unwrap()
            .contains("486 Busy Here")
    );
}

#[tokio::test]
async fn second_transfer_on_the_same_dialog_reports_491() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let first = client
        .run(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:busy@127.0.0.1"}),
        )
        .await;
    assert_eq!(error_of(&first)["code"], "TRANSFER_FAILED");
    let second = client
        .run(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:cindy@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        shape(&second),
        ["Error:TRANSFER_PENDING", "Ended"],
        "{second:#?}"
    );
    assert_eq!(error_of(&second)["sip_code"], 491);
    assert!(
        error_of(&second)["message"]
            .as_str()
            .unwrap()
            .contains("491 Request Pending")
    );
}

#[tokio::test]
async fn hold_of_an_already_held_call() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"]);
    let again = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&again), ["Error:ALREADY_HELD", "Ended"], "{again:#?}");
    assert!(
        error_of(&again)["message"]
            .as_str()
            .unwrap()
            .contains("Both dialog legs are on hold")
    );
    let notes = client.run("CallUnHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_UNHOLD", "Ended"]);
    let again = client.run("CallUnHold", json!({"callid": callid})).await;
    assert_eq!(shape(&again), ["Error:NOT_HELD", "Ended"], "{again:#?}");
}

#[tokio::test]
async fn unknown_callid_for_each_command() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let unknown = "no-such-call@127.0.0.1";
    let live = call(&mut client, "alice", "bob").await;
    for (method, params) in [
        (
            "CallBlindTransfer",
            json!({"callid": unknown, "leg": "callee", "destination": "sip:cindy@127.0.0.1"}),
        ),
        (
            "CallAttendedTransfer",
            json!({"callid_a": unknown, "leg_a": "callee", "callid_b": live, "leg_b": "callee"}),
        ),
        (
            "CallAttendedTransfer",
            json!({"callid_a": live, "leg_a": "callee", "callid_b": unknown, "leg_b": "callee"}),
        ),
        ("CallHold", json!({"callid": unknown})),
        ("CallUnHold", json!({"callid": unknown})),
        ("CallEnd", json!({"callid": unknown})),
    ] {
        let notes = client.run(method, params.clone()).await;
        assert_eq!(
            shape(&notes),
            ["Error:DIALOG_NOT_FOUND", "Ended"],
            "{method} {params}: {notes:#?}"
        );
        assert_eq!(error_of(&notes)["sip_code"], 404);
    }
}

#[tokio::test]
async fn a_transfer_whose_outcome_never_comes_ends_with_a_timeout() {
    // The target rings past the transfer deadline: started, but no `ok`/`fail` in time.
    let stack = Stack::with(StackOptions {
        deadlines_ms: (15_000, 2_000, 5_000, 5_000),
        ring_timeout_ms: 10_000,
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let started = std::time::Instant::now();
    let notes = client
        .run(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:noanswer@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        shape(&notes),
        [
            "Event:TRANSFER_ACCEPT",
            "Event:CALL_START",
            "Error:TIMEOUT",
            "Ended"
        ],
        "{notes:#?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
}

#[tokio::test]
async fn per_leg_hold_is_refused_clearly_by_opensips_36() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client
        .run("CallHold", json!({"callid": callid, "leg": "caller"}))
        .await;
    assert_eq!(
        shape(&notes),
        ["Error:NOT_SUPPORTED", "Ended"],
        "{notes:#?}"
    );
    assert!(
        error_of(&notes)["message"]
            .as_str()
            .unwrap()
            .contains("4.0")
    );
}

#[tokio::test]
async fn per_leg_hold_works_on_opensips_40() {
    let stack = Stack::with(StackOptions {
        opensips_version: "4.0",
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client
        .run("CallHold", json!({"callid": callid, "leg": "caller"}))
        .await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"], "{notes:#?}");
    assert_eq!(notes[0]["params"]["leg"], "caller");
    let notes = client
        .run("CallHold", json!({"callid": callid, "leg": "callee"}))
        .await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"], "{notes:#?}");
    let notes = client.run("CallUnHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_UNHOLD", "Ended"], "{notes:#?}");
}
