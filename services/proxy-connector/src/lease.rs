//! Node slots kept after a reply. `call_transfer` is answered at once, but the INVITE its REFER
//! makes rings on inside OpenSIPS, holding a transaction in its shared memory: counting only MI
//! requests in flight let a storm of click-to-dials push a node out of memory. A request that
//! asks for it (`MiRequest.hold_slot_ms`) keeps its slot after a result reply until the
//! requester publishes on the reply's `release_subject`, or its hold time ends (a requester
//! that died never leaks a slot).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use callapi_kit::subjects;
use tokio::sync::oneshot;

use crate::fair::Permit;

/// The slots one connector instance keeps for one node.
pub struct Leases {
    /// `callapi.v1.mi-release.<node>.<instance>`: a lease's subject is this plus `.<id>`.
    prefix: String,
    held: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_id: AtomicU64,
}

impl Leases {
    /// The leases of `node` kept by this instance (`instance`: unique among the node's
    /// connectors, so a release reaches the one holding the slot).
    pub fn new(node: &str, instance: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: subjects::mi_release(node, instance),
            held: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The wildcard subject carrying every release for these leases.
    pub fn subscription(&self) -> String {
        format!("{}.*", self.prefix)
    }

    /// Keeps `permit` until released or `hold` has passed; returns the release subject.
    pub fn keep(self: &Arc<Self>, permit: Permit, hold: Duration) -> String {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (release, released) = oneshot::channel();
        self.lock().insert(id, release);
        let leases = Arc::downgrade(self);
        tokio::spawn(async move {
            if tokio::time::timeout(hold, released).await.is_err() {
                tracing::debug!(
                    lease = id,
                    ?hold,
                    "kept node slot freed at the end of its hold time"
                );
            }
            if let Some(leases) = leases.upgrade() {
                leases.lock().remove(&id);
            }
            drop(permit);
        });
        format!("{}.{id}", self.prefix)
    }

    /// Frees the slot kept under `subject` (a release message's subject); false if no such
    /// lease is held (already released, expired, or not ours).
    pub fn release(&self, subject: &str) -> bool {
        let Some(id) = subject
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            return false;
        };
        match self.lock().remove(&id) {
            Some(release) => release.send(()).is_ok(),
            None => false,
        }
    }

    /// Slots kept now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adaptive::Aimd;
    use crate::fair::{Class, FairLimiter, Limits};

    fn one_long_slot() -> FairLimiter {
        FairLimiter::new(
            Limits {
                total: 2,
                long: 1,
                long_per_client: 1,
                max_queued: 8,
            },
            Aimd::new(2, 2, 2, Duration::from_secs(1), Duration::ZERO),
        )
    }

    async fn long_slot_free(limiter: &FairLimiter) -> bool {
        tokio::time::timeout(Duration::from_millis(50), limiter.acquire("c", Class::Long))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_kept_slot_is_freed_by_its_release_subject() {
        let limiter = one_long_slot();
        let leases = Leases::new("node1", "abc");
        let permit = limiter.acquire("c", Class::Long).await.expect("slot");
        let subject = leases.keep(permit.keep(), Duration::from_secs(60));
        assert!(
            subject.starts_with("callapi.v1.mi-release.node1.abc."),
            "{subject}"
        );
        assert_eq!(leases.held(), 1);
        assert!(!long_slot_free(&limiter).await, "kept");
        assert!(
            !leases.release("callapi.v1.mi-release.node1.other.1"),
            "not ours"
        );
        assert!(leases.release(&subject));
        assert!(!leases.release(&subject), "only once");
        assert!(long_slot_free(&limiter).await, "freed");
        assert_eq!(leases.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_slot_nobody_releases_is_freed_at_the_end_of_its_hold_time() {
        let limiter = one_long_slot();
        let leases = Leases::new("node1", "abc");
        let permit = limiter.acquire("c", Class::Long).await.expect("slot");
        let subject = leases.keep(permit.keep(), Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!long_slot_free(&limiter).await, "still kept");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(long_slot_free(&limiter).await, "freed");
        assert!(!leases.release(&subject), "gone");
    }
}
