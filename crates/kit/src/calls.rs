//! The session store's layout, shared by its writer (event-ingest) and its readers (gateway): the
//! JetStream key-value bucket [`BUCKET`], one `CallRecord` per dialog under
//! `<tenant>.<node>.<call token>`, and how a session id is derived.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::validate::MAX_CALLID_LEN;

/// The bucket of live calls.
pub const BUCKET: &str = "callapi_calls";

/// How long a record lives without being written (a safety net: reconciliation with each
/// node's `dlg_list` removes records of dialogs that are gone long before).
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How long the marker of a removed record stays in the bucket (so watchers that were away see
/// the removal), after which JetStream drops it: ended calls leave nothing behind.
pub const MARKER_TTL: Duration = Duration::from_secs(60);

/// Headers of a message removing a record (published on `$KV.callapi_calls.<key>` with an
/// empty payload): a purge rolling up the key's history, whose marker expires after
/// [`MARKER_TTL`].
pub fn removal_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("KV-Operation", "PURGE");
    headers.insert("Nats-Rollup", "sub");
    headers.insert("Nats-TTL", MARKER_TTL.as_secs().to_string().as_str());
    headers
}

/// The session id of a session whose first dialog has `callid`: 63 bits of SHA-256 of tenant
/// and Call-ID (never 0), so every writer derives the same id without asking anyone.
pub fn session_id(tenant: &str, callid: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update(tenant.as_bytes());
    hash.update([0]);
    hash.update(callid.as_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) & (i64::MAX as u64)).max(1)
}

/// A Call-ID as one key token: unpadded URL-safe base64, or `=` + hex SHA-256 past
/// [`MAX_CALLID_LEN`] bytes (`=` is allowed in keys and never in unpadded base64).
pub fn callid_token(callid: &str) -> String {
    if callid.len() > MAX_CALLID_LEN {
        let digest = Sha256::digest(callid.as_bytes());
        let mut token = String::with_capacity(1 + 2 * digest.len());
        token.push('=');
        for byte in digest {
            token.push_str(&format!("{byte:02x}"));
        }
        token
    } else {
        URL_SAFE_NO_PAD.encode(callid.as_bytes())
    }
}

/// The key of one dialog's record.
pub fn key(tenant: &str, node_id: &str, callid: &str) -> String {
    format!("{tenant}.{node_id}.{}", callid_token(callid))
}

/// The subject a record's writes are published on (`$KV.<bucket>.<key>`).
pub fn subject(key: &str) -> String {
    format!("$KV.{BUCKET}.{key}")
}

/// The keys of one node's records, as a watch filter.
pub fn node_keys(tenant: &str, node_id: &str) -> String {
    format!("{tenant}.{node_id}.*")
}

fn config(replicas: usize) -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: BUCKET.to_owned(),
        description: "callapi: one record per live dialog (callapi.v1.CallRecord)".to_owned(),
        history: 1,
        max_age: MAX_AGE,
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        // Per-message TTLs, so removal markers expire instead of piling up.
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    }
}

/// Opens key-value bucket `config.bucket` as it is if it exists (its settings untouched), else
/// creates it with `config`.
pub async fn open_or_create(
    jetstream: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let bucket = config.bucket.clone();
    retrying(
        STARTUP_ATTEMPTS,
        &format!("key-value bucket {bucket}"),
        || async {
            if let Ok(kv) = jetstream.get_key_value(&bucket).await {
                return Ok(kv);
            }
            match jetstream.create_key_value(config.clone()).await {
                Ok(kv) => Ok(kv),
                // Made meanwhile by someone else (or it existed and the first look failed).
                Err(create) => jetstream
                    .get_key_value(&bucket)
                    .await
                    .map_err(|get| format!("cannot create it ({create}) nor open it ({get})")),
            }
        },
    )
    .await
}

/// Creates the stream `config` describes, or finds it made already (by another replica, or
/// before), in up to `attempts` tries a second apart ([`STARTUP_ATTEMPTS`] at start-up: a
/// JetStream cluster that has just formed may not place it yet).
pub async fn ensure_stream(
    jetstream: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
    attempts: u32,
) -> Result<(), String> {
    let name = config.name.clone();
    retrying(attempts, &format!("stream {name}"), || async {
        match jetstream.create_stream(config.clone()).await {
            Ok(_) => Ok(()),
            Err(_) if jetstream.get_stream(&name).await.is_ok() => Ok(()),
            Err(err) => Err(err.to_string()),
        }
    })
    .await
}

/// A JetStream cluster that has just formed may refuse to place a new stream for a few
/// seconds: at start-up a stream or bucket is tried this many times, a second apart.
pub const STARTUP_ATTEMPTS: u32 = 15;

/// Runs `attempt` up to `attempts` times, a second apart, until it succeeds; the last error,
/// prefixed by `what`, otherwise.
async fn retrying<T, F, Fut>(attempts: u32, what: &str, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for n in 0..attempts.max(1) {
        if n > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                tracing::debug!(what, attempt = n, %err, "not ready yet");
                last = err;
            }
        }
    }
    Err(format!("{what}: {last}"))
}

/// Opens the bucket for reading: as it is if it exists (its settings untouched), else creates
/// it with one replica (event-ingest sets the replicas it is configured with).
pub async fn open_existing(
    jetstream: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    open_or_create(jetstream, config(1)).await
}

/// Opens the bucket, creating it (or bringing its settings up to date) if needed.
pub async fn open(
    jetstream: &async_nats::jetstream::Context,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, String> {
    retrying(
        STARTUP_ATTEMPTS,
        &format!("key-value bucket {BUCKET}"),
        || async {
            jetstream
                .create_or_update_key_value(config(replicas))
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await
}

/// The bucket of what clients said about the sessions they created (`SessionMeta`).
pub const META_BUCKET: &str = "callapi_session_meta";

/// The key of a session's `SessionMeta`.
pub fn meta_key(tenant: &str, session_id: u64) -> String {
    format!("{tenant}.{session_id}")
}

/// Opens the metadata bucket, creating it if needed (a gateway writes it, every gateway
/// reads it; records live at most [`MAX_AGE`], and their expiry leaves a marker watchers see).
pub async fn open_meta(
    jetstream: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let config = async_nats::jetstream::kv::Config {
        bucket: META_BUCKET.to_owned(),
        description:
            "callapi: what clients said about the sessions they created (callapi.v1.SessionMeta)"
                .to_owned(),
        history: 1,
        max_age: MAX_AGE,
        storage: async_nats::jetstream::stream::StorageType::File,
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    };
    open_or_create(jetstream, config).await
}

/// The JetStream stream of `tenant`'s call events (`CALLAPI_CALLS_<tenant>`, subjects
/// `callapi.v1.calls.<tenant>.>`): one stream per tenant, so its sequence numbers the tenant's
/// events 1, 2, 3… with no gap.
pub fn calls_stream(tenant: &str) -> String {
    format!("CALLAPI_CALLS_{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_stable_positive_and_per_tenant() {
        let id = session_id("acme", "a84b4c76e66710@pc33.example.com");
        assert_eq!(id, session_id("acme", "a84b4c76e66710@pc33.example.com"));
        assert!(id > 0 && id <= i64::MAX as u64);
        assert_ne!(id, session_id("other", "a84b4c76e66710@pc33.example.com"));
        assert_ne!(id, session_id("acme", "another"));
    }

    #[test]
    fn keys_are_valid_key_value_keys_whatever_the_call_id() {
        let valid = |key: &str| {
            key.split('.').all(|token| !token.is_empty())
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.'))
        };
        for callid in [
            "x",
            "a84b4c76e66710@pc33.example.com",
            "a b/c+d",
            &"é".repeat(200),
        ] {
            let key = key("acme", "node1", callid);
            assert!(valid(&key), "{key}");
        }
        let long = key("acme", "node1", &"x".repeat(400));
        assert!(valid(&long) && long.len() < 100, "{long}");
        assert_ne!(callid_token("a"), callid_token("b"));
    }
}
