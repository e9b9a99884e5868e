//! Fair sharing of one node's MI slots between clients.
//!
//! OpenSIPS is protected by a bound on MI requests in flight per node. Without care one client
//! can take every slot: `t_uac_dlg` holds its slot while a phone rings (seconds, tens of
//! seconds), so a burst of ringing CallStarts from one connection made everyone else's short
//! commands (hold, end, subscription checks) wait or time out. Here:
//! - the node's limit (`total`) adapts to how OpenSIPS answers ([`crate::adaptive`]);
//! - long requests (`t_uac_dlg`) may use at most `long` of the slots and never more than three
//!   quarters of the current limit, so short ones always find room;
//! - one client (tenant + connection) may hold at most `long_per_client` long slots;
//! - when slots are scarce, waiting requests are served short first, then round-robin over
//!   clients, each client's own requests in order; at most `max_queued` wait, more are refused
//!   at once (the node is overloaded: better a fast, clear error than a pile-up).
//!
//! [`Slots`] is the pure bookkeeping (tested as a table); [`FairLimiter`] wraps it for tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::adaptive::{Aimd, Signal};

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
    /// Requests in flight at once (the starting point of the adaptive limit).
    pub total: usize,
    /// Long requests in flight at once.
    pub long: usize,
    /// Long requests in flight at once for one client.
    pub long_per_client: usize,
    /// Requests waiting for a slot at once; more are refused.
    pub max_queued: usize,
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
            max_queued: self.max_queued,
        }
    }
}

#[derive(Debug, Default)]
struct ClientQueue {
    short: VecDeque<u64>,
    long: VecDeque<u64>,
    long_running: usize,
    /// In `short_turn` (at most once).
    in_short_turn: bool,
    /// In `long_turn` (at most once).
    in_long_turn: bool,
    /// At its share of long slots, with long requests waiting: out of `long_turn` until one of
    /// its long requests ends.
    parked: bool,
}

impl ClientQueue {
    fn idle(&self) -> bool {
        self.short.is_empty()
            && self.long.is_empty()
            && self.long_running == 0
            && !self.in_short_turn
            && !self.in_long_turn
            && !self.parked
    }
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

/// The bookkeeping of one node's slots: who runs, who waits, who goes next. Each grant costs
/// O(1) amortised, whatever the number of clients waiting.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    /// Requests on the wire (granted, not answered): bounded by the limit.
    running: usize,
    /// Long slots held: long requests running plus slots kept after their reply (bounded by
    /// the long cap).
    long_running: usize,
    /// Slots kept after a reply (see [`Slots::keep`]): memory held in the node, no request on
    /// the wire.
    kept: usize,
    clients: HashMap<String, ClientQueue>,
    /// Clients with short requests waiting, in round-robin order.
    short_turn: VecDeque<String>,
    /// Clients with long requests waiting and below their share, in round-robin order.
    long_turn: VecDeque<String>,
    /// Clients with long requests waiting but at their share.
    parked: Vec<String>,
    waiting: usize,
    next_id: u64,
}

/// The node's queue is full: the request is refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} MI requests are already waiting for this node")]
pub struct QueueFull(pub usize);

impl Slots {
    /// No one running or waiting.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: limits.sane(),
            running: 0,
            long_running: 0,
            kept: 0,
            clients: HashMap::new(),
            short_turn: VecDeque::new(),
            long_turn: VecDeque::new(),
            parked: Vec::new(),
            waiting: 0,
            next_id: 1,
        }
    }

    /// Sets the node's current limit (the adaptive one); raising it lets waiters in.
    pub fn set_total(&mut self, total: usize) {
        let before = self.per_client();
        self.limits.total = total.max(1);
        if self.per_client() > before {
            // A larger share: every parked client gets another go.
            for client in std::mem::take(&mut self.parked) {
                if let Some(queue) = self.clients.get_mut(&client) {
                    queue.parked = false;
                    if !queue.in_long_turn {
                        queue.in_long_turn = true;
                        self.long_turn.push_back(client);
                    }
                }
            }
        }
    }

    /// The most long requests that may run now: at most three quarters of the limit, and
    /// always one slot left for short requests (unless the limit is 1).
    fn long_cap(&self) -> usize {
        let total = self.limits.total;
        self.limits
            .long
            .min(total * 3 / 4)
            .min(total.saturating_sub(1))
            .max(1)
    }

    /// The most long requests one client may run now.
    fn per_client(&self) -> usize {
        self.limits.long_per_client.min(self.long_cap())
    }

    /// Queues a request; returns its id (see [`Slots::grants`]), or refuses it when
    /// `max_queued` requests already wait.
    pub fn enqueue(&mut self, client: &str, class: Class) -> Result<u64, QueueFull> {
        if self.waiting >= self.limits.max_queued {
            return Err(QueueFull(self.waiting));
        }
        self.waiting += 1;
        let id = self.next_id;
        self.next_id += 1;
        let queue = self.clients.entry(client.to_owned()).or_default();
        match class {
            Class::Short => {
                queue.short.push_back(id);
                if !queue.in_short_turn {
                    queue.in_short_turn = true;
                    self.short_turn.push_back(client.to_owned());
                }
            }
            Class::Long => {
                queue.long.push_back(id);
                if !queue.in_long_turn && !queue.parked {
                    queue.in_long_turn = true;
                    self.long_turn.push_back(client.to_owned());
                }
            }
        }
        Ok(id)
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
        if removed {
            self.waiting = self.waiting.saturating_sub(1);
        }
        // Cancels are rare (a request timed out while queued): leave no trace in the turns.
        if queue.short.is_empty() && queue.in_short_turn {
            queue.in_short_turn = false;
            self.short_turn.retain(|c| c != client);
        }
        if queue.long.is_empty() && queue.in_long_turn {
            queue.in_long_turn = false;
            self.long_turn.retain(|c| c != client);
        }
        if queue.long.is_empty() && queue.parked {
            queue.parked = false;
            self.parked.retain(|c| c != client);
        }
        self.forget_if_idle(client);
        removed
    }

    /// Requests on the wire plus slots kept after a reply: how much of the node is in use.
    pub fn in_use(&self) -> usize {
        self.running + self.kept
    }

    /// A granted long request was answered but its effect goes on holding the node's memory
    /// (a REFERed INVITE ringing): it leaves the wire (its place in the limit is free) and
    /// keeps its long slot until [`Slots::release_kept`].
    pub fn keep(&mut self) {
        self.running = self.running.saturating_sub(1);
        self.kept += 1;
    }

    /// A slot kept after its reply is given back.
    pub fn release_kept(&mut self, client: &str) {
        self.kept = self.kept.saturating_sub(1);
        // As a long request's end, without the place in the limit it left already.
        self.running += 1;
        self.release(client, Class::Long);
    }

    /// A granted request finished.
    pub fn release(&mut self, client: &str, class: Class) {
        self.running = self.running.saturating_sub(1);
        if class == Class::Long {
            self.long_running = self.long_running.saturating_sub(1);
            let per_client = self.per_client();
            if let Some(queue) = self.clients.get_mut(client) {
                queue.long_running = queue.long_running.saturating_sub(1);
                if queue.parked && queue.long_running < per_client {
                    queue.parked = false;
                    self.parked.retain(|c| c != client);
                    if !queue.long.is_empty() && !queue.in_long_turn {
                        queue.in_long_turn = true;
                        self.long_turn.push_back(client.to_owned());
                    }
                }
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
        self.grant_short().or_else(|| self.grant_long())
    }

    fn grant_short(&mut self) -> Option<Grant> {
        while let Some(client) = self.short_turn.pop_front() {
            let Some(queue) = self.clients.get_mut(&client) else {
                continue;
            };
            let Some(id) = queue.short.pop_front() else {
                // Emptied by a cancel while in the turn.
                queue.in_short_turn = false;
                self.forget_if_idle(&client);
                continue;
            };
            if queue.short.is_empty() {
                queue.in_short_turn = false;
            } else {
                self.short_turn.push_back(client.clone());
            }
            self.running += 1;
            self.waiting = self.waiting.saturating_sub(1);
            // Short requests are not counted per client: it may have nothing left here.
            self.forget_if_idle(&client);
            return Some(Grant {
                id,
                class: Class::Short,
                client,
            });
        }
        None
    }

    fn grant_long(&mut self) -> Option<Grant> {
        if self.long_running >= self.long_cap() {
            return None;
        }
        let per_client = self.per_client();
        while let Some(client) = self.long_turn.pop_front() {
            let Some(queue) = self.clients.get_mut(&client) else {
                continue;
            };
            if queue.long.is_empty() {
                queue.in_long_turn = false;
                self.forget_if_idle(&client);
                continue;
            }
            if queue.long_running >= per_client {
                // At its share: wait out of the turn until one of its calls ends.
                queue.in_long_turn = false;
                queue.parked = true;
                self.parked.push(client);
                continue;
            }
            let Some(id) = queue.long.pop_front() else {
                continue;
            };
            queue.long_running += 1;
            if queue.long.is_empty() {
                queue.in_long_turn = false;
            } else {
                self.long_turn.push_back(client.clone());
            }
            self.long_running += 1;
            self.running += 1;
            self.waiting = self.waiting.saturating_sub(1);
            return Some(Grant {
                id,
                class: Class::Long,
                client,
            });
        }
        None
    }

    fn forget_if_idle(&mut self, client: &str) {
        if self.clients.get(client).is_some_and(ClientQueue::idle) {
            self.clients.remove(client);
        }
    }
}

struct Shared {
    slots: Slots,
    waiters: HashMap<u64, oneshot::Sender<()>>,
    limit: Aimd,
    origin: Instant,
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
    kept: bool,
}

impl Permit {
    /// The request was answered but its effect still holds the node's memory: it leaves the
    /// wire and keeps its long slot until dropped (see [`Slots::keep`]). Only a long permit is
    /// kept; a short one is returned as it is.
    pub fn keep(mut self) -> Self {
        if self.class == Class::Long
            && !self.kept
            && let Some(mut shared) = self.limiter.lock()
        {
            shared.slots.keep();
            FairLimiter::hand_out(&mut shared);
            self.kept = true;
        }
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.kept {
            if let Some(mut shared) = self.limiter.lock() {
                shared.slots.release_kept(&self.client);
                FairLimiter::hand_out(&mut shared);
            }
        } else {
            self.limiter.release(&self.client, self.class);
        }
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
    /// A limiter with `limits`, whose total adapts as `limit` says.
    pub fn new(limits: Limits, limit: Aimd) -> Self {
        let mut slots = Slots::new(limits);
        slots.set_total(limit.limit());
        Self {
            shared: Arc::new(Mutex::new(Shared {
                slots,
                waiters: HashMap::new(),
                limit,
                origin: Instant::now(),
            })),
        }
    }

    /// Tells the adaptive limit how a request went.
    pub fn observe(&self, signal: Signal) {
        if let Some(mut shared) = self.lock() {
            let now = shared.origin.elapsed();
            let before = shared.slots.limits.total;
            let in_use = shared.slots.in_use();
            let total = shared.limit.observe(signal, now, in_use);
            if total < before {
                // At most once per cooldown: a burst of overload signals is one line.
                tracing::warn!(
                    before,
                    total,
                    ?signal,
                    "OpenSIPS node overloaded: fewer MI requests in flight"
                );
            } else if total > before {
                tracing::debug!(before, total, "MI concurrency limit raised");
            }
            if total != before {
                shared.slots.set_total(total);
                Self::hand_out(&mut shared);
            }
        }
    }

    /// The current limit of requests in flight.
    pub fn limit(&self) -> usize {
        self.lock().map_or(0, |shared| shared.slots.limits.total)
    }

    /// Requests holding a slot (on the wire, or kept after their reply) and requests waiting
    /// for one, now.
    pub fn load(&self) -> (usize, usize) {
        self.lock().map_or((0, 0), |shared| {
            (shared.slots.in_use(), shared.slots.waiting)
        })
    }

    /// Waits for a slot for a request of `client` of `class`; refused at once when the
    /// node's queue is full.
    pub async fn acquire(&self, client: &str, class: Class) -> Result<Permit, QueueFull> {
        let permit = || Permit {
            limiter: self.clone(),
            client: client.to_owned(),
            class,
            kept: false,
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let Some(mut shared) = self.lock() else {
                // A poisoned lock means a panic elsewhere: run unbounded rather than hang.
                return Ok(permit());
            };
            let id = shared.slots.enqueue(client, class)?;
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
        Ok(permit())
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
            max_queued: 100,
        }
    }

    fn ids(grants: &[Grant]) -> Vec<u64> {
        grants.iter().map(|g| g.id).collect()
    }

    #[test]
    fn one_client_cannot_take_every_long_slot() {
        let mut slots = Slots::new(limits(4, 3, 2));
        let hog: Vec<u64> = (0..6)
            .map(|_| slots.enqueue("a", Class::Long).unwrap())
            .collect();
        assert_eq!(ids(&slots.grants()), hog[..2]);
        let other = slots.enqueue("b", Class::Long).unwrap();
        assert_eq!(ids(&slots.grants()), [other]);
        // Long slots full (3 of 3): a short request still runs.
        let end = slots.enqueue("a", Class::Short).unwrap();
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
        let a1 = slots.enqueue("a", Class::Short).unwrap();
        let a2 = slots.enqueue("a", Class::Short).unwrap();
        let a3 = slots.enqueue("a", Class::Short).unwrap();
        let b1 = slots.enqueue("b", Class::Short).unwrap();
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
        let running = slots.enqueue("x", Class::Short).unwrap();
        assert_eq!(ids(&slots.grants()), [running]);
        let long = slots.enqueue("a", Class::Long).unwrap();
        let short = slots.enqueue("b", Class::Short).unwrap();
        slots.release("x", Class::Short);
        assert_eq!(ids(&slots.grants()), [short]);
        slots.release("b", Class::Short);
        assert_eq!(ids(&slots.grants()), [long]);
    }

    #[test]
    fn a_cancelled_waiter_is_skipped_and_a_granted_one_is_not_cancelled() {
        let mut slots = Slots::new(limits(1, 1, 1));
        let first = slots.enqueue("a", Class::Short).unwrap();
        let second = slots.enqueue("a", Class::Short).unwrap();
        assert_eq!(ids(&slots.grants()), [first]);
        assert!(!slots.cancel("a", first));
        assert!(slots.cancel("a", second));
        slots.release("a", Class::Short);
        assert!(slots.grants().is_empty());
        assert!(
            slots.clients.is_empty() && slots.short_turn.is_empty() && slots.long_turn.is_empty()
        );
    }

    fn aimd(initial: usize, max: usize) -> Aimd {
        Aimd::new(
            1,
            initial,
            max,
            std::time::Duration::from_millis(500),
            std::time::Duration::ZERO,
        )
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let mut slots = Slots::new(Limits {
            max_queued: 2,
            ..limits(1, 1, 1)
        });
        let running = slots.enqueue("a", Class::Short).unwrap();
        assert_eq!(ids(&slots.grants()), [running]);
        slots.enqueue("a", Class::Short).unwrap();
        let cancelled = slots.enqueue("b", Class::Short).unwrap();
        assert_eq!(slots.enqueue("c", Class::Short), Err(QueueFull(2)));
        assert!(slots.cancel("b", cancelled));
        assert!(slots.enqueue("c", Class::Short).is_ok(), "room again");
    }

    #[test]
    fn a_lower_limit_leaves_long_requests_less_room_and_short_ones_some() {
        let mut slots = Slots::new(limits(8, 8, 8));
        let longs: Vec<u64> = (0..8)
            .map(|_| slots.enqueue("a", Class::Long).unwrap())
            .collect();
        assert_eq!(ids(&slots.grants()), longs[..6], "three quarters of 8");
        slots.set_total(4);
        for _ in 0..6 {
            slots.release("a", Class::Long);
        }
        assert_eq!(ids(&slots.grants()), longs[6..8], "three of 4, ...");
        let short = slots.enqueue("b", Class::Short).unwrap();
        assert_eq!(
            ids(&slots.grants()),
            [short],
            "... and the 4th is for short ones"
        );
    }

    #[test]
    fn a_kept_slot_leaves_the_wire_but_holds_its_long_slot() {
        let mut slots = Slots::new(limits(2, 1, 1));
        let long = slots.enqueue("a", Class::Long).unwrap();
        assert_eq!(ids(&slots.grants()), [long]);
        slots.keep();
        assert_eq!(slots.in_use(), 1);
        // Its place on the wire is free: two short requests run at once ...
        let shorts = [
            slots.enqueue("b", Class::Short).unwrap(),
            slots.enqueue("b", Class::Short).unwrap(),
        ];
        assert_eq!(ids(&slots.grants()), shorts);
        assert_eq!(slots.in_use(), 3);
        // ... but the long slot stays taken until the kept one is given back.
        let next = slots.enqueue("a", Class::Long).unwrap();
        slots.release("b", Class::Short);
        slots.release("b", Class::Short);
        assert!(slots.grants().is_empty(), "long cap");
        slots.release_kept("a");
        assert_eq!(ids(&slots.grants()), [next]);
        assert_eq!(slots.in_use(), 1);
    }

    #[tokio::test]
    async fn overload_signals_lower_the_limit_and_answers_raise_it() {
        let limiter = FairLimiter::new(limits(64, 48, 48), aimd(20, 64));
        assert_eq!(limiter.limit(), 20);
        limiter.observe(Signal::Overload);
        assert_eq!(limiter.limit(), 14);
        // The limit grows only while in use.
        let mut permits = Vec::new();
        for _ in 0..14 {
            permits.push(limiter.acquire("c", Class::Short).await.expect("slot"));
        }
        for _ in 0..15 {
            limiter.observe(Signal::Answered {
                short: true,
                latency: std::time::Duration::from_millis(1),
            });
        }
        assert_eq!(limiter.limit(), 15);
    }

    #[test]
    fn random_traffic_keeps_every_bound_and_serves_everyone_in_the_end() {
        // A small linear congruential generator: no dependency, same run every time.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        let mut slots = Slots::new(limits(12, 8, 3));
        let mut waiting: Vec<(String, Class, u64)> = Vec::new();
        let mut running: Vec<(String, Class)> = Vec::new();
        let mut granted = 0usize;
        for step in 0..20_000u64 {
            match next(10) {
                0..=4 => {
                    let client = format!("c{}", next(40));
                    let class = if next(3) == 0 {
                        Class::Short
                    } else {
                        Class::Long
                    };
                    if let Ok(id) = slots.enqueue(&client, class) {
                        waiting.push((client, class, id));
                    }
                }
                5 if !waiting.is_empty() => {
                    let (client, class, id) =
                        waiting.swap_remove(next(waiting.len() as u64) as usize);
                    if !slots.cancel(&client, id) {
                        panic!("step {step}: {id} of {client} ({class:?}) was waiting");
                    }
                }
                6..=8 if !running.is_empty() => {
                    let (client, class) = running.swap_remove(next(running.len() as u64) as usize);
                    slots.release(&client, class);
                }
                _ => {}
            }
            for grant in slots.grants() {
                let at = waiting
                    .iter()
                    .position(|(_, _, id)| *id == grant.id)
                    .unwrap_or_else(|| panic!("step {step}: granted {grant:?} was not waiting"));
                waiting.swap_remove(at);
                running.push((grant.client, grant.class));
                granted += 1;
            }
            let long = running.iter().filter(|(_, c)| *c == Class::Long).count();
            assert!(
                running.len() <= 12 && long <= slots.long_cap(),
                "step {step}"
            );
            for client in running.iter().map(|(c, _)| c) {
                let theirs = running
                    .iter()
                    .filter(|(c, k)| c == client && *k == Class::Long)
                    .count();
                assert!(theirs <= 3, "step {step}: {client} runs {theirs} long");
            }
            assert_eq!(slots.waiting, waiting.len(), "step {step}");
        }
        // Everyone left is served once the running requests end.
        while !running.is_empty() || !waiting.is_empty() {
            for (client, class) in std::mem::take(&mut running) {
                slots.release(&client, class);
            }
            for grant in slots.grants() {
                waiting.retain(|(_, _, id)| *id != grant.id);
                running.push((grant.client, grant.class));
                granted += 1;
            }
            assert!(
                !running.is_empty() || waiting.is_empty(),
                "waiters left with nothing running: {waiting:?}"
            );
        }
        assert!(granted > 1_000, "{granted}");
        assert!(slots.clients.is_empty(), "{:?}", slots.clients);
        assert!(
            slots.short_turn.is_empty() && slots.long_turn.is_empty() && slots.parked.is_empty()
        );
    }

    #[test]
    fn limits_are_made_sane() {
        assert_eq!(limits(0, 0, 0).sane(), limits(1, 1, 1));
        assert_eq!(limits(8, 20, 30).sane(), limits(8, 8, 8));
    }

    #[tokio::test]
    async fn permits_free_their_slot_and_timed_out_waits_leave_no_trace() {
        let limiter = FairLimiter::new(limits(1, 1, 1), aimd(1, 1));
        let held = limiter.acquire("a", Class::Long).await.unwrap();
        let timed_out = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            limiter.acquire("b", Class::Long),
        )
        .await;
        assert!(timed_out.is_err());
        {
            let shared = limiter.lock().unwrap();
            assert!(shared.waiters.is_empty(), "the timed-out waiter is gone");
            assert_eq!(shared.slots.waiting, 0);
            assert_eq!(shared.slots.running, 1);
        }
        drop(held);
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            limiter.acquire("c", Class::Short),
        )
        .await;
        assert!(again.is_ok(), "the slot was given back");
        drop(again);
        let shared = limiter.lock().unwrap();
        assert_eq!((shared.slots.running, shared.slots.long_running), (0, 0));
        assert!(shared.slots.clients.is_empty() && shared.slots.short_turn.is_empty());
    }
}
