//! `callapi`: sends one call-api command over WebSocket and prints the reply and every
//! notification of that command until `Ended`, like OpenSIPS's call-api-client.
//!
//! ```text
//! callapi CallStart '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}'
//! ```
//! A gateway with authentication needs an access token: `--token` (`CALLAPI_TOKEN`), or an API
//! client's `--client-id` and `--client-secret` (`CALLAPI_CLIENT_ID`, `CALLAPI_CLIENT_SECRET`),
//! with which the CLI signs in first (`POST /api/login/oauth/token` on the gateway's address).
//!
//! Exit status: 0 when the command ended without an `Error` notification, 1 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Send one call-api command and print its notifications until it ends.
#[derive(Parser, Debug)]
#[command(name = "callapi", version)]
struct Args {
    /// WebSocket URL of a gateway.
    #[arg(
        long,
        env = "CALLAPI_URL",
        default_value = "ws://127.0.0.1:5059/call-api"
    )]
    url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Access token sent at the WebSocket upgrade.
    #[arg(long, env = "CALLAPI_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// API client id to sign in with (client credentials), when no token is given.
    #[arg(long, env = "CALLAPI_CLIENT_ID")]
    client_id: Option<String>,
    /// API client secret to sign in with.
    #[arg(long, env = "CALLAPI_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Method: CallStart, CallBlindTransfer, CallAttendedTransfer, CallHold, CallUnHold, CallEnd.
    method: String,
    /// Params as a JSON object.
    #[arg(default_value = "{}")]
    params: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match tokio::time::timeout(Duration::from_secs(args.timeout), run(&args)).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        Ok(Err(message)) => {
            eprintln!("callapi: {message}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("callapi: no Ended within {} s", args.timeout);
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> Result<bool, String> {
    let params: Value =
        serde_json::from_str(&args.params).map_err(|e| format!("params are not JSON: {e}"))?;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URL {}: {e}", args.url))?;
    let token = match (&args.token, &args.client_id, &args.client_secret) {
        (Some(token), _, _) => Some(token.clone()),
        (None, Some(id), Some(secret)) => Some(sign_in(&args.url, id, secret).await?),
        _ => None,
    };
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        request.headers_mut().insert("Authorization", value);
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.url))?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let request = json!({"jsonrpc": "2.0", "id": id, "method": args.method, "params": params});
    println!(">> {request}");
    socket
        .send(Message::Text(request.to_string().into()))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let mut cmd_id: Option<String> = None;
    let mut clean = true;
    while let Some(message) = socket.next().await {
        let text = match message.map_err(|e| format!("connection lost: {e}"))? {
            Message::Text(text) => text.to_string(),
            Message::Close(_) => return Err("the gateway closed the connection".to_owned()),
            _ => continue,
        };
        println!("<< {text}");
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if value.get("id").and_then(Value::as_str) == Some(id.as_str()) {
            if value.get("error").is_some() {
                return Ok(false);
            }
            cmd_id = value["result"]["cmd_id"].as_str().map(str::to_owned);
            if cmd_id.is_none() {
                // A query (CallList, CallGet): its result is the whole answer.
                return Ok(true);
            }
            continue;
        }
        let ours = cmd_id.is_some() && value["params"]["cmd_id"].as_str() == cmd_id.as_deref();
        match value.get("method").and_then(Value::as_str) {
            Some("Error") if ours => clean = false,
            Some("Ended") if ours => return Ok(clean),
            _ => {}
        }
    }
    Err("the connection ended before the command did".to_owned())
}

/// Signs in as an API client on the gateway of `ws_url` (plain HTTP: the local stack); returns
/// the access token.
async fn sign_in(ws_url: &str, client_id: &str, secret: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = ws_url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("signing in needs a ws:// URL, not {ws_url}"))?;
    let body = serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
    ])
    .map_err(|e| format!("sign-in: {e}"))?;
    let request = format!(
        "POST /api/login/oauth/token HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sign-in failed: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("sign-in failed: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let reply: Value = serde_json::from_str(body).map_err(|_| {
        format!(
            "sign-in: unexpected answer: {}",
            text.lines().next().unwrap_or("")
        )
    })?;
    reply["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("sign-in refused: {reply}"))
}
