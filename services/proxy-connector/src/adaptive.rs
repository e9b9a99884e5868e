//! How many MI requests one OpenSIPS node may have in flight, learned from how it answers.
//!
//! OpenSIPS under load does not slow down gracefully: it runs out of shared memory and answers
//! `500 Internal error` (or nothing), fails to send BYEs, and 3.6.8 even crashed. So the limit
//! is additive-increase / multiplicative-decrease (AIMD, as TCP and Netflix's concurrency-limits
//! do): every answered request raises it by `1/limit` (one step per round of requests), every
//! overload signal (an internal-error reply, a timeout, a short command answered slower than
//! `slow`) cuts it by [`DECREASE`], at most once per `cooldown` so that one burst of errors
//! counts once. Time is passed in: this is pure bookkeeping, tested as a table.

use std::time::Duration;

/// Factor applied to the limit on an overload signal.
pub const DECREASE: f64 = 0.7;

/// What one finished request says about the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered, in this time; `short` requests are answered at once by OpenSIPS, so their
    /// latency measures its load (a `t_uac_dlg`'s measures the phone).
    Answered {
        /// Whether it was a short request.
        short: bool,
        /// How long OpenSIPS took.
        latency: Duration,
    },
    /// OpenSIPS said it is out of resources, or did not answer in time.
    Overload,
    /// Anything that says nothing about load (bad request, node down).
    Neutral,
}

/// The adaptive limit of one node.
#[derive(Debug, Clone)]
pub struct Aimd {
    min: usize,
    max: usize,
    limit: f64,
    slow: Duration,
    cooldown: Duration,
    last_decrease: Option<Duration>,
}

impl Aimd {
    /// Starts at `initial`, kept within `min..=max`; a short request slower than `slow` is an
    /// overload signal; decreases are at least `cooldown` apart.
    pub fn new(min: usize, initial: usize, max: usize, slow: Duration, cooldown: Duration) -> Self {
        let max = max.max(1);
        let min = min.clamp(1, max);
        Self {
            min,
            max,
            limit: initial.clamp(min, max) as f64,
            slow,
            cooldown,
            last_decrease: None,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        // In range by construction; the cast only drops the fraction.
        (self.limit.floor() as usize).clamp(self.min, self.max)
    }

    /// Takes one signal, observed `now` (time since any fixed origin); returns the new limit.
    pub fn observe(&mut self, signal: Signal, now: Duration) -> usize {
        let overload = match signal {
            Signal::Overload => true,
            Signal::Answered { short, latency } => short && latency > self.slow,
            Signal::Neutral => return self.limit(),
        };
        if overload {
            let cooled = self
                .last_decrease
                .is_none_or(|at| now.saturating_sub(at) >= self.cooldown);
            if cooled {
                self.limit = (self.limit * DECREASE).max(self.min as f64);
                self.last_decrease = Some(now);
            }
        } else {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max as f64);
        }
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn aimd() -> Aimd {
        Aimd::new(4, 20, 64, ms(500), ms(1000))
    }

    fn answered(n: u64) -> Signal {
        Signal::Answered {
            short: true,
            latency: ms(n),
        }
    }

    #[test]
    fn grows_by_about_one_per_round_of_answers() {
        let mut a = aimd();
        for _ in 0..21 {
            a.observe(answered(2), Duration::ZERO);
        }
        assert_eq!(a.limit(), 21);
        for _ in 0..2_000 {
            a.observe(answered(2), Duration::ZERO);
        }
        assert_eq!(a.limit(), 64, "never above max");
    }

    #[test]
    fn an_overload_burst_cuts_once_per_cooldown_and_never_below_min() {
        let mut a = aimd();
        assert_eq!(a.observe(Signal::Overload, ms(10)), 14);
        for t in 11..100 {
            assert_eq!(a.observe(Signal::Overload, ms(t)), 14, "same burst");
        }
        assert_eq!(a.observe(Signal::Overload, ms(1010)), 9);
        assert_eq!(a.observe(Signal::Overload, ms(2010)), 6);
        assert_eq!(a.observe(Signal::Overload, ms(3010)), 4);
        assert_eq!(a.observe(Signal::Overload, ms(4010)), 4, "floor");
    }

    #[test]
    fn slow_short_answers_are_overload_but_slow_calls_are_not() {
        let mut a = aimd();
        let ringing = Signal::Answered {
            short: false,
            latency: ms(30_000),
        };
        assert_eq!(a.observe(ringing, Duration::ZERO), 20);
        assert_eq!(a.observe(answered(900), Duration::ZERO), 14);
        assert_eq!(a.observe(Signal::Neutral, ms(5000)), 14);
    }

    #[test]
    fn bounds_are_made_consistent() {
        let a = Aimd::new(0, 0, 0, MS, MS);
        assert_eq!(a.limit(), 1);
        let a = Aimd::new(10, 100, 8, MS, MS);
        assert_eq!(a.limit(), 8);
    }
}
