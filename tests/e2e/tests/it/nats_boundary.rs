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
        node_id: String::new(),
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

/// A nats-server on the shipped configuration (`deploy/nats/nats-server.conf`), on a free port.
struct ShippedNats {
    url: String,
    _child: tokio::process::Child,
}

async fn shipped_nats() -> ShippedNats {
    let port = callapi_e2e::process::free_port();
    let dir = std::env::temp_dir().join(format!("callapi-nats-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/nats-server.conf");
    let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_owned());
    let child = tokio::process::Command::new(binary)
        .arg("-c")
        .arg(&config)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("jetstream"))
        .env("CALLAPI_NATS_PASSWORD", "services-secret")
        .env("CALLAPI_NATS_ACME_PASSWORD", "acme-secret")
        .env("CALLAPI_NATS_GLOBEX_PASSWORD", "globex-secret")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(
            std::fs::File::create(dir.join("nats-server.log")).expect("log"),
        ))
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server must be installed (or NATS_SERVER_BIN set)");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return ShippedNats {
                url: format!("nats://127.0.0.1:{port}"),
                _child: child,
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("nats-server did not start on {config:?} (log in {dir:?})");
}

/// Connects as `user`; what the server reports (permission violations) goes to the receiver.
async fn connect_as(
    url: &str,
    user: &str,
    password: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        })
        .connect(url)
        .await
        .expect("connect");
    (client, rx)
}

/// Publishes on `subject` (as the services do) until `subscriber` gets a message: the
/// subscription is then in place on the server.
async fn publish_until_received(
    services: &async_nats::Client,
    subject: &str,
    subscriber: &mut async_nats::Subscriber,
) {
    use futures::StreamExt as _;
    for _ in 0..50 {
        services
            .publish(subject.to_owned(), "probe".into())
            .await
            .expect("publish");
        if let Ok(Some(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), subscriber.next()).await
        {
            return;
        }
    }
    panic!("nothing arrived on {subject}");
}

/// The next message that is not a probe left from [`publish_until_received`] (5 s at most).
async fn past_probes(subscriber: &mut async_nats::Subscriber) -> Option<String> {
    use futures::StreamExt as _;
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), subscriber.next())
            .await
            .ok()
            .flatten()?;
        if message.payload.as_ref() != b"probe" {
            return Some(String::from_utf8_lossy(&message.payload).into_owned());
        }
    }
}

/// Waits up to `within` for a server report that contains `text`.
async fn reported(
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    text: &str,
    within: std::time::Duration,
) -> bool {
    let until = tokio::time::Instant::now() + within;
    while let Ok(Some(report)) = tokio::time::timeout_at(until, reports.recv()).await {
        if report.contains(text) {
            return true;
        }
    }
    false
}

/// The shipped NATS configuration confines a tenant's event consumer to its own tenant, on a
/// real nats-server: it gets its tenant's call events; another tenant's events, our internal
/// subjects and the key-value buckets are refused, and it can publish nothing.
#[tokio::test]
async fn a_tenant_consumer_reads_only_its_own_tenants_events() {
    use futures::StreamExt as _;
    let nats = shipped_nats().await;
    let (services, _) = connect_as(&nats.url, "callapi", "services-secret").await;
    let (acme, mut acme_reports) = connect_as(&nats.url, "acme-events", "acme-secret").await;
    let (globex, _) = connect_as(&nats.url, "globex-events", "globex-secret").await;

    let acme_event = "callapi.v1.event.acme.opensips1.E_DLG_STATE_CHANGED.YWJj";
    let globex_event = "callapi.v1.event.globex.opensips1.E_DLG_STATE_CHANGED.eHl6";
    let mut acme_own = acme.subscribe("callapi.v1.event.acme.>").await.unwrap();
    let mut globex_own = globex.subscribe("callapi.v1.event.globex.>").await.unwrap();
    let mut forbidden = Vec::new();
    for subject in [
        "callapi.v1.event.globex.>",
        "callapi.v1.event.*.>",
        ">",
        "callapi.v1.notify.acme.>",
        "callapi.v1.cmd.acme.*",
        "$KV.callapi_calls.>",
    ] {
        forbidden.push((subject, acme.subscribe(subject).await.unwrap()));
    }
    acme.flush().await.unwrap();
    publish_until_received(&services, acme_event, &mut acme_own).await;
    publish_until_received(&services, globex_event, &mut globex_own).await;

    // One more of each tenant's events: each consumer gets its own, and nothing else.
    services
        .publish(globex_event, "globex-only".into())
        .await
        .unwrap();
    services
        .publish(acme_event, "acme-only".into())
        .await
        .unwrap();
    services.flush().await.unwrap();
    assert_eq!(
        past_probes(&mut globex_own).await.as_deref(),
        Some("globex-only")
    );
    assert_eq!(
        past_probes(&mut acme_own).await.as_deref(),
        Some("acme-only")
    );
    for (subject, subscriber) in &mut forbidden {
        let leaked =
            tokio::time::timeout(std::time::Duration::from_millis(300), subscriber.next()).await;
        assert!(
            leaked.is_err() || matches!(leaked, Ok(None)),
            "acme's consumer got a message on {subject}"
        );
    }
    assert!(
        reported(
            &mut acme_reports,
            "Permissions Violation for Subscription to \"callapi.v1.event.globex.>\"",
            std::time::Duration::from_secs(5)
        )
        .await,
        "no violation reported for another tenant's events"
    );

    // It publishes nothing: a command it tries to send never reaches the services.
    let mut commands = services.subscribe("callapi.v1.cmd.>").await.unwrap();
    services.flush().await.unwrap();
    acme.publish("callapi.v1.cmd.acme.call_start", "forged".into())
        .await
        .unwrap();
    acme.flush().await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), commands.next())
            .await
            .is_err(),
        "a tenant consumer's publish reached the services"
    );
    assert!(
        reported(
            &mut acme_reports,
            "Permissions Violation for Publish",
            std::time::Duration::from_secs(5)
        )
        .await,
        "no violation reported for the publish"
    );
}
