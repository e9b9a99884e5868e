//! Keeps an OpenSIPS node subscribed to the events we need.
//!
//! Every check interval it asks the node (`subscribers_list`, through proxy-connector) which
//! subscriptions it holds; any needed event where our socket is missing, expired or past half
//! its lifetime is (re-)subscribed with `event_subscribe`. This refreshes before expiry and
//! also catches a node that restarted and forgot us, within one interval.

use std::time::Duration;

use callapi_kit::mi::{MiAnswer, MiCall, MiClient};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What to keep subscribed on one node.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Node id.
    pub node_id: String,
    /// Our socket as OpenSIPS must see it (`udp:IP:PORT`).
    pub socket: String,
    /// Event names.
    pub events: Vec<String>,
    /// Lifetime asked for, seconds.
    pub expire_secs: u32,
    /// How often to check.
    pub check_interval: Duration,
}

/// Runs until `shutdown`; never gives up on a node.
pub async fn keep_subscribed(
    client: MiClient,
    subscription: Subscription,
    subscribed: callapi_kit::ops::Checks,
    shutdown: CancellationToken,
) {
    let mut node_was_up = true;
    loop {
        let checked = check_once(&client, &subscription).await;
        subscribed.set(&subscription.node_id, checked.is_ok());
        match checked {
            Ok(renewed) => {
                if !node_was_up {
                    tracing::info!(node = %subscription.node_id, "node answers again");
                }
                node_was_up = true;
                if !renewed.is_empty() {
                    tracing::info!(node = %subscription.node_id, events = ?renewed, "subscribed");
                }
            }
            Err(reason) => {
                if node_was_up {
                    tracing::warn!(node = %subscription.node_id, %reason, "cannot check event subscriptions");
                }
                node_was_up = false;
            }
        }
        // While a node is down, look again soon so it gets subscribed as soon as it is back.
        let wait = if node_was_up {
            subscription.check_interval
        } else {
            subscription.check_interval.min(Duration::from_secs(1))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Checks the node once; returns the events (re-)subscribed.
pub async fn check_once(
    client: &MiClient,
    subscription: &Subscription,
) -> Result<Vec<String>, String> {
    let listed = mi(client, &subscription.node_id, "subscribers_list", None).await?;
    let mut renewed = Vec::new();
    for event in &subscription.events {
        let ttl = our_ttl(&listed, event, &subscription.socket);
        let fresh_enough = ttl.is_some_and(|ttl| ttl * 2 > u64::from(subscription.expire_secs));
        if fresh_enough {
            continue;
        }
        mi(
            client,
            &subscription.node_id,
            "event_subscribe",
            Some(json!({
                "event": event,
                "socket": subscription.socket,
                "expire": subscription.expire_secs,
            })),
        )
        .await?;
        renewed.push(event.clone());
    }
    Ok(renewed)
}

/// Seconds left on our subscription to `event`, from a `subscribers_list` result.
pub fn our_ttl(listed: &Value, event: &str, socket: &str) -> Option<u64> {
    let events = listed.get("Events").and_then(Value::as_array)?;
    let entry = events
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(event))?;
    let subscribers = entry.get("Subscribers").and_then(Value::as_array)?;
    let ours = subscribers
        .iter()
        .find(|s| s.get("socket").and_then(Value::as_str) == Some(socket))?;
    // "ttl" is a number of seconds, or the string "expired".
    ours.get("ttl").and_then(Value::as_u64)
}

async fn mi(
    client: &MiClient,
    node_id: &str,
    method: &str,
    params: Option<Value>,
) -> Result<Value, String> {
    let call = MiCall {
        node_id: node_id.to_owned(),
        method: method.to_owned(),
        params_json: params.map(|p| p.to_string()).unwrap_or_default(),
        timeout: Duration::from_secs(4),
        tenant: String::new(),
        client: "event-ingest".to_owned(),
        hold_slot: Duration::ZERO,
    };
    match client.call(&call, None).await {
        Ok(MiAnswer::Result(json)) => {
            serde_json::from_str(&json).map_err(|e| format!("{method}: {e}"))
        }
        Ok(MiAnswer::Error { code, message, .. }) => {
            Err(format!("{method}: OpenSIPS answered {code} {message}"))
        }
        Err(err) => Err(format!("{method}: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_from_a_real_subscribers_list() {
        let listed = json!({"Events": [
            {"name": "E_DLG_STATE_CHANGED", "id": 6, "Subscribers": [
                {"socket": "udp:127.0.0.1:9097", "expire": 0, "ttl": "expired"},
                {"socket": "udp:127.0.0.1:9099", "expire": 3600, "ttl": 3375}]},
            {"name": "E_CALL_HOLD", "id": 8, "Subscribers": []}
        ]});
        assert_eq!(
            our_ttl(&listed, "E_DLG_STATE_CHANGED", "udp:127.0.0.1:9099"),
            Some(3375)
        );
        assert_eq!(
            our_ttl(&listed, "E_DLG_STATE_CHANGED", "udp:127.0.0.1:9097"),
            None
        );
        assert_eq!(our_ttl(&listed, "E_CALL_HOLD", "udp:127.0.0.1:9099"), None);
        assert_eq!(
            our_ttl(&listed, "E_CALL_TRANSFER", "udp:127.0.0.1:9099"),
            None
        );
        assert_eq!(our_ttl(&json!("OK"), "E_CALL_HOLD", "x"), None);
    }
}
