//! Per-tenant limits (issue 11), as the tenants file sets them (`limits`; 0: none): WebSocket
//! connections open at once, commands per second (WebSocket), REST requests per second. Rates
//! are token buckets holding one second's worth (a burst of `rate` at once, then `rate` per
//! second). Each gateway counts what it serves: with N gateways behind a load balancer a tenant
//! may reach N times the limits.
//!
//! [`Bucket`] is pure (time passed in, tested as a table); [`TenantLimits`] keeps one set per
//! tenant for the gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of `rate` per second, holding at most `rate`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Takes one token at `now` for a bucket of `rate` per second; when none is left, how long
    /// until one is.
    pub fn take(&mut self, rate: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
struct Usage {
    connections: u32,
    commands: Bucket,
    rest: Bucket,
}

/// What a tenant is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// As many WebSocket connections open as it may have.
    Connections(u32),
    /// Its rate; try again after this long.
    Rate(Duration),
}

/// The limits' counters of every tenant on this gateway.
#[derive(Debug, Clone, Default)]
pub struct TenantLimits {
    usage: Arc<Mutex<HashMap<String, Usage>>>,
}

/// An open WebSocket connection counted against its tenant; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: TenantLimits,
    tenant: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(usage) = self.limits.lock().get_mut(&self.tenant) {
            usage.connections = usage.connections.saturating_sub(1);
        }
    }
}

impl TenantLimits {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Usage>> {
        self.usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut Usage, Instant) -> T) -> T {
        let now = Instant::now();
        let mut usage = self.lock();
        let entry = usage.entry(tenant.to_owned()).or_insert_with(|| Usage {
            connections: 0,
            commands: Bucket::new(u32::MAX, now),
            rest: Bucket::new(u32::MAX, now),
        });
        f(entry, now)
    }

    /// Counts a new WebSocket connection of `tenant`, which may have `max` (0: any number).
    pub fn open_connection(&self, tenant: &str, max: u32) -> Result<ConnectionSlot, Over> {
        self.with(tenant, |usage, _| {
            if max > 0 && usage.connections >= max {
                return Err(Over::Connections(max));
            }
            usage.connections += 1;
            Ok(())
        })?;
        Ok(ConnectionSlot {
            limits: self.clone(),
            tenant: tenant.to_owned(),
        })
    }

    /// Takes one command of `tenant`, allowed `rate` per second (0: any).
    pub fn take_command(&self, tenant: &str, rate: u32) -> Result<(), Over> {
        if rate == 0 {
            return Ok(());
        }
        self.with(tenant, |usage, now| usage.commands.take(rate, now))
            .map_err(Over::Rate)
    }

    /// Takes one REST request of `tenant`, allowed `rate` per second (0: any).
    pub fn take_rest(&self, tenant: &str, rate: u32) -> Result<(), Over> {
        if rate == 0 {
            return Ok(());
        }
        self.with(tenant, |usage, now| usage.rest.take(rate, now))
            .map_err(Over::Rate)
    }
}

/// Failed sign-ins (token endpoint, `/directly`) per key (an account, a source address) in a
/// sliding window: past `max` within `window`, the key is refused until its oldest failure
/// leaves the window. Against guessing passwords; a success does not count.
#[derive(Debug)]
pub struct Failures {
    max: usize,
    window: Duration,
    by_key: Mutex<HashMap<String, std::collections::VecDeque<Instant>>>,
}

/// Keys tracked at most; past it, keys whose failures have all left the window are forgotten
/// (and, should all still be live, the map is cleared rather than grow without bound).
const MAX_KEYS: usize = 100_000;

impl Failures {
    /// At most `max` failures per key within `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max: max.max(1),
            window,
            by_key: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, std::collections::VecDeque<Instant>>> {
        self.by_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `key` may try now; if not, how long until it may.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut by_key = self.lock();
        let Some(failures) = by_key.get_mut(key) else {
            return Ok(());
        };
        while failures
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= self.window)
        {
            failures.pop_front();
        }
        if failures.len() < self.max {
            return Ok(());
        }
        let oldest = failures.front().copied().unwrap_or(now);
        Err(self
            .window
            .saturating_sub(now.saturating_duration_since(oldest)))
    }

    /// Counts a failure of `key` at `now`.
    pub fn record(&self, key: &str, now: Instant) {
        let mut by_key = self.lock();
        if by_key.len() >= MAX_KEYS {
            let window = self.window;
            by_key.retain(|_, f| {
                f.back()
                    .is_some_and(|at| now.saturating_duration_since(*at) < window)
            });
            if by_key.len() >= MAX_KEYS {
                by_key.clear();
            }
        }
        let failures = by_key.entry(key.to_owned()).or_default();
        failures.push_back(now);
        while failures.len() > self.max {
            failures.pop_front();
        }
    }
}

/// Whole seconds to tell a client to wait (`Retry-After`), at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_seconds_worth_through_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(4, start);
        for _ in 0..4 {
            assert_eq!(bucket.take(4, start), Ok(()));
        }
        let wait = bucket.take(4, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(250));
        assert_eq!(bucket.take(4, start + Duration::from_millis(250)), Ok(()));
        assert!(bucket.take(4, start + Duration::from_millis(300)).is_err());
        // Never more than a second's worth, however long it rested.
        let later = start + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(bucket.take(4, later), Ok(()));
        }
        assert!(bucket.take(4, later).is_err());
    }

    #[test]
    fn past_its_failures_a_key_waits_until_the_oldest_leaves_the_window() {
        let start = Instant::now();
        let failures = Failures::new(3, Duration::from_secs(60));
        for s in 0..3 {
            assert!(failures.check("ext:1001", start).is_ok());
            failures.record("ext:1001", start + Duration::from_secs(s));
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(
            failures.check("ext:1001", now),
            Err(Duration::from_secs(50))
        );
        assert!(failures.check("ip:10.0.0.1", now).is_ok(), "other keys");
        assert!(
            failures
                .check("ext:1001", start + Duration::from_secs(60))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn connections_are_counted_per_tenant_until_they_close() {
        let limits = TenantLimits::default();
        let a = limits.open_connection("acme", 2).unwrap();
        let _b = limits.open_connection("acme", 2).unwrap();
        assert_eq!(
            limits.open_connection("acme", 2).unwrap_err(),
            Over::Connections(2)
        );
        let _other = limits.open_connection("globex", 2).unwrap();
        drop(a);
        assert!(limits.open_connection("acme", 2).is_ok());
        assert!(limits.open_connection("acme", 0).is_ok(), "0: no limit");
    }

    #[tokio::test]
    async fn rates_are_per_tenant_and_zero_is_none() {
        let limits = TenantLimits::default();
        // The first use starts a full bucket of the rate asked.
        assert!(limits.take_rest("acme", 2).is_ok());
        assert!(limits.take_rest("acme", 2).is_ok());
        assert!(matches!(limits.take_rest("acme", 2), Err(Over::Rate(_))));
        assert!(limits.take_rest("globex", 2).is_ok());
        assert!(limits.take_command("acme", 2).is_ok(), "its own bucket");
        for _ in 0..100 {
            assert!(limits.take_rest("acme", 0).is_ok());
        }
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
