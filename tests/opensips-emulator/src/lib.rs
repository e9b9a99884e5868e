//! An OpenSIPS stand-in for tests. It speaks OpenSIPS's real wire protocols — MI JSON-RPC over
//! `mi_datagram` (UDP) and `mi_http`, `event_subscribe` with real expiry, event_datagram and
//! event_stream notifications — and models dialogs and simulated phones so that every flow
//! produces the reply and event sequences recorded from a real OpenSIPS 3.6.8 (or, with
//! [`Version::V4_0`], 4.0.1), quirks included. It must never be kinder than the real thing.
#![forbid(unsafe_code)]

pub mod events;
pub mod mi;
pub mod node;
pub mod phones;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::mi::{Envelope, MiError};
use crate::node::Node;

/// Which OpenSIPS to behave like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// OpenSIPS 3.6.8: hold of both legs only.
    V3_6,
    /// OpenSIPS 4.0.1: per-leg hold, namespaced MI names, crash on a method-less datagram.
    V4_0,
}

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// mi_datagram listener (None: off).
    pub mi_udp: Option<SocketAddr>,
    /// mi_http listener (None: off).
    pub mi_http: Option<SocketAddr>,
    /// Behaviour.
    pub version: Version,
    /// How long answering phones take to answer.
    pub answer_delay: Duration,
    /// How long `noanswer` rings before 408 (fr_inv_timeout; real: 8 s).
    pub ring_timeout: Duration,
    /// How long `dead` takes to time out (fr_timeout; real: 4 s).
    pub dead_timeout: Duration,
    /// More users whose phones answer, besides alice, bob, cindy and dave.
    pub extra_phones: Vec<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            mi_udp: Some(local),
            mi_http: Some(local),
            version: Version::V3_6,
            answer_delay: Duration::from_millis(50),
            ring_timeout: Duration::from_secs(8),
            dead_timeout: Duration::from_secs(4),
            extra_phones: vec!["eve".to_owned(), "frank".to_owned()],
        }
    }
}

/// A running emulator.
pub struct Emulator {
    node: Arc<Node>,
    mi_udp: Option<SocketAddr>,
    mi_http: Option<SocketAddr>,
    stop: CancellationToken,
}

impl Emulator {
    /// Where mi_datagram listens.
    pub fn mi_udp_addr(&self) -> Option<SocketAddr> {
        self.mi_udp
    }

    /// Where mi_http listens (`POST /mi`).
    pub fn mi_http_addr(&self) -> Option<SocketAddr> {
        self.mi_http
    }

    /// A call placed by a phone, not through MI; returns its Call-ID. With
    /// `hangs_up_on_refer` the phones act like baresip (the transferee hangs the call up as
    /// soon as it accepted a REFER), else like pyua (it keeps the call until told).
    pub async fn place_call(
        &self,
        from_user: &str,
        to_user: &str,
        hangs_up_on_refer: bool,
    ) -> String {
        self.node
            .place_call(from_user, to_user, hangs_up_on_refer)
            .await
    }

    /// Whether the node crashed.
    pub fn crashed(&self) -> bool {
        self.node.crashed()
    }

    /// Stops every listener.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the emulator's listeners.
pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
    let event_socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    let stop = CancellationToken::new();
    let node = Node::new(config.clone(), event_socket);
    let mut mi_udp = None;
    if let Some(addr) = config.mi_udp {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        mi_udp = Some(socket.local_addr()?);
        tokio::spawn(serve_udp(
            socket,
            node.clone(),
            config.version,
            stop.clone(),
        ));
    }
    let mut mi_http = None;
    if let Some(addr) = config.mi_http {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        mi_http = Some(listener.local_addr()?);
        let app = Router::new()
            .route("/mi", post(http_mi))
            .route("/emulator/call", post(http_place_call))
            .with_state(node.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::warn!(%err, "mi_http stopped");
            }
        });
    }
    Ok(Emulator {
        node,
        mi_udp,
        mi_http,
        stop,
    })
}

/// Handles one raw request; `None` means no reply at all.
async fn handle(
    node: &Arc<Node>,
    bytes: &[u8],
    over_udp: bool,
    version: Version,
) -> Option<Vec<u8>> {
    if node.crashed() {
        return None;
    }
    match mi::envelope(bytes) {
        Envelope::ParseError => Some(b"400 Parse_error".to_vec()),
        Envelope::NoMethod { id } => {
            if over_udp && version == Version::V4_0 {
                node.crash();
                return None;
            }
            id.map(|id| mi::reply(&id, &Err(MiError::invalid_request())))
        }
        Envelope::Invalid { id } => id.map(|id| mi::reply(&id, &Err(MiError::invalid_request()))),
        Envelope::Call { id, method, params } => {
            tracing::debug!(%method, %params, "MI request");
            let result = node.call(&method, &params).await;
            if node.crashed() {
                return None;
            }
            id.map(|id| mi::reply(&id, &result))
        }
    }
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    node: Arc<Node>,
    version: Version,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, from) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(_) => continue,
            },
        };
        let request = buf[..len].to_vec();
        let node = node.clone();
        let socket = socket.clone();
        // Requests run concurrently; replies go out when each command completes.
        tokio::spawn(async move {
            if let Some(reply) = handle(&node, &request, true, version).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

async fn http_mi(State(node): State<Arc<Node>>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let version = node.version();
    match handle(&node, &body, false, version).await {
        Some(reply) => ([("content-type", "application/json")], reply).into_response(),
        None if node.crashed() => {
            // A crashed OpenSIPS does not answer at all: hold the connection, then drop it.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        None => axum::http::StatusCode::OK.into_response(),
    }
}

async fn http_place_call(State(node): State<Arc<Node>>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (Some(from), Some(to)) = (request["from"].as_str(), request["to"].as_str()) else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "expected {\"from\": USER, \"to\": USER, \"phones\": \"pyua\"|\"baresip\"}",
        )
            .into_response();
    };
    let hangs_up_on_refer = request["phones"].as_str() == Some("baresip");
    let callid = node.place_call(from, to, hangs_up_on_refer).await;
    axum::Json(json!({"callid": callid})).into_response()
}
