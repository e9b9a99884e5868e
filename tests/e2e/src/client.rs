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

    /// Connects with extra upgrade request `headers` (e.g. `Authorization`, `Origin`); the
    /// HTTP status and body of a refused upgrade otherwise.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut request = url.into_client_request().expect("a WebSocket URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name"),
                tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value)
                    .expect("header value"),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Self {
                socket,
                backlog: VecDeque::new(),
                next_id: 1,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((status, body))
            }
            Err(err) => Err((0, err.to_string())),
        }
    }

    /// Connects with an access token in the `Authorization` header.
    pub async fn connect_with_token(url: &str, token: &str) -> Self {
        let authorization = format!("Bearer {token}");
        Self::try_connect(url, &[("Authorization", &authorization)])
            .await
            .unwrap_or_else(|(status, body)| panic!("upgrade refused: {status} {body}"))
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

    /// Sends a request and returns its id, or `None` if the connection is gone.
    pub async fn try_request(&mut self, method: &str, params: Value) -> Option<Value> {
        let id = json!(format!("req-{}", self.next_id));
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await
            .ok()
            .map(|()| id)
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

    /// The next message (from the backlog first), or the close frame's code and reason if the
    /// gateway closes the connection (`(0, "")` without one); panics if nothing comes within
    /// [`WAIT`].
    pub async fn next_or_closed(&mut self) -> Result<Value, (u16, String)> {
        if let Some(value) = self.backlog.pop_front() {
            return Ok(value);
        }
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("no message from the gateway in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(serde_json::from_str(&text).expect("gateway sent JSON"));
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Err((u16::from(frame.code), frame.reason.to_string()));
                }
                Some(Ok(Message::Close(None)) | Err(_)) | None => return Err((0, String::new())),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Every message not taken yet: the backlog and whatever arrives within `quiet`.
    pub async fn pending(&mut self, quiet: Duration) -> Vec<Value> {
        let mut messages: Vec<Value> = self.backlog.drain(..).collect();
        while let Ok(Some(Ok(message))) = tokio::time::timeout(quiet, self.socket.next()).await {
            if let Message::Text(text) = message
                && let Ok(value) = serde_json::from_str(&text)
            {
                messages.push(value);
            }
        }
        messages
    }

    /// Waits for the gateway's close frame, skipping other messages: its code and reason
    /// (`(0, "")` if the connection ended without one).
    pub async fn closed(&mut self) -> (u16, String) {
        while let Some(message) = self.socket.next().await {
            match message {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Ok(Message::Close(None)) | Err(_) => return (0, String::new()),
                Ok(_) => continue,
            }
        }
        (0, String::new())
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
