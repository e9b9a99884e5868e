//! Talking to OpenSIPS (or the emulator) directly, bypassing callapi: MI requests over
//! mi_datagram (one JSON-RPC request per UDP datagram), and an event socket of the bench's own
//! subscribed with `event_subscribe`. This is the yardstick for callapi's overhead: the same MI
//! work done by the thinnest possible client, and a way to count the events OpenSIPS raises.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{BenchError, Result};

/// Largest datagram mi_datagram sends.
const MAX_DATAGRAM: usize = 65_535;

/// The address to bind a local socket on to reach `target`.
fn local_for(target: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match target {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => [127, 0, 0, 1].into(),
        SocketAddr::V4(_) => [0, 0, 0, 0].into(),
        SocketAddr::V6(v6) if v6.ip().is_loopback() => std::net::Ipv6Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// An mi_datagram client: one socket, one request at a time.
pub struct MiClient {
    socket: UdpSocket,
    target: SocketAddr,
    next_id: u64,
    buf: Vec<u8>,
}

/// An MI answer: the JSON-RPC `result`, or its `error` code and message.
pub type MiAnswer = std::result::Result<Value, (i64, String)>;

impl MiClient {
    /// A client of the MI datagram socket at `target`.
    pub async fn new(target: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind(local_for(target)).await?;
        Ok(Self {
            socket,
            target,
            next_id: 1,
            buf: vec![0; MAX_DATAGRAM],
        })
    }

    /// Sends `method` with `params` and waits up to `timeout` for its reply.
    pub async fn call(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<MiAnswer> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.socket
            .send_to(request.to_string().as_bytes(), self.target)
            .await?;
        let until = Instant::now() + timeout;
        loop {
            let received =
                tokio::time::timeout_at(until.into(), self.socket.recv_from(&mut self.buf))
                    .await
                    .map_err(|_| BenchError::Timeout {
                        ms: timeout.as_millis(),
                        what: "an MI reply",
                    })?;
            let (len, from) = received?;
            if from != self.target {
                continue;
            }
            let Ok(reply) = serde_json::from_slice::<Value>(&self.buf[..len]) else {
                let text = String::from_utf8_lossy(&self.buf[..len]).into_owned();
                return Err(BenchError::Mi(format!("reply is not JSON: {text}")));
            };
            if reply["id"].as_u64() != Some(id) {
                // A late reply to an earlier, timed-out request.
                continue;
            }
            if let Some(error) = reply.get("error") {
                let code = error["code"].as_i64().unwrap_or_default();
                let message = error["message"].as_str().unwrap_or_default().to_owned();
                return Ok(Err((code, message)));
            }
            return Ok(Ok(reply.get("result").cloned().unwrap_or(Value::Null)));
        }
    }

    /// Like [`MiClient::call`], but an MI error reply is an error too.
    pub async fn call_ok(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value> {
        match self.call(method, params, timeout).await? {
            Ok(result) => Ok(result),
            Err((code, message)) => Err(BenchError::Mi(format!("{method}: {code} {message}"))),
        }
    }
}

type Waiters = HashMap<String, oneshot::Sender<Value>>;

fn lock(waiters: &Mutex<Waiters>) -> MutexGuard<'_, Waiters> {
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The bench's own event_datagram socket: counts every event it gets, and hands the final
/// `E_CALL_TRANSFER` (`ok` or `fail`) of a Call-ID to whoever waits for it.
pub struct EventTap {
    /// The socket as given to `event_subscribe` (`udp:IP:PORT`).
    pub socket: String,
    received: Arc<AtomicU64>,
    waiters: Arc<Mutex<Waiters>>,
    stop: CancellationToken,
}

impl EventTap {
    /// Listens on `listen`; `advertise` is the socket OpenSIPS is told (default: the bound one).
    pub async fn start(listen: &str, advertise: Option<&str>) -> Result<Self> {
        let udp = UdpSocket::bind(listen).await?;
        let socket = match advertise {
            Some(advertise) => advertise.to_owned(),
            None => format!("udp:{}", udp.local_addr()?),
        };
        let tap = Self {
            socket,
            received: Arc::new(AtomicU64::new(0)),
            waiters: Arc::new(Mutex::new(HashMap::new())),
            stop: CancellationToken::new(),
        };
        let (received, waiters, stop) =
            (tap.received.clone(), tap.waiters.clone(), tap.stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let len = tokio::select! {
                    _ = stop.cancelled() => return,
                    got = udp.recv_from(&mut buf) => match got {
                        Ok((len, _)) => len,
                        Err(_) => continue,
                    },
                };
                received.fetch_add(1, Ordering::Relaxed);
                let Ok(event) = serde_json::from_slice::<Value>(&buf[..len]) else {
                    continue;
                };
                let params = &event["params"];
                let done = matches!(params["state"].as_str(), Some("ok" | "fail"));
                if event["method"] == "E_CALL_TRANSFER"
                    && done
                    && let Some(callid) = params["callid"].as_str()
                    && let Some(waiter) = lock(&waiters).remove(callid)
                {
                    let _ = waiter.send(params.clone());
                }
            }
        });
        Ok(tap)
    }

    /// Events received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The final `E_CALL_TRANSFER` params of `callid`, once it comes (register before the
    /// request that causes it).
    pub fn expect_transfer(&self, callid: &str) -> oneshot::Receiver<Value> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(callid.to_owned(), tx);
        rx
    }

    /// Forgets a wait that will not be satisfied.
    pub fn forget(&self, callid: &str) {
        lock(&self.waiters).remove(callid);
    }

    /// Subscribes (or, with `expire` 0, unsubscribes) this socket to `event` on the node.
    pub async fn subscribe(&self, mi: &mut MiClient, event: &str, expire: u64) -> Result<()> {
        mi.call_ok(
            "event_subscribe",
            json!({"event": event, "socket": self.socket, "expire": expire}),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_socket_matches_the_target() {
        let local = |t: &str| local_for(t.parse().unwrap_or_else(|_| panic!("{t}")));
        assert_eq!(local("127.0.0.1:8080"), "127.0.0.1:0".parse().unwrap());
        assert_eq!(local("10.0.0.5:8080"), "0.0.0.0:0".parse().unwrap());
        assert_eq!(local("[::1]:8080"), "[::1]:0".parse().unwrap());
    }

    #[tokio::test]
    async fn mi_replies_are_matched_by_id_and_errors_kept_apart() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            for _ in 0..2 {
                let (len, from) = server.recv_from(&mut buf).await.unwrap();
                let request: Value = serde_json::from_slice(&buf[..len]).unwrap();
                let id = request["id"].clone();
                // A stale reply first, then the real one.
                let stale = json!({"jsonrpc": "2.0", "id": 999, "result": "stale"});
                server
                    .send_to(stale.to_string().as_bytes(), from)
                    .await
                    .unwrap();
                let reply = if request["method"] == "dlg_end_dlg" {
                    json!({"jsonrpc": "2.0", "id": id, "error": {"code": 404, "message": "Requested Dialog not found"}})
                } else {
                    json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}})
                };
                server
                    .send_to(reply.to_string().as_bytes(), from)
                    .await
                    .unwrap();
            }
        });
        let mut mi = MiClient::new(target).await.unwrap();
        let t = Duration::from_secs(5);
        let ok = mi.call("which", json!({}), t).await.unwrap();
        assert_eq!(ok, Ok(json!({"ok": true})));
        let err = mi
            .call("dlg_end_dlg", json!({"dialog_id": "x"}), t)
            .await
            .unwrap();
        assert_eq!(err, Err((404, "Requested Dialog not found".to_owned())));
    }

    #[tokio::test]
    async fn tap_counts_events_and_hands_over_the_final_transfer_event() {
        let tap = EventTap::start("127.0.0.1:0", None).await.unwrap();
        let addr = tap.socket.strip_prefix("udp:").unwrap().to_owned();
        let waiter = tap.expect_transfer("X");
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for state in ["start", "ok"] {
            let event = json!({"jsonrpc": "2.0", "method": "E_CALL_TRANSFER", "params": {"callid": "X", "state": state}});
            sender
                .send_to(event.to_string().as_bytes(), &addr)
                .await
                .unwrap();
        }
        let params = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(params["state"], "ok");
        assert_eq!(tap.received(), 2);
    }
}
