//! Tracing set-up: logs on stderr, human-readable or, with `CALLAPI_LOG_FORMAT=json`, one JSON
//! object per line (for a log collector), filtered by `RUST_LOG` (default `info`).
//!
//! Some libraries print credentials below INFO: async-nats its server URLs (with any user
//! information) at DEBUG and its `CONNECT` message (with the password or token) at TRACE;
//! hyper-util its connection-pool key, the MI URL's authority with its `user:password@`, at
//! DEBUG. So when `RUST_LOG` turns on DEBUG or TRACE for everything, these ([`QUIET_TARGETS`])
//! stay at INFO, unless `RUST_LOG` names them itself.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The filter used when `RUST_LOG` is unset, empty or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Log targets kept at INFO when `RUST_LOG` asks for more on everything: they log credentials.
pub const QUIET_TARGETS: &[&str] = &["async_nats", "hyper_util", "hyper"];

/// Installs the global tracing subscriber; later calls are no-ops.
pub fn init(service: &str) {
    let asked = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(filter_directives(asked.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("CALLAPI_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
}

/// The filter directives for `RUST_LOG` = `asked`: `asked` itself (or [`DEFAULT_FILTER`]),
/// plus `TARGET=info` for each of [`QUIET_TARGETS`] it does not name, when its default level
/// is DEBUG or TRACE.
pub fn filter_directives(asked: Option<&str>) -> String {
    let asked = asked
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER);
    let directives: Vec<&str> = asked.split(',').map(str::trim).collect();
    let default_level = directives
        .iter()
        .filter_map(|directive| directive.parse::<LevelFilter>().ok())
        .max()
        .unwrap_or(LevelFilter::OFF);
    if default_level <= LevelFilter::INFO {
        return asked.to_owned();
    }
    let mut out = asked.to_owned();
    for quiet in QUIET_TARGETS {
        let named = directives.iter().any(|directive| {
            let target = directive
                .split(['=', '['])
                .next()
                .unwrap_or_default()
                .trim();
            target == *quiet
                || target
                    .strip_prefix(quiet)
                    .is_some_and(|rest| rest.starts_with("::"))
        });
        if !named {
            out.push_str(&format!(",{quiet}=info"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn libraries_that_log_credentials_stay_at_info_unless_named() {
        const QUIET: &str = "async_nats=info,hyper_util=info,hyper=info";
        assert_eq!(filter_directives(None), "info");
        assert_eq!(filter_directives(Some("  ")), "info");
        assert_eq!(filter_directives(Some("debug")), format!("debug,{QUIET}"));
        assert_eq!(filter_directives(Some("TRACE")), format!("TRACE,{QUIET}"));
        assert_eq!(
            filter_directives(Some("gateway=trace,debug")),
            format!("gateway=trace,debug,{QUIET}")
        );
        assert_eq!(filter_directives(Some("warn")), "warn");
        assert_eq!(filter_directives(Some("gateway=debug")), "gateway=debug");
        assert_eq!(
            filter_directives(Some("debug,async_nats=debug")),
            "debug,async_nats=debug,hyper_util=info,hyper=info"
        );
        assert_eq!(
            filter_directives(Some("debug,hyper_util::client=trace")),
            "debug,hyper_util::client=trace,async_nats=info,hyper=info"
        );
        assert_eq!(
            filter_directives(Some("debug,hyper=debug,async_nats[conn]=trace")),
            "debug,hyper=debug,async_nats[conn]=trace,hyper_util=info"
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn debug_for_everything_still_hides_credential_logging_libraries() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter_directives(Some("debug"))))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "async_nats::connector", "password: Some(\"s3cretpw\")");
            tracing::debug!(target: "hyper_util::client::legacy::pool", "admin:hunter2@h");
            tracing::info!(target: "async_nats", "event: connected");
            tracing::debug!(target: "gateway", "ours at debug");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("s3cretpw"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("event: connected"), "{text}");
        assert!(text.contains("ours at debug"), "{text}");
    }
}
