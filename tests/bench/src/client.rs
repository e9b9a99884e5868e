//! A WebSocket JSON-RPC client as an application would use it: one connection (TCP_NODELAY
//! set), one command at a time, its `Started` reply and its notifications up to `Ended`, timed
//! from the moment the request was written. Every failure is a [`BenchError`], never a panic.

use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{BenchError, Result};

/// One connection to the gateway.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Prefix of this client's `cmd_id`s.
    name: String,
    next_id: u64,
}

/// How one command went, as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// From writing the request to its `Started` reply.
    pub started: Duration,
    /// From writing the request to `Ended`.
    pub ended: Duration,
    /// The command's `Event` notifications' params, in order.
    pub events: Vec<Value>,
    /// Its `Error` notification's `code` and `message`, if any.
    pub error: Option<(String, String)>,
}

impl Outcome {
    /// The `callid` of the first event named `name`.
    pub fn callid_of(&self, name: &str) -> Option<&str> {
        self.events
            .iter()
            .find(|e| e["data"] == name)
            .and_then(|e| e["callid"].as_str())
    }
}

impl WsClient {
    /// Connects to `url` within `timeout`; `small_buffers` keeps an idle connection's memory low.
    pub async fn connect(
        url: &str,
        name: String,
        timeout: Duration,
        small_buffers: bool,
    ) -> Result<Self> {
        let config = small_buffers.then(|| {
            WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
        });
        let connect = tokio_tungstenite::connect_async_with_config(url, config, true);
        let (socket, _) =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| BenchError::Timeout {
                    ms: timeout.as_millis(),
                    what: "the WebSocket handshake",
                })??;
        Ok(Self {
            socket,
            name,
            next_id: 1,
        })
    }

    /// Runs `method` with `params` (a `cmd_id` is added) until its `Ended`, within `timeout`.
    /// An `Error` notification is part of the outcome; a JSON-RPC error reply is an error.
    pub async fn run(
        &mut self,
        method: &str,
        mut params: Value,
        timeout: Duration,
    ) -> Result<Outcome> {
        let id = self.next_id;
        self.next_id += 1;
        let cmd_id = format!("{}-{id}", self.name);
        if let Some(map) = params.as_object_mut() {
            map.insert("cmd_id".into(), Value::String(cmd_id.clone()));
        }
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let sent = Instant::now();
        let until = sent + timeout;
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await?;
        let mut outcome = Outcome::default();
        loop {
            let message = self.recv(until, timeout, "the command's Ended").await?;
            if message.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(error) = message.get("error") {
                    return Err(BenchError::Rpc(error.to_string()));
                }
                if message["result"]["status"] != "Started" {
                    return Err(BenchError::Protocol(message.to_string()));
                }
                outcome.started = sent.elapsed();
                continue;
            }
            let params = &message["params"];
            if params["cmd_id"].as_str() != Some(cmd_id.as_str()) {
                continue;
            }
            match message["method"].as_str() {
                Some("Event") => outcome.events.push(params.clone()),
                Some("Error") => {
                    let text = |key: &str| params[key].as_str().unwrap_or_default().to_owned();
                    outcome.error = Some((text("code"), text("message")));
                }
                Some("Ended") => {
                    outcome.ended = sent.elapsed();
                    return Ok(outcome);
                }
                _ => return Err(BenchError::Protocol(message.to_string())),
            }
        }
    }

    /// The next JSON text message before `until` (pings are answered on the way).
    async fn recv(&mut self, until: Instant, total: Duration, what: &'static str) -> Result<Value> {
        loop {
            let next = tokio::time::timeout_at(until.into(), self.socket.next())
                .await
                .map_err(|_| BenchError::Timeout {
                    ms: total.as_millis(),
                    what,
                })?;
            match next {
                None => return Err(BenchError::Closed),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text)
                        .map_err(|err| BenchError::Protocol(format!("{err}: {text}")));
                }
                Some(Ok(Message::Close(_))) => return Err(BenchError::Closed),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Waits, answering pings, until `stop` is cancelled or the connection ends; returns
    /// whether the connection was still open when stopped.
    pub async fn hold_open(&mut self, stop: &tokio_util::sync::CancellationToken) -> bool {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return true,
                next = self.socket.next() => match next {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return false,
                    Some(Ok(_)) => continue,
                },
            }
        }
    }

    /// Subscribes to the tenant's call events from now (`Subscribe`), then counts the `held` and
    /// `resumed` ones until `stop` and a `quiet` spell after it: (how many, whether their
    /// sequences always rose).
    pub async fn count_hold_events(
        &mut self,
        stop: &tokio_util::sync::CancellationToken,
        quiet: Duration,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(u64, bool)> {
        self.send_subscribe().await?;
        let (mut count, mut ordered, mut last, mut ready) = (0u64, true, 0u64, Some(ready));
        loop {
            let wait = if stop.is_cancelled() {
                quiet
            } else {
                Duration::from_secs(3600)
            };
            let next = tokio::select! {
                _ = stop.cancelled(), if !stop.is_cancelled() => continue,
                next = tokio::time::timeout(wait, self.socket.next()) => next,
            };
            let Ok(Some(Ok(Message::Text(text)))) = next else {
                return Ok((count, ordered));
            };
            let Some(event) = call_event(&text, &mut ready)? else {
                continue;
            };
            let seq = event["seq"].as_u64().unwrap_or(0);
            ordered &= seq > last;
            last = seq;
            if matches!(event["kind"].as_str(), Some("held" | "resumed")) {
                count += 1;
            }
        }
    }

    /// Asks for the tenant's call events (the answer's id is `sub`).
    async fn send_subscribe(&mut self) -> Result<()> {
        let request = json!({"jsonrpc": "2.0", "id": "sub", "method": "Subscribe", "params": {}});
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await
            .map_err(|e| BenchError::Protocol(format!("send: {e}")))
    }

    /// Subscribes to the tenant's call events (telling `ready` once subscribed), then counts
    /// those about Call-IDs starting with `prefix` until `expected` came, or `quiet` passed
    /// with none; returns how many came, whether their sequence only rose, and when the last
    /// one came.
    pub async fn count_prefixed_events(
        &mut self,
        prefix: &str,
        expected: u64,
        quiet: Duration,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(u64, bool, std::time::Instant)> {
        self.send_subscribe().await?;
        let (mut count, mut ordered, mut last, mut ready) = (0u64, true, 0u64, Some(ready));
        let mut last_at = std::time::Instant::now();
        while count < expected {
            let wait = if ready.is_some() {
                Duration::from_secs(30)
            } else {
                quiet
            };
            let Ok(Some(Ok(Message::Text(text)))) =
                tokio::time::timeout(wait, self.socket.next()).await
            else {
                break;
            };
            let Some(event) = call_event(&text, &mut ready)? else {
                continue;
            };
            let seq = event["seq"].as_u64().unwrap_or(0);
            ordered &= seq > last;
            last = seq;
            if event["callid"]
                .as_str()
                .is_some_and(|c| c.starts_with(prefix))
            {
                count += 1;
                last_at = std::time::Instant::now();
            }
        }
        Ok((count, ordered, last_at))
    }

    /// Closes the connection politely (close frame), giving up after `timeout`.
    pub async fn close(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.socket.close(None)).await;
    }
}

/// What a subscriber's message is: the params of a `CallEvent` notification, or nothing (the
/// `Subscribe` answer, which tells `ready`, or anything else); an error if the subscription was
/// refused.
fn call_event(
    text: &str,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<Option<Value>> {
    let Ok(mut message) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    if message["id"] == "sub" {
        if message["result"]["subscribed"] != true {
            return Err(BenchError::Protocol(format!("Subscribe: {message}")));
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        return Ok(None);
    }
    if message["method"] != "CallEvent" {
        return Ok(None);
    }
    Ok(Some(message["params"].take()))
}
