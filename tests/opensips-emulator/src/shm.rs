//! The node's shared-memory budget. A real OpenSIPS keeps every SIP transaction and every
//! asynchronous MI handler in a fixed-size shared memory (`-m`); under load it runs out
//! ("not enough free shm memory"), refuses work and recovers once the load eases. The emulator
//! models that memory as a number of slots:
//!
//! - a *long* transaction holds one slot while it lasts: a `t_uac_dlg` from its arrival until
//!   its final reply (its async handler and its INVITE), and an INVITE the proxy relays (a
//!   transfer target or a phone-placed call) while it rings (dialog states 1 and 2);
//! - a *short* transaction (the BYE of `dlg_end_dlg`, the REFER of `call_transfer`, the
//!   re-INVITEs of `call_hold`) is answered within milliseconds: it needs a free slot at that
//!   moment but is not counted as held.
//!
//! Work is admitted only while fewer than `budget` slots are held, so the node can never be
//! pushed past its budget: the high-water mark is at most the budget by construction. What was
//! refused instead is counted, so tests can tell how often callapi hit the limit.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// What the budget looks like now (served as `GET /emulator/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Slots held now (long transactions in flight).
    pub in_flight: usize,
    /// The most slots ever held at once.
    pub high_water: usize,
    /// The budget (0: unlimited).
    pub budget: usize,
    /// Requests and transactions refused for want of memory.
    pub refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    in_flight: usize,
    high_water: usize,
    refused: u64,
}

/// The budget of one node.
#[derive(Debug)]
pub struct Shm {
    budget: usize,
    counters: Mutex<Counters>,
}

/// One held slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    shm: Arc<Shm>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counters = self.shm.lock();
        counters.in_flight = counters.in_flight.saturating_sub(1);
    }
}

impl Shm {
    /// A budget of `budget` slots (0: unlimited, only counted).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            budget,
            counters: Mutex::new(Counters::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn full(&self, counters: &Counters) -> bool {
        self.budget > 0 && counters.in_flight >= self.budget
    }

    fn refuse(&self, counters: &mut Counters, what: &str) {
        counters.refused += 1;
        tracing::error!(
            "ERROR:core:fm_malloc: not enough free shm memory for {what} ({} of {} transactions \
             in flight), please increase the \"-m\" command line parameter!",
            counters.in_flight,
            self.budget
        );
    }

    /// A slot for a long transaction (`what` names it in the log), or `None` (counted as
    /// refused) when the budget is used up.
    pub fn acquire(self: &Arc<Self>, what: &str) -> Option<Slot> {
        let mut counters = self.lock();
        if self.full(&counters) {
            self.refuse(&mut counters, what);
            return None;
        }
        counters.in_flight += 1;
        if counters.in_flight > counters.high_water {
            counters.high_water = counters.in_flight;
            if self.budget > 0 {
                tracing::info!(
                    high_water = counters.high_water,
                    budget = self.budget,
                    "shm high-water mark"
                );
            }
        }
        Some(Slot { shm: self.clone() })
    }

    /// Whether a short transaction (`what`) finds memory now; false is counted as refused.
    pub fn room(&self, what: &str) -> bool {
        let mut counters = self.lock();
        if self.full(&counters) {
            self.refuse(&mut counters, what);
            return false;
        }
        true
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let counters = self.lock();
        Stats {
            in_flight: counters.in_flight,
            high_water: counters.high_water,
            budget: self.budget,
            refused: counters.refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_past_the_budget_and_recovers() {
        let shm = Shm::new(2);
        let a = shm.acquire("a");
        let b = shm.acquire("b");
        assert!(a.is_some() && b.is_some());
        assert!(shm.acquire("c").is_none());
        assert!(!shm.room("bye"));
        assert_eq!(
            shm.stats(),
            Stats {
                in_flight: 2,
                high_water: 2,
                budget: 2,
                refused: 2
            }
        );
        drop(a);
        assert!(shm.room("bye"));
        let c = shm.acquire("c");
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(shm.stats().in_flight, 0);
        assert_eq!(shm.stats().high_water, 2);
    }

    #[test]
    fn zero_is_unlimited_but_counted() {
        let shm = Shm::new(0);
        let slots: Vec<Slot> = (0..100).filter_map(|_| shm.acquire("x")).collect();
        assert_eq!(slots.len(), 100);
        assert!(shm.room("bye"));
        assert_eq!(shm.stats().high_water, 100);
        assert_eq!(shm.stats().refused, 0);
    }
}
