//! The MI listeners: `mi_datagram` (one JSON-RPC request per UDP datagram, the reply to the
//! sender) and `mi_http` (`POST /mi`), plus the emulator's own test hooks on the mi_http port
//! (`POST /emulator/call`, `POST /emulator/hangup`, `GET /emulator/stats`). A crashed node
//! closes its listeners and answers nothing more.
//!
//! The two transports differ as on OpenSIPS. mi_datagram runs requests concurrently and sends
//! each reply as soon as its command completed. mi_http is OpenSIPS's single httpd process: it
//! serves one request at a time (the others wait), and for an asynchronous command
//! (`t_uac_dlg`) it checks for the reply every poll step (500 ms), sleeping in between
//! (`mi_json_wait_async_reply` in `modules/mi_http/mi_http.c`), so that reply goes out at the
//! first step after the command completed and everything behind it waits that long too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Version;
use crate::mi::{self, Envelope, MiError};
use crate::node::{Answer, Node};
use crate::phones::Phones;

/// mi_datagram's reply when no response could be built (no JSON, no id).
pub const INTERNAL_ERROR: &[u8] = b"500 Internal error";

/// How long mi_http waits for an async reply before it gives up and answers HTTP 500
/// (`MI_JSON_MAX_WAIT`: 2*60*4 steps of 500 ms, 4 minutes, whatever the emulator's step).
const GIVE_UP: Duration = Duration::from_secs(240);

/// What to send back for one raw request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Nothing: a request without an id, or a crashed node.
    Silent,
    /// A JSON-RPC reply, or the plain text `400 Parse_error`.
    Body(Vec<u8>),
    /// No response could be built (out of shared memory): mi_datagram sends
    /// [`INTERNAL_ERROR`], mi_http an HTTP 500 with an empty body.
    InternalError,
}

/// One handled request.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// What to send back.
    pub reply: Reply,
    /// Whether the reply came through an async handler (mi_http only sees it at a poll step).
    pub asynchronous: bool,
}

impl Handled {
    fn now(reply: Option<Vec<u8>>) -> Self {
        Self {
            reply: reply.map_or(Reply::Silent, Reply::Body),
            asynchronous: false,
        }
    }
}

/// Handles one raw request.
pub async fn handle(node: &Arc<Node>, bytes: &[u8], over_udp: bool) -> Handled {
    if node.crashed() {
        return Handled::now(None);
    }
    let handled = match mi::envelope(bytes) {
        Envelope::ParseError => Handled::now(Some(b"400 Parse_error".to_vec())),
        Envelope::NoMethod { id } => {
            if over_udp && node.version() == Version::V4_0 {
                node.crash();
                return Handled::now(None);
            }
            Handled::now(id.map(|id| mi::reply(&id, &Err(MiError::invalid_request()))))
        }
        Envelope::Invalid { id } => {
            Handled::now(id.map(|id| mi::reply(&id, &Err(MiError::invalid_request()))))
        }
        Envelope::Call { id, method, params } => {
            tracing::debug!(%method, %params, "MI request");
            match node.call(&method, &params).await {
                Answer::Now(result) => Handled::now(id.map(|id| mi::reply(&id, &result))),
                Answer::Async(result) => Handled {
                    reply: id.map_or(Reply::Silent, |id| Reply::Body(mi::reply(&id, &result))),
                    asynchronous: true,
                },
                Answer::NoMemory => {
                    if over_udp {
                        tracing::error!("ERROR:mi_datagram:build_async_handler: no more shm mem");
                        tracing::error!(
                            %method,
                            "ERROR:mi_datagram:mi_datagram_callback: failed to build async handler"
                        );
                    } else {
                        tracing::error!("ERROR:mi_http:mi_json_build_async_handler: oom");
                        tracing::error!(
                            %method,
                            "ERROR:mi_http:mi_http_run_mi_cmd: failed to build async handler"
                        );
                        tracing::error!(
                            "ERROR:mi_http:mi_json_answer_to_connection: failed to build response"
                        );
                    }
                    Handled {
                        reply: Reply::InternalError,
                        asynchronous: false,
                    }
                }
            }
        }
    };
    // A node that crashed meanwhile does not answer.
    if node.crashed() {
        return Handled::now(None);
    }
    handled
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
            let reply = match handle(&node, &request, true).await.reply {
                Reply::Silent => return,
                Reply::Body(reply) => reply,
                Reply::InternalError => INTERNAL_ERROR.to_vec(),
            };
            // mi_datagram caps replies at 65,457 bytes.
            let reply = &reply[..reply.len().min(65_457)];
            if let Err(err) = socket.send_to(reply, from).await {
                tracing::debug!(%err, %from, "mi_datagram reply not sent");
            }
        });
    }
}

/// The mi_http listener's state.
#[derive(Clone)]
struct Http {
    node: Arc<Node>,
    /// Held while the one httpd process serves an MI request.
    httpd: Arc<tokio::sync::Mutex<()>>,
}

/// Serves mi_http on `listener` until `stop` or a crash.
pub async fn serve_http(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let crashed = node.crash_token();
    let app = Router::new()
        .route("/mi", post(http_mi))
        .route("/emulator/call", post(http_place_call))
        .route("/emulator/hangup", post(http_hang_up))
        .route("/emulator/stats", get(http_stats))
        .route("/emulator/sip", get(http_sent))
        .with_state(Http {
            node,
            httpd: Arc::new(tokio::sync::Mutex::new(())),
        });
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

/// When mi_http sends the reply of an async command that began waiting at `began` and
/// completed at `done`: at the first poll step after it completed (never at once: the first
/// check comes right after the command was sent, long before any phone answered).
pub fn poll_deadline(began: Instant, done: Instant, poll: Duration) -> Instant {
    if poll.is_zero() {
        return done;
    }
    let waited = done.saturating_duration_since(began).as_nanos();
    let steps = waited.div_ceil(poll.as_nanos()).max(1);
    let steps = u32::try_from(steps).unwrap_or(u32::MAX);
    poll.checked_mul(steps)
        .and_then(|wait| began.checked_add(wait))
        .unwrap_or(done)
}

/// What mi_http answers.
enum HttpReply {
    /// 200 with a JSON body (or mi's plain text parse error).
    Body(Vec<u8>),
    /// 202, empty: a request without an id.
    Accepted,
    /// 500, empty: no response could be built.
    InternalError,
    /// Nothing ever (crashed node).
    Silent,
}

/// Runs one MI request as the single httpd process does: one at a time; an async command's
/// reply only at a poll step.
async fn serve_mi(http: Http, body: Bytes) -> HttpReply {
    let _busy = http.httpd.lock().await;
    let node = http.node;
    let poll = node.mi_http_poll();
    let began = Instant::now();
    // The command runs apart: if mi_http gives up waiting, the SIP transaction lives on.
    let command = tokio::spawn({
        let node = node.clone();
        async move { handle(&node, &body, false).await }
    });
    let handled = match tokio::time::timeout(GIVE_UP, command).await {
        Ok(Ok(handled)) => handled,
        Ok(Err(_)) => return HttpReply::InternalError,
        Err(_) => {
            tracing::info!("INFO:mi_http:mi_json_wait_async_reply: exiting before receiving reply");
            tracing::error!("ERROR:mi_http:mi_json_answer_to_connection: failed to build response");
            return HttpReply::InternalError;
        }
    };
    if handled.asynchronous {
        tokio::time::sleep_until(poll_deadline(began, Instant::now(), poll)).await;
    }
    if node.crashed() {
        return HttpReply::Silent;
    }
    match handled.reply {
        Reply::Body(bytes) => HttpReply::Body(bytes),
        Reply::Silent => HttpReply::Accepted,
        Reply::InternalError => HttpReply::InternalError,
    }
}

async fn http_mi(State(http): State<Http>, body: Bytes) -> Response {
    // OpenSIPS carries on with a request whose HTTP client went away (the httpd stays busy
    // with it, the SIP transaction of a t_uac_dlg lives on): run it apart from this handler,
    // which may be dropped.
    let work = tokio::spawn(serve_mi(http, body));
    match work.await.unwrap_or(HttpReply::InternalError) {
        HttpReply::Body(reply) => ([("content-type", "application/json")], reply).into_response(),
        HttpReply::Accepted => StatusCode::ACCEPTED.into_response(),
        HttpReply::InternalError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
        )
            .into_response(),
        HttpReply::Silent => {
            // A crashed OpenSIPS answers nothing: the request hangs until the client gives up.
            std::future::pending::<()>().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

async fn http_stats(State(http): State<Http>) -> Response {
    axum::Json(http.node.stats()).into_response()
}

/// `GET /emulator/sip[?callid=CALL-ID]`: the SIP requests the node sent, oldest first.
async fn http_sent(
    State(http): State<Http>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    axum::Json(http.node.sent(query.get("callid").map(String::as_str))).into_response()
}

fn bad_request(text: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, text).into_response()
}

async fn http_place_call(State(http): State<Http>, body: Bytes) -> Response {
    let node = http.node;
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

async fn http_hang_up(State(http): State<Http>, body: Bytes) -> Response {
    let node = http.node;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_replies_go_out_at_the_first_poll_step_after_completion() {
        let began = Instant::now();
        let poll = Duration::from_millis(500);
        let at = |done_ms: u64| {
            poll_deadline(began, began + Duration::from_millis(done_ms), poll)
                .duration_since(began)
                .as_millis()
        };
        assert_eq!(at(0), 500);
        assert_eq!(at(1), 500);
        assert_eq!(at(499), 500);
        assert_eq!(at(500), 500);
        assert_eq!(at(501), 1000);
        assert_eq!(at(2_300), 2_500);
        let done = began + Duration::from_millis(7);
        assert_eq!(poll_deadline(began, done, Duration::ZERO), done);
    }
}
