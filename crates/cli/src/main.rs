//! `callapi`: sends one call-api command over WebSocket and prints the reply and every
//! notification of that command until `Ended`, like OpenSIPS's call-api-client.
//!
//! ```text
//! callapi CallStart '{"caller":"sip:alice@127.0.0.1","callee":"sip:bob@127.0.0.1"}'
//! ```
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
    let (mut socket, _) = tokio_tungstenite::connect_async(args.url.as_str())
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
