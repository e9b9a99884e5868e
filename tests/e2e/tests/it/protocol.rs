//! The JSON-RPC edge: malformed input of each kind gets a standard error and the connection
//! stays usable.

use callapi_e2e::Stack;
use callapi_e2e::client::shape;
use serde_json::{Value, json};

#[tokio::test]
async fn malformed_requests_get_standard_errors_and_the_connection_stays_usable() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let cases: Vec<(String, i64, Value)> = vec![
        ("{not json".into(), -32700, Value::Null),
        ("[]".into(), -32600, Value::Null),
        ("\"CallStart\"".into(), -32600, Value::Null),
        (r#"{"method":"CallEnd","params":{"callid":"x"},"id":1}"#.into(), -32600, json!(1)),
        (r#"{"jsonrpc":"2.0","method":42,"id":2}"#.into(), -32600, json!(2)),
        (r#"{"jsonrpc":"2.0","method":"CallDance","params":{},"id":3}"#.into(), -32601, json!(3)),
        (r#"{"jsonrpc":"2.0","method":"CallEnd","params":"x","id":4}"#.into(), -32602, json!(4)),
        (r#"{"jsonrpc":"2.0","method":"CallEnd","params":{},"id":5}"#.into(), -32602, json!(5)),
        (r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":7},"id":6}"#.into(), -32602, json!(6)),
        (r#"{"jsonrpc":"2.0","method":"CallStart","params":{"caller":"sip:a@b","callee":{"uri":"sip:c@d"}},"id":7}"#.into(), -32602, json!(7)),
        (r#"{"jsonrpc":"2.0","method":"CallStart","params":{"caller":"sip:a@b\r\nX-Injected: 1","callee":"sip:c@d"},"id":8}"#.into(), -32602, json!(8)),
        (r#"{"jsonrpc":"2.0","method":"CallBlindTransfer","params":{"callid":"x","leg":"sideways","destination":"sip:c@d"},"id":9}"#.into(), -32602, json!(9)),
        (r#"{"jsonrpc":"2.0","method":"CallHold","params":{"callid":"x","leg":true},"id":10}"#.into(), -32602, json!(10)),
        (r#"{"jsonrpc":"2.0","method":"CallEnd","params":{"callid":"x","bogus":1},"id":11}"#.into(), -32602, json!(11)),
        (format!(r#"{{"jsonrpc":"2.0","method":"CallEnd","params":{{"callid":"{}"}},"id":12}}"#, "x".repeat(70_000)), -32600, Value::Null),
    ];
    for (text, code, id) in cases {
        client.send_text(&text).await;
        let reply = client.next().await;
        assert_eq!(
            reply["error"]["code"],
            code,
            "{}: {reply}",
            &text[..text.len().min(80)]
        );
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["jsonrpc"], "2.0");
    }
    // Invalid params name the field.
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"CallStart","params":{"caller":"sip:a@b","callee":5},"id":"f"}"#)
        .await;
    let reply = client.next().await;
    assert_eq!(reply["error"]["data"]["field"], "callee");
    // A notification (no id) that is malformed gets no answer; the next request does.
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"CallDance"}"#)
        .await;
    let notes = client
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);
}

#[tokio::test]
async fn a_cmd_id_in_use_is_refused() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let first = client
        .request("CallStart", json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1", "cmd_id": "same"}))
        .await;
    let second = client
        .request("CallStart", json!({"caller": "sip:dave@127.0.0.1", "callee": "sip:cindy@127.0.0.1", "cmd_id": "same"}))
        .await;
    assert_eq!(client.reply(&second).await["error"]["code"], -32002);
    assert_eq!(client.reply(&first).await["result"]["status"], "Started");
    let notes = client.until_ended("same").await;
    assert_eq!(notes.last().unwrap()["method"], "Ended");
}
