//! The commands of one client, without I/O: which are pending (sent, not yet taken by a
//! commands replica) or live (taken, not yet `Ended`), what is held back for a pending command,
//! and when a live one is overdue. Time is passed in; the caller does the writing.
//!
//! A command's notifications may overtake its `Started` reply (they come from commands over
//! NATS while the ack is still on its way): they are held while the command is pending and
//! released, in order, right after `Started`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

/// Extra time given to a commands replica beyond the deadline it announced.
pub const OVERDUE_MARGIN: Duration = Duration::from_secs(3);

/// Whether a command may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Registered as pending, as this submission of the connection (sent with the command and
    /// echoed in its notifications).
    Admitted {
        /// The submission's number.
        attempt: u64,
    },
    /// A running command already has this id.
    Duplicate,
    /// The client has as many commands in flight as it may.
    Full {
        /// The limit.
        limit: usize,
    },
}

/// What to do with a notification that arrived.
#[derive(Debug, PartialEq)]
pub enum Delivery<N> {
    /// Write it now (and the command is over if it was its end).
    Deliver(N),
    /// Held back until the command's `Started` is written.
    Held,
    /// No such command (ended, refused, or never started here): drop it.
    Unknown(N),
}

#[derive(Debug)]
enum State<N> {
    Pending { attempt: u64, held: Vec<(N, bool)> },
    Live { attempt: u64, overdue_at: Instant },
}

impl<N> State<N> {
    fn attempt(&self) -> u64 {
        match self {
            State::Pending { attempt, .. } | State::Live { attempt, .. } => *attempt,
        }
    }
}

/// The commands of one client. `N` is a notification as the caller keeps it.
#[derive(Debug)]
pub struct CommandTracker<N> {
    commands: HashMap<String, State<N>>,
    limit: usize,
    /// The last submission number given.
    attempts: u64,
}

impl<N> CommandTracker<N> {
    /// A tracker allowing `limit` commands in flight at once.
    pub fn new(limit: usize) -> Self {
        Self {
            commands: HashMap::new(),
            limit,
            attempts: 0,
        }
    }

    /// Commands in flight (pending or live).
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether no command is in flight.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Registers `cmd_id` as pending, unless it is in use or the client is at its limit.
    pub fn admit(&mut self, cmd_id: &str) -> Admission {
        if self.commands.contains_key(cmd_id) {
            return Admission::Duplicate;
        }
        if self.commands.len() >= self.limit {
            return Admission::Full { limit: self.limit };
        }
        self.attempts += 1;
        let attempt = self.attempts;
        self.commands.insert(
            cmd_id.to_owned(),
            State::Pending {
                attempt,
                held: Vec::new(),
            },
        );
        Admission::Admitted { attempt }
    }

    /// A replica took the command at `now` and ends it within `ends_within`: returns what was
    /// held back, to write right after `Started`. If that includes the command's end, the
    /// command is over.
    pub fn started(&mut self, cmd_id: &str, now: Instant, ends_within: Duration) -> Vec<N> {
        // The deadline comes from NATS: an absurd one must not overflow.
        let overdue_at = now
            .checked_add(ends_within.saturating_add(OVERDUE_MARGIN))
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        let Some(state) = self.commands.get_mut(cmd_id) else {
            return Vec::new();
        };
        let attempt = state.attempt();
        let held = match std::mem::replace(
            state,
            State::Live {
                attempt,
                overdue_at,
            },
        ) {
            State::Pending { held, .. } => held,
            State::Live { .. } => Vec::new(),
        };
        if held.iter().any(|(_, ends)| *ends) {
            self.commands.remove(cmd_id);
        }
        held.into_iter().map(|(note, _)| note).collect()
    }

    /// The command was not taken: it is over; what was held back is dropped.
    pub fn refused(&mut self, cmd_id: &str) {
        self.commands.remove(cmd_id);
    }

    /// A notification of submission `attempt` of `cmd_id`; `ends` when it is the command's
    /// `Ended`. One of an earlier submission of a reused `cmd_id` is unknown.
    pub fn notification(&mut self, cmd_id: &str, attempt: u64, note: N, ends: bool) -> Delivery<N> {
        match self.commands.entry(cmd_id.to_owned()) {
            Entry::Vacant(_) => Delivery::Unknown(note),
            Entry::Occupied(entry) if entry.get().attempt() != attempt => Delivery::Unknown(note),
            Entry::Occupied(mut entry) => match entry.get_mut() {
                State::Pending { held, .. } => {
                    held.push((note, ends));
                    Delivery::Held
                }
                State::Live { .. } => {
                    if ends {
                        entry.remove();
                    }
                    Delivery::Deliver(note)
                }
            },
        }
    }

    /// When the next live command becomes overdue, if any is live.
    pub fn next_overdue_at(&self) -> Option<Instant> {
        self.commands
            .values()
            .filter_map(|state| match state {
                State::Live { overdue_at, .. } => Some(*overdue_at),
                State::Pending { .. } => None,
            })
            .min()
    }

    /// The live commands overdue at `now`, which are over: the caller ends them for the client.
    pub fn take_overdue(&mut self, now: Instant) -> Vec<String> {
        let overdue: Vec<String> = self
            .commands
            .iter()
            .filter(
                |(_, state)| matches!(state, State::Live { overdue_at, .. } if *overdue_at <= now),
            )
            .map(|(cmd_id, _)| cmd_id.clone())
            .collect();
        for cmd_id in &overdue {
            self.commands.remove(cmd_id);
        }
        overdue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Admits `cmd_id`, returning its submission number.
    fn admit<N>(t: &mut CommandTracker<N>, cmd_id: &str) -> u64 {
        match t.admit(cmd_id) {
            Admission::Admitted { attempt } => attempt,
            other => panic!("{cmd_id} not admitted: {other:?}"),
        }
    }

    #[test]
    fn notifications_before_started_are_held_and_released_in_order() {
        let now = Instant::now();
        let mut t = CommandTracker::new(4);
        let n = admit(&mut t, "c1");
        assert_eq!(t.notification("c1", n, "event 1", false), Delivery::Held);
        assert_eq!(t.notification("c1", n, "event 2", false), Delivery::Held);
        assert_eq!(t.started("c1", now, SECOND), ["event 1", "event 2"]);
        assert_eq!(
            t.notification("c1", n, "event 3", false),
            Delivery::Deliver("event 3")
        );
        assert_eq!(
            t.notification("c1", n, "ended", true),
            Delivery::Deliver("ended")
        );
        assert!(t.is_empty());
        assert_eq!(
            t.notification("c1", n, "late", false),
            Delivery::Unknown("late")
        );
    }

    #[test]
    fn an_end_held_back_ends_the_command_when_it_starts() {
        let mut t = CommandTracker::new(4);
        let n = admit(&mut t, "c1");
        t.notification("c1", n, "error", false);
        t.notification("c1", n, "ended", true);
        assert_eq!(t.started("c1", Instant::now(), SECOND), ["error", "ended"]);
        assert!(t.is_empty());
        assert_eq!(t.next_overdue_at(), None);
    }

    #[test]
    fn ids_in_use_and_the_limit_are_refused_and_freed_when_commands_end() {
        let mut t = CommandTracker::<&str>::new(2);
        admit(&mut t, "a");
        assert_eq!(t.admit("a"), Admission::Duplicate);
        let b = admit(&mut t, "b");
        assert_eq!(t.admit("c"), Admission::Full { limit: 2 });
        t.refused("a");
        admit(&mut t, "a");
        t.started("b", Instant::now(), SECOND);
        t.notification("b", b, "ended", true);
        admit(&mut t, "c");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_refused_command_drops_what_was_held() {
        let mut t = CommandTracker::new(2);
        let n = admit(&mut t, "a");
        t.notification("a", n, "event", false);
        t.refused("a");
        assert!(t.is_empty());
        assert_eq!(t.started("a", Instant::now(), SECOND), Vec::<&str>::new());
        assert!(t.is_empty());
    }

    #[test]
    fn live_commands_become_overdue_after_their_deadline_and_margin() {
        let now = Instant::now();
        let mut t = CommandTracker::<&str>::new(4);
        admit(&mut t, "pending");
        admit(&mut t, "short");
        admit(&mut t, "long");
        t.started("short", now, SECOND);
        t.started("long", now, 10 * SECOND);
        assert_eq!(t.next_overdue_at(), Some(now + SECOND + OVERDUE_MARGIN));
        assert!(t.take_overdue(now + SECOND).is_empty());
        assert_eq!(t.take_overdue(now + SECOND + OVERDUE_MARGIN), ["short"]);
        assert_eq!(
            t.next_overdue_at(),
            Some(now + 10 * SECOND + OVERDUE_MARGIN)
        );
        assert_eq!(t.take_overdue(now + 60 * SECOND), ["long"]);
        // A pending command is never overdue: its ack has its own timeout.
        assert_eq!(t.next_overdue_at(), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_reused_id_gets_a_fresh_deadline() {
        let now = Instant::now();
        let mut t = CommandTracker::<&str>::new(4);
        let first = admit(&mut t, "a");
        t.started("a", now, SECOND);
        t.notification("a", first, "ended", true);
        admit(&mut t, "a");
        t.started("a", now + 5 * SECOND, SECOND);
        assert!(t.take_overdue(now + SECOND + OVERDUE_MARGIN).is_empty());
        assert_eq!(t.take_overdue(now + 6 * SECOND + OVERDUE_MARGIN), ["a"]);
    }

    #[test]
    fn late_notifications_of_a_lost_command_do_not_reach_its_reused_id() {
        let now = Instant::now();
        let mut t = CommandTracker::<&str>::new(4);
        let lost = admit(&mut t, "a");
        t.started("a", now, SECOND);
        assert_eq!(t.take_overdue(now + 10 * SECOND), ["a"]);
        let again = admit(&mut t, "a");
        assert_ne!(lost, again);
        t.started("a", now + 10 * SECOND, SECOND);
        // The lost command's replica was alive after all: its end must not end the new one.
        assert_eq!(
            t.notification("a", lost, "ended", true),
            Delivery::Unknown("ended")
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.notification("a", again, "ended", true),
            Delivery::Deliver("ended")
        );
        assert!(t.is_empty());
    }

    #[test]
    fn an_absurd_deadline_does_not_overflow() {
        let mut t = CommandTracker::<&str>::new(4);
        admit(&mut t, "a");
        t.started("a", Instant::now(), Duration::MAX);
        assert!(t.next_overdue_at().is_some());
    }
}
