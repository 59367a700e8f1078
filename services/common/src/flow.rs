//! A keyed flow: a partition's messages worked through with per-key order and no barrier
//! between batches (the activator's delivery at `batch_max` 1).
//!
//! A reader hands in batches through a channel; [`keyed_flow`] splits each into its keys and
//! runs each key's items in order, one at a time per key, every key with an item waiting at
//! once (what bounds the work in flight is the caller's: the activator's requests wait for
//! the destination's slots). A batch's other keys never wait for its slowest one, and the next
//! batch's keys start at once, so an item waits only for earlier items of its own key.
//!
//! The processor does not use it: it was measured there (docs/benchmarks.md, "The fourth
//! pass") and cost about a quarter more CPU per event at full load than its batch loop, for no
//! gain in freshness on a CPU-bound machine.
//!
//! At most `max_held` items are taken in before some are settled, which bounds memory and
//! what is delivered and unacked. A run that reports failure (it was cancelled) ends its key:
//! the key's later items are never started. On cancel nothing new starts, the runs in flight
//! end as they do on cancel, and the items never started are handed back, in arrival order, for
//! the caller to give back to JetStream (nak) so the partition's next owner gets them at once.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Runs the flow until `batches` closes (then until every item taken in is settled) or
/// `cancel` fires, holding at most `max_held` items taken in and not settled (0 is taken as
/// 1; a batch is taken in whole, so up to a batch more can be held). `admit` turns a batch
/// into `(key, item)` pairs in stream order; `run` gets a key and its next item and says
/// whether it was settled (`false` when it was cancelled first); `settled` runs after each
/// item settled. Returns the items never started, in arrival order (empty unless cancelled or
/// a run failed).
pub async fn keyed_flow<B, K, T, A, AF, R, RF>(
    mut batches: mpsc::Receiver<B>,
    max_held: usize,
    mut admit: A,
    run: R,
    mut settled: impl FnMut(),
    cancel: &CancellationToken,
) -> Vec<T>
where
    K: Hash + Eq + Clone,
    A: FnMut(B) -> AF,
    AF: Future<Output = Vec<(K, T)>>,
    R: Fn(K, T) -> RF,
    RF: Future<Output = bool>,
{
    let max_held = max_held.max(1);
    // Per key with a run in flight or items waiting: the items waiting, in order, and when
    // each arrived (to hand back the never-started ones in arrival order).
    let mut queues: HashMap<K, VecDeque<(u64, T)>> = HashMap::new();
    // Keys whose next item can start (none of theirs in flight).
    let mut ready: VecDeque<K> = VecDeque::new();
    let mut running = FuturesUnordered::new();
    let mut left: Vec<(u64, T)> = Vec::new();
    let mut held = 0usize;
    let mut arrived = 0u64;
    let mut open = true;
    loop {
        if cancel.is_cancelled() {
            open = false;
            ready.clear();
        }
        while let Some(key) = ready.pop_front() {
            let queue = queues.get_mut(&key).expect("a ready key has items waiting");
            let (_, item) = queue.pop_front().expect("a ready key has items waiting");
            running.push(run(key.clone(), item).map(move |ok| (key, ok)));
        }
        if !open && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some((key, ok)) = running.next() => {
                held -= 1;
                if ok {
                    settled();
                }
                match queues.get(&key) {
                    Some(rest) if ok && !rest.is_empty() => ready.push_back(key),
                    _ => {
                        if let Some(rest) = queues.remove(&key) {
                            held -= rest.len();
                            left.extend(rest);
                        }
                    }
                }
            }
            _ = cancel.cancelled(), if open => {}
            batch = batches.recv(), if open && held < max_held => {
                let Some(batch) = batch else {
                    open = false;
                    continue;
                };
                for (key, item) in admit(batch).await {
                    held += 1;
                    arrived += 1;
                    match queues.entry(key) {
                        Entry::Occupied(mut waiting) => waiting.get_mut().push_back((arrived, item)),
                        Entry::Vacant(new) => {
                            ready.push_back(new.key().clone());
                            new.insert(VecDeque::from([(arrived, item)]));
                        }
                    }
                }
            }
        }
    }
    left.extend(queues.into_values().flatten());
    left.sort_by_key(|(at, _)| *at);
    left.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Feeds `batches` of `(key, value)` into a flow and returns the items each run got, in
    /// the order runs started, and what was never started. Keys in `slow` take 200 ms a run.
    async fn drive(
        batches: Vec<Vec<(&'static str, u32)>>,
        slow: &[&'static str],
        cancel_after: Option<Duration>,
    ) -> (Vec<(&'static str, u32)>, Vec<u32>) {
        let (tx, rx) = mpsc::channel(1);
        let runs = Mutex::new(Vec::new());
        let cancel = CancellationToken::new();
        if let Some(after) = cancel_after {
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                c.cancel();
            });
        }
        let feed = async move {
            for b in batches {
                tx.send(b).await.expect("the flow is open");
            }
        };
        let flow = keyed_flow(
            rx,
            100,
            |b: Vec<(&'static str, u32)>| async move { b },
            |key, item: u32| {
                runs.lock().unwrap().push((key, item));
                let cancel = cancel.clone();
                async move {
                    let pause = if slow.contains(&key) { 200 } else { 5 };
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(pause)) => true,
                        _ = cancel.cancelled() => false,
                    }
                }
            },
            || {},
            &cancel,
        );
        let (_, left) = tokio::join!(feed, flow);
        (runs.into_inner().unwrap(), left)
    }

    #[tokio::test]
    async fn each_key_runs_its_items_in_order_one_at_a_time() {
        let batches = vec![vec![("a", 1), ("b", 2), ("a", 3)], vec![("a", 4), ("b", 5)]];
        let (runs, left) = drive(batches, &[], None).await;
        let of = |k| {
            runs.iter()
                .filter(|(key, _)| *key == k)
                .map(|(_, v)| *v)
                .collect::<Vec<_>>()
        };
        assert_eq!(of("a"), vec![1, 3, 4]);
        assert_eq!(of("b"), vec![2, 5]);
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn every_key_with_an_item_waiting_runs_at_once() {
        let (tx, rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let (running, peak) = (Mutex::new(0usize), Mutex::new(0usize));
        let feed = async move {
            let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
            tx.send(keys.iter().map(|k| (*k, 0u32)).collect::<Vec<_>>())
                .await
                .expect("open");
        };
        let flow = keyed_flow(
            rx,
            100,
            |b: Vec<(&'static str, u32)>| async move { b },
            |_, _| {
                let (running, peak) = (&running, &peak);
                async move {
                    {
                        let mut r = running.lock().unwrap();
                        *r += 1;
                        let mut p = peak.lock().unwrap();
                        *p = (*p).max(*r);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    *running.lock().unwrap() -= 1;
                    true
                }
            },
            || {},
            &cancel,
        );
        tokio::join!(feed, flow);
        assert_eq!(*peak.lock().unwrap(), 8, "the batch's 8 keys at once");
    }

    #[tokio::test]
    async fn a_slow_key_holds_up_only_its_own_later_items() {
        let batches = vec![vec![("slow", 1), ("b", 2)], vec![("slow", 3), ("c", 4)]];
        let started = tokio::time::Instant::now();
        let runs = Mutex::new(Vec::new());
        let (tx, rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let feed = async move {
            for b in batches {
                tx.send(b).await.expect("open");
            }
        };
        let flow = keyed_flow(
            rx,
            100,
            |b: Vec<(&'static str, u32)>| async move { b },
            |key, item: u32| {
                let runs = &runs;
                async move {
                    let pause = if key == "slow" { 200 } else { 5 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    runs.lock().unwrap().push((item, started.elapsed()));
                    true
                }
            },
            || {},
            &cancel,
        );
        tokio::join!(feed, flow);
        let runs = runs.into_inner().unwrap();
        let at = |v| runs.iter().find(|(x, _)| *x == v).expect("ran").1;
        // The next batch's "c" does not wait for the first batch's slow key; the slow key's
        // second item waits for its first.
        assert!(at(4) < at(1), "{runs:?}");
        assert!(at(3) >= Duration::from_millis(400), "{runs:?}");
    }

    #[tokio::test]
    async fn on_cancel_the_items_never_started_come_back_in_arrival_order() {
        // Two slow keys interleaved: each runs its first item; the rest, of both keys, come
        // back in the order they arrived. "b" ran to its end before the cancel.
        let batches = vec![vec![
            ("s1", 1),
            ("s2", 2),
            ("s1", 3),
            ("b", 4),
            ("s2", 5),
            ("s1", 6),
        ]];
        let (runs, left) = drive(batches, &["s1", "s2"], Some(Duration::from_millis(50))).await;
        let mut started: Vec<u32> = runs.iter().map(|(_, v)| *v).collect();
        started.sort_unstable();
        assert_eq!(started, vec![1, 2, 4], "{runs:?}");
        assert_eq!(left, vec![3, 5, 6]);
    }

    #[tokio::test]
    async fn no_more_than_max_held_items_are_taken_in_before_some_settle() {
        let (tx, rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let admitted = Mutex::new(0usize);
        let peak = Mutex::new(0usize);
        let settled_total = Mutex::new(0usize);
        let feed = async move {
            for i in 0..10u32 {
                tx.send(vec![("k", i), ("j", i)]).await.expect("open");
            }
        };
        let flow = keyed_flow(
            rx,
            4,
            |b: Vec<(&'static str, u32)>| {
                let n = b.len();
                let mut a = admitted.lock().unwrap();
                *a += n;
                let held = *a - *settled_total.lock().unwrap();
                let mut p = peak.lock().unwrap();
                *p = (*p).max(held);
                async move { b }
            },
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                true
            },
            || *settled_total.lock().unwrap() += 1,
            &cancel,
        );
        tokio::join!(feed, flow);
        assert_eq!(*settled_total.lock().unwrap(), 20);
        // Taken in while fewer than 4 were held: at most 3 + one batch of 2.
        assert!(*peak.lock().unwrap() <= 5, "peak {}", peak.lock().unwrap());
    }
}
