//! Shared plumbing of the callapi services: configuration loading, tracing set-up, NATS
//! connection, shutdown signal and the NATS subject scheme. Nothing here knows call flows.
#![forbid(unsafe_code)]

pub mod config;
pub mod nats;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod validate;

/// Prints the one-line readiness report (`READY key=value ...`) that scripts and tests wait for.
pub fn announce_ready(details: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the service down.
    let _ = writeln!(out, "READY {details}");
    let _ = out.flush();
}
