//! MI transports: `mi_datagram` (one JSON-RPC request per UDP datagram, one socket per request
//! in flight) and `mi_http` (`POST` of the same JSON), chosen per command: asynchronous ones
//! (`t_uac_dlg`) never go over mi_http. Requests in flight are bounded fairly and adaptively
//! ([`crate::fair`], [`crate::adaptive`]); an internal-error reply or a full queue is
//! [`TransportError::Overloaded`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use callapi_kit::secret::{Secret, percent_decode, redact_url};
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::adaptive::{Aimd, Signal};
use crate::envelope::{self, MiOutcome};
use crate::fair::{Class, FairLimiter, Limits, Permit};

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
            let authorization = match userinfo {
                Some(userinfo) => {
                    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                    let decode = |part: &str| {
                        percent_decode(part)
                            .ok_or_else(|| format!("bad %-escape in the credentials of {shown:?}"))
                    };
                    let (user, password) = (decode(user)?, decode(password)?);
                    Some(Secret::new(format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(format!(
                            "{}:{}",
                            user.expose(),
                            password.expose()
                        ))
                    )))
                }
                None => None,
            };
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
    /// The node is overloaded: OpenSIPS kept refusing the request, or too many requests wait.
    #[error("node overloaded: {0}")]
    Overloaded(String),
    /// OpenSIPS refused this request without carrying it out (its plain `500 Internal error`:
    /// out of shared memory); [`MiTransport::call`] sends it again after a pause.
    #[error("refused by OpenSIPS: {0}")]
    Refused(String),
}

/// An open MI channel to one node: what one kind of command travels on.
enum Channel {
    /// mi_datagram: one socket per request in flight (kept in a pool), so that a reply with no
    /// usable id — the plain text `500 Internal error` OpenSIPS sends when it is out of shared
    /// memory — still belongs to exactly one request.
    Udp {
        target: SocketAddr,
        label: String,
        idle: std::sync::Mutex<Vec<Lane>>,
    },
    /// mi_http: one POST per request.
    Http {
        uri: hyper::Uri,
        authorization: Option<Secret>,
        /// Boxed: the client is large, and a channel is mostly the UDP kind.
        client: Box<
            hyper_util::client::legacy::Client<
                hyper_util::client::legacy::connect::HttpConnector,
                Full<Bytes>,
            >,
        >,
    },
}

/// A UDP socket connected to the node, with its receive buffer.
struct Lane {
    socket: UdpSocket,
    buffer: Vec<u8>,
}

/// Idle UDP sockets kept per node for the next requests.
const MAX_IDLE_LANES: usize = 256;

/// An open MI transport to one node.
pub struct MiTransport {
    /// Synchronous commands (answered at once).
    sync: Channel,
    /// Asynchronous commands (`t_uac_dlg`): never mi_http, whose single process answers them
    /// only at its next 500 ms poll step and serves nothing else meanwhile.
    asynchronous: Channel,
    limit: FairLimiter,
    next_id: AtomicU64,
}

/// How the node's MI is reached, per kind of command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MiRoutes {
    /// Where synchronous commands go.
    pub sync: MiEndpoint,
    /// Where asynchronous commands (`t_uac_dlg`) go: always mi_datagram.
    pub asynchronous: MiEndpoint,
}

impl MiRoutes {
    /// The routes of a node with MI at `mi` and, optionally, asynchronous commands at
    /// `mi_async`; refused if asynchronous commands would go over mi_http.
    pub fn new(mi: &str, mi_async: Option<&str>) -> Result<Self, String> {
        let sync = MiEndpoint::parse(mi)?;
        let asynchronous = match mi_async {
            Some(text) => MiEndpoint::parse(text)?,
            None => sync.clone(),
        };
        if matches!(asynchronous, MiEndpoint::Http { .. }) {
            return Err(
                "asynchronous MI commands (t_uac_dlg) must not go over mi_http: OpenSIPS answers \
                 them only at its next 500 ms poll step, one at a time; set mi = \"udp:HOST:PORT\" \
                 (mi_datagram), or keep mi_http for the rest and add mi_async = \"udp:HOST:PORT\""
                    .to_owned(),
            );
        }
        Ok(Self { sync, asynchronous })
    }

    /// How each kind travels, for the logs (no credentials).
    pub fn describe(&self) -> String {
        format!(
            "synchronous commands over {}, asynchronous (t_uac_dlg) over {}",
            self.sync.describe(),
            self.asynchronous.describe()
        )
    }
}

impl MiEndpoint {
    /// The transport and address, without credentials.
    pub fn describe(&self) -> String {
        match self {
            MiEndpoint::Udp(target) => format!("mi_datagram udp:{target}"),
            MiEndpoint::Http { uri, .. } => format!("mi_http {uri}"),
        }
    }
}

impl Channel {
    async fn open(endpoint: MiEndpoint) -> std::io::Result<Self> {
        Ok(match endpoint {
            MiEndpoint::Udp(target) => {
                let resolved: SocketAddr = tokio::net::lookup_host(target.as_str())
                    .await?
                    .next()
                    .ok_or_else(|| {
                    std::io::Error::other(format!("{target} does not resolve"))
                })?;
                Channel::Udp {
                    target: resolved,
                    label: format!("udp:{target}"),
                    idle: std::sync::Mutex::new(Vec::new()),
                }
            }
            MiEndpoint::Http { uri, authorization } => {
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                // Small requests and replies: never wait for a delayed ACK.
                connector.set_nodelay(true);
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(connector);
                Channel::Http {
                    uri,
                    authorization,
                    client: Box::new(client),
                }
            }
        })
    }

    fn label(&self) -> String {
        match self {
            Channel::Udp { label, .. } => label.clone(),
            Channel::Http { uri, .. } => uri.to_string(),
        }
    }

    /// One request/reply exchange, without a time limit (the caller sets it).
    async fn exchange(&self, id: u64, body: &[u8]) -> Result<MiOutcome, TransportError> {
        match self {
            Channel::Udp {
                target,
                label,
                idle,
            } => {
                let mut lane = match idle.lock().ok().and_then(|mut lanes| lanes.pop()) {
                    Some(lane) => lane,
                    None => Lane::open(*target)
                        .await
                        .map_err(|e| TransportError::Unreachable(label.clone(), e.to_string()))?,
                };
                let outcome = lane.exchange(id, body, label).await;
                // A lane is reused only after a clean exchange: after a timeout or an error a
                // late reply could still arrive on it (the future is dropped with the lane).
                if outcome.is_ok()
                    && let Ok(mut lanes) = idle.lock()
                    && lanes.len() < MAX_IDLE_LANES
                {
                    lanes.push(lane);
                }
                outcome
            }
            Channel::Http {
                uri,
                authorization,
                client,
            } => {
                let mut request =
                    hyper::Request::post(uri.clone()).header("content-type", "application/json");
                if let Some(authorization) = authorization {
                    request = request.header("authorization", authorization.expose());
                }
                let request = request
                    .body(Full::new(Bytes::from(body.to_vec())))
                    .map_err(|e| TransportError::BadMethod(e.to_string()))?;
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| TransportError::Unreachable(uri.to_string(), e.to_string()))?;
                let status = response.status();
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| TransportError::Unreachable(uri.to_string(), e.to_string()))?
                    .to_bytes();
                if status.is_server_error() || is_internal_error(&bytes) {
                    return Err(TransportError::Refused(format!(
                        "OpenSIPS answered HTTP {status}: {}",
                        snippet(&bytes)
                    )));
                }
                envelope::parse_reply(&bytes)
                    .map(|(_, outcome)| outcome)
                    .map_err(TransportError::BadReply)
            }
        }
    }
}

impl Lane {
    async fn open(target: SocketAddr) -> std::io::Result<Self> {
        let bind: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(target).await?;
        Ok(Self {
            socket,
            buffer: vec![0u8; MAX_DATAGRAM],
        })
    }

    async fn exchange(
        &mut self,
        id: u64,
        body: &[u8],
        label: &str,
    ) -> Result<MiOutcome, TransportError> {
        let unreachable =
            |e: std::io::Error| TransportError::Unreachable(label.to_owned(), e.to_string());
        self.socket.send(body).await.map_err(unreachable)?;
        loop {
            // A refused port shows up here (ICMP port unreachable on a connected socket).
            let len = self
                .socket
                .recv(&mut self.buffer)
                .await
                .map_err(unreachable)?;
            let reply = &self.buffer[..len];
            if is_internal_error(reply) {
                return Err(TransportError::Refused(format!(
                    "OpenSIPS answered {:?} (out of shared memory?)",
                    snippet(reply)
                )));
            }
            match envelope::parse_reply(reply) {
                Ok((Some(reply_id), outcome)) if reply_id == id => return Ok(outcome),
                Ok((Some(other), _)) => {
                    tracing::debug!(other, id, "MI reply for an earlier request on this socket");
                }
                Ok((None, outcome)) => return Ok(outcome),
                Err(reason) => return Err(TransportError::BadReply(reason)),
            }
        }
    }
}

/// Times a request refused by OpenSIPS is sent again (within its timeout).
const MAX_RETRIES: u32 = 8;

/// Pause before sending a refused request again: doubling from 40 ms up to 640 ms, spread by
/// the request id so that refused requests do not all come back at once.
fn retry_pause(attempt: u32, id: u64) -> Duration {
    let base = 20u64 << attempt.min(5);
    Duration::from_millis(base + (id % 7) * base / 8)
}

/// Whether a reply is OpenSIPS's plain-text internal error (e.g. mi_datagram's async handler
/// could not be built: no shared memory left).
fn is_internal_error(reply: &[u8]) -> bool {
    reply.trim_ascii().starts_with(b"500 ")
}

/// Whether an MI error says OpenSIPS ran out of resources after acting: a 500 (`dlg_end_dlg`
/// ended the dialog but could not send its BYE: "Operation failed"). The error still goes back
/// to the requester.
fn is_resource_error(outcome: &MiOutcome) -> bool {
    matches!(outcome, MiOutcome::Error { code: 500, .. })
}

/// Whether an MI error says the command handler returned nothing ("Command handler returned
/// null": it could not allocate its reply, and changed nothing), so it may be sent again.
fn is_null_handler(outcome: &MiOutcome) -> bool {
    matches!(
        outcome,
        MiOutcome::Error {
            code: -32000,
            data: Some(Value::String(data)),
            ..
        } if data.contains("returned null")
    )
}

fn snippet(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(120)])
        .trim()
        .to_owned()
}

impl MiTransport {
    /// Opens the node's channels; `limits` and `adaptive` bound the requests in flight (see
    /// [`crate::fair`] and [`crate::adaptive`]).
    pub async fn open(routes: MiRoutes, limits: Limits, adaptive: Aimd) -> std::io::Result<Self> {
        Ok(Self {
            sync: Channel::open(routes.sync).await?,
            asynchronous: Channel::open(routes.asynchronous).await?,
            limit: FairLimiter::new(limits, adaptive),
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
        self.call_keeping(method, params, timeout, client, false)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// As [`MiTransport::call`]; with `keep`, the request takes a long slot and, when OpenSIPS
    /// answers with a result, the slot is returned kept instead of freed ([`Permit::keep`]):
    /// the command's effect goes on holding the node's memory (a REFERed INVITE ringing) until
    /// the permit is dropped, while its place among the requests on the wire is free.
    pub async fn call_keeping(
        &self,
        method: &str,
        params: Option<Value>,
        timeout: Duration,
        client: &str,
        keep: bool,
    ) -> Result<(MiOutcome, Option<Permit>), TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = envelope::build_request(id, method, params.as_ref())
            .map_err(TransportError::BadMethod)?;
        let class = Class::of(method);
        let channel = match class {
            Class::Short => &self.sync,
            Class::Long => &self.asynchronous,
        };
        let slot_class = if keep { Class::Long } else { class };
        let work = async {
            let mut attempt = 0u32;
            loop {
                let permit = self
                    .limit
                    .acquire(client, slot_class)
                    .await
                    .map_err(|full| TransportError::Overloaded(format!("{full}; not sent")))?;
                let sent = Instant::now();
                let outcome = match channel.exchange(id, &body).await {
                    // A handler that could not allocate its reply did nothing: as refused.
                    Ok(outcome) if is_null_handler(&outcome) => Err(TransportError::Refused(
                        "OpenSIPS's command handler returned null (out of shared memory?)"
                            .to_owned(),
                    )),
                    other => other,
                };
                let signal = match &outcome {
                    Ok(outcome) if is_resource_error(outcome) => Signal::Overload,
                    Ok(_) => Signal::Answered {
                        short: class == Class::Short,
                        latency: sent.elapsed(),
                    },
                    Err(TransportError::Refused(_)) => Signal::Overload,
                    Err(_) => Signal::Neutral,
                };
                self.limit.observe(signal);
                match outcome {
                    Ok(outcome @ MiOutcome::Result(_)) if keep => {
                        return Ok((outcome, Some(permit.keep())));
                    }
                    // OpenSIPS did not carry it out (no memory for it): safe to send again,
                    // once the lowered limit and a pause have given the node room.
                    // The slot stays taken during the pause: given back at once it would go
                    // to the next waiting request, refused in turn, hundreds of times before
                    // the lowered limit takes effect.
                    Err(TransportError::Refused(reason)) => {
                        attempt += 1;
                        if attempt > MAX_RETRIES {
                            return Err(TransportError::Overloaded(format!(
                                "{reason}; refused {attempt} times"
                            )));
                        }
                        tokio::time::sleep(retry_pause(attempt, id)).await;
                        drop(permit);
                    }
                    other => return other.map(|outcome| (outcome, None)),
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                // A short command unanswered in time is a sign of overload too (a long one may
                // just be a phone that keeps ringing).
                if class == Class::Short {
                    self.limit.observe(Signal::Overload);
                }
                Err(TransportError::Timeout(channel.label(), timeout))
            }
        }
    }

    /// The node's current limit of MI requests in flight.
    pub fn limit(&self) -> usize {
        self.limit.limit()
    }

    /// MI requests holding a slot and MI requests waiting for one, now.
    pub fn load(&self) -> (usize, usize) {
        self.limit.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> (Limits, Aimd) {
        (
            Limits {
                total: 8,
                long: 6,
                long_per_client: 6,
                max_queued: 16,
            },
            Aimd::new(1, 8, 8, Duration::from_millis(500), Duration::ZERO),
        )
    }

    /// A fake mi_datagram node answering each request with `reply(request)`.
    async fn fake_node(reply: fn(&Value) -> Vec<u8>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let request: Value = serde_json::from_slice(&buf[..len]).unwrap_or_default();
                let _ = socket.send_to(&reply(&request), from).await;
            }
        });
        addr
    }

    async fn transport_to(addr: SocketAddr) -> MiTransport {
        let (limits, aimd) = limits();
        let routes = MiRoutes::new(&format!("udp:{addr}"), None).unwrap();
        MiTransport::open(routes, limits, aimd).await.unwrap()
    }

    #[tokio::test]
    async fn a_plain_internal_error_is_retried_then_overload_and_lowers_the_limit() {
        let addr = fake_node(|_| b"500 Internal error\n".to_vec()).await;
        let transport = transport_to(addr).await;
        let outcome = transport
            .call("t_uac_dlg", None, Duration::from_secs(10), "t/c")
            .await;
        let Err(TransportError::Overloaded(reason)) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.contains("refused 9 times"), "{reason}");
        assert!(transport.limit() < 8, "limit {}", transport.limit());
    }

    #[tokio::test]
    async fn a_request_refused_once_goes_through_when_sent_again() {
        static SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let addr = fake_node(|request| {
            if SEEN.fetch_add(1, Ordering::SeqCst) == 0 {
                b"500 Internal error".to_vec()
            } else {
                serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": request["id"], "result": "OK"}))
                    .unwrap()
            }
        })
        .await;
        let transport = transport_to(addr).await;
        let outcome = transport
            .call("t_uac_dlg", None, Duration::from_secs(2), "t/c")
            .await;
        assert_eq!(outcome.unwrap(), MiOutcome::Result(json!("OK")));
        assert_eq!(SEEN.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn resource_errors_are_told_from_other_errors() {
        let error = |code, data: Option<Value>| MiOutcome::Error {
            code,
            message: String::new(),
            data,
        };
        assert!(is_resource_error(&error(500, None)));
        assert!(is_null_handler(&error(
            -32000,
            Some(json!("Command handler returned null"))
        )));
        assert!(!is_null_handler(&error(
            -32000,
            Some(json!("Failed to handle parameter"))
        )));
        assert!(!is_resource_error(&error(404, None)));
        assert!(!is_resource_error(&MiOutcome::Result(json!("OK"))));
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_their_own_reply() {
        let addr = fake_node(|request| {
            serde_json::to_vec(
                &json!({"jsonrpc": "2.0", "id": request["id"], "result": request["params"]}),
            )
            .unwrap()
        })
        .await;
        let transport = std::sync::Arc::new(transport_to(addr).await);
        let calls = (0..20).map(|i| {
            let transport = transport.clone();
            async move {
                transport
                    .call(
                        "dlg_list",
                        Some(json!({"callid": i.to_string()})),
                        Duration::from_secs(2),
                        "t/c",
                    )
                    .await
            }
        });
        for (i, outcome) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                outcome.unwrap(),
                MiOutcome::Result(json!({"callid": i.to_string()}))
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_at_once() {
        let addr = {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            socket.local_addr().unwrap()
        };
        let transport = transport_to(addr).await;
        let started = Instant::now();
        let outcome = transport
            .call("dlg_list", None, Duration::from_secs(5), "t/c")
            .await;
        assert!(
            matches!(outcome, Err(TransportError::Unreachable(..))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn asynchronous_commands_never_go_over_mi_http() {
        let err = MiRoutes::new("http://127.0.0.1:8888/mi", None).unwrap_err();
        assert!(err.contains("500 ms"), "{err}");
        let routes = MiRoutes::new("http://127.0.0.1:8888/mi", Some("udp:127.0.0.1:8080")).unwrap();
        assert_eq!(
            routes.describe(),
            "synchronous commands over mi_http http://127.0.0.1:8888/mi, asynchronous (t_uac_dlg) over mi_datagram udp:127.0.0.1:8080"
        );
        assert!(MiRoutes::new("udp:127.0.0.1:8080", Some("http://h/mi")).is_err());
    }

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
        let MiEndpoint::Http { authorization, .. } =
            MiEndpoint::parse("http://admin:p%40ss@127.0.0.1:8888/mi").unwrap()
        else {
            panic!("not http")
        };
        // base64 of "admin:p@ss"
        assert_eq!(authorization.unwrap().expose(), "Basic YWRtaW46cEBzcw==");
        let err = MiEndpoint::parse("ftp://admin:hunter2@h/mi").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
