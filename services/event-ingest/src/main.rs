//! event-ingest binary: loads configuration and runs the service until SIGTERM/SIGINT.

fn main() -> std::process::ExitCode {
    callapi_kit::start_service("event-ingest", Some(1), event_ingest::run)
}
