//! gateway binary: loads configuration and runs the service until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    callapi_kit::service_main("gateway", |config, shutdown| {
        gateway::run(config, shutdown, None)
    })
    .await
}
