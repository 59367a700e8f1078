//! A destination's circuit breaker and rate limit, shared by every send to it on this replica.
//!
//! [`Breaker`]: after `threshold` transient failures in a row (408, 429, 5xx, network errors)
//! the circuit opens for `cool_down`: no request is sent, and sends wait in [`Breaker::acquire`]
//! (a wait is not an attempt, so it does not use up an event's `max_attempts`). Then it is
//! half-open: one probe request goes out; its success closes the circuit, its transient failure
//! opens it again. Any answer that is not a transient failure (a success, a 400) shows the
//! destination is up and closes it.
//!
//! [`RateLimit`]: a token bucket of `rate` events per second (a burst of one second's worth),
//! per destination and per replica: N replicas deliver up to N times the rate.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::destinations::FailureClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Requests flow; `failures` transient failures in a row so far.
    Closed { failures: u32 },
    /// No request goes out until `until`.
    Open { until: Instant },
    /// One probe may go out; `probing` while it is out.
    HalfOpen { probing: bool },
}

/// What [`Breaker::record`] saw happen to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Result {
    /// The destination accepted it.
    Success,
    /// It failed with this class.
    Failure(FailureClass),
}

/// How a circuit changed, for telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// It opened (or opened again after a failed probe).
    Opened,
    /// It closed again.
    Closed,
}

/// A destination's circuit breaker; see the module docs.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
    changed: Notify,
}

/// Leave to send one request; give it back with [`Breaker::record`]. Dropped unrecorded (the
/// send was abandoned), a probe lets the next waiter probe instead.
#[must_use]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    /// Opens after `threshold` transient failures in a row (0: never), for `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the circuit is open or half-open (no request, or only a probe, goes out).
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    /// Waits until a request may go out; `None` when `cancel` fires first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Option<Permit<'_>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut state = self.lock();
                match *state {
                    State::Closed { .. } => {
                        return Some(Permit {
                            breaker: self,
                            probe: false,
                            recorded: false,
                        });
                    }
                    State::Open { until } if Instant::now() >= until => {
                        *state = State::HalfOpen { probing: true };
                        return Some(Permit {
                            breaker: self,
                            probe: true,
                            recorded: false,
                        });
                    }
                    State::HalfOpen { probing: false } => {
                        *state = State::HalfOpen { probing: true };
                        return Some(Permit {
                            breaker: self,
                            probe: true,
                            recorded: false,
                        });
                    }
                    State::Open { until } => Some(until),
                    State::HalfOpen { probing: true } => None,
                }
            };
            let sleep = async {
                match wait_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = &mut notified => {}
                _ = sleep => {}
            }
        }
    }

    /// Records what happened to the request `permit` let out; `Some` when the circuit opened
    /// or closed because of it.
    pub fn record(&self, mut permit: Permit<'_>, result: Result) -> Option<Transition> {
        permit.recorded = true;
        let mut state = self.lock();
        let before = *state;
        let transient = result == Result::Failure(FailureClass::Transient);
        *state = match (before, transient) {
            (_, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, true) => {
                let failures = failures.saturating_add(1);
                if self.threshold > 0 && failures >= self.threshold {
                    State::Open {
                        until: Instant::now() + self.cool_down,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            // The probe failed: open again.
            (State::HalfOpen { .. }, true) if permit.probe => State::Open {
                until: Instant::now() + self.cool_down,
            },
            // A request let out before the circuit opened failed too: nothing changes.
            (other, true) => other,
        };
        let after = *state;
        drop(state);
        self.changed.notify_waiters();
        match (before, after) {
            (State::Closed { .. }, State::Open { .. })
            | (State::HalfOpen { .. }, State::Open { .. }) => Some(Transition::Opened),
            (State::Open { .. } | State::HalfOpen { .. }, State::Closed { .. }) => {
                Some(Transition::Closed)
            }
            _ => None,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
            drop(state);
            self.breaker.changed.notify_waiters();
        }
    }
}

/// A token bucket of `rate` events per second; see the module docs.
#[derive(Debug)]
pub(crate) struct RateLimit {
    rate: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `rate` events per second (at least 1), starting with a full bucket.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes `n` tokens, waiting until they have accrued (a request of more than the bucket
    /// holds waits for its share); `false` when `cancel` fires first.
    pub async fn acquire(&self, n: usize, cancel: &CancellationToken) -> bool {
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (tokens, last) = *b;
            let refilled =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
            let left = refilled - n as f64;
            *b = (left, now);
            if left >= 0.0 {
                return true;
            }
            Duration::from_secs_f64(-left / self.rate)
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSIENT: Result = Result::Failure(FailureClass::Transient);
    const PERMANENT: Result = Result::Failure(FailureClass::Permanent);
    const COOL_DOWN: Duration = Duration::from_millis(200);
    /// Far above any wait these tests expect to end.
    const DEADLINE: Duration = Duration::from_secs(10);

    async fn send(b: &Breaker, result: Result) -> Option<Transition> {
        let cancel = CancellationToken::new();
        let permit = tokio::time::timeout(DEADLINE, b.acquire(&cancel))
            .await
            .expect("let out")
            .expect("not cancelled");
        b.record(permit, result)
    }

    #[tokio::test]
    async fn opens_after_the_threshold_then_probes_once_after_the_cool_down() {
        let b = Breaker::new(3, COOL_DOWN);
        // A success or a permanent failure resets the count.
        for r in [TRANSIENT, TRANSIENT, Result::Success, TRANSIENT, PERMANENT] {
            assert_eq!(send(&b, r).await, None);
        }
        assert!(!b.is_open());
        assert_eq!(send(&b, TRANSIENT).await, None);
        assert_eq!(send(&b, TRANSIENT).await, None);
        let opened = Instant::now();
        assert_eq!(send(&b, TRANSIENT).await, Some(Transition::Opened));
        assert!(b.is_open());

        // While open nothing is let out until the cool-down has passed.
        let cancel = CancellationToken::new();
        let probe = tokio::time::timeout(DEADLINE, b.acquire(&cancel))
            .await
            .expect("a probe after the cool-down")
            .expect("not cancelled");
        assert!(opened.elapsed() >= COOL_DOWN, "{:?}", opened.elapsed());
        // Only one probe at a time: a second caller waits while it is out.
        let second = tokio::time::timeout(COOL_DOWN * 2, b.acquire(&cancel)).await;
        assert!(second.is_err(), "a second request went out while probing");
        // The probe fails: open again for another cool-down.
        let reopened = Instant::now();
        assert_eq!(b.record(probe, TRANSIENT), Some(Transition::Opened));
        let probe = tokio::time::timeout(DEADLINE, b.acquire(&cancel))
            .await
            .expect("a probe")
            .expect("not cancelled");
        assert!(reopened.elapsed() >= COOL_DOWN, "{:?}", reopened.elapsed());
        // It succeeds: closed, everyone flows.
        assert_eq!(b.record(probe, Result::Success), Some(Transition::Closed));
        assert!(!b.is_open());
        let a = b.acquire(&cancel).await.expect("closed");
        let c = b.acquire(&cancel).await.expect("closed");
        assert_eq!(b.record(a, Result::Success), None);
        assert_eq!(b.record(c, Result::Success), None);
    }

    #[tokio::test]
    async fn a_waiter_is_let_out_when_the_probe_succeeds() {
        let b = std::sync::Arc::new(Breaker::new(1, COOL_DOWN));
        assert_eq!(send(&b, TRANSIENT).await, Some(Transition::Opened));
        let cancel = CancellationToken::new();
        let probe = b.acquire(&cancel).await.expect("a probe");
        let waiter = {
            let b = b.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                b.acquire(&cancel)
                    .await
                    .map(|p| b.record(p, Result::Success))
            })
        };
        assert_eq!(b.record(probe, Result::Success), Some(Transition::Closed));
        let got = tokio::time::timeout(DEADLINE, waiter)
            .await
            .expect("the waiter is woken")
            .expect("joined");
        assert_eq!(got, Some(None));
    }

    #[tokio::test]
    async fn an_abandoned_probe_lets_another_probe() {
        let b = Breaker::new(1, COOL_DOWN);
        assert_eq!(send(&b, TRANSIENT).await, Some(Transition::Opened));
        let cancel = CancellationToken::new();
        let probe = b.acquire(&cancel).await.expect("a probe");
        drop(probe);
        let again = tokio::time::timeout(DEADLINE, b.acquire(&cancel))
            .await
            .expect("the next probe is let out");
        assert!(again.is_some());
    }

    #[tokio::test]
    async fn waiting_ends_when_cancelled_and_zero_never_opens() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        assert_eq!(send(&b, TRANSIENT).await, Some(Transition::Opened));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let got = tokio::time::timeout(DEADLINE, b.acquire(&cancel))
            .await
            .expect("ends at once");
        assert!(got.is_none());

        let never = Breaker::new(0, Duration::from_secs(3600));
        for _ in 0..100 {
            assert_eq!(send(&never, TRANSIENT).await, None);
        }
        assert!(!never.is_open());
    }

    #[tokio::test]
    async fn the_rate_limit_spreads_sends() {
        let limit = RateLimit::new(50);
        let cancel = CancellationToken::new();
        let started = Instant::now();
        // A full bucket lets the first second's worth go; the next 25 wait for half a second
        // of refill, a batch of 25 for another half.
        for _ in 0..75 {
            assert!(limit.acquire(1, &cancel).await);
        }
        assert!(
            started.elapsed() >= Duration::from_millis(490),
            "{:?}",
            started.elapsed()
        );
        let before = Instant::now();
        assert!(limit.acquire(25, &cancel).await);
        assert!(
            before.elapsed() >= Duration::from_millis(490),
            "{:?}",
            before.elapsed()
        );
        // Cancelled while waiting: false.
        cancel.cancel();
        assert!(!limit.acquire(100, &cancel).await);
    }
}
