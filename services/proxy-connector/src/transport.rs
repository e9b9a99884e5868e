//! MI transports: `mi_datagram` (one JSON-RPC request per UDP datagram, replies correlated by
//! id, in any order) and `mi_http` (`POST` of the same JSON). Both bound the requests in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, oneshot};

use base64::Engine as _;
use callapi_kit::secret::{Secret, redact_url};

use crate::envelope::{self, MiOutcome};
use crate::fair::{Class, FairLimiter, Limits};

/// Largest datagram OpenSIPS sends (mi_datagram caps replies at 65,457 bytes).
const MAX_DATAGRAM: usize = 65_535;

/// Where a node's MI listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MiEndpoint {
    /// `udp:HOST:PORT`: mi_datagram.
    Udp(String),
    /// `http://[USER:PASSWORD@]HOST:PORT/PATH`: mi_http. The URL is kept without its userinfo
    /// (so it can be logged and quoted in errors); the credentials, if any, become an
    /// `Authorization: Basic` header (for an OpenSIPS behind an authenticating proxy).
    Http {
        /// The URL without credentials.
        uri: hyper::Uri,
        /// `Basic …` value of the Authorization header.
        authorization: Option<Secret>,
    },
}

impl MiEndpoint {
    /// Parses `udp:HOST:PORT` or an `http://` URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(addr) = text.strip_prefix("udp:") {
            return Ok(Self::Udp(addr.to_owned()));
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let (authority_end, _) = rest
                .char_indices()
                .find(|(_, c)| matches!(c, '/' | '?' | '#'))
                .unwrap_or((rest.len(), ' '));
            let (authority, path) = rest.split_at(authority_end);
            let (userinfo, host) = match authority.rsplit_once('@') {
                Some((userinfo, host)) => (Some(userinfo), host),
                None => (None, authority),
            };
            let shown = redact_url(text);
            let uri: hyper::Uri = format!("http://{host}{path}")
                .parse()
                .map_err(|e| format!("bad MI URL {shown:?}: {e}"))?;
            let authorization = userinfo.map(|userinfo| {
                Secret::new(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(userinfo)
                ))
            });
            return Ok(Self::Http { uri, authorization });
        }
        Err(format!(
            "MI address {:?} must be udp:HOST:PORT or http://HOST:PORT/mi",
            redact_url(text)
        ))
    }
}

/// Why an MI request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The method or params were refused before sending.
    #[error("{0}")]
    BadMethod(String),
    /// No answer within the timeout.
    #[error("OpenSIPS MI at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// The node could not be reached at all.
    #[error("OpenSIPS MI at {0} is unreachable: {1}")]
    Unreachable(String, String),
    /// The answer was not a JSON-RPC reply.
    #[error("{0}")]
    BadReply(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<MiOutcome>>>>;

/// An open MI transport to one node.
pub struct MiTransport {
    kind: Kind,
    limit: FairLimiter,
    next_id: AtomicU64,
}

enum Kind {
    Udp {
        socket: Arc<UdpSocket>,
        target: String,
        pending: Pending,
        receiver: tokio::task::JoinHandle<()>,
    },
    Http {
        uri: hyper::Uri,
        authorization: Option<Secret>,
        client: hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            Full<Bytes>,
        >,
    },
}

impl Drop for MiTransport {
    fn drop(&mut self) {
        if let Kind::Udp { receiver, .. } = &self.kind {
            receiver.abort();
        }
    }
}

impl MiTransport {
    /// Opens the transport (binds the UDP socket, or prepares the HTTP client); `limits` bound
    /// the requests in flight (see [`crate::fair`]).
    pub async fn open(endpoint: MiEndpoint, limits: Limits) -> std::io::Result<Self> {
        let kind = match endpoint {
            MiEndpoint::Udp(target) => {
                let resolved: SocketAddr = tokio::net::lookup_host(target.as_str())
                    .await?
                    .next()
                    .ok_or_else(|| {
                    std::io::Error::other(format!("{target} does not resolve"))
                })?;
                let bind: SocketAddr = if resolved.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(bind).await?;
                socket.connect(resolved).await?;
                let socket = Arc::new(socket);
                let pending: Pending = Arc::default();
                let receiver = tokio::spawn(receive_replies(socket.clone(), pending.clone()));
                Kind::Udp {
                    socket,
                    target,
                    pending,
                    receiver,
                }
            }
            MiEndpoint::Http { uri, authorization } => {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                Kind::Http {
                    uri,
                    authorization,
                    client,
                }
            }
        };
        Ok(Self {
            kind,
            limit: FairLimiter::new(limits),
            next_id: AtomicU64::new(1),
        })
    }

    /// Sends one MI command of `client` and waits (at most `timeout`, queueing for a fair
    /// share of the node's slots included) for its outcome.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        timeout: Duration,
        client: &str,
    ) -> Result<MiOutcome, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = envelope::build_request(id, method, params.as_ref())
            .map_err(TransportError::BadMethod)?;
        let work = async {
            let _permit = self.limit.acquire(client, Class::of(method)).await;
            match &self.kind {
                Kind::Udp {
                    socket,
                    target,
                    pending,
                    ..
                } => {
                    let (tx, rx) = oneshot::channel();
                    pending.lock().await.insert(id, tx);
                    let _guard = PendingGuard {
                        pending: pending.clone(),
                        id,
                    };
                    socket
                        .send(&body)
                        .await
                        .map_err(|e| TransportError::Unreachable(target.clone(), e.to_string()))?;
                    rx.await
                        .map_err(|_| TransportError::Unreachable(target.clone(), "closed".into()))
                }
                Kind::Http {
                    uri,
                    authorization,
                    client,
                } => {
                    let mut request = hyper::Request::post(uri.clone())
                        .header("content-type", "application/json");
                    if let Some(authorization) = authorization {
                        request = request.header("authorization", authorization.expose());
                    }
                    let request = request
                        .body(Full::new(Bytes::from(body)))
                        .map_err(|e| TransportError::BadMethod(e.to_string()))?;
                    let response = client
                        .request(request)
                        .await
                        .map_err(|e| TransportError::Unreachable(uri.to_string(), e.to_string()))?;
                    let bytes = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| TransportError::Unreachable(uri.to_string(), e.to_string()))?
                        .to_bytes();
                    envelope::parse_reply(&bytes)
                        .map(|(_, outcome)| outcome)
                        .map_err(TransportError::BadReply)
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(self.target(), timeout)),
        }
    }

    fn target(&self) -> String {
        match &self.kind {
            Kind::Udp { target, .. } => format!("udp:{target}"),
            Kind::Http { uri, .. } => uri.to_string(),
        }
    }
}

/// Removes a pending UDP request however its wait ends (reply, timeout, cancel).
struct PendingGuard {
    pending: Pending,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let pending = self.pending.clone();
        let id = self.id;
        if let Ok(mut map) = pending.try_lock() {
            map.remove(&id);
        } else {
            tokio::spawn(async move {
                pending.lock().await.remove(&id);
            });
        }
    }
}

async fn receive_replies(socket: Arc<UdpSocket>, pending: Pending) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            Err(err) => {
                // ICMP port unreachable shows up here while OpenSIPS is down: keep listening.
                tracing::debug!(%err, "MI datagram receive error");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        match envelope::parse_reply(&buf[..len]) {
            Ok((Some(id), outcome)) => {
                if let Some(tx) = pending.lock().await.remove(&id) {
                    let _ = tx.send(outcome);
                } else {
                    tracing::debug!(id, "MI reply for no pending request (late?)");
                }
            }
            Ok((None, outcome)) => tracing::warn!(?outcome, "MI reply without a usable id"),
            Err(reason) => tracing::warn!(%reason, "unusable MI datagram"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_mi_url_become_a_header_and_leave_the_url() {
        let MiEndpoint::Http { uri, authorization } =
            MiEndpoint::parse("http://admin:hunter2@127.0.0.1:18888/mi").unwrap()
        else {
            panic!("not http")
        };
        assert_eq!(uri.to_string(), "http://127.0.0.1:18888/mi");
        let authorization = authorization.expect("authorization");
        assert_eq!(authorization.expose(), "Basic YWRtaW46aHVudGVyMg==");
        assert_eq!(format!("{authorization:?}"), "***");
        let MiEndpoint::Http { authorization, .. } =
            MiEndpoint::parse("http://127.0.0.1:8888/mi").unwrap()
        else {
            panic!("not http")
        };
        assert!(authorization.is_none());
        let err = MiEndpoint::parse("ftp://admin:hunter2@h/mi").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
