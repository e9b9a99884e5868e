//! The gateway's own accept loop: HTTP/1 with upgrades (hyper) around the axum router, with a
//! handshake timeout that `axum::serve` lacks.
//!
//! Every accepted TCP connection must send its request headers within `handshake_timeout_ms`
//! (half-sent requests and silent connections are closed), and stays open for HTTP at most that
//! long: then it is shut down gracefully, an idle keep-alive connection at once, a request in
//! flight (a REST call waiting for its command) after its answer, within [`REQUEST_GRACE`].
//! Upgraded WebSockets are not affected: hyper's connection future completes when the
//! connection is upgraded, and the socket then belongs to the WebSocket task. On shutdown no
//! new connection is accepted and pending HTTP exchanges are ended gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;

/// How long a request in flight at the connection's deadline may still take.
const REQUEST_GRACE: Duration = Duration::from_secs(30);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections until shutdown; each is served in a task tracked by `shared.tasks`.
pub(crate) async fn accept_loop(listener: TcpListener, app: Router, shared: &Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared
                    .tasks
                    .spawn(serve_http(stream, peer, app.clone(), shared.clone()));
            }
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// The most a request's line and headers may take (a WebSocket upgrade, a REST request with its
/// query): past it hyper answers 431 and closes.
pub const REQUEST_HEAD_LIMIT: usize = 32 * 1024;

/// The most header fields a request may have (431 past it).
pub const MAX_REQUEST_HEADERS: usize = 100;

/// The router with the peer's address in every request (`ConnectInfo<SocketAddr>`: sign-in
/// failures are counted per source address).
fn with_peer(
    app: Router,
    peer: SocketAddr,
) -> impl tower::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    use tower::ServiceExt as _;
    app.map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        request
    })
}

/// Serves one TCP connection's HTTP exchange, bounded by the handshake timeout.
async fn serve_http(stream: TcpStream, peer: SocketAddr, app: Router, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout)
        .max_header_size(REQUEST_HEAD_LIMIT)
        .max_headers(MAX_REQUEST_HEADERS)
        .serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(with_peer(app, peer)),
        )
        .with_upgrades();
    tokio::pin!(connection);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    tokio::select! {
        done = connection.as_mut() => {
            if let Err(err) = done {
                tracing::debug!(%err, %peer, "HTTP connection error");
            }
        }
        _ = deadline.as_mut() => {
            tracing::debug!(%peer, "HTTP connection open for {timeout:?}: closing it once idle");
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = tokio::time::sleep(REQUEST_GRACE) => {}
            }
        }
        _ = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = deadline.as_mut() => {}
            }
        }
    }
}
