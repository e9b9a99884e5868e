//! commands binary: loads configuration and runs the service until SIGTERM/SIGINT.

fn main() -> std::process::ExitCode {
    callapi_kit::start_service("commands", Some(1), commands::run)
}
