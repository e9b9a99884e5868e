//! Rate-limited accounting of what event-ingest drops.
//!
//! Anything that reaches the event socket can make us drop it (a forged datagram, a stranger's
//! connection, an unparsable event), and one WARN line per drop would let a flood of garbage
//! fill the logs. So drops are counted per node, by reason and source address, and reported in
//! at most one WARN line per interval: the first drop after a quiet interval at once, the rest
//! summed up when the interval is over.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Distinct (reason, address) pairs told apart in one report; the rest are summed as others,
/// so a flood from spoofed addresses cannot make the tally grow without bound.
const MAX_TRACKED: usize = 16;
/// Longest example reason kept per (reason, address) pair.
const MAX_DETAIL: usize = 160;

/// Why something was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// A datagram from an address not in the node's `senders`.
    DatagramSenderNotAllowed,
    /// A connection from an address not in the node's `senders` (closed at once).
    ConnectionNotAllowed,
    /// An event from an allowed sender that cannot be used (not JSON, no or bad method, …).
    UnusableEvent,
    /// A connection whose byte stream can never become JSON (closed).
    StreamNotJson,
    /// A connection that sent more than an event's worth of bytes without completing one
    /// (closed).
    StreamOverflow,
    /// An event published but not recorded in the session store: its recorder is behind (the
    /// next reconciliation repairs the view).
    StoreBehind,
    /// An event not published: the router finding tenants is too far behind.
    RouterBehind,
    /// An event not published: no tenant's domain is its dialog's From or To host (or the node
    /// could not say).
    NoTenant,
}

impl Why {
    /// What was dropped, and why.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Self::DatagramSenderNotAllowed => ("datagram(s)", "sender not in `senders`"),
            Self::ConnectionNotAllowed => ("connection(s)", "peer not in `senders`, closed"),
            Self::UnusableEvent => ("event(s)", "unusable"),
            Self::StreamNotJson => ("connection(s)", "event stream is not JSON, closed"),
            Self::StreamOverflow => ("connection(s)", "event too large, closed"),
            Self::StoreBehind => ("event(s)", "not recorded in the session store (behind)"),
            Self::RouterBehind => ("event(s)", "not published: the tenant router is behind"),
            Self::NoTenant => (
                "event(s)",
                "not published: no tenant owns the dialog's domain",
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tally {
    count: u64,
    /// The latest reason given for this pair (e.g. the parse error).
    detail: String,
}

/// The drops of one interval, as one WARN line shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How many things were dropped in all.
    pub total: u64,
    lines: Vec<(Why, IpAddr, Tally)>,
    others: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dropped {}:", self.total)?;
        for (i, (why, from, tally)) in self.lines.iter().enumerate() {
            let separator = if i == 0 { " " } else { "; " };
            let (unit, reason) = why.describe();
            write!(f, "{separator}{} {unit} from {from} ({reason}", tally.count)?;
            if !tally.detail.is_empty() {
                write!(f, "; last: {}", tally.detail)?;
            }
            write!(f, ")")?;
        }
        if self.others > 0 {
            write!(f, "; {} more from other addresses", self.others)?;
        }
        Ok(())
    }
}

/// The drops of one node since the last report.
#[derive(Debug)]
pub struct DropLog {
    interval: Duration,
    last_report: Option<Instant>,
    pending: BTreeMap<(Why, IpAddr), Tally>,
    others: u64,
    total: u64,
}

impl DropLog {
    /// A log reporting at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_report: None,
            pending: BTreeMap::new(),
            others: 0,
            total: 0,
        }
    }

    /// Counts one drop; returns a report to log now if none was logged within the interval.
    pub fn record(
        &mut self,
        now: Instant,
        why: Why,
        from: IpAddr,
        detail: &dyn fmt::Display,
    ) -> Option<Report> {
        let key = (why, from.to_canonical());
        self.total += 1;
        let tracked = self.pending.len();
        match self.pending.get_mut(&key) {
            Some(tally) => {
                tally.count += 1;
                tally.detail = bounded(detail);
            }
            None if tracked < MAX_TRACKED => {
                self.pending.insert(
                    key,
                    Tally {
                        count: 1,
                        detail: bounded(detail),
                    },
                );
            }
            None => self.others += 1,
        }
        self.flush(now)
    }

    /// Returns the pending drops as a report if there are any and the interval since the last
    /// report is over.
    pub fn flush(&mut self, now: Instant) -> Option<Report> {
        if self.total == 0 {
            return None;
        }
        if self
            .last_report
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            return None;
        }
        self.last_report = Some(now);
        let lines = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((why, from), tally)| (why, from, tally))
            .collect();
        let report = Report {
            total: self.total,
            lines,
            others: self.others,
        };
        self.total = 0;
        self.others = 0;
        Some(report)
    }
}

/// `detail` as text of at most [`MAX_DETAIL`] characters.
fn bounded(detail: &dyn fmt::Display) -> String {
    let text = detail.to_string();
    if text.chars().count() <= MAX_DETAIL {
        text
    } else {
        let mut cut: String = text.chars().take(MAX_DETAIL).collect();
        cut.push('…');
        cut
    }
}

/// A node's drop log, shared by its receiving tasks.
#[derive(Debug, Clone)]
pub struct Drops {
    node_id: Arc<str>,
    interval: Duration,
    log: Arc<Mutex<DropLog>>,
}

impl Drops {
    /// The drop log of node `node_id`, reporting at most once per `interval`.
    pub fn new(node_id: &str, interval: Duration) -> Self {
        Self {
            node_id: node_id.into(),
            interval,
            log: Arc::new(Mutex::new(DropLog::new(interval))),
        }
    }

    /// Counts one drop, logging it now if nothing was logged within the interval.
    pub fn record(&self, why: Why, from: IpAddr, detail: &dyn fmt::Display) {
        metrics::counter!("callapi_events_dropped_total", "node" => self.node_id.to_string(), "why" => format!("{why:?}"))
            .increment(1);
        let report = self
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(Instant::now(), why, from, detail);
        self.warn(report);
    }

    /// Logs what was dropped since the last report, once the interval is over; until `shutdown`.
    pub async fn report_periodically(self, shutdown: CancellationToken) {
        let tick = (self.interval / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let report = self
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush(Instant::now());
            self.warn(report);
        }
    }

    fn warn(&self, report: Option<Report>) {
        if let Some(report) = report {
            tracing::warn!(node = %self.node_id, dropped = report.total, "{report}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flood_gives_one_report_per_interval_with_the_counts() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut log = DropLog::new(second);
        let first = log
            .record(start, Why::DatagramSenderNotAllowed, ip("127.0.0.2"), &"")
            .expect("the first drop is reported at once");
        assert_eq!(first.total, 1);
        assert_eq!(
            first.to_string(),
            "dropped 1: 1 datagram(s) from 127.0.0.2 (sender not in `senders`)"
        );
        let mut reports = 0;
        for n in 0..1_000u64 {
            let now = start + Duration::from_micros(n * 100);
            let from = if n % 2 == 0 { "127.0.0.2" } else { "10.9.8.7" };
            reports += usize::from(
                log.record(now, Why::DatagramSenderNotAllowed, ip(from), &"")
                    .is_some(),
            );
        }
        log.record(
            start + Duration::from_millis(200),
            Why::UnusableEvent,
            ip("127.0.0.1"),
            &"event is not JSON",
        );
        assert_eq!(reports, 0, "nothing more is logged within the interval");
        assert_eq!(log.flush(start + Duration::from_millis(999)), None);
        let summary = log
            .flush(start + second)
            .expect("reported after the interval");
        assert_eq!(summary.total, 1_001);
        let text = summary.to_string();
        assert_eq!(
            text,
            "dropped 1001: 500 datagram(s) from 10.9.8.7 (sender not in `senders`); \
             500 datagram(s) from 127.0.0.2 (sender not in `senders`); \
             1 event(s) from 127.0.0.1 (unusable; last: event is not JSON)"
        );
        assert_eq!(log.flush(start + 3 * second), None, "nothing pending");
        // After a quiet interval the next drop is reported at once again.
        assert!(
            log.record(
                start + 3 * second,
                Why::ConnectionNotAllowed,
                ip("::1"),
                &""
            )
            .is_some()
        );
    }

    #[test]
    fn spoofed_addresses_cannot_grow_the_tally_without_bound() {
        let start = Instant::now();
        let mut log = DropLog::new(Duration::from_secs(1));
        let _ = log.record(start, Why::UnusableEvent, ip("10.0.0.1"), &"x");
        for n in 0..10_000u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(n));
            let _ = log.record(start, Why::DatagramSenderNotAllowed, from, &"");
        }
        assert!(log.pending.len() <= MAX_TRACKED);
        let report = log.flush(start + Duration::from_secs(1)).unwrap();
        assert_eq!(report.total, 10_000);
        assert_eq!(
            report.lines.iter().map(|l| l.2.count).sum::<u64>() + report.others,
            10_000
        );
        assert!(report.to_string().contains("more from other addresses"));
    }

    #[test]
    fn details_are_bounded() {
        let mut log = DropLog::new(Duration::from_secs(1));
        let long = "é".repeat(5_000);
        let report = log
            .record(Instant::now(), Why::UnusableEvent, ip("::1"), &long)
            .unwrap();
        assert!(report.to_string().chars().count() < MAX_DETAIL + 100);
    }
}
