//! proxy-connector binary: loads configuration and runs the service until SIGTERM/SIGINT.

fn main() -> std::process::ExitCode {
    callapi_kit::start_service("proxy-connector", Some(1), proxy_connector::run)
}
