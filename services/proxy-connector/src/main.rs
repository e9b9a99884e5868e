//! proxy-connector binary: loads configuration and runs the service until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    callapi_kit::service_main("proxy-connector", proxy_connector::run).await
}
