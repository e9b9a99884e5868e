//! Each of the six commands succeeds with the documented notification sequence.

use callapi_e2e::client::shape;
use callapi_e2e::{Client, Stack};
use serde_json::{Value, json};

/// The notifications of a successful CallStart, as the call-api document shows them.
pub const CALL_START_OK: [&str; 5] = [
    "Event:CALL_ANSWER",
    "Event:TRANSFER_ACCEPT",
    "Event:CALL_START",
    "Event:CALL_ANSWER",
    "Ended",
];

/// Starts alice→bob (or other parties) and returns the new call's Call-ID.
pub async fn call(client: &mut Client, caller: &str, callee: &str) -> String {
    let notes = client
        .run(
            "CallStart",
            json!({"caller": format!("sip:{caller}@127.0.0.1"), "callee": format!("sip:{callee}@127.0.0.1")}),
        )
        .await;
    assert_eq!(shape(&notes), CALL_START_OK, "{notes:#?}");
    notes[2]["params"]["callid"]
        .as_str()
        .expect("callid")
        .to_owned()
}

/// The state of dialog `callid` on the emulator (`None`: not known any more).
pub fn dialog_state(stack: &Stack, callid: &str) -> Option<i64> {
    let reply = stack.mi("dlg_list", json!({"callid": callid}));
    reply["result"]["Dialog"]["state"].as_i64()
}

#[tokio::test]
async fn call_start_connects_caller_and_callee_and_reports_the_new_callid() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let cmd_id = client
        .start("CallStart", json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "my-cmd-1"}))
        .await;
    assert_eq!(cmd_id, "my-cmd-1");
    let notes = client.until_ended(&cmd_id).await;
    assert_eq!(shape(&notes), CALL_START_OK);
    let first_leg = notes[0]["params"]["callid"].as_str().unwrap().to_owned();
    let new_call = notes[2]["params"]["callid"].as_str().unwrap().to_owned();
    assert_ne!(first_leg, new_call);
    assert_eq!(
        notes[3]["params"]["callid"],
        Value::String(new_call.clone())
    );
    // The new call is up on OpenSIPS; the first leg is being torn down.
    assert_eq!(dialog_state(&stack, &new_call), Some(4));
    for _ in 0..50 {
        if dialog_state(&stack, &first_leg).is_none_or(|s| s == 5) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the first leg {first_leg} was not ended");
}

#[tokio::test]
async fn blind_transfer_moves_the_callee_to_a_new_destination() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client
        .run(
            "CallBlindTransfer",
            json!({"callid": callid, "leg": "callee", "destination": "sip:cindy@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        shape(&notes),
        ["Event:TRANSFER_ACCEPT", "Event:CALL_START", "Ended"],
        "{notes:#?}"
    );
    let transferred = notes[1]["params"]["callid"].as_str().unwrap();
    assert_ne!(transferred, callid);
    assert_eq!(dialog_state(&stack, transferred), Some(4));
}

#[tokio::test]
async fn attended_transfer_joins_two_calls() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let a = call(&mut client, "alice", "bob").await;
    let b = call(&mut client, "dave", "cindy").await;
    let notes = client
        .run(
            "CallAttendedTransfer",
            json!({"callid_a": a, "leg_a": "callee", "callid_b": b, "leg_b": "callee", "destination": "sip:cindy@127.0.0.1"}),
        )
        .await;
    assert_eq!(
        shape(&notes),
        ["Event:TRANSFER_ACCEPT", "Event:CALL_START", "Ended"],
        "{notes:#?}"
    );
    let joined = notes[1]["params"]["callid"].as_str().unwrap();
    assert_eq!(dialog_state(&stack, joined), Some(4));
}

#[tokio::test]
async fn attended_transfer_accepts_the_go_spellings() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let a = call(&mut client, "alice", "bob").await;
    let b = call(&mut client, "dave", "cindy").await;
    let notes = client
        .run(
            "CallAttendedTransfer",
            json!({"callidA": a, "legA": "callee", "callidB": b, "legB": "callee"}),
        )
        .await;
    assert_eq!(
        shape(&notes),
        ["Event:TRANSFER_ACCEPT", "Event:CALL_START", "Ended"],
        "{notes:#?}"
    );
}

#[tokio::test]
async fn hold_then_unhold_then_end() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_HOLD", "Ended"], "{notes:#?}");
    assert_eq!(notes[0]["params"]["leg"], "both");
    let notes = client.run("CallUnHold", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Event:CALL_UNHOLD", "Ended"], "{notes:#?}");
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"], "{notes:#?}");
    assert!(dialog_state(&stack, &callid).is_none_or(|s| s == 5));
}

#[tokio::test]
async fn two_commands_interleaved_on_one_connection() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let first = client
        .request(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    let second = client
        .request(
            "CallStart",
            json!({"caller": "sip:dave@127.0.0.1", "callee": "sip:cindy@127.0.0.1"}),
        )
        .await;
    let first_cmd = client.reply(&first).await["result"]["cmd_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second_cmd = client.reply(&second).await["result"]["cmd_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(first_cmd, second_cmd);
    let notes_b = client.until_ended(&second_cmd).await;
    let notes_a = client.until_ended(&first_cmd).await;
    for notes in [&notes_a, &notes_b] {
        assert_eq!(shape(notes), CALL_START_OK);
    }
    assert_ne!(
        notes_a[2]["params"]["callid"],
        notes_b[2]["params"]["callid"]
    );
}

#[tokio::test]
async fn a_client_that_reconnects_reattaches_to_its_running_command_by_cmd_id() {
    let stack = callapi_e2e::Stack::with(callapi_e2e::StackOptions {
        gateways: 2,
        answer_delay_ms: 1_500,
        ..callapi_e2e::StackOptions::default()
    })
    .await;
    // The command starts on gateway 1; its client goes away before the callee answers.
    let mut first = stack.client_of(0).await;
    let cmd_id = "crm-dial-42";
    let id = first
        .request(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": cmd_id}),
        )
        .await;
    let reply = first.reply(&id).await;
    assert_eq!(reply["result"]["status"], "Started", "{reply}");
    let before = first.take(|m| m["method"] == "Event").await;
    drop(first);

    // It comes back on gateway 2 and re-attaches: everything the command said, once, in
    // order, then the rest live until Ended.
    let mut again = stack.client_of(1).await;
    let id = again
        .request("CommandAttach", json!({"cmd_id": cmd_id}))
        .await;
    let reply = again.reply(&id).await;
    assert_eq!(reply["result"]["status"], "Attached", "{reply}");
    assert_eq!(reply["result"]["running"], true, "{reply}");
    assert!(
        reply["result"]["replayed"].as_u64().unwrap() >= 1,
        "{reply}"
    );
    let notes = again.until_ended(cmd_id).await;
    assert_eq!(shape(&notes), CALL_START_OK, "{notes:#?}");
    assert_eq!(notes[0]["params"], before["params"]);

    // Attached again once it ended: the whole story, and it is over.
    let id = again
        .request("CommandAttach", json!({"cmd_id": cmd_id}))
        .await;
    let reply = again.reply(&id).await;
    assert_eq!(reply["result"]["running"], false, "{reply}");
    assert_eq!(reply["result"]["replayed"], 5, "{reply}");
    assert_eq!(shape(&again.until_ended(cmd_id).await), CALL_START_OK);

    // An id no command had, and a bad one.
    let id = again
        .request("CommandAttach", json!({"cmd_id": "never-started"}))
        .await;
    assert_eq!(again.reply(&id).await["error"]["code"], -32004);
    let id = again.request("CommandAttach", json!({"cmd_id": ""})).await;
    let reply = again.reply(&id).await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "cmd_id", "{reply}");
}
