//! event-ingest: receives OpenSIPS events (event_datagram, one JSON-RPC notification per UDP
//! datagram), turns each into an `OpensipsEvent` and publishes it on
//! `callapi.v1.event.<tenant>.<node>.<event>.<callid>`, so any service can follow one Call-ID.
//! It also keeps each node subscribed ([`subscriber`]): it subscribes through proxy-connector,
//! refreshes well before expiry and subscribes again as soon as a node lost the subscription
//! (OpenSIPS restarted).
//!
//! Events are read only from the addresses a node lists in `senders` ([`senders`]); everything
//! dropped (strangers, unusable events) is counted and reported in rate-limited WARN lines
//! ([`drops`]).
//!
//! Architecture invariant: this is the only crate that parses OpenSIPS events.
#![forbid(unsafe_code)]

pub mod calls;
pub mod calls_stream;
pub mod drops;
pub mod normalise;
pub mod parse;
mod router;
pub mod senders;
pub mod store;
pub mod subscriber;
pub mod tenancy;

use std::net::SocketAddr;
use std::time::Duration;
use tracing::Instrument as _;

use callapi_kit::bus;
use callapi_kit::config::NatsSettings;
use callapi_kit::subjects;
use callapi_proto::v1::OpensipsEvent;
use drops::{Drops, Why};
use senders::Senders;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// The event-ingest configuration.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where NATS is.
    pub nats: NatsSettings,
    /// The OpenSIPS nodes whose events are received.
    pub nodes: Vec<NodeConfig>,
    /// Events subscribed on every node.
    pub events: Vec<String>,
    /// Subscription lifetime asked of OpenSIPS, seconds.
    pub expire_secs: u32,
    /// How often the subscriptions are checked on each node, milliseconds.
    pub check_interval_ms: u64,
    /// At most one WARN line per node per this many milliseconds about dropped datagrams,
    /// connections and events (with their counts).
    pub drop_report_interval_ms: u64,
    /// The session store (live view of every dialog).
    pub sessions: store::StoreConfig,
    /// The stream of normalised call events.
    pub calls_stream: calls_stream::CallsStreamConfig,
    /// The tenants file (`kit::tenants`; read again on SIGHUP). With it, one node serves many
    /// tenants: each dialog's tenant is found by its SIP domain (`tenancy`), and a node's
    /// `tenant` is not used. Without it, every event of a node is its `tenant`'s.
    pub tenants_file: Option<String>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (none: not served).
    pub ops_listen: Option<String>,
    /// On SIGTERM, how long event-ingest goes on receiving while `/readyz` answers 503, so its
    /// Service sends the node's events to its replacement first, milliseconds.
    pub drain_delay_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsSettings::default(),
            nodes: vec![NodeConfig::default()],
            events: vec![
                "E_DLG_STATE_CHANGED".to_owned(),
                "E_CALL_TRANSFER".to_owned(),
                "E_CALL_HOLD".to_owned(),
            ],
            expire_secs: 3600,
            check_interval_ms: 5_000,
            drop_report_interval_ms: 10_000,
            sessions: store::StoreConfig::default(),
            calls_stream: calls_stream::CallsStreamConfig::default(),
            tenants_file: None,
            ops_listen: None,
            drain_delay_ms: 0,
        }
    }
}

/// One OpenSIPS node whose events this service receives.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Node id (as proxy-connector knows it).
    pub id: String,
    /// Tenant the node's events belong to (without `tenants_file`).
    pub tenant: String,
    /// How OpenSIPS delivers events: `udp` (event_datagram) or `tcp` (event_stream).
    pub transport: Transport,
    /// Address to receive this node's events on (port 0 = any free port).
    pub listen: String,
    /// Socket OpenSIPS must send events to (`udp:IP:PORT` / `tcp:IP:PORT`); defaults to the
    /// bound listen address.
    pub advertise: Option<String>,
    /// IP addresses or CIDR prefixes OpenSIPS sends this node's events from; datagrams and
    /// connections from any other address are dropped.
    pub senders: Vec<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "opensips1".to_owned(),
            tenant: "default".to_owned(),
            transport: Transport::Udp,
            listen: "127.0.0.1:9099".to_owned(),
            advertise: None,
            senders: default_senders(),
        }
    }
}

/// The default `senders`: the loopback addresses, i.e. an OpenSIPS on this host (as with the
/// default `listen`); a node elsewhere must be listed explicitly, so a forgotten setting
/// refuses strangers instead of trusting everyone.
pub fn default_senders() -> Vec<String> {
    vec!["127.0.0.1".to_owned(), "::1".to_owned()]
}

/// Event transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// event_datagram: one notification per UDP datagram.
    Udp,
    /// event_stream: OpenSIPS connects and writes notifications back to back.
    Tcp,
}

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS could not be used.
    #[error("NATS: {0}")]
    Nats(String),
    /// A node is misconfigured or its socket cannot be bound.
    #[error("node {node}: {reason}")]
    Node {
        /// Node id.
        node: String,
        /// What went wrong.
        reason: String,
    },
}

/// Runs event-ingest until `stop` is cancelled, then `drain_delay_ms` more while not ready;
/// then the datagrams the kernel holds already are taken, published and flushed before the
/// sockets close (a replacement bound to the same address gets the rest).
pub async fn run(config: Config, stop: CancellationToken) -> Result<(), Error> {
    let draining =
        callapi_kit::shutdown::Draining::after(stop, Duration::from_millis(config.drain_delay_ms));
    let shutdown = draining.shutdown.clone();
    // What the receivers hand on (the router, the call-events publisher, the session store)
    // outlives them: they stop at `shutdown` after taking what their sockets hold, and these go
    // on until their queues close, or DOWNSTREAM_WITHIN after `shutdown` at the latest.
    let downstream = CancellationToken::new();
    {
        let (shutdown, downstream) = (shutdown.clone(), downstream.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(DOWNSTREAM_WITHIN).await;
            downstream.cancel();
        });
    }
    // Configuration mistakes are reported at once, not after NATS answers.
    let node_senders = config
        .nodes
        .iter()
        .map(check_node)
        .collect::<Result<Vec<_>, _>>()?;
    let client = callapi_kit::nats::connect(&config.nats, "event-ingest")
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mi = callapi_kit::mi::MiClient::new(client.clone())
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let kv = if config.sessions.enabled {
        let jetstream = async_nats::jetstream::new(client.clone());
        Some(
            callapi_kit::calls::open(&jetstream, config.sessions.replicas)
                .await
                .map_err(|e| {
                    Error::Nats(format!(
                        "{e} (the session store needs JetStream on nats-server 2.11 or later; sessions.enabled = false runs without it)"
                    ))
                })?,
        )
    } else {
        None
    };
    let tenants = match &config.tenants_file {
        Some(path) => {
            let file = callapi_kit::tenants::TenantsFile::open(std::path::Path::new(path))
                .map_err(|e| Error::Node {
                    node: "*".to_owned(),
                    reason: format!("tenants_file: {e}"),
                })?;
            let watch = file.watch();
            tokio::spawn(file.reload_on_sighup(shutdown.clone()));
            Some(watch)
        }
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Which nodes have our event subscriptions in place.
    let subscribed = callapi_kit::ops::Checks::default();
    let publisher = if config.calls_stream.publish {
        if config.calls_stream.enabled {
            let jetstream = async_nats::jetstream::new(client.clone());
            let known: Vec<String> = match &tenants {
                Some(tenants) => tenants.borrow().iter().map(|t| t.id.clone()).collect(),
                None => config.nodes.iter().map(|n| n.tenant.clone()).collect(),
            };
            for tenant in &known {
                calls_stream::ensure(
                    &jetstream,
                    &config.calls_stream,
                    tenant,
                    callapi_kit::calls::STARTUP_ATTEMPTS,
                )
                    .await
                    .map_err(|e| {
                        Error::Nats(format!(
                            "{e} (call events need JetStream; calls_stream.enabled = false publishes them without the streams)"
                        ))
                    })?;
            }
            if let Some(tenants) = &tenants {
                tasks.spawn(calls_stream::ensure_on_reload(
                    jetstream,
                    config.calls_stream.clone(),
                    tenants.clone(),
                    shutdown.clone(),
                ));
            }
        }
        let (publisher, task) = calls_stream::Publisher::start(
            client.clone(),
            config.calls_stream.clone(),
            downstream.clone(),
        );
        tasks.spawn(async move {
            let _ = task.await;
        });
        Some(publisher)
    } else {
        None
    };
    let mut ready = Vec::new();
    let drop_report_interval = Duration::from_millis(config.drop_report_interval_ms.max(10));
    for (node, senders) in config.nodes.iter().zip(node_senders) {
        let node_error = |reason: String| Error::Node {
            node: node.id.clone(),
            reason,
        };
        let drops = Drops::new(&node.id, drop_report_interval);
        tasks.spawn(drops.clone().report_periodically(shutdown.clone()));
        let route = match &tenants {
            None => {
                let recorder = kv.as_ref().map(|kv| {
                    let (recorder, task) = store::start(
                        mi.clone(),
                        kv.clone(),
                        &node.tenant,
                        &node.id,
                        &config.sessions,
                        None,
                        downstream.clone(),
                    );
                    tasks.spawn(async move {
                        let _ = task.await;
                    });
                    recorder
                });
                Route::Fixed {
                    tenant: node.tenant.clone(),
                    recorder,
                    calls: calls_stream::CallEvents::new(publisher.clone()),
                }
            }
            Some(tenants) => {
                let (events, queue) = tokio::sync::mpsc::channel(ROUTER_QUEUE);
                let router = router::Router::new(router::Context {
                    client: client.clone(),
                    mi: mi.clone(),
                    kv: kv.clone(),
                    node_id: node.id.clone(),
                    tenants: tenants.clone(),
                    store: config.sessions.clone(),
                    drops: drops.clone(),
                    calls: calls_stream::CallEvents::new(publisher.clone()),
                    shutdown: downstream.clone(),
                });
                tasks.spawn(router.run(queue));
                Route::ByDomain(events)
            }
        };
        let sink = Sink {
            client: client.clone(),
            node_id: node.id.clone(),
            senders,
            drops,
            route,
        };
        let bound = match node.transport {
            Transport::Udp => {
                let socket = bind_udp(&node.listen)
                    .await
                    .map_err(|e| node_error(format!("cannot bind udp {}: {e}", node.listen)))?;
                let bound = socket.local_addr().map_err(|e| node_error(e.to_string()))?;
                tasks.spawn(receive_datagrams(socket, sink, shutdown.clone()));
                format!("udp:{bound}")
            }
            Transport::Tcp => {
                let listener = TcpListener::bind(node.listen.as_str())
                    .await
                    .map_err(|e| node_error(format!("cannot bind tcp {}: {e}", node.listen)))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| node_error(e.to_string()))?;
                tasks.spawn(accept_streams(listener, sink, shutdown.clone()));
                format!("tcp:{bound}")
            }
        };
        let advertise = node.advertise.clone().unwrap_or(bound);
        ready.push(format!("{}={advertise}", node.id));
        tasks.spawn(subscriber::keep_subscribed(
            mi.clone(),
            subscriber::Subscription {
                node_id: node.id.clone(),
                socket: advertise,
                events: config.events.clone(),
                expire_secs: config.expire_secs,
                check_interval: Duration::from_millis(config.check_interval_ms.max(100)),
            },
            subscribed.clone(),
            shutdown.clone(),
        ));
    }
    let nats = client.clone();
    // Ready while NATS is up and at least one node has our subscriptions.
    let readiness = || -> callapi_kit::ops::Readiness {
        std::sync::Arc::new(move || {
            let mut reasons = callapi_kit::ops::nats_connected(&nats);
            if draining.stopping() {
                reasons.push("shutting down".to_owned());
            }
            if !subscribed.any_holds() {
                reasons.push("no OpenSIPS node has our event subscriptions yet".to_owned());
                reasons.extend(
                    subscribed
                        .failing()
                        .into_iter()
                        .map(|node| format!("node {node}: subscriptions not checked")),
                );
            }
            reasons
        })
    };
    let ops =
        callapi_kit::ops::serve_configured(config.ops_listen.as_deref(), readiness, &shutdown)
            .await
            .map_err(|reason| Error::Node {
                node: "*".to_owned(),
                reason,
            })?;
    ready.extend(ops);
    callapi_kit::announce_ready(&ready.join(" "));
    // Bounded: a task waiting for NATS (away at shutdown) must not hold the process.
    let finished = async { while tasks.join_next().await.is_some() {} };
    let limit = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DOWNSTREAM_WITHIN + Duration::from_secs(2)).await;
    };
    tokio::select! {
        () = finished => {}
        () = limit => {
            tracing::warn!(tasks = tasks.len(), "tasks still running at shutdown were stopped (NATS away?)");
        }
    }
    tasks.abort_all();
    callapi_kit::nats::close(&client, Duration::from_secs(5)).await;
    Ok(())
}

/// Checks a node's ids and returns its parsed `senders`.
fn check_node(node: &NodeConfig) -> Result<Senders, Error> {
    let node_error = |reason: String| Error::Node {
        node: node.id.clone(),
        reason,
    };
    if !subjects::is_token(&node.id) || !subjects::is_token(&node.tenant) {
        return Err(node_error(
            "id and tenant must be letters, digits, '-' or '_'".into(),
        ));
    }
    Senders::parse(&node.senders).map_err(|e| node_error(e.to_string()))
}

/// At shutdown, longest time the router, the call-events publisher and the session store get
/// after the receivers stopped, to pass on what they were handed.
const DOWNSTREAM_WITHIN: Duration = Duration::from_secs(3);
/// At shutdown, longest time spent taking what a socket still holds (a socket that keeps
/// receiving as fast as it is read would otherwise never be empty).
const DRAIN_SOCKET_WITHIN: Duration = Duration::from_secs(1);

/// Receive buffer asked of the kernel for event datagrams, so bursts are not dropped.
const UDP_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Binds the event datagram socket with a large receive buffer (best effort: the kernel may
/// cap it at `net.core.rmem_max`).
async fn bind_udp(listen: &str) -> std::io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("address does not resolve"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(err) = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER) {
        tracing::warn!(%err, "cannot enlarge the event socket's receive buffer");
    }
    socket.set_nonblocking(true)?;
    // A replacement may bind the same address while this one drains (the kernel gives each
    // sender's datagrams to one of them; to the replacement once this one closes).
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Receive buffer for one datagram: larger than any UDP payload, so none is cut short (an
/// event over `MAX_EVENT_BYTES` is refused whole).
const MAX_DATAGRAM: usize = parse::MAX_EVENT_BYTES + 1;
/// Largest partial event buffered from a stream before the stream is dropped as garbage: no
/// event is larger.
const MAX_STREAM_BUFFER: usize = parse::MAX_EVENT_BYTES;

/// Events waiting for the router of a node that serves many tenants; more are dropped
/// (counted) rather than slowing the socket down.
const ROUTER_QUEUE: usize = 16_384;

/// Whose a node's events are.
#[derive(Clone)]
enum Route {
    /// All one tenant's: published at once, recorded by `recorder` (if the store is kept).
    Fixed {
        tenant: String,
        recorder: Option<store::Recorder>,
        calls: calls_stream::CallEvents,
    },
    /// Each dialog's tenant found by its SIP domain: events go to the node's router.
    ByDomain(tokio::sync::mpsc::Sender<OpensipsEvent>),
}

/// Where parsed events go.
#[derive(Clone)]
struct Sink {
    client: async_nats::Client,
    node_id: String,
    senders: Senders,
    drops: Drops,
    route: Route,
}

impl Sink {
    async fn publish(&self, bytes: &[u8], from: &SocketAddr) {
        let received_at_ms = callapi_kit::unix_ms();
        metrics::counter!("callapi_events_received_total", "node" => self.node_id.clone())
            .increment(1);
        let (tenant, recorder, calls) = match &self.route {
            Route::Fixed {
                tenant,
                recorder,
                calls,
            } => (tenant, recorder, calls),
            Route::ByDomain(router) => {
                match parse::event(bytes, "", &self.node_id, received_at_ms) {
                    Ok(event) => {
                        if router.try_send(event).is_err() {
                            self.drops
                                .record(Why::RouterBehind, from.ip(), &"router queue full");
                        }
                    }
                    Err(reason) => self.drops.record(Why::UnusableEvent, from.ip(), &reason),
                }
                return;
            }
        };
        let parsed = parse::event(bytes, tenant, &self.node_id, received_at_ms)
            .map_err(|e| e.to_string())
            .and_then(|event| {
                subjects::event(tenant, &self.node_id, &event.name, &event.callid)
                    .map(|subject| (subject, event))
                    .map_err(|e| e.to_string())
            });
        let (subject, event) = match parsed {
            Ok(parsed) => parsed,
            Err(reason) => {
                self.drops.record(Why::UnusableEvent, from.ip(), &reason);
                return;
            }
        };
        tracing::debug!(%subject, name = %event.name, callid = %event.callid, "event");
        if let Err(err) = bus::publish(&self.client, subject, &event)
            .instrument(event_span(&event))
            .await
        {
            tracing::warn!(%err, "could not publish an event");
        }
        calls.on_event(&event).await;
        if let Some(recorder) = recorder
            && !recorder.record(event)
        {
            self.drops.record(
                Why::StoreBehind,
                from.ip(),
                &"session store recorder queue full",
            );
        }
    }
}

/// The span of one OpenSIPS event published (the root of a trace of its own, which the
/// commands it drives link to); none unless spans are exported.
pub(crate) fn event_span(event: &OpensipsEvent) -> tracing::Span {
    if !callapi_kit::telemetry::exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "opensips.event",
        node = %event.node_id,
        event = %event.name,
        tenant = %event.tenant,
        callid = %event.callid,
        trace_id = tracing::field::Empty,
    );
    callapi_kit::telemetry::record_trace_id(&span);
    span
}

async fn receive_datagrams(socket: UdpSocket, sink: Sink, shutdown: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from): (usize, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => {
                // What the kernel holds already is taken before the socket closes (within
                // DRAIN_SOCKET_WITHIN, and never waiting for NATS longer than that).
                let drain = async {
                    while let Ok((len, from)) = socket.try_recv_from(&mut buf) {
                        if sink.senders.allows(from.ip()) {
                            sink.publish(&buf[..len], &from).await;
                        } else {
                            sink.drops.record(Why::DatagramSenderNotAllowed, from.ip(), &"");
                        }
                    }
                    let _ = sink.client.flush().await;
                };
                let _ = tokio::time::timeout(DRAIN_SOCKET_WITHIN, drain).await;
                return;
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(%err, "event socket receive error");
                    continue;
                }
            },
        };
        if !sink.senders.allows(from.ip()) {
            sink.drops
                .record(Why::DatagramSenderNotAllowed, from.ip(), &"");
            continue;
        }
        sink.publish(&buf[..len], &from).await;
    }
}

async fn accept_streams(listener: TcpListener, sink: Sink, shutdown: CancellationToken) {
    loop {
        let (stream, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "event stream accept error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !sink.senders.allows(from.ip()) {
            drop(stream);
            sink.drops.record(Why::ConnectionNotAllowed, from.ip(), &"");
            continue;
        }
        tracing::info!(%from, node = %sink.node_id, "event stream connected");
        tokio::spawn(read_stream(stream, from, sink.clone(), shutdown.clone()));
    }
}

async fn read_stream(
    mut stream: tokio::net::TcpStream,
    from: SocketAddr,
    sink: Sink,
    shutdown: CancellationToken,
) {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let len = tokio::select! {
            _ = shutdown.cancelled() => return,
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(len) => len,
            },
        };
        buffer.extend_from_slice(&chunk[..len]);
        let framed = parse::split_stream(&buffer);
        for event in &framed.events {
            sink.publish(event, &from).await;
        }
        if let Some(reason) = framed.garbage {
            sink.drops.record(Why::StreamNotJson, from.ip(), &reason);
            break;
        }
        buffer.drain(..framed.consumed);
        if buffer.len() > MAX_STREAM_BUFFER {
            sink.drops.record(
                Why::StreamOverflow,
                from.ip(),
                &format_args!("over {MAX_STREAM_BUFFER} bytes without a complete event"),
            );
            break;
        }
    }
    tracing::info!(%from, node = %sink.node_id, "event stream closed");
}
