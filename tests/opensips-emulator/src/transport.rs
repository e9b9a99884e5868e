//! The MI listeners: `mi_datagram` (one JSON-RPC request per UDP datagram, the reply to the
//! sender) and `mi_http` (`POST /mi`), plus the emulator's own `POST /emulator/call` and
//! `POST /emulator/hangup` test hooks. Requests run concurrently; each reply goes out when its
//! command completes. A crashed node closes its listeners and answers nothing more.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::Version;
use crate::mi::{self, Envelope, MiError};
use crate::node::Node;
use crate::phones::Phones;

/// Handles one raw request; `None` means no reply at all.
pub async fn handle(node: &Arc<Node>, bytes: &[u8], over_udp: bool) -> Option<Vec<u8>> {
    if node.crashed() {
        return None;
    }
    let reply = match mi::envelope(bytes) {
        Envelope::ParseError => Some(b"400 Parse_error".to_vec()),
        Envelope::NoMethod { id } => {
            if over_udp && node.version() == Version::V4_0 {
                node.crash();
                return None;
            }
            id.map(|id| mi::reply(&id, &Err(MiError::invalid_request())))
        }
        Envelope::Invalid { id } => id.map(|id| mi::reply(&id, &Err(MiError::invalid_request()))),
        Envelope::Call { id, method, params } => {
            tracing::debug!(%method, %params, "MI request");
            let result = node.call(&method, &params).await;
            id.map(|id| mi::reply(&id, &result))
        }
    };
    // A node that crashed meanwhile does not answer.
    reply.filter(|_| !node.crashed())
}

/// Serves mi_datagram on `socket` until `stop` or a crash.
pub async fn serve_udp(socket: UdpSocket, node: Arc<Node>, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let crashed = node.crash_token();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, from) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = crashed.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(err) => {
                    // E.g. an ICMP port unreachable reported on Windows-like stacks: go on.
                    tracing::debug!(%err, "mi_datagram receive");
                    continue;
                }
            },
        };
        let request = buf[..len].to_vec();
        let node = node.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Some(reply) = handle(&node, &request, true).await {
                // mi_datagram caps replies at 65,457 bytes.
                let reply = &reply[..reply.len().min(65_457)];
                if let Err(err) = socket.send_to(reply, from).await {
                    tracing::debug!(%err, %from, "mi_datagram reply not sent");
                }
            }
        });
    }
}

/// Serves mi_http on `listener` until `stop` or a crash.
pub async fn serve_http(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let crashed = node.crash_token();
    let app = Router::new()
        .route("/mi", post(http_mi))
        .route("/emulator/call", post(http_place_call))
        .route("/emulator/hangup", post(http_hang_up))
        .with_state(node);
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = crashed.cancelled() => {}
        served = axum::serve(listener, app).into_future() => {
            if let Err(err) = served {
                tracing::warn!(%err, "mi_http stopped");
            }
        }
    }
}

async fn http_mi(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    // OpenSIPS carries on with a command whose HTTP client went away (the SIP transaction of a
    // t_uac_dlg lives on): run it apart from this request, which may be dropped.
    let work = tokio::spawn({
        let node = node.clone();
        async move { handle(&node, &body, false).await }
    });
    match work.await.ok().flatten() {
        Some(reply) => ([("content-type", "application/json")], reply).into_response(),
        None if node.crashed() => {
            // A crashed OpenSIPS answers nothing: the request hangs until the client gives up.
            std::future::pending::<()>().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        None => StatusCode::OK.into_response(),
    }
}

fn bad_request(text: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, text).into_response()
}

async fn http_place_call(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    if node.crashed() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let usage = "expected {\"from\": USER, \"to\": USER, \"phones\": \"pyua\"|\"baresip\"}";
    let (Some(from), Some(to)) = (request["from"].as_str(), request["to"].as_str()) else {
        return bad_request(usage);
    };
    let phones = match request.get("phones").and_then(Value::as_str) {
        None | Some("pyua") => Phones::Pyua,
        Some("baresip") => Phones::Baresip,
        Some(_) => return bad_request(usage),
    };
    let callid = node.place_call(from, to, phones).await;
    axum::Json(json!({"callid": callid})).into_response()
}

async fn http_hang_up(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    if node.crashed() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(callid) = request["callid"].as_str() else {
        return bad_request("expected {\"callid\": CALL_ID}");
    };
    if node.hang_up(callid) {
        axum::Json(json!({"callid": callid})).into_response()
    } else {
        (StatusCode::NOT_FOUND, "no such call").into_response()
    }
}
