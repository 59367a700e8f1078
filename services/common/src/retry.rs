//! Retrying with backoff: the one loop every in-process retry of Herald goes through (intake's
//! stores, the processor's profile updates and publishes, the activator's sends and acks, and
//! the NATS provisioning helpers).
//!
//! [`Retry::run`] calls an operation until it succeeds, waiting [`backoff`] between attempts
//! (doubling up to a maximum; with [`Retry::jitter`], a random part of it, see [`jittered`]),
//! and gives up only when the cancellation token fires. Each
//! caller keeps its own telemetry: the `on_error` callback sees every [`Failure`] and may change
//! how long to wait before the next attempt (a destination's `Retry-After`). Messages whose
//! outcome waits on the retry are kept alive with in-progress acks ([`Retry::keep_alive`]) from
//! the first failure until the retry returns, so JetStream does not redeliver them behind later
//! ones while their ack wait runs out.

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;

/// The pause after failed attempt number `attempt`: 100 ms doubled `attempt` times (200 ms
/// after the first failure, 400 ms after the second), up to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << attempt.min(16));
    Duration::from_millis(ms).min(max)
}

/// `wait` with "equal jitter": a uniformly random pause between half of `wait` and `wait`, so
/// clients that failed together do not retry together.
pub fn jittered(wait: Duration) -> Duration {
    use rand::Rng as _;
    let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos))
}

/// One failed attempt, as [`Retry::run`]'s `on_error` callback sees it.
#[derive(Debug)]
pub struct Failure<'a, E> {
    /// Failed attempts so far, this one included (1 for the first failure).
    pub attempt: u32,
    /// What failed.
    pub error: &'a E,
    /// How long the retry waits before the next attempt: [`backoff`] ([`jittered`] with
    /// [`Retry::jitter`]) unless the callback sets another value.
    pub wait: Duration,
}

/// How to retry: the longest pause between attempts and, optionally, messages to keep alive
/// while waiting. See the module docs.
#[derive(Debug, Clone)]
pub struct Retry<'a> {
    max_backoff: Duration,
    jitter: bool,
    keep_alive: Option<(Cow<'a, [Message]>, Duration)>,
}

impl<'a> Retry<'a> {
    /// Retries with [`backoff`] pauses of at most `max_backoff`.
    pub fn new(max_backoff: Duration) -> Self {
        Self {
            max_backoff,
            jitter: false,
            keep_alive: None,
        }
    }

    /// Waits a [`jittered`] backoff instead of the exact one (a pause the callback sets is
    /// kept as it is).
    pub fn jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Sends in-progress acks for `messages` every `every` from the first failure until
    /// [`Retry::run`] returns (pick a third of their consumer's ack wait). Borrowed messages
    /// are copied only when an attempt fails.
    pub fn keep_alive(mut self, messages: impl Into<Cow<'a, [Message]>>, every: Duration) -> Self {
        self.keep_alive = Some((messages.into(), every));
        self
    }

    /// Calls `f` until it returns `Ok` (then `Some` of its value), or until `cancel` fires
    /// while waiting between attempts (then `None`, at once). After each failure `on_error`
    /// sees it (to log and count it, or to change the pause).
    pub async fn run<T, E, F, Fut>(
        self,
        cancel: &CancellationToken,
        mut f: F,
        mut on_error: impl FnMut(&mut Failure<'_, E>),
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Self {
            max_backoff,
            jitter,
            mut keep_alive,
        } = self;
        // Stops (is dropped) when this function returns.
        let mut _alive: Option<KeepAlive> = None;
        let mut attempt = 0u32;
        loop {
            let error = match f().await {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            attempt = attempt.saturating_add(1);
            let wait = backoff(attempt, max_backoff);
            let mut failure = Failure {
                attempt,
                error: &error,
                wait: if jitter { jittered(wait) } else { wait },
            };
            on_error(&mut failure);
            let wait = failure.wait;
            if let Some((messages, every)) = keep_alive.take() {
                _alive = Some(KeepAlive::start(messages.into_owned(), every));
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Sends in-progress acks for messages every `every` until dropped, so messages that wait
/// behind a retry or a slow batch are not redelivered.
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    /// Starts keeping `msgs` alive; the first in-progress acks go out after `every`.
    pub fn start(msgs: Vec<Message>, every: Duration) -> Self {
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for m in &msgs {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        });
        Self { task }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(1);
        let cases = [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1_000),
            (40, 1_000),
        ];
        for (attempt, ms) in cases {
            assert_eq!(
                backoff(attempt, max),
                Duration::from_millis(ms),
                "attempt {attempt}"
            );
        }
    }

    #[tokio::test]
    async fn retries_until_success_with_growing_backoff() {
        let calls = Mutex::new(Vec::<Instant>::new());
        let mut failures = Vec::new();
        let cancel = CancellationToken::new();
        let got = Retry::new(Duration::from_millis(500))
            .run(
                &cancel,
                || {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now());
                    let n = calls.len();
                    async move {
                        if n < 5 {
                            Err(format!("fail {n}"))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |f: &mut Failure<'_, String>| failures.push((f.attempt, f.error.clone(), f.wait)),
            )
            .await;
        assert_eq!(got, Some(5));
        let ms = |m| Duration::from_millis(m);
        assert_eq!(
            failures,
            [
                (1, "fail 1".to_string(), ms(200)),
                (2, "fail 2".to_string(), ms(400)),
                (3, "fail 3".to_string(), ms(500)),
                (4, "fail 4".to_string(), ms(500)),
            ]
        );
        // Each pause lasted at least its backoff.
        let calls = calls.into_inner().unwrap();
        for (gap, (_, _, wait)) in calls.windows(2).zip(&failures) {
            assert!(gap[1] - gap[0] >= *wait, "{:?} < {wait:?}", gap[1] - gap[0]);
        }
    }

    #[test]
    fn jittered_stays_between_half_and_all_of_the_pause() {
        for ms in [0, 1, 200, 5_000] {
            let wait = Duration::from_millis(ms);
            let got: Vec<Duration> = (0..200).map(|_| jittered(wait)).collect();
            assert!(
                got.iter().all(|j| *j >= wait / 2 && *j <= wait),
                "{wait:?}: {got:?}"
            );
            if ms >= 200 {
                // 200 draws over a range of 100 ms or more are never all the same.
                assert!(got.iter().any(|j| *j != got[0]), "{wait:?} is not jittered");
            }
        }
    }

    #[tokio::test]
    async fn with_jitter_each_pause_is_within_its_backoff() {
        let cancel = CancellationToken::new();
        let mut waits = Vec::new();
        let mut n = 0;
        let got = Retry::new(Duration::from_millis(40))
            .jitter()
            .run(
                &cancel,
                || {
                    n += 1;
                    let n = n;
                    async move { if n < 4 { Err(()) } else { Ok(n) } }
                },
                |f| waits.push((f.attempt, f.wait)),
            )
            .await;
        assert_eq!(got, Some(4));
        assert_eq!(waits.len(), 3);
        for (attempt, wait) in waits {
            let full = backoff(attempt, Duration::from_millis(40));
            assert!(
                wait >= full / 2 && wait <= full,
                "attempt {attempt}: {wait:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_callback_sets_the_pause() {
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let mut n = 0;
        let got = Retry::new(Duration::from_millis(1))
            .run(
                &cancel,
                || {
                    n += 1;
                    let n = n;
                    async move { if n < 2 { Err(()) } else { Ok(()) } }
                },
                |f| f.wait = Duration::from_millis(300),
            )
            .await;
        assert_eq!(got, Some(()));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn stops_at_once_when_cancelled_while_waiting() {
        let cancel = CancellationToken::new();
        let attempts = Mutex::new(0u32);
        let run = Retry::new(Duration::from_secs(600)).run(
            &cancel,
            || {
                *attempts.lock().unwrap() += 1;
                async { Err::<(), _>("down") }
            },
            |f| f.wait = Duration::from_secs(600),
        );
        let cancelling = async {
            // The first attempt has failed once the run waits; cancel then.
            while *attempts.lock().unwrap() == 0 {
                tokio::task::yield_now().await;
            }
            cancel.cancel();
        };
        let (got, ()) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(run, cancelling)
        })
        .await
        .expect("the retry ends long before its 600 s pause");
        assert_eq!(got, None);
        assert_eq!(*attempts.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn an_already_cancelled_token_stops_after_the_first_failure() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut calls = 0;
        let got = Retry::new(Duration::from_secs(600))
            .run(
                &cancel,
                || {
                    calls += 1;
                    async { Err::<(), _>(()) }
                },
                |_| {},
            )
            .await;
        assert_eq!((got, calls), (None, 1));
    }
}
