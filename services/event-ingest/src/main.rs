//! event-ingest binary: loads configuration and runs the service until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    callapi_kit::service_main("event-ingest", event_ingest::run).await
}
