//! `callapi_kit::mi::MiClient` against a real nats-server and a hand-driven stand-in for
//! proxy-connector: every request gets its own answer though all share one reply subscription.

use std::time::Duration;

use callapi_e2e::NatsServer;
use callapi_kit::mi::{Liveness, MiAnswer, MiCall, MiCallError, MiClient};
use callapi_proto::v1::{MiFailure, MiProgress, MiReply, MiRequest, mi_failure, mi_reply};
use futures::StreamExt as _;
use prost::Message as _;

fn call(node: &str, method: &str, params_json: &str) -> MiCall {
    MiCall {
        node_id: node.into(),
        method: method.into(),
        params_json: params_json.into(),
        timeout: Duration::from_secs(5),
        tenant: "default".into(),
        client: "test".into(),
        ..MiCall::default()
    }
}

fn result(json: &str) -> Vec<u8> {
    MiReply {
        outcome: Some(mi_reply::Outcome::ResultJson(json.into())),
        ..MiReply::default()
    }
    .encode_to_vec()
}

fn progress() -> Vec<u8> {
    MiReply {
        outcome: Some(mi_reply::Outcome::Progress(MiProgress {})),
        ..MiReply::default()
    }
    .encode_to_vec()
}

/// Answers each request on `callapi.v1.mi.n1` after the delay its params name (`{"ms": N}`),
/// with its own params as the result; `"kept"` answers with a kept slot released on
/// `test.release.<params.n>`; `"silent"` gets no answer, `"chatty"` progress first
/// and a second, stray answer after the first; `"refused"`, `"garbled"` and `"unknown"` the
/// connector's failures of those kinds.
async fn stand_in_connector(nats: async_nats::Client) {
    let mut requests =
        callapi_e2e::subscribe_ready(&nats, "callapi.v1.mi.n1", "callapi.v1.mi.n1").await;
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let nats = nats.clone();
            tokio::spawn(async move {
                let request = MiRequest::decode(message.payload.as_ref()).unwrap();
                let reply = message.reply.unwrap();
                let ms = serde_json::from_str::<serde_json::Value>(&request.params_json)
                    .ok()
                    .and_then(|p| p["ms"].as_u64())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                match request.method.as_str() {
                    "silent" => {}
                    "refused" | "garbled" | "unknown" => {
                        let kind = match request.method.as_str() {
                            "refused" => mi_failure::Kind::BadRequest,
                            "garbled" => mi_failure::Kind::BadReply,
                            _ => mi_failure::Kind::UnknownNode,
                        };
                        let failure = MiReply {
                            outcome: Some(mi_reply::Outcome::Failure(MiFailure {
                                kind: kind as i32,
                                message: request.method.clone(),
                            })),
                            ..MiReply::default()
                        };
                        nats.publish(reply, failure.encode_to_vec().into())
                            .await
                            .unwrap();
                    }
                    "chatty" => {
                        for _ in 0..3 {
                            nats.publish(reply.clone(), progress().into())
                                .await
                                .unwrap();
                        }
                        let answer = result(&request.params_json);
                        nats.publish(reply.clone(), answer.into()).await.unwrap();
                        nats.publish(reply, result("\"stray\"").into())
                            .await
                            .unwrap();
                    }
                    "kept" => {
                        // A slot kept for the requester, released on `test.release.<n>`.
                        let n = serde_json::from_str::<serde_json::Value>(&request.params_json)
                            .ok()
                            .and_then(|p| p["n"].as_u64())
                            .unwrap_or(0);
                        let answer = MiReply {
                            outcome: Some(mi_reply::Outcome::ResultJson("\"OK\"".into())),
                            release_subject: format!("test.release.{n}"),
                        };
                        assert!(request.hold_slot_ms > 0, "{request:?}");
                        nats.publish(reply, answer.encode_to_vec().into())
                            .await
                            .unwrap();
                    }
                    _ => {
                        let answer = result(&request.params_json);
                        nats.publish(reply, answer.into()).await.unwrap();
                    }
                }
            });
        }
    });
}

/// A nats-server of its own, the stand-in connector on it, and an `MiClient` on another
/// connection (the server stops when the first value is dropped).
async fn server_connector_and_client() -> (NatsServer, MiClient) {
    let server = NatsServer::start(&tempdir()).await;
    stand_in_connector(async_nats::connect(server.url.as_str()).await.unwrap()).await;
    let mi = MiClient::new(async_nats::connect(server.url.as_str()).await.unwrap())
        .await
        .unwrap();
    (server, mi)
}

#[tokio::test]
async fn a_kept_slot_is_given_back_when_its_lease_drops_or_nobody_reads_its_reply() {
    let server = NatsServer::start(&tempdir()).await;
    stand_in_connector(async_nats::connect(server.url.as_str()).await.unwrap()).await;
    let watcher = async_nats::connect(server.url.as_str()).await.unwrap();
    let mut releases =
        callapi_e2e::subscribe_ready(&watcher, "test.release.*", "test.release.0").await;
    let mi = MiClient::new(async_nats::connect(server.url.as_str()).await.unwrap())
        .await
        .unwrap();
    let next_release = async |releases: &mut async_nats::Subscriber| {
        tokio::time::timeout(Duration::from_secs(5), releases.next())
            .await
            .expect("a release within 5 s")
            .expect("subscription open")
            .subject
            .to_string()
    };

    // The lease is held while the caller keeps it, released when it drops.
    let kept = MiCall {
        hold_slot: Duration::from_secs(30),
        ..call("n1", "kept", "{\"n\":1}")
    };
    let (answer, lease) = mi.call_leased(&kept, None).await.unwrap();
    assert_eq!(answer, MiAnswer::Result("\"OK\"".into()));
    let lease = lease.expect("a lease");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), releases.next())
            .await
            .is_err(),
        "held"
    );
    drop(lease);
    assert_eq!(next_release(&mut releases).await, "test.release.1");

    // A request given up before its reply (its flow ended on an event that came first): the
    // reply nobody reads still gives its slot back.
    let late = MiCall {
        hold_slot: Duration::from_secs(30),
        ..call("n1", "kept", "{\"n\":2,\"ms\":300}")
    };
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), mi.call_leased(&late, None)).await;
    assert!(gave_up.is_err(), "gave up before the reply");
    assert_eq!(next_release(&mut releases).await, "test.release.2");
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer_over_one_subscription() {
    let (_server, mi) = server_connector_and_client().await;

    // Answers come back in the reverse order of the requests.
    let calls = (0..50u64).map(|i| {
        let mi = mi.clone();
        async move {
            let params = format!("{{\"ms\":{},\"i\":{i}}}", (50 - i) * 4);
            let answer = mi.call(&call("n1", "echo", &params), None).await;
            (params, answer)
        }
    });
    for (params, answer) in futures::future::join_all(calls).await {
        assert_eq!(answer, Ok(MiAnswer::Result(params)));
    }

    // Progress messages are not answers; a stray second reply disturbs nobody.
    let liveness = Some(Liveness {
        progress_interval: Duration::from_millis(100),
        lost_after: Duration::from_millis(400),
    });
    let answer = mi.call(&call("n1", "chatty", "{\"ms\":1}"), liveness).await;
    assert_eq!(answer, Ok(MiAnswer::Result("{\"ms\":1}".into())));
    let answer = mi.call(&call("n1", "echo", "{\"next\":1}"), None).await;
    assert_eq!(answer, Ok(MiAnswer::Result("{\"next\":1}".into())));

    // Silence is a lost request within lost_after; no subscriber is no connector.
    let started = tokio::time::Instant::now();
    let answer = mi.call(&call("n1", "silent", ""), liveness).await;
    assert!(
        matches!(answer, Err(MiCallError::Lost { .. })),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let answer = mi.call(&call("n2", "echo", ""), None).await;
    assert_eq!(answer, Err(MiCallError::NoConnector("n2".into())));
}

#[tokio::test]
async fn each_kind_of_connector_failure_keeps_its_meaning() {
    let (_server, mi) = server_connector_and_client().await;
    let cases = [
        ("refused", MiCallError::BadRequest("refused".into())),
        ("garbled", MiCallError::BadReply("garbled".into())),
        ("unknown", MiCallError::UnknownNode("unknown".into())),
    ];
    for (method, expected) in cases {
        assert_eq!(mi.call(&call("n1", method, ""), None).await, Err(expected));
    }
}

#[tokio::test]
async fn requests_in_flight_fail_when_the_connection_is_closed() {
    let dir = tempdir();
    let server = NatsServer::start(&dir).await;
    stand_in_connector(async_nats::connect(server.url.as_str()).await.unwrap()).await;
    let nats = async_nats::connect(server.url.as_str()).await.unwrap();
    let mi = MiClient::new(nats.clone()).await.unwrap();
    let waiting = tokio::spawn({
        let mi = mi.clone();
        async move { mi.call(&call("n1", "silent", ""), None).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    nats.drain().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("answered before its 5 s timeout")
        .unwrap();
    assert!(answer.is_err(), "{answer:?}");
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("callapi-mi-client-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
