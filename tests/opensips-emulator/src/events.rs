//! Event subscriptions (`event_subscribe`, with real expiry) and delivery: event_datagram (one
//! JSON-RPC notification per UDP datagram) or event_stream (notifications back to back on a TCP
//! connection the emulator opens).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

use crate::Version;

/// Events OpenSIPS 3.6.8 lists (`events_list`), in id order.
pub const EVENTS_36: [&str; 17] = [
    "E_CORE_SR_STATUS_CHANGED",
    "E_CORE_THRESHOLD",
    "E_CORE_SHM_THRESHOLD",
    "E_CORE_PKG_THRESHOLD",
    "E_CORE_PROC_AUTO_SCALE",
    "E_CORE_TCP_DISCONNECT",
    "E_DLG_STATE_CHANGED",
    "E_CALL_TRANSFER",
    "E_CALL_HOLD",
    "E_UL_AOR_INSERT",
    "E_UL_AOR_DELETE",
    "E_UL_CONTACT_INSERT",
    "E_UL_CONTACT_UPDATE",
    "E_UL_CONTACT_DELETE",
    "E_UL_CONTACT_REFRESH",
    "E_UL_LATENCY_UPDATE",
    "E_CORE_LOG",
];

/// Events OpenSIPS 4.0.1 lists (`events_list`), in id order.
pub const EVENTS_40: [&str; 19] = [
    "E_CORE_SR_STATUS_CHANGED",
    "E_CORE_THRESHOLD",
    "E_CORE_SHM_THRESHOLD",
    "E_CORE_PKG_THRESHOLD",
    "E_CORE_PROC_AUTO_SCALE",
    "E_CORE_TCP_DISCONNECT",
    "E_PROFILING_SCRIPT",
    "E_PROFILING_PROC",
    "E_DLG_STATE_CHANGED",
    "E_CALL_TRANSFER",
    "E_CALL_HOLD",
    "E_UL_AOR_INSERT",
    "E_UL_AOR_DELETE",
    "E_UL_CONTACT_INSERT",
    "E_UL_CONTACT_UPDATE",
    "E_UL_CONTACT_DELETE",
    "E_UL_CONTACT_REFRESH",
    "E_UL_LATENCY_UPDATE",
    "E_CORE_LOG",
];

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// event_datagram.
    Udp(SocketAddr),
    /// event_stream.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone)]
struct Subscription {
    event: String,
    socket: String,
    target: Target,
    expire: u64,
    /// `None` once unsubscribed with expire 0 (listed as "expired" for a while).
    expires_at: Option<Instant>,
    unsubscribed_at: Option<Instant>,
}

/// The subscriptions of one node and the means to deliver events.
pub struct Events {
    known: &'static [&'static str],
    subscriptions: Vec<Subscription>,
    udp: std::net::UdpSocket,
    streams: HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>,
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    /// Unknown event or unusable socket: 400 "Bad parameter value".
    BadValue,
    /// Negative expire.
    Negative,
}

impl Events {
    /// A subscription table of an OpenSIPS `version`, sending datagrams from `udp`.
    pub fn new(udp: std::net::UdpSocket, version: Version) -> Self {
        Self {
            known: match version {
                Version::V3_6 => &EVENTS_36,
                Version::V4_0 => &EVENTS_40,
            },
            subscriptions: Vec::new(),
            udp,
            streams: HashMap::new(),
        }
    }

    /// `event_subscribe`.
    pub fn subscribe(
        &mut self,
        event: &str,
        socket: &str,
        expire: i64,
    ) -> Result<(), SubscribeError> {
        if !self.known.contains(&event) {
            return Err(SubscribeError::BadValue);
        }
        let target = parse_socket(socket).ok_or(SubscribeError::BadValue)?;
        let expire = u64::try_from(expire).map_err(|_| SubscribeError::Negative)?;
        let now = Instant::now();
        let subscription = Subscription {
            event: event.to_owned(),
            socket: socket.to_owned(),
            target,
            expire,
            expires_at: (expire > 0).then(|| {
                // Huge values must not overflow the clock: about 136 years is forever here.
                let ttl = Duration::from_secs(expire.min(u64::from(u32::MAX)));
                now.checked_add(ttl).unwrap_or(now)
            }),
            unsubscribed_at: (expire == 0).then_some(now),
        };
        // A refresh keeps its place; a new subscriber is listed first (j_subscribe_expiry).
        match self
            .subscriptions
            .iter_mut()
            .find(|s| s.event == event && s.socket == socket)
        {
            Some(existing) => *existing = subscription,
            None => self.subscriptions.insert(0, subscription),
        }
        Ok(())
    }

    fn prune(&mut self) {
        let now = Instant::now();
        self.subscriptions
            .retain(|s| match (s.expires_at, s.unsubscribed_at) {
                (Some(at), _) => at > now,
                (None, Some(at)) => now.duration_since(at) < Duration::from_secs(10),
                (None, None) => false,
            });
    }

    /// `events_list`.
    pub fn events_list(&self) -> Value {
        let events: Vec<Value> = self
            .known
            .iter()
            .enumerate()
            .map(|(id, name)| json!({"name": name, "id": id}))
            .collect();
        json!({"Events": events})
    }

    /// `subscribers_list` (all events with subscribers, or one event); `None` for an unknown
    /// event.
    pub fn list(&mut self, only: Option<&str>) -> Option<Value> {
        self.prune();
        let now = Instant::now();
        let subscribers = |name: &str| -> Vec<Value> {
            self.subscriptions
                .iter()
                .filter(|s| s.event == name)
                .map(|s| {
                    let ttl = match s.expires_at {
                        // Whole seconds left, as OpenSIPS counts them (expire right after
                        // subscribing).
                        Some(at) => json!(
                            (at.saturating_duration_since(now) + Duration::from_millis(999))
                                .as_secs()
                        ),
                        None => json!("expired"),
                    };
                    json!({"socket": s.socket, "expire": s.expire, "ttl": ttl})
                })
                .collect()
        };
        if let Some(name) = only {
            let id = self.known.iter().position(|e| *e == name)?;
            return Some(
                json!({"Event": {"name": name, "id": id, "Subscribers": subscribers(name)}}),
            );
        }
        let events: Vec<Value> = self
            .known
            .iter()
            .enumerate()
            .filter_map(|(id, name)| {
                let subs = subscribers(name);
                (!subs.is_empty()).then(|| json!({"name": name, "id": id, "Subscribers": subs}))
            })
            .collect();
        Some(json!({"Events": events}))
    }

    /// Sends `event` with `params` to every live subscriber.
    pub fn raise(&mut self, event: &str, params: Value) {
        self.prune();
        let body = json!({"jsonrpc": "2.0", "method": event, "params": params})
            .to_string()
            .into_bytes();
        let now = Instant::now();
        let targets: Vec<Target> = self
            .subscriptions
            .iter()
            .filter(|s| s.event == event && s.expires_at.is_some_and(|at| at > now))
            .map(|s| s.target.clone())
            .collect();
        for target in targets {
            match target {
                Target::Udp(addr) => {
                    if let Err(err) = self.udp.send_to(&body, addr) {
                        tracing::debug!(%err, %addr, "event datagram not sent");
                    }
                }
                Target::Tcp(addr) => {
                    let sender = self
                        .streams
                        .entry(addr)
                        .or_insert_with(|| open_stream(addr));
                    if sender.send(body.clone()).is_err() {
                        let sender = open_stream(addr);
                        let _ = sender.send(body.clone());
                        self.streams.insert(addr, sender);
                    }
                }
            }
        }
    }
}

fn parse_socket(socket: &str) -> Option<Target> {
    let (proto, addr) = socket.split_once(':')?;
    let addr: SocketAddr = addr.parse().ok()?;
    match proto {
        "udp" => Some(Target::Udp(addr)),
        "tcp" => Some(Target::Tcp(addr)),
        _ => None,
    }
}

/// One event_stream connection, written in order by its own task.
fn open_stream(addr: SocketAddr) -> mpsc::UnboundedSender<Vec<u8>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            tracing::debug!(%addr, "event_stream connect failed");
            return;
        };
        while let Some(bytes) = rx.recv().await {
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    tx
}
