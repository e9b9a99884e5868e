//! event-ingest: receives OpenSIPS events (event_datagram, one JSON-RPC notification per UDP
//! datagram), turns each into an `OpensipsEvent` and publishes it on
//! `callapi.v1.event.<tenant>.<node>.<event>.<callid>`, so any service can follow one Call-ID.
//! It also keeps each node subscribed ([`subscriber`]): it subscribes through proxy-connector,
//! refreshes well before expiry and subscribes again as soon as a node lost the subscription
//! (OpenSIPS restarted).
//!
//! Architecture invariant: this is the only crate that parses OpenSIPS events.
#![forbid(unsafe_code)]

pub mod parse;
pub mod subscriber;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callapi_kit::config::NatsSettings;
use callapi_kit::subjects;
use prost::Message as _;
use tokio::net::UdpSocket;
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
        }
    }
}

/// One OpenSIPS node whose events this service receives.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Node id (as proxy-connector knows it).
    pub id: String,
    /// Tenant the node's events belong to.
    pub tenant: String,
    /// UDP address to receive this node's events on (port 0 = any free port).
    pub listen: String,
    /// Address OpenSIPS must send events to; defaults to the bound listen address.
    pub advertise: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "opensips1".to_owned(),
            tenant: "default".to_owned(),
            listen: "127.0.0.1:9099".to_owned(),
            advertise: None,
        }
    }
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

/// Runs event-ingest until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let client = callapi_kit::nats::connect(&config.nats, "event-ingest")
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut ready = Vec::new();
    for node in &config.nodes {
        let node_error = |reason: String| Error::Node {
            node: node.id.clone(),
            reason,
        };
        if !subjects::is_token(&node.id) || !subjects::is_token(&node.tenant) {
            return Err(node_error(
                "id and tenant must be letters, digits, '-' or '_'".into(),
            ));
        }
        let socket = UdpSocket::bind(node.listen.as_str())
            .await
            .map_err(|e| node_error(format!("cannot bind {}: {e}", node.listen)))?;
        let bound = socket.local_addr().map_err(|e| node_error(e.to_string()))?;
        let advertise = node
            .advertise
            .clone()
            .unwrap_or_else(|| format!("udp:{bound}"));
        ready.push(format!("{}={advertise}", node.id));
        tasks.spawn(receive(
            client.clone(),
            socket,
            node.id.clone(),
            node.tenant.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(subscriber::keep_subscribed(
            client.clone(),
            subscriber::Subscription {
                node_id: node.id.clone(),
                socket: advertise,
                events: config.events.clone(),
                expire_secs: config.expire_secs,
                check_interval: Duration::from_millis(config.check_interval_ms.max(100)),
            },
            shutdown.clone(),
        ));
    }
    callapi_kit::announce_ready(&ready.join(" "));
    while tasks.join_next().await.is_some() {}
    let _ = client.drain().await;
    Ok(())
}

/// Largest datagram accepted (OpenSIPS events seen so far are under 300 bytes).
const MAX_DATAGRAM: usize = 65_535;

async fn receive(
    client: async_nats::Client,
    socket: UdpSocket,
    node_id: String,
    tenant: String,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from): (usize, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(%err, "event socket receive error");
                    continue;
                }
            },
        };
        let received_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let event = match parse::event(&buf[..len], &tenant, &node_id, received_at_ms) {
            Ok(event) => event,
            Err(reason) => {
                tracing::warn!(%from, %reason, "unusable event datagram");
                continue;
            }
        };
        let subject = subjects::event(&tenant, &node_id, &event.name, &event.callid);
        tracing::debug!(%subject, name = %event.name, callid = %event.callid, "event");
        if let Err(err) = client.publish(subject, event.encode_to_vec().into()).await {
            tracing::warn!(%err, "could not publish an event");
        }
    }
}
