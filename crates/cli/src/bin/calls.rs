//! `callapi-calls`: prints a tenant's calls live, one line per normalised call event, as any
//! service can read them from the tenant's JetStream stream `CALLAPI_CALLS_<tenant>` (an
//! example consumer; the subjects and payloads: proto/asyncapi.yaml). The stream's sequence
//! numbers the tenant's events with no gap.
//!
//! ```text
//! callapi-calls --tenant acme                # from now on
//! callapi-calls --tenant acme --since 1200   # from stream sequence 1200 (resume)
//! callapi-calls --tenant acme --all          # everything the stream still holds
//! ```

use std::process::ExitCode;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use callapi_proto::v1::CallEvent;
use clap::Parser;
use futures::StreamExt as _;
use prost::Message as _;

/// Print a tenant's call events live.
#[derive(Parser, Debug)]
#[command(name = "callapi-calls", version)]
struct Args {
    /// NATS server (an account that may read the tenant's subjects).
    #[arg(
        long,
        env = "CALLAPI_NATS__URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    /// The tenant whose calls to print.
    #[arg(long)]
    tenant: String,
    /// Start after this stream sequence (the last one printed before), instead of now.
    #[arg(long, conflicts_with = "all")]
    since: Option<u64>,
    /// Start from the oldest event the stream holds.
    #[arg(long)]
    all: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("callapi-calls: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let client = async_nats::connect(args.nats.as_str())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.nats))?;
    let jetstream = async_nats::jetstream::new(client);
    let name = callapi_kit::calls::calls_stream(&args.tenant);
    let stream = jetstream
        .get_stream(&name)
        .await
        .map_err(|e| format!("no stream {name} (is event-ingest running?): {e}"))?;
    let deliver_policy = match (args.since, args.all) {
        (Some(sequence), _) => DeliverPolicy::ByStartSequence {
            start_sequence: sequence.saturating_add(1),
        },
        (None, true) => DeliverPolicy::All,
        (None, false) => DeliverPolicy::New,
    };
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot read the stream: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot read the stream: {e}"))?;
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("stream: {e}"))?;
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let printed = match CallEvent::decode(message.payload.as_ref()) {
            Ok(event) => writeln!(out, "{}", line(sequence, &event)),
            Err(err) => writeln!(out, "#{sequence}: not a CallEvent ({err})"),
        };
        // The reader went away (e.g. `| head`): done.
        if printed.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        let _ = message.ack().await;
    }
    Ok(())
}

/// One printed line: sequence, time, kind, Call-ID and what else the event says.
fn line(sequence: u64, event: &CallEvent) -> String {
    let mut text = format!(
        "#{sequence} {} {:?} session={} callid={} node={}",
        event.at_ms,
        event.kind(),
        event.session_id,
        event.callid,
        event.node_id
    );
    for (name, value) in [
        ("transfer_callid", &event.transfer_callid),
        ("sip_status", &event.sip_status),
        ("cause", &event.cause),
    ] {
        if !value.is_empty() {
            text.push_str(&format!(" {name}={value}"));
        }
    }
    if event.leg != 0 {
        text.push_str(&format!(" leg={:?}", event.leg()));
    }
    text
}
