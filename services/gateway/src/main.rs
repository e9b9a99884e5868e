//! gateway binary: loads configuration and runs the service until SIGTERM/SIGINT.

fn main() -> std::process::ExitCode {
    callapi_kit::start_service("gateway", None, |config, shutdown| {
        gateway::run(config, shutdown, None)
    })
}
