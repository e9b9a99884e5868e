//! gateway binary: loads configuration and runs the service until SIGTERM/SIGINT.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    callapi_kit::telemetry::init("gateway");
    let config = match callapi_kit::config::config_path_from_args()
        .and_then(|path| callapi_kit::config::load::<gateway::Config>(path.as_deref()))
    {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(%err, "cannot load configuration");
            return ExitCode::FAILURE;
        }
    };
    match gateway::run(config, callapi_kit::shutdown::on_signal(), None).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "gateway failed");
            ExitCode::FAILURE
        }
    }
}
