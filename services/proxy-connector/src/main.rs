//! proxy-connector binary: loads configuration and runs the service until SIGTERM/SIGINT.

/// mimalloc rather than glibc's malloc: fewer CPU cycles per message (docs/performance.md).
/// Not in the gateway, where glibc keeps idle WebSocket connections smaller.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    callapi_kit::start_service("proxy-connector", Some(1), proxy_connector::run)
}
