//! Latency samples and error tallies: nearest-rank percentiles over a sorted vector (exact, and
//! the sample counts here are small enough), and the first few error messages for the report.

use std::time::Duration;

use serde::Serialize;

/// How many error messages a tally keeps verbatim.
pub const KEPT_ERRORS: usize = 5;

/// Latency samples of one kind.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Adds one sample.
    pub fn push(&mut self, sample: Duration) {
        self.0.push(sample);
    }

    /// Adds all of `other`'s samples.
    pub fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// Number of samples.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Percentiles of the samples.
    pub fn summary(&self) -> Summary {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let total: Duration = sorted.iter().sum();
        let mean = u32::try_from(sorted.len())
            .ok()
            .filter(|n| *n > 0)
            .map(|n| total / n)
            .unwrap_or_default();
        Summary {
            count: sorted.len(),
            p50_ms: ms(percentile(&sorted, 0.50)),
            p99_ms: ms(percentile(&sorted, 0.99)),
            max_ms: ms(sorted.last().copied().unwrap_or_default()),
            mean_ms: ms(mean),
        }
    }
}

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// Milliseconds with microsecond precision.
pub fn ms(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1_000.0
}

/// The nearest-rank `q` quantile (0 < q ≤ 1) of `sorted`; zero when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Errors seen: how many, and the first few messages.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors {
    /// How many.
    pub count: u64,
    /// The first [`KEPT_ERRORS`] messages.
    pub first: Vec<String>,
}

impl Errors {
    /// Counts one error.
    pub fn record(&mut self, message: impl Into<String>) {
        self.count += 1;
        if self.first.len() < KEPT_ERRORS {
            self.first.push(message.into());
        }
    }

    /// Adds `other`'s errors.
    pub fn merge(&mut self, other: Errors) {
        self.count += other.count;
        for message in other.first {
            if self.first.len() < KEPT_ERRORS {
                self.first.push(message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<Duration> = (1..=100).map(d).collect();
        assert_eq!(percentile(&sorted, 0.50), d(50));
        assert_eq!(percentile(&sorted, 0.99), d(99));
        assert_eq!(percentile(&sorted, 1.0), d(100));
        assert_eq!(percentile(&[d(7)], 0.99), d(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn summary_sorts_its_samples() {
        let mut samples = Samples::default();
        for v in [5, 1, 3, 2, 4] {
            samples.push(d(v));
        }
        let summary = samples.summary();
        assert_eq!(summary.count, 5);
        assert_eq!(summary.p50_ms, 3.0);
        assert_eq!(summary.p99_ms, 5.0);
        assert_eq!(summary.max_ms, 5.0);
        assert_eq!(summary.mean_ms, 3.0);
        assert_eq!(Samples::default().summary(), Summary::default());
    }

    #[test]
    fn errors_keep_the_first_few_messages() {
        let mut errors = Errors::default();
        for i in 0..3 {
            errors.record(format!("a{i}"));
        }
        let mut other = Errors::default();
        for i in 0..4 {
            other.record(format!("b{i}"));
        }
        errors.merge(other);
        assert_eq!(errors.count, 7);
        assert_eq!(errors.first, ["a0", "a1", "a2", "b0", "b1"]);
    }
}
