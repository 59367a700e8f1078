//! Per-source rate limits: a token bucket per source and replica, counting events.
//!
//! Design:
//! - A source's `rate_limit_per_second` refills its bucket; `rate_limit_burst` is its capacity
//!   (0: one second's worth, the rate rounded up). A rate of 0 means unlimited.
//! - Events, not requests, take tokens: a 100-event batch costs 100, so a limit means the same
//!   whether an SDK batches or not. Every item of a request counts, valid or not (invalid items
//!   are stored too, as quarantine records).
//! - A request is admitted when the bucket holds as many tokens as it has events; a request
//!   larger than the whole bucket is admitted when the bucket is full, and leaves it in debt
//!   (negative), so the average rate still holds and no batch size is refused forever.
//! - Refused requests learn how long until the bucket holds enough tokens for them
//!   (`Retry-After`, whole seconds, at least 1).
//! - Buckets live in each replica's memory: the effective limit of a source is the configured
//!   one times the number of ingest replicas its traffic is spread over.
//!
//! A request is checked twice: before its body is read (is there a token at all? so a source
//! far over its limit costs no body reading), then with its event count after parsing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::SourceSettings;
use crate::source_registry::Source;

/// A token bucket; pure, time passed in.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` tokens per second holding at most `burst` (0: the rate
    /// rounded up, at least 1). `None` when the rate is 0 (unlimited) or not a positive number.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let capacity = if burst > 0 {
            f64::from(burst)
        } else {
            rate.ceil().max(1.0)
        };
        Some(Self {
            rate,
            capacity,
            tokens: capacity,
            updated: now,
        })
    }

    /// The bucket's capacity.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
    }

    /// How many tokens `n` events need before they are admitted: `n`, or the whole bucket for
    /// more events than it holds.
    fn needed(&self, n: u64) -> f64 {
        (n as f64).min(self.capacity)
    }

    /// Whether `n` events would be admitted now, without taking tokens; `Err` holds the wait
    /// until they would be.
    pub fn check(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let needed = self.needed(n);
        if self.tokens >= needed {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - self.tokens) / self.rate))
        }
    }

    /// Takes `n` tokens when `n` events are admitted (see the module docs); `Err` holds the
    /// wait until they would be.
    pub fn take(&mut self, n: u64, now: Instant) -> Result<(), Duration> {
        self.check(n, now)?;
        self.tokens -= n as f64;
        Ok(())
    }
}

/// A request over its source's rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// The source's rate, events per second.
    pub rate: f64,
    /// The bucket's capacity.
    pub burst: u64,
    /// Events in the request (1 for the check before the body is read).
    pub events: u64,
    /// Time until the bucket holds enough tokens for the request.
    pub wait: Duration,
}

impl Limited {
    /// `Retry-After`: whole seconds, rounded up (from whole milliseconds, so float noise
    /// does not add a second), at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        let seconds = self.wait.as_millis().div_ceil(1000);
        u64::try_from(seconds).unwrap_or(u64::MAX).max(1)
    }
}

struct Entry {
    settings: (u64, u32),
    bucket: TokenBucket,
}

/// The buckets of every source on this replica. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct RateLimiter {
    buckets: Arc<Mutex<HashMap<Arc<str>, Entry>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Takes `events` tokens from the source's bucket, or says how long to wait. Always admits
    /// a source without a limit. A changed limit starts a full bucket.
    pub fn admit(&self, source: &Source, events: u64) -> Result<(), Limited> {
        self.with_bucket(source, |b, now| b.take(events, now), events)
    }

    /// Whether the source's bucket holds a token at all (nothing is taken): the check before a
    /// request's body is read.
    pub fn has_token(&self, source: &Source) -> Result<(), Limited> {
        self.with_bucket(source, |b, now| b.check(1, now), 1)
    }

    fn with_bucket(
        &self,
        source: &Source,
        f: impl FnOnce(&mut TokenBucket, Instant) -> Result<(), Duration>,
        events: u64,
    ) -> Result<(), Limited> {
        let SourceSettings {
            rate_limit_per_second: rate,
            rate_limit_burst: burst,
            ..
        } = source.settings;
        let now = Instant::now();
        let Some(fresh) = TokenBucket::new(rate, burst, now) else {
            return Ok(());
        };
        let settings = (rate.to_bits(), burst);
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let entry = match buckets.get_mut(&source.id) {
            Some(e) if e.settings == settings => e,
            _ => {
                buckets.insert(
                    source.id.clone(),
                    Entry {
                        settings,
                        bucket: fresh,
                    },
                );
                buckets.get_mut(&source.id).expect("just inserted")
            }
        };
        f(&mut entry.bucket, now).map_err(|wait| Limited {
            rate,
            burst: entry.bucket.capacity() as u64,
            events,
            wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn unlimited_and_invalid_rates_have_no_bucket() {
        let now = Instant::now();
        assert!(TokenBucket::new(0.0, 10, now).is_none());
        assert!(TokenBucket::new(-1.0, 10, now).is_none());
        assert!(TokenBucket::new(f64::NAN, 10, now).is_none());
        assert_eq!(TokenBucket::new(2.5, 0, now).unwrap().capacity(), 3.0);
        assert_eq!(TokenBucket::new(0.1, 0, now).unwrap().capacity(), 1.0);
        assert_eq!(TokenBucket::new(2.5, 7, now).unwrap().capacity(), 7.0);
    }

    #[test]
    fn token_bucket_table() {
        // (seconds since start, events, expected wait: None = admitted)
        type Step = (f64, u64, Option<f64>);
        // rate 2/s, burst 4
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "burst then refill",
                vec![
                    (0.0, 4, None),
                    (0.0, 1, Some(0.5)),
                    (0.5, 1, None),
                    (0.5, 2, Some(1.0)),
                    (1.5, 2, None),
                ],
            ),
            (
                "a refused request takes nothing",
                vec![(0.0, 3, None), (0.0, 2, Some(0.5)), (0.0, 1, None)],
            ),
            (
                "larger than the bucket: admitted when full, then in debt",
                vec![
                    (0.0, 1, None),
                    (0.0, 10, Some(0.5)),
                    (0.5, 10, None),
                    (0.5, 1, Some(3.5)),
                    (4.0, 1, None),
                ],
            ),
            (
                "tokens never exceed the burst",
                vec![(100.0, 4, None), (100.0, 1, Some(0.5))],
            ),
        ];
        for (name, steps) in cases {
            let start = Instant::now();
            let mut b = TokenBucket::new(2.0, 4, start).unwrap();
            for (i, (at, n, want)) in steps.into_iter().enumerate() {
                let got = b.take(n, start + secs(at)).err();
                match (got, want) {
                    (None, None) => {}
                    (Some(wait), Some(w)) => {
                        assert!(
                            (wait.as_secs_f64() - w).abs() < 1e-6,
                            "{name} step {i}: waited {wait:?}, want {w}"
                        );
                    }
                    (got, want) => panic!("{name} step {i}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    fn source(rate: f64, burst: u32) -> Source {
        Source {
            id: "web".into(),
            name: "Web".into(),
            enabled: true,
            settings: SourceSettings {
                atomic_publish: false,
                rate_limit_per_second: rate,
                rate_limit_burst: burst,
            },
        }
    }

    #[test]
    fn limiter_keeps_a_bucket_per_source_and_resets_on_change() {
        let limiter = RateLimiter::default();
        assert!(limiter.admit(&source(0.0, 0), 1_000_000).is_ok());
        let slow = source(0.01, 2);
        limiter.admit(&slow, 2).unwrap();
        let limited = limiter.has_token(&slow).unwrap_err();
        assert_eq!(limited.retry_after_seconds(), 100);
        assert_eq!((limited.burst, limited.events), (2, 1));
        let limited = limiter.admit(&slow, 2).unwrap_err();
        assert_eq!(limited.retry_after_seconds(), 200);
        // Another source has its own bucket.
        let mut other = source(0.01, 2);
        other.id = "app".into();
        limiter.admit(&other, 2).unwrap();
        // A new limit starts over with a full bucket.
        limiter.admit(&source(0.01, 3), 3).unwrap();
        assert!(limiter.admit(&source(0.01, 3), 1).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let l = |wait: f64| Limited {
            rate: 1.0,
            burst: 1,
            events: 1,
            wait: secs(wait),
        };
        assert_eq!(l(0.0).retry_after_seconds(), 1);
        assert_eq!(l(0.2).retry_after_seconds(), 1);
        assert_eq!(l(1.01).retry_after_seconds(), 2);
        assert_eq!(l(100.0).retry_after_seconds(), 100);
    }
}
