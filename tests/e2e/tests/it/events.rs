//! event-ingest as other services see it: OpenSIPS events on NATS, one subject per Call-ID.

use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::{NatsServer, Service, Stack};
use callapi_proto::v1::{OpensipsEvent, opensips_event};
use futures::StreamExt as _;
use prost::Message as _;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

use crate::commands::call;

#[tokio::test]
async fn every_dialog_event_is_published_under_its_callid() {
    let stack = Stack::start().await;
    let nats = async_nats::connect(stack.nats.url.as_str()).await.unwrap();
    let mut all = callapi_e2e::subscribe_ready(
        &nats,
        "callapi.v1.event.default.>",
        "callapi.v1.event.default.probe",
    )
    .await;
    let mut client = stack.client().await;
    let callid = call(&mut client, "alice", "bob").await;
    let notes = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&notes), ["Ended"]);
    let wanted = callapi_kit::subjects::encode_callid(&callid);
    let mut states = Vec::new();
    while !states.contains(&5) {
        let message = tokio::time::timeout(Duration::from_secs(10), all.next())
            .await
            .expect("events in time")
            .expect("subscription open");
        let event = OpensipsEvent::decode(message.payload.as_ref()).unwrap();
        if event.callid != callid {
            continue;
        }
        assert!(message.subject.ends_with(&wanted), "{}", message.subject);
        assert_eq!(
            (event.tenant.as_str(), event.node_id.as_str()),
            ("default", "opensips1")
        );
        if let Some(opensips_event::Body::DialogStateChanged(d)) = event.body {
            states.push(d.new_state);
        }
    }
    assert_eq!(states, [2, 3, 4, 5]);
}

/// event-ingest alone (node `node-7`, tenant `acme`, event_stream over TCP) on its own
/// nats-server, with `extra` lines in its top level and node entry; and a NATS subscription to
/// the node's events.
pub struct LoneTcpIngest {
    /// Its configuration and logs (the test removes it).
    pub dir: std::path::PathBuf,
    /// The NATS server (killed on drop).
    pub nats_server: NatsServer,
    /// event-ingest.
    pub ingest: Service,
    /// Where OpenSIPS would connect.
    pub addr: std::net::SocketAddr,
    /// Subscribed to `callapi.v1.event.acme.node-7.>`.
    pub events: async_nats::Subscriber,
    /// The connection `events` is on.
    pub nats: async_nats::Client,
}

/// Starts a [`LoneTcpIngest`]; `top` goes before `[nats]`, `node` into `[[nodes]]`.
pub async fn lone_tcp_ingest(top: &str, node: &str) -> LoneTcpIngest {
    let dir = std::env::temp_dir().join(format!("callapi-e2e-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let nats_server = NatsServer::start(&dir).await;
    let config = dir.join("event-ingest.toml");
    std::fs::write(
        &config,
        format!(
            "check_interval_ms = 60000\n{top}\n[nats]\nurl = \"{}\"\n[[nodes]]\nid = \"node-7\"\ntenant = \"acme\"\ntransport = \"tcp\"\nlisten = \"127.0.0.1:0\"\n{node}\n",
            nats_server.url
        ),
    )
    .unwrap();
    let ingest = Service::start(
        &dir,
        "event-ingest",
        &["--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    let addr = ingest
        .ready_field("node-7")
        .unwrap()
        .strip_prefix("tcp:")
        .expect("tcp socket advertised")
        .parse()
        .unwrap();
    let nats = async_nats::connect(nats_server.url.as_str()).await.unwrap();
    let events = callapi_e2e::subscribe_ready(
        &nats,
        "callapi.v1.event.acme.node-7.>",
        "callapi.v1.event.acme.node-7.probe",
    )
    .await;
    LoneTcpIngest {
        dir,
        nats_server,
        ingest,
        addr,
        events,
        nats,
    }
}

#[tokio::test]
async fn event_stream_over_tcp_is_read_back_to_back() {
    let LoneTcpIngest {
        dir,
        nats_server: _nats_server,
        ingest,
        addr,
        mut events,
        nats,
    } = lone_tcp_ingest("", "").await;
    // As OpenSIPS's event_stream does: connect and write notifications with no delimiter,
    // here split at an awkward place.
    let a = r#"{"jsonrpc":"2.0","method":"E_CALL_HOLD","params":{"callid":"55254bf3893eb48e","leg":"caller","action":"hold","state":"start"}}"#;
    let b = r#"{"jsonrpc":"2.0","method":"E_DLG_STATE_CHANGED","params":{"id":"8eb.a122f335","db_id":"13092456964634","callid":"55254bf3893eb48e","from_tag":"3459e5bedaa9d852","to_tag":"604efa0371e73cc4","old_state":4,"new_state":5}}"#;
    let stream_bytes = format!("{a}{b}");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&stream_bytes.as_bytes()[..150])
        .await
        .unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(&stream_bytes.as_bytes()[150..])
        .await
        .unwrap();
    let mut names = Vec::new();
    for _ in 0..2 {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(10), events.next()).await else {
            // Say which side lost it (the subscription is known to be in place).
            let probe = "callapi.v1.event.acme.node-7.probe";
            let _ = nats.publish(probe, "x".into()).await;
            let got = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
            panic!(
                "no event within 10 s (got so far: {names:?}); a probe published by the test itself {}; the test's NATS connection: {:?}",
                if got.is_ok() {
                    "arrived"
                } else {
                    "did not arrive either"
                },
                nats.connection_state()
            );
        };
        let message = message.expect("subscription open");
        let event = OpensipsEvent::decode(message.payload.as_ref()).unwrap();
        assert_eq!(event.callid, "55254bf3893eb48e");
        names.push(event.name);
    }
    assert_eq!(names, ["E_CALL_HOLD", "E_DLG_STATE_CHANGED"]);
    drop(ingest);
    let _ = std::fs::remove_dir_all(&dir);
}
