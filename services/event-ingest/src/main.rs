//! event-ingest binary: loads configuration and runs the service until SIGTERM/SIGINT.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    callapi_kit::telemetry::init("event-ingest");
    let config = match callapi_kit::config::config_path_from_args()
        .and_then(|path| callapi_kit::config::load::<event_ingest::Config>(path.as_deref()))
    {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(%err, "cannot load configuration");
            return ExitCode::FAILURE;
        }
    };
    match event_ingest::run(config, callapi_kit::shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "event-ingest failed");
            ExitCode::FAILURE
        }
    }
}
