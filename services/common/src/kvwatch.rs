//! Live config in a KV bucket (ingest's sources, the activator's destinations): [`seed`] writes
//! a config-file entry into the bucket, and [`follow`] is the one loop that keeps a replica in
//! step with it.
//!
//! [`follow`] starts a watch on a key filter, then has the [`Follower`] load everything under it
//! (a change made in between is in both, and revisions order them), then hands it every change
//! the watch reports, until the cancellation token fires. A watch that breaks is started again
//! with a full reload, and so is one whose client reconnected: a restarted server may have lost
//! the watch's ephemeral consumer, which the client would notice only after missed heartbeats.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// How often the watch checks whether the client reconnected.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);

/// The pause before a broken watch is started again.
const RESTART_PAUSE: Duration = Duration::from_millis(250);

/// What keeps itself in step with part of a bucket.
pub trait Follower: Send {
    /// Loads everything under the filter, replacing what was known: first, and again after each
    /// restart of the watch. An error restarts the watch.
    fn reload(&mut self, kv: &kv::Store) -> impl Future<Output = Result<(), String>> + Send;

    /// Applies one change the watch reported (a put, a delete or a purge).
    fn changed(&mut self, entry: kv::Entry) -> impl Future<Output = ()> + Send;
}

/// Seeds one key from the config file: when it is absent, `record(None)` is created; when it is
/// there, `record(Some(stored))` is written over it by compare-and-set, or nothing when that
/// gives `None` (the stored one is current). A concurrent change is read again, up to
/// `attempts` times. Returns whether it wrote.
pub async fn seed(
    kv: &kv::Store,
    key: &str,
    attempts: usize,
    mut record: impl FnMut(Option<&[u8]>) -> Option<bytes::Bytes>,
) -> Result<bool, String> {
    for attempt in 1.. {
        let current = kv.entry(key).await.map_err(|e| e.to_string())?;
        // (whether the error is a lost race, what it says)
        let result = match current.filter(|e| e.operation == kv::Operation::Put) {
            None => {
                let Some(value) = record(None) else {
                    return Ok(false);
                };
                kv.create(key, value).await.map(|_| ()).map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
            }
            Some(entry) => {
                let Some(value) = record(Some(&entry.value)) else {
                    return Ok(false);
                };
                kv.update(key, value, entry.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            }
        };
        match result {
            Ok(()) => return Ok(true),
            Err((true, _)) if attempt < attempts => continue,
            Err((_, e)) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}

/// How a watch ended without an error.
enum Watched {
    Cancelled,
    /// The client reconnected: watch anew at once.
    Reconnected,
}

/// Follows the keys of `kv` matching `filter` (`sources.*`, `destinations.>`) with `follower`
/// until `cancel` fires. `what` names them in log lines ("sources").
pub async fn follow<F: Follower>(
    kv: &kv::Store,
    client: &async_nats::Client,
    filter: &str,
    what: &str,
    follower: &mut F,
    cancel: &CancellationToken,
) {
    let stats = client.statistics();
    loop {
        match watch_once(kv, &stats, filter, follower, cancel).await {
            Ok(Watched::Cancelled) => return,
            Ok(Watched::Reconnected) => {
                tracing::debug!("NATS reconnected: watching the {what} anew");
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "the {what} watch failed; reloading"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
        }
    }
}

async fn watch_once<F: Follower>(
    kv: &kv::Store,
    stats: &async_nats::Statistics,
    filter: &str,
    follower: &mut F,
    cancel: &CancellationToken,
) -> Result<Watched, String> {
    let connects = stats.connects.load(Ordering::Relaxed);
    let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
    // Watch first, then load: a change in between is in both, and revisions order them.
    let mut watch = kv.watch(filter).await.map_err(|e| e.to_string())?;
    follower.reload(kv).await?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Watched::Cancelled),
            _ = reconnect_check.tick() => {
                if stats.connects.load(Ordering::Relaxed) != connects {
                    return Ok(Watched::Reconnected);
                }
            }
            next = watch.next() => match next {
                Some(Ok(entry)) => follower.changed(entry).await,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the watch ended".into()),
            },
        }
    }
}
