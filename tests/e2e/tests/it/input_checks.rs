//! End-to-end tests of input checks (SIP URIs) and secrets kept out of logs (issue 8).

use callapi_e2e::client::shape;
use callapi_e2e::{Service, Stack, StackOptions};
use callapi_proto::v1::{self as pb, CommandAck, CommandRequest, command_request::Command};
use prost::Message as _;
use serde_json::{Value, json};

use crate::commands::CALL_START_OK;

/// URIs a hostile client sent; each would have reached OpenSIPS unchanged.
const BAD_URIS: &[&str] = &[
    "sip:bob@127.0.0.1?Replaces=victim-callid%3Bto-tag%3D1%3Bfrom-tag%3D2",
    "sip:bob@127.0.0.1?X-Evil=1",
    "sip:bob@127.0.0.1?Call-ID=forged",
    "sip:bob@127.0.0.1;maddr=10.6.6.6",
    "sip:bob@127.0.0.1,sip:evil@10.6.6.6",
    "sip:bob:hunter3@127.0.0.1",
    "sip:bob%00@127.0.0.1",
    "sip:bob@127.0.0.1;transport=pigeon",
];

/// Parts of [`BAD_URIS`] that only they hold, to look for in the emulator's log.
const BAD_MARKS: &[&str] = &[
    "Replaces", "X-Evil", "forged", "10.6.6.6", "hunter3", "bob%00", "pigeon",
];

/// Each way a URI reaches the gateway: method, params around the URI, and the field it is in.
fn gateway_requests(uri: &str) -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "CallStart",
            json!({"caller": uri, "callee": "sip:bob@127.0.0.1"}),
            "caller",
        ),
        (
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": uri}),
            "callee",
        ),
        (
            "CallBlindTransfer",
            json!({"callid": "x@y", "leg": "callee", "destination": uri}),
            "destination",
        ),
        (
            "CallAttendedTransfer",
            json!({"callid_a": "a@x", "leg_a": "caller", "callid_b": "b@x", "leg_b": "callee", "destination": uri}),
            "destination",
        ),
    ]
}

/// The same, as commands get them over NATS: subject kind, command, field.
fn nats_commands(uri: &str) -> Vec<(&'static str, Command, &'static str)> {
    vec![
        (
            "call_start",
            Command::CallStart(pb::CallStart {
                caller: uri.into(),
                callee: "sip:bob@127.0.0.1".into(),
                callid: String::new(),
                options: None,
            }),
            "caller",
        ),
        (
            "call_start",
            Command::CallStart(pb::CallStart {
                caller: "sip:alice@127.0.0.1".into(),
                callee: uri.into(),
                callid: String::new(),
                options: None,
            }),
            "callee",
        ),
        (
            "call_start",
            Command::CallStart(pb::CallStart {
                caller: "sip:alice@127.0.0.1".into(),
                callee: "sip:bob@127.0.0.1".into(),
                callid: String::new(),
                options: Some(Box::new(pb::CallOptions {
                    target: uri.into(),
                    ..Default::default()
                })),
            }),
            "target",
        ),
        (
            "blind_transfer",
            Command::BlindTransfer(pb::CallBlindTransfer {
                callid: "x@y".into(),
                leg: pb::Leg::Callee as i32,
                destination: uri.into(),
            }),
            "destination",
        ),
        (
            "attended_transfer",
            Command::AttendedTransfer(pb::CallAttendedTransfer {
                callid_a: "a@x".into(),
                leg_a: pb::Leg::Caller as i32,
                callid_b: "b@x".into(),
                leg_b: pb::Leg::Callee as i32,
                destination: uri.into(),
            }),
            "destination",
        ),
    ]
}

#[tokio::test]
async fn uris_with_headers_maddr_passwords_or_lists_never_reach_opensips() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    for uri in BAD_URIS {
        for (method, params, field) in gateway_requests(uri) {
            let id = client.request(method, params).await;
            let reply = client.reply(&id).await;
            assert_eq!(reply["error"]["code"], -32602, "{method} {uri}: {reply}");
            assert_eq!(
                reply["error"]["data"]["field"], field,
                "{method} {uri}: {reply}"
            );
            assert!(
                reply["error"]["data"]["reason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{reply}"
            );
        }
    }

    // commands checks them again: NATS is a trust boundary.
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let mut n = 0;
    for uri in BAD_URIS {
        for (kind, command, field) in nats_commands(uri) {
            n += 1;
            let request = CommandRequest {
                tenant: "default".into(),
                cmd_id: format!("bad-{n}"),
                notify_subject: "callapi.v1.notify.default.test".into(),
                connection_id: "conn".into(),
                attempt: 1,
                node_id: String::new(),
                command: Some(command),
            };
            let reply = nats
                .request(
                    format!("callapi.v1.cmd.default.{kind}"),
                    request.encode_to_vec().into(),
                )
                .await
                .expect("a commands replica answers");
            let ack = CommandAck::decode(reply.payload.as_ref()).unwrap();
            assert!(!ack.accepted, "{kind} {field} {uri}: accepted");
            assert!(ack.error.contains(field), "{kind} {uri}: {}", ack.error);
        }
    }

    // A good call still goes through, and shows the emulator logs the URIs it gets.
    let notes = client
        .run(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1;transport=udp", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    assert_eq!(shape(&notes), CALL_START_OK, "{notes:#?}");
    let seen = stack.emulator.logs();
    assert!(seen.contains("sip:alice@127.0.0.1;transport=udp"), "{seen}");
    for uri in BAD_URIS {
        assert!(!seen.contains(uri), "the emulator saw {uri}");
    }
    for mark in BAD_MARKS {
        assert!(!seen.contains(mark), "the emulator saw {mark}");
    }
}

const NATS_PASSWORD: &str = "s3cretpw";
const MI_PASSWORD: &str = "hunter2";

#[tokio::test]
async fn credentials_and_sip_messages_stay_out_of_debug_logs() {
    let stack = Stack::with(StackOptions {
        nats_auth: Some(("callapi".into(), NATS_PASSWORD.into())),
        mi_userinfo: format!("admin:{MI_PASSWORD}@"),
        service_env: vec![("RUST_LOG".into(), "debug".into())],
        ..StackOptions::default()
    })
    .await;
    // The stack is up: every service logged in to NATS with the credentials of its
    // `nats.url`, and event-ingest subscribed through the connector's MI URL with userinfo.
    let mut client = stack.client().await;
    let notes = client
        .run(
            "CallStart",
            json!({"caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    assert_eq!(shape(&notes), CALL_START_OK, "{notes:#?}");

    // A gateway given the credentials as nats.user / nats.password instead.
    let plain_url = format!("nats://127.0.0.1:{}", stack.nats.port);
    let gateway = Service::start(
        &stack.dir,
        "gateway",
        &[],
        &[
            ("CALLAPI_LISTEN", "127.0.0.1:0"),
            ("CALLAPI_NATS__URL", plain_url.as_str()),
            ("CALLAPI_NATS__USER", "callapi"),
            ("CALLAPI_NATS__PASSWORD", NATS_PASSWORD),
            ("RUST_LOG", "debug"),
        ],
    )
    .await;
    let listen = gateway.ready_field("listen").expect("listen");
    let mut other = callapi_e2e::Client::connect(&format!("ws://{listen}/call-api")).await;
    let notes = other
        .run("CallEnd", json!({"callid": "no-such-call"}))
        .await;
    assert_eq!(shape(&notes), ["Error:DIALOG_NOT_FOUND", "Ended"]);

    let mut services: Vec<&Service> = vec![&stack.connector, &stack.ingest, &gateway];
    services.extend(stack.gateways.iter());
    services.extend(stack.commands.iter());
    for service in services {
        let logs = service.logs();
        assert!(
            logs.contains("DEBUG"),
            "{} does not log at DEBUG:\n{logs}",
            service.name
        );
        for secret in [MI_PASSWORD, NATS_PASSWORD] {
            assert!(
                !logs.contains(secret),
                "{} logged {secret}:\n{logs}",
                service.name
            );
        }
    }
    let connector = stack.connector.logs();
    assert!(connector.contains("MI reply"), "{connector}");
    assert!(connector.contains("***@127.0.0.1"), "{connector}");
    assert!(
        !connector.contains("SIP/2.0"),
        "the connector logged a SIP message at DEBUG:\n{connector}"
    );
}
