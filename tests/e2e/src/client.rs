//! A WebSocket JSON-RPC client for tests: sends requests, collects replies and notifications.

use std::collections::VecDeque;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one message.
pub const WAIT: Duration = Duration::from_secs(20);

/// A client connection to a gateway.
pub struct Client {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages read but not yet taken.
    backlog: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to gateway");
        Self {
            socket,
            backlog: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    /// Sends a request and returns its id.
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = json!(format!("req-{}", self.next_id));
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_text(&request.to_string()).await;
        id
    }

    /// Reads the next message (from the backlog first).
    pub async fn next(&mut self) -> Value {
        if let Some(value) = self.backlog.pop_front() {
            return value;
        }
        self.read().await
    }

    async fn read(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("no message from the gateway in time")
                .expect("connection closed")
                .expect("WebSocket error");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("gateway sent JSON");
                }
                Message::Close(frame) => panic!("gateway closed the connection: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The reply to request `id` (other messages stay in the backlog).
    pub async fn reply(&mut self, id: &Value) -> Value {
        self.take(|m| {
            m.get("id") == Some(id) && (m.get("result").is_some() || m.get("error").is_some())
        })
        .await
    }

    /// Waits for the first message matching `pred`, keeping the others for later.
    pub async fn take(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos).expect("position exists");
        }
        loop {
            let message = self.read().await;
            if pred(&message) {
                return message;
            }
            self.backlog.push_back(message);
        }
    }

    /// Sends a command, asserts `Started`, and returns its cmd_id.
    pub async fn start(&mut self, method: &str, params: Value) -> String {
        let id = self.request(method, params).await;
        let reply = self.reply(&id).await;
        assert_eq!(
            reply["result"]["status"], "Started",
            "reply to {method}: {reply}"
        );
        reply["result"]["cmd_id"]
            .as_str()
            .expect("cmd_id")
            .to_owned()
    }

    /// Every notification of `cmd_id` up to and including `Ended`.
    pub async fn until_ended(&mut self, cmd_id: &str) -> Vec<Value> {
        let mut notes = Vec::new();
        loop {
            let note = self
                .take(|m| {
                    m["params"]["cmd_id"].as_str() == Some(cmd_id) && m.get("method").is_some()
                })
                .await;
            let ended = note["method"] == "Ended";
            notes.push(note);
            if ended {
                return notes;
            }
        }
    }

    /// Runs a command to its end and returns its notifications.
    pub async fn run(&mut self, method: &str, params: Value) -> Vec<Value> {
        let cmd_id = self.start(method, params).await;
        self.until_ended(&cmd_id).await
    }
}

/// The notification sequence in short form: `Event:CALL_START`, `Error:TIMEOUT`, `Ended`.
pub fn shape(notes: &[Value]) -> Vec<String> {
    notes
        .iter()
        .map(|n| match n["method"].as_str() {
            Some("Event") => format!("Event:{}", n["params"]["data"].as_str().unwrap_or("?")),
            Some("Error") => format!("Error:{}", n["params"]["code"].as_str().unwrap_or("?")),
            Some(other) => other.to_owned(),
            None => "?".to_owned(),
        })
        .collect()
}
