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
        attempt: 1,
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
        callid: String::new(),
        options: None,
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
                    callid: String::new(),
                    options: None,
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

#[tokio::test]
async fn configuration_layers_defaults_then_file_then_environment() {
    let dir = std::env::temp_dir().join(format!("callapi-e2e-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let nats = callapi_e2e::NatsServer::start(&dir).await;
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ngateway_id = \"from-file\"\n[nats]\nurl = \"nats://127.0.0.1:1\"\n",
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    // The file's NATS URL is wrong on purpose: the environment's must win.
    let gateway = callapi_e2e::Service::start(
        &dir,
        "gateway",
        &["--config", &config],
        &[
            ("CALLAPI_GATEWAY_ID", "from-env"),
            ("CALLAPI_NATS__URL", nats.url.as_str()),
        ],
    )
    .await;
    assert_eq!(
        gateway.ready_field("gateway_id").as_deref(),
        Some("from-env")
    );
    assert!(
        gateway
            .ready_field("listen")
            .is_some_and(|l| l.starts_with("127.0.0.1:"))
    );
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
