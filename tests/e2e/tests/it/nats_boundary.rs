//! The commands service checks what arrives over NATS too: it is a trust boundary.

use callapi_e2e::Stack;
use callapi_proto::v1::{self as pb, CommandAck, CommandRequest, command_request::Command};
use prost::Message as _;

async fn ack(nats: &async_nats::Client, subject: &str, payload: Vec<u8>) -> CommandAck {
    let reply = nats
        .request(subject.to_owned(), payload.into())
        .await
        .expect("a commands replica answers");
    CommandAck::decode(reply.payload.as_ref()).expect("CommandAck")
}

fn request(tenant: &str, command: Command) -> CommandRequest {
    CommandRequest {
        tenant: tenant.into(),
        cmd_id: "c1".into(),
        notify_subject: "callapi.v1.notify.default.test".into(),
        connection_id: "conn".into(),
        command: Some(command),
    }
}

#[tokio::test]
async fn bad_command_messages_are_refused_with_a_reason() {
    let stack = Stack::start().await;
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let start = Command::CallStart(pb::CallStart {
        caller: "sip:alice@127.0.0.1".into(),
        callee: "sip:bob@127.0.0.1".into(),
    });
    let cases = [
        (
            "callapi.v1.cmd.default.call_start",
            b"\xff\x00garbage".to_vec(),
            "undecodable",
        ),
        (
            "callapi.v1.cmd.default.hold",
            request("default", start.clone()).encode_to_vec(),
            "does not match its subject",
        ),
        (
            "callapi.v1.cmd.other.call_start",
            request("default", start.clone()).encode_to_vec(),
            "tenant",
        ),
        (
            "callapi.v1.cmd.default.call_start",
            request(
                "default",
                Command::CallStart(pb::CallStart {
                    caller: "sip:alice@127.0.0.1\r\nX-Injected: 1".into(),
                    callee: "sip:bob@127.0.0.1".into(),
                }),
            )
            .encode_to_vec(),
            "caller",
        ),
        (
            "callapi.v1.cmd.default.blind_transfer",
            request(
                "default",
                Command::BlindTransfer(pb::CallBlindTransfer {
                    callid: "x@y".into(),
                    leg: pb::Leg::Both as i32,
                    destination: "sip:cindy@127.0.0.1".into(),
                }),
            )
            .encode_to_vec(),
            "leg",
        ),
    ];
    for (subject, payload, reason) in cases {
        let ack = ack(&nats, subject, payload).await;
        assert!(!ack.accepted, "{subject}: accepted");
        assert!(ack.error.contains(reason), "{subject}: {}", ack.error);
    }
    let ok = ack(
        &nats,
        "callapi.v1.cmd.default.call_start",
        request("default", start).encode_to_vec(),
    )
    .await;
    assert!(ok.accepted, "{}", ok.error);
    assert!(ok.deadline_ms > 0);
}
