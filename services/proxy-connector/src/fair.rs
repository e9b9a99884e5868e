//! Fair sharing of one node's MI slots between clients.
//!
//! OpenSIPS is protected by a bound on MI requests in flight per node. Without care one client
//! can take every slot: `t_uac_dlg` holds its slot while a phone rings (seconds, tens of
//! seconds), so a burst of ringing CallStarts from one connection made everyone else's short
//! commands (hold, end, subscription checks) wait or time out. Here:
//! - long requests (`t_uac_dlg`) may use at most `long` of the `total` slots, so short ones
//!   always find room;
//! - one client (tenant + connection) may hold at most `long_per_client` long slots;
//! - when slots are scarce, waiting requests are served short first, then round-robin over
//!   clients, each client's own requests in order.
//!
//! [`Slots`] is the pure bookkeeping (tested as a table); [`FairLimiter`] wraps it for tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// How a request uses its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Answered at once by OpenSIPS.
    Short,
    /// Answered after a phone answers (`t_uac_dlg`): holds its slot for seconds.
    Long,
}

impl Class {
    /// The class of an MI command.
    pub fn of(method: &str) -> Self {
        match method {
            "t_uac_dlg" | "tm:uac_dlg" => Self::Long,
            _ => Self::Short,
        }
    }
}

/// The bounds of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight at once.
    pub total: usize,
    /// Long requests in flight at once.
    pub long: usize,
    /// Long requests in flight at once for one client.
    pub long_per_client: usize,
}

impl Limits {
    /// Bounds made consistent: at least one slot of each kind, long ≤ total.
    pub fn sane(self) -> Self {
        let total = self.total.max(1);
        let long = self.long.clamp(1, total);
        Self {
            total,
            long,
            long_per_client: self.long_per_client.clamp(1, long),
        }
    }
}

#[derive(Debug, Default)]
struct ClientQueue {
    short: VecDeque<u64>,
    long: VecDeque<u64>,
    long_running: usize,
}

/// A request given a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The waiter's id.
    pub id: u64,
    /// Its class.
    pub class: Class,
    /// Its client.
    pub client: String,
}

/// The bookkeeping of one node's slots: who runs, who waits, who goes next.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    running: usize,
    long_running: usize,
    clients: HashMap<String, ClientQueue>,
    /// Clients with waiters, in round-robin order.
    turn: VecDeque<String>,
    next_id: u64,
}

impl Slots {
    /// No one running or waiting.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: limits.sane(),
            running: 0,
            long_running: 0,
            clients: HashMap::new(),
            turn: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Queues a request; returns its id (see [`Slots::grants`]).
    pub fn enqueue(&mut self, client: &str, class: Class) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let queue = self.clients.entry(client.to_owned()).or_default();
        match class {
            Class::Short => queue.short.push_back(id),
            Class::Long => queue.long.push_back(id),
        }
        if !self.turn.iter().any(|c| c == client) {
            self.turn.push_back(client.to_owned());
        }
        id
    }

    /// Removes a waiter that gave up; false if it is not waiting (already granted).
    pub fn cancel(&mut self, client: &str, id: u64) -> bool {
        let Some(queue) = self.clients.get_mut(client) else {
            return false;
        };
        let before = queue.short.len() + queue.long.len();
        queue.short.retain(|w| *w != id);
        queue.long.retain(|w| *w != id);
        let removed = queue.short.len() + queue.long.len() < before;
        self.forget_if_idle(client);
        removed
    }

    /// A granted request finished.
    pub fn release(&mut self, client: &str, class: Class) {
        self.running = self.running.saturating_sub(1);
        if class == Class::Long {
            self.long_running = self.long_running.saturating_sub(1);
            if let Some(queue) = self.clients.get_mut(client) {
                queue.long_running = queue.long_running.saturating_sub(1);
            }
            self.forget_if_idle(client);
        }
    }

    /// Every waiter that may run now, in the order they get their slots.
    pub fn grants(&mut self) -> Vec<Grant> {
        let mut granted = Vec::new();
        while let Some(grant) = self.grant_one() {
            granted.push(grant);
        }
        granted
    }

    fn grant_one(&mut self) -> Option<Grant> {
        if self.running >= self.limits.total {
            return None;
        }
        let short = self.turn.iter().position(|c| {
            self.clients
                .get(c)
                .is_some_and(|queue| !queue.short.is_empty())
        });
        let pick = short.map(|at| (at, Class::Short)).or_else(|| {
            if self.long_running >= self.limits.long {
                return None;
            }
            self.turn
                .iter()
                .position(|c| {
                    self.clients.get(c).is_some_and(|queue| {
                        !queue.long.is_empty() && queue.long_running < self.limits.long_per_client
                    })
                })
                .map(|at| (at, Class::Long))
        });
        let (at, class) = pick?;
        let client = self.turn.remove(at)?;
        let queue = self.clients.get_mut(&client)?;
        let id = match class {
            Class::Short => queue.short.pop_front()?,
            Class::Long => {
                queue.long_running += 1;
                self.long_running += 1;
                queue.long.pop_front()?
            }
        };
        self.running += 1;
        if !queue.short.is_empty() || !queue.long.is_empty() {
            self.turn.push_back(client.clone());
        }
        self.forget_if_idle(&client);
        Some(Grant { id, class, client })
    }

    fn forget_if_idle(&mut self, client: &str) {
        let idle = self.clients.get(client).is_some_and(|queue| {
            queue.short.is_empty() && queue.long.is_empty() && queue.long_running == 0
        });
        let waiting = self
            .clients
            .get(client)
            .is_some_and(|queue| !queue.short.is_empty() || !queue.long.is_empty());
        if !waiting {
            self.turn.retain(|c| c != client);
        }
        if idle {
            self.clients.remove(client);
        }
    }
}

struct Shared {
    slots: Slots,
    waiters: HashMap<u64, oneshot::Sender<()>>,
}

/// [`Slots`] for async tasks: `acquire` waits for a slot; dropping the [`Permit`] frees it.
#[derive(Clone)]
pub struct FairLimiter {
    shared: Arc<Mutex<Shared>>,
}

/// A held slot; freed on drop.
pub struct Permit {
    limiter: FairLimiter,
    client: String,
    class: Class,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(&self.client, self.class);
    }
}

/// Cancels a wait that did not complete (its request timed out while queued).
struct Waiting<'a> {
    limiter: &'a FairLimiter,
    client: &'a str,
    class: Class,
    id: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let granted = match self.limiter.lock() {
            Some(mut shared) => {
                shared.waiters.remove(&self.id);
                !shared.slots.cancel(self.client, self.id)
            }
            None => false,
        };
        if granted {
            // It got its slot just as it gave up: give the slot back.
            self.limiter.release(self.client, self.class);
        }
    }
}

impl FairLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                slots: Slots::new(limits),
                waiters: HashMap::new(),
            })),
        }
    }

    /// Waits for a slot for a request of `client` of `class`.
    pub async fn acquire(&self, client: &str, class: Class) -> Permit {
        let permit = || Permit {
            limiter: self.clone(),
            client: client.to_owned(),
            class,
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let Some(mut shared) = self.lock() else {
                // A poisoned lock means a panic elsewhere: run unbounded rather than hang.
                return permit();
            };
            let id = shared.slots.enqueue(client, class);
            shared.waiters.insert(id, tx);
            Self::hand_out(&mut shared);
            id
        };
        let mut waiting = Waiting {
            limiter: self,
            client,
            class,
            id,
            done: false,
        };
        let _ = rx.await;
        waiting.done = true;
        permit()
    }

    fn release(&self, client: &str, class: Class) {
        if let Some(mut shared) = self.lock() {
            shared.slots.release(client, class);
            Self::hand_out(&mut shared);
        }
    }

    fn hand_out(shared: &mut Shared) {
        loop {
            let grants = shared.slots.grants();
            if grants.is_empty() {
                return;
            }
            for grant in grants {
                let delivered = shared
                    .waiters
                    .remove(&grant.id)
                    .is_some_and(|tx| tx.send(()).is_ok());
                if !delivered {
                    shared.slots.release(&grant.client, grant.class);
                }
            }
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, Shared>> {
        self.shared.lock().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, long: usize, long_per_client: usize) -> Limits {
        Limits {
            total,
            long,
            long_per_client,
        }
    }

    fn ids(grants: &[Grant]) -> Vec<u64> {
        grants.iter().map(|g| g.id).collect()
    }

    #[test]
    fn one_client_cannot_take_every_long_slot() {
        let mut slots = Slots::new(limits(4, 3, 2));
        let hog: Vec<u64> = (0..6).map(|_| slots.enqueue("a", Class::Long)).collect();
        assert_eq!(ids(&slots.grants()), hog[..2]);
        let other = slots.enqueue("b", Class::Long);
        assert_eq!(ids(&slots.grants()), [other]);
        // Long slots full (3 of 3): a short request still runs.
        let end = slots.enqueue("a", Class::Short);
        assert_eq!(ids(&slots.grants()), [end]);
        // All 4 slots in use: nothing more.
        assert!(slots.grants().is_empty());
        slots.release("a", Class::Short);
        assert!(slots.grants().is_empty(), "a is at its long share");
        slots.release("a", Class::Long);
        assert_eq!(ids(&slots.grants()), [hog[2]]);
    }

    #[test]
    fn waiting_clients_take_turns() {
        let mut slots = Slots::new(limits(1, 1, 1));
        let a1 = slots.enqueue("a", Class::Short);
        let a2 = slots.enqueue("a", Class::Short);
        let a3 = slots.enqueue("a", Class::Short);
        let b1 = slots.enqueue("b", Class::Short);
        let mut order = Vec::new();
        for _ in 0..4 {
            let granted = slots.grants();
            order.extend(ids(&granted));
            for grant in granted {
                slots.release(&grant.client, grant.class);
            }
        }
        assert_eq!(order, [a1, b1, a2, a3]);
    }

    #[test]
    fn short_requests_go_before_long_ones() {
        let mut slots = Slots::new(limits(1, 1, 1));
        let running = slots.enqueue("x", Class::Short);
        assert_eq!(ids(&slots.grants()), [running]);
        let long = slots.enqueue("a", Class::Long);
        let short = slots.enqueue("b", Class::Short);
        slots.release("x", Class::Short);
        assert_eq!(ids(&slots.grants()), [short]);
        slots.release("b", Class::Short);
        assert_eq!(ids(&slots.grants()), [long]);
    }

    #[test]
    fn a_cancelled_waiter_is_skipped_and_a_granted_one_is_not_cancelled() {
        let mut slots = Slots::new(limits(1, 1, 1));
        let first = slots.enqueue("a", Class::Short);
        let second = slots.enqueue("a", Class::Short);
        assert_eq!(ids(&slots.grants()), [first]);
        assert!(!slots.cancel("a", first));
        assert!(slots.cancel("a", second));
        slots.release("a", Class::Short);
        assert!(slots.grants().is_empty());
        assert!(slots.clients.is_empty() && slots.turn.is_empty());
    }

    #[test]
    fn limits_are_made_sane() {
        assert_eq!(limits(0, 0, 0).sane(), limits(1, 1, 1));
        assert_eq!(limits(8, 20, 30).sane(), limits(8, 8, 8));
    }

    #[tokio::test]
    async fn permits_free_their_slot_and_timed_out_waits_leave_no_trace() {
        let limiter = FairLimiter::new(limits(1, 1, 1));
        let held = limiter.acquire("a", Class::Long).await;
        let timed_out = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            limiter.acquire("b", Class::Long),
        )
        .await;
        assert!(timed_out.is_err());
        drop(held);
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            limiter.acquire("c", Class::Short),
        )
        .await;
        assert!(again.is_ok(), "the slot was given back");
    }
}
