//! Traces (issue 13): the trace context goes with every NATS message in its headers, so one
//! client request is one trace from the gateway through commands and proxy-connector to the
//! MI call, and the OpenSIPS events that drove it are linked. First with an in-memory exporter
//! over a real nats-server, then across the real services exporting OTLP/HTTP to a collector
//! the test runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callapi_e2e::client::shape;
use callapi_e2e::{NatsServer, Stack, StackOptions};
use futures::StreamExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::{Value, json};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::commands::CALL_START_OK;

#[tokio::test]
async fn the_trace_context_crosses_nats_in_the_message_headers() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);
    callapi_kit::telemetry::start_exporting();

    let dir = std::env::temp_dir().join(format!("callapi-trace-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let nats = NatsServer::start(&dir).await;
    let client = callapi_e2e::process::connect_nats(&nats.url).await;
    let mut inbox = client.subscribe("trace.test.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    // A message published inside a span carries it; a span on the other side follows it.
    let sender = tracing::info_span!("sender", trace_id = tracing::field::Empty);
    let message = callapi_proto::v1::CommandAck {
        accepted: true,
        error: String::new(),
        deadline_ms: 7,
    };
    callapi_kit::bus::publish(&client, "trace.test.one", &message)
        .instrument(sender.clone())
        .await
        .expect("publish");
    let received = tokio::time::timeout(Duration::from_secs(5), inbox.next())
        .await
        .expect("in time")
        .expect("a message");
    let headers = received.headers.clone().expect("the message has headers");
    assert!(headers.get("traceparent").is_some(), "{headers:?}");
    let receiver = tracing::info_span!("receiver", trace_id = tracing::field::Empty);
    callapi_kit::telemetry::follow(&receiver, received.headers.as_ref());

    // An event published in a trace of its own is linked, not parented.
    let event = tracing::info_span!("event");
    callapi_kit::bus::publish(&client, "trace.test.two", &message)
        .instrument(event.clone())
        .await
        .expect("publish");
    let linked = tokio::time::timeout(Duration::from_secs(5), inbox.next())
        .await
        .expect("in time")
        .expect("a message");
    callapi_kit::telemetry::link(&receiver, linked.headers.as_ref());
    drop((sender, receiver, event));
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().expect("spans");
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:#?}"))
    };
    let (sender, receiver, event) = (by_name("sender"), by_name("receiver"), by_name("event"));
    assert_eq!(
        receiver.span_context.trace_id(),
        sender.span_context.trace_id()
    );
    assert_eq!(receiver.parent_span_id, sender.span_context.span_id());
    assert_ne!(
        event.span_context.trace_id(),
        sender.span_context.trace_id()
    );
    assert_eq!(receiver.links.links.len(), 1, "{receiver:#?}");
    let link = &receiver.links.links[0].span_context;
    assert_eq!(
        (link.trace_id(), link.span_id()),
        (event.span_context.trace_id(), event.span_context.span_id())
    );
    assert!(link.is_remote(), "the link came over NATS");
    // The follower names its trace in its `trace_id` field (what JSON log lines show).
    let trace_id = receiver
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "trace_id")
        .map(|kv| kv.value.to_string());
    assert_eq!(trace_id, Some(sender.span_context.trace_id().to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OTLP/HTTP (JSON) collector: every export request's body.
async fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: String| {
            let kept = kept.clone();
            async move {
                if let Ok(value) = serde_json::from_str::<Value>(&body) {
                    kept.lock().unwrap().push(value);
                }
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), bodies)
}

/// One exported span: its service and what the test looks at.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
    links: Vec<String>,
}

fn exported(bodies: &[Value]) -> Vec<Exported> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let attributes = |list: &Value| -> HashMap<String, String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|kv| {
                let value = kv["value"].as_object()?.values().next()?;
                Some((kv["key"].as_str()?.to_owned(), text(value)))
            })
            .collect()
    };
    let mut out = Vec::new();
    for body in bodies {
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = attributes(&resource["resource"]["attributes"])
                .remove("service.name")
                .unwrap_or_default();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    out.push(Exported {
                        service: service.clone(),
                        name: text(&span["name"]),
                        trace_id: text(&span["traceId"]),
                        span_id: text(&span["spanId"]),
                        parent: span["parentSpanId"].as_str().unwrap_or_default().to_owned(),
                        attributes: attributes(&span["attributes"]),
                        links: span["links"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|l| text(&l["traceId"]))
                            .collect(),
                    });
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn one_client_request_is_one_trace_across_the_services_to_the_mi_call() {
    let (endpoint, bodies) = collector().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("CALLAPI_LOG_FORMAT", "json"),
        // Whatever the environment says: the commands' debug lines carry the trace id.
        ("RUST_LOG", "debug,async_nats=info,hyper=info"),
    ];
    let stack = Stack::with(StackOptions {
        service_env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let cmd_id = "traced-call-1";
    let notes = client
        .run(
            "CallStart",
            json!({"cmd_id": cmd_id, "caller": "sip:alice@127.0.0.1", "callee": "sip:bob@127.0.0.1"}),
        )
        .await;
    assert_eq!(shape(&notes), CALL_START_OK, "{notes:#?}");
    let first_callid = notes[0]["params"]["callid"]
        .as_str()
        .expect("callid")
        .to_owned();
    let callid = notes[2]["params"]["callid"]
        .as_str()
        .expect("callid")
        .to_owned();
    let ended = client.run("CallEnd", json!({"callid": callid})).await;
    assert_eq!(shape(&ended), ["Ended"]);

    // Wait for the spans: the gateway's root, commands' run, proxy-connector's MI requests.
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = exported(&bodies.lock().unwrap());
        let root = spans.iter().find(|s| {
            s.name == "gateway.command"
                && s.attributes.get("cmd_id").map(String::as_str) == Some(cmd_id)
        });
        if let Some(root) = root {
            let trace = &root.trace_id;
            let mi = spans
                .iter()
                .filter(|s| &s.trace_id == trace && s.name == "mi.request")
                .count();
            let run = spans
                .iter()
                .any(|s| &s.trace_id == trace && s.name == "commands.run");
            if run && mi >= 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = spans
        .iter()
        .find(|s| {
            s.name == "gateway.command"
                && s.attributes.get("cmd_id").map(String::as_str) == Some(cmd_id)
        })
        .unwrap_or_else(|| panic!("no gateway span for {cmd_id}: {spans:#?}"))
        .clone();
    assert_eq!(root.service, "gateway");
    assert_eq!(
        root.attributes.get("tenant").map(String::as_str),
        Some("default")
    );
    assert_eq!(
        root.attributes.get("kind").map(String::as_str),
        Some("call_start")
    );
    // A WebSocket CallStart's Call-ID is made by commands: its span has it.
    assert!(!root.attributes.contains_key("callid"), "{root:#?}");
    let trace: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    let run = trace
        .iter()
        .find(|s| s.name == "commands.run")
        .unwrap_or_else(|| panic!("no commands span in the trace: {trace:#?}"));
    assert_eq!(run.service, "commands");
    assert_eq!(run.parent, root.span_id, "{run:#?}");
    assert_eq!(
        run.attributes.get("cmd_id").map(String::as_str),
        Some(cmd_id)
    );
    assert_eq!(
        run.attributes.get("node").map(String::as_str),
        Some("opensips1")
    );
    assert_eq!(run.attributes.get("callid"), Some(&first_callid));
    assert!(run.attributes.contains_key("session_id"), "{run:#?}");
    assert_eq!(run.attributes.get("trace_id"), Some(&root.trace_id));
    let methods: Vec<&str> = trace
        .iter()
        .filter(|s| s.name == "mi.request")
        .map(|s| {
            assert_eq!(s.service, "proxy-connector");
            assert_eq!(s.parent, run.span_id, "{s:#?}");
            assert_eq!(
                s.attributes.get("node").map(String::as_str),
                Some("opensips1")
            );
            assert_eq!(
                s.attributes.get("outcome").map(String::as_str),
                Some("result"),
                "{s:#?}"
            );
            s.attributes.get("method").map_or("", String::as_str)
        })
        .collect();
    assert!(methods.contains(&"t_uac_dlg"), "{methods:?}");
    assert!(methods.contains(&"call_transfer"), "{methods:?}");
    // The OpenSIPS events that drove the command: event-ingest's spans, linked from it.
    let events: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.name == "opensips.event" && run.links.contains(&s.trace_id))
        .collect();
    assert!(!events.is_empty(), "no event linked: {:#?}", run.links);
    assert!(events.iter().all(|e| e.service == "event-ingest"));
    // The commands log names the trace in its JSON lines.
    let logs = stack.commands[0].logs();
    assert!(
        logs.lines()
            .any(|line| line.contains(&format!("\"trace_id\":\"{}\"", root.trace_id))),
        "{logs}"
    );
}
