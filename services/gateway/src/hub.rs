//! Routes notifications from NATS to the connection that started the command.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use callapi_proto::v1::Notification;
use futures::StreamExt as _;
use prost::Message as _;

use crate::connection::Outgoing;
use crate::outbox::Outbox;

/// One live connection as the hub sees it.
#[derive(Clone)]
pub(crate) struct ConnectionHandle {
    /// The tenant of its client.
    pub tenant: String,
    /// Its writer's queue; a client that cannot keep up is dropped by the queue itself.
    pub outbox: Outbox,
}

/// The connections of this gateway, by connection id.
#[derive(Clone, Default)]
pub(crate) struct Hub {
    connections: Arc<RwLock<HashMap<String, ConnectionHandle>>>,
}

impl Hub {
    /// Registers a connection.
    pub fn add(&self, id: String, handle: ConnectionHandle) {
        if let Ok(mut map) = self.connections.write() {
            map.insert(id, handle);
        }
    }

    /// Forgets a connection.
    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.connections.write() {
            map.remove(id);
        }
    }

    fn get(&self, id: &str) -> Option<ConnectionHandle> {
        self.connections.read().ok()?.get(id).cloned()
    }

    /// Forwards every notification to its connection until the subscription ends.
    pub async fn dispatch(self, mut notifications: async_nats::Subscriber) {
        while let Some(message) = notifications.next().await {
            let notification = match Notification::decode(message.payload.as_ref()) {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(%err, "undecodable notification");
                    continue;
                }
            };
            let Some(handle) = self.get(&notification.connection_id) else {
                tracing::debug!(cmd_id = %notification.cmd_id, "notification for a closed connection");
                continue;
            };
            if handle.tenant != notification.tenant {
                tracing::warn!(cmd_id = %notification.cmd_id, "notification for another tenant dropped");
                continue;
            }
            let Some(kind) = notification.kind else {
                continue;
            };
            let outgoing = Outgoing::Notification {
                cmd_id: notification.cmd_id,
                kind,
            };
            // Never waits: past the queue's limits the connection is killed (and logged).
            let _ = handle.outbox.push(outgoing);
        }
    }
}
