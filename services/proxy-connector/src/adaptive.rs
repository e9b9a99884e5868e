//! How many MI requests one OpenSIPS node may have in flight, learned from how it answers.
//!
//! OpenSIPS under load does not slow down gracefully: it runs out of shared memory and answers
//! `500 Internal error` (or nothing), fails to send BYEs, and 3.6.8 even crashed. So the limit
//! is additive-increase / multiplicative-decrease (AIMD, as TCP and Netflix's concurrency-limits
//! do): every overload signal (an internal-error reply, a timeout, a short command answered
//! slower than `slow`) cuts it by [`DECREASE`], at most once per `cooldown` so that one burst of
//! errors counts once; every answered request raises it by `1/limit` (one step per round of
//! requests). Two guards keep a storm from overshooting the node's memory:
//! - *slow start*, as TCP's: the limit starts low and grows by one per answer (doubling per
//!   round) until the first overload signal, then additively;
//! - the limit grows only while it is in use (at least half of it in flight when an answer
//!   comes): hours of light traffic must not leave a high limit, never tested, for the next
//!   storm to find;
//! - near the limit of the last overload (for [`CEILING_MEMORY`] after it) it grows
//!   [`NEAR_CEILING_SLOWDOWN`] times slower, as TCP CUBIC does near its last window: each probe
//!   above the node's capacity costs a refused request, so they come seldom.
//!
//! Besides `slow`, a fixed ceiling, latency *growth* is an overload signal: OpenSIPS answers a
//! short command in about a millisecond when at ease; a recent average of short answers
//! [`GROWTH`] times the long-run baseline (and above a tenth of `slow`, so that jitter around a
//! millisecond says nothing) means the node is queueing work.
//!
//! Time and the requests in flight are passed in: this is pure bookkeeping, tested as a table.

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

/// How long the limit at the last overload is remembered.
pub const CEILING_MEMORY: Duration = Duration::from_secs(30);
/// How many times slower the limit grows within one of the last overload's limit.
pub const NEAR_CEILING_SLOWDOWN: f64 = 8.0;

/// A recent average of short answers this many times the baseline is an overload signal.
pub const GROWTH: f64 = 5.0;
/// Weight of a new short answer in the recent average (about the last ten).
const RECENT_WEIGHT: f64 = 0.1;
/// Weight of a new short answer in the baseline (about the last five hundred).
const BASELINE_WEIGHT: f64 = 0.002;
/// Short answers seen before growth is judged.
const WARM_UP: u64 = 20;

/// How short answers' latency moves: a recent average against a slow baseline (milliseconds).
#[derive(Debug, Clone, Default)]
struct Trend {
    recent: f64,
    baseline: f64,
    samples: u64,
}

impl Trend {
    /// Takes one short answer's latency; true if the recent average has grown past
    /// [`GROWTH`] times the baseline and past `floor`.
    fn grown(&mut self, latency: Duration, floor: Duration) -> bool {
        let ms = latency.as_secs_f64() * 1000.0;
        if self.samples == 0 {
            self.recent = ms;
            self.baseline = ms;
        } else {
            self.recent += RECENT_WEIGHT * (ms - self.recent);
            self.baseline += BASELINE_WEIGHT * (ms - self.baseline);
        }
        self.samples = self.samples.saturating_add(1);
        self.samples >= WARM_UP
            && self.recent > GROWTH * self.baseline
            && self.recent > floor.as_secs_f64() * 1000.0
    }
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
    /// Before the first overload signal: grow by one per answer.
    slow_start: bool,
    trend: Trend,
    /// The limit when it was last cut for overload, and when.
    ceiling: Option<(f64, Duration)>,
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
            slow_start: true,
            trend: Trend::default(),
            ceiling: None,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        // In range by construction; the cast only drops the fraction.
        (self.limit.floor() as usize).clamp(self.min, self.max)
    }

    /// Takes one signal, observed `now` (time since any fixed origin) with `in_flight`
    /// requests holding a slot (the one observed included); returns the new limit.
    pub fn observe(&mut self, signal: Signal, now: Duration, in_flight: usize) -> usize {
        let overload = match signal {
            Signal::Overload => true,
            Signal::Answered { short, latency } => {
                short && (self.trend.grown(latency, self.slow / 10) || latency > self.slow)
            }
            Signal::Neutral => return self.limit(),
        };
        if overload {
            let cooled = self
                .last_decrease
                .is_none_or(|at| now.saturating_sub(at) >= self.cooldown);
            self.slow_start = false;
            if cooled {
                self.ceiling = Some((self.limit, now));
                self.limit = (self.limit * DECREASE).max(self.min as f64);
                self.last_decrease = Some(now);
            }
        } else if in_flight * 2 >= self.limit() {
            let near_ceiling = self.ceiling.is_some_and(|(ceiling, at)| {
                now.saturating_sub(at) < CEILING_MEMORY && (self.limit - ceiling).abs() < 1.0
            });
            let step = if self.slow_start {
                1.0
            } else if near_ceiling {
                1.0 / (self.limit * NEAR_CEILING_SLOWDOWN)
            } else {
                1.0 / self.limit
            };
            self.limit = (self.limit + step).min(self.max as f64);
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

    /// Past slow start: one overload signal at time zero (20 → 14).
    fn after_slow_start() -> Aimd {
        let mut a = aimd();
        assert_eq!(a.observe(Signal::Overload, Duration::ZERO, 20), 14);
        a
    }

    #[test]
    fn slow_start_grows_by_one_per_answer_until_the_first_overload() {
        let mut a = aimd();
        for _ in 0..10 {
            a.observe(answered(2), Duration::ZERO, 20);
        }
        assert_eq!(a.limit(), 30, "one per answer");
        assert_eq!(a.observe(Signal::Overload, ms(10), 30), 21);
        for _ in 0..22 {
            a.observe(answered(2), ms(20), 21);
        }
        assert_eq!(a.limit(), 22, "then one per round");
    }

    #[test]
    fn grows_by_about_one_per_round_of_answers() {
        let mut a = after_slow_start();
        for _ in 0..15 {
            a.observe(answered(2), ms(1), 14);
        }
        assert_eq!(a.limit(), 15);
        for _ in 0..3_000 {
            a.observe(answered(2), ms(1), 64);
        }
        assert_eq!(a.limit(), 64, "never above max");
    }

    #[test]
    fn near_the_last_overloads_limit_it_grows_slower_for_a_while() {
        let mut a = aimd();
        for _ in 0..10 {
            a.observe(answered(2), Duration::ZERO, 30);
        }
        assert_eq!(a.observe(Signal::Overload, ms(10), 30), 21, "cut from 30");
        // Back up to one below 30 at the usual pace: about one per round.
        let mut answers = 0;
        while a.limit() < 29 {
            a.observe(answered(2), ms(20), 30);
            answers += 1;
        }
        assert!(answers < 250, "{answers}");
        // The last step, within one of 30, takes eight rounds.
        let mut near = 0;
        while a.limit() < 30 {
            a.observe(answered(2), ms(20), 30);
            near += 1;
        }
        assert!(near > 7 * 29, "{near}");
        // Forgotten after a while: the usual pace again.
        let mut b = aimd();
        b.observe(Signal::Overload, ms(0), 20);
        let start = b.limit();
        let mut later = 0;
        while b.limit() < start + 1 {
            b.observe(answered(2), CEILING_MEMORY + ms(1), 20);
            later += 1;
        }
        assert!(later <= 15, "{later}");
    }

    #[test]
    fn grows_only_while_at_least_half_of_the_limit_is_in_use() {
        let mut a = aimd();
        for _ in 0..1_000 {
            a.observe(answered(2), Duration::ZERO, 9);
        }
        assert_eq!(a.limit(), 20, "light traffic leaves the limit where it was");
        a.observe(answered(2), Duration::ZERO, 10);
        assert_eq!(a.limit(), 21);
    }

    #[test]
    fn an_overload_burst_cuts_once_per_cooldown_and_never_below_min() {
        let mut a = aimd();
        assert_eq!(a.observe(Signal::Overload, ms(10), 20), 14);
        for t in 11..100 {
            assert_eq!(a.observe(Signal::Overload, ms(t), 20), 14, "same burst");
        }
        assert_eq!(a.observe(Signal::Overload, ms(1010), 14), 9);
        assert_eq!(a.observe(Signal::Overload, ms(2010), 9), 6);
        assert_eq!(a.observe(Signal::Overload, ms(3010), 6), 4);
        assert_eq!(a.observe(Signal::Overload, ms(4010), 4), 4, "floor");
    }

    #[test]
    fn slow_short_answers_are_overload_but_slow_calls_are_not() {
        let mut a = aimd();
        let ringing = Signal::Answered {
            short: false,
            latency: ms(30_000),
        };
        assert_eq!(a.observe(ringing, Duration::ZERO, 1), 20);
        assert_eq!(a.observe(answered(900), Duration::ZERO, 1), 14);
        assert_eq!(a.observe(Signal::Neutral, ms(5000), 14), 14);
    }

    #[test]
    fn latency_growing_past_the_baseline_is_overload() {
        let mut a = after_slow_start();
        // Times start past the cooldown of the slow start's end.
        for t in 1000..1200 {
            a.observe(answered(2), ms(t), 1);
        }
        assert_eq!(a.limit(), 14, "steady: unchanged (not in use)");
        // Jitter, even tenfold, under a tenth of `slow` says nothing.
        for t in 1200..1230 {
            a.observe(answered(40), ms(t), 1);
        }
        assert_eq!(a.limit(), 14);
        // Answers of 80 ms where the baseline is a few ms: the node is queueing work.
        let mut cut_at = None;
        for t in 1230..1260 {
            if a.observe(answered(80), ms(t), 1) < 14 {
                cut_at.get_or_insert(t);
            }
        }
        assert_eq!(a.limit(), 9, "cut once per cooldown");
        assert!(
            cut_at.is_some_and(|t| t < 1240),
            "cut within a few answers: {cut_at:?}"
        );
    }

    #[test]
    fn a_node_slow_from_the_start_is_judged_by_slow_alone() {
        let mut a = aimd();
        for t in 0..100 {
            a.observe(answered(200), ms(t), 1);
        }
        assert_eq!(a.limit(), 20, "a steady 200 ms is the node's pace");
        assert_eq!(a.observe(answered(600), ms(100), 1), 14);
    }

    #[test]
    fn bounds_are_made_consistent() {
        let a = Aimd::new(0, 0, 0, MS, MS);
        assert_eq!(a.limit(), 1);
        let a = Aimd::new(10, 100, 8, MS, MS);
        assert_eq!(a.limit(), 8);
    }
}
