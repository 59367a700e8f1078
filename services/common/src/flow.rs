//! A keyed flow: a partition's messages worked through with per-key order and no barrier
//! between batches (the activator's delivery at `batch_max` 1).
//!
//! A reader hands in batches through a channel; [`keyed_flow`] splits each into its keys and
//! runs each key's items in order, one run at a time per key, up to `slots` keys at once. A
//! batch's other keys never wait for its slowest one, and the next batch's keys start as soon
//! as a slot is free, so an item waits only for earlier items of its own key. A run takes
//! either the key's next item ([`Take::One`]: each event sent alone) or every item of the key
//! waiting when it starts ([`Take::All`]).
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

/// How many of a key's waiting items one run takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The next one.
    One,
    /// Every one waiting when the run starts.
    All,
}

/// The bounds of a [`keyed_flow`].
#[derive(Debug, Clone, Copy)]
pub struct FlowLimits {
    /// Most keys running at once (0 is taken as 1).
    pub slots: usize,
    /// Most items taken in and not settled (0 is taken as 1); a batch is taken in whole, so
    /// up to a batch more can be held.
    pub max_held: usize,
    /// What one run takes.
    pub take: Take,
}

/// Runs the flow until `batches` closes (then until every item taken in is settled) or
/// `cancel` fires. `admit` turns a batch into `(key, item)` pairs in stream order; `run` gets a
/// key and its items in order and says whether they were all settled (`false` when it was
/// cancelled first); `settled` hears how many items each run that settled them took. Returns the items
/// never started, in arrival order (empty unless cancelled or a run failed).
pub async fn keyed_flow<B, K, T, A, AF, R, RF>(
    mut batches: mpsc::Receiver<B>,
    limits: FlowLimits,
    mut admit: A,
    run: R,
    mut settled: impl FnMut(usize),
    cancel: &CancellationToken,
) -> Vec<T>
where
    K: Hash + Eq + Clone,
    A: FnMut(B) -> AF,
    AF: Future<Output = Vec<(K, T)>>,
    R: Fn(K, Vec<T>) -> RF,
    RF: Future<Output = bool>,
{
    let slots = limits.slots.max(1);
    let max_held = limits.max_held.max(1);
    // Per key with a run in flight or items waiting: the items waiting, in order, and when
    // each arrived (to hand back the never-started ones in arrival order).
    let mut queues: HashMap<K, VecDeque<(u64, T)>> = HashMap::new();
    // Keys whose next items wait for a slot (none of theirs in flight).
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
        while running.len() < slots
            && let Some(key) = ready.pop_front()
        {
            let queue = queues.get_mut(&key).expect("a ready key has items waiting");
            let items: Vec<T> = match limits.take {
                Take::One => queue.pop_front().into_iter().map(|(_, t)| t).collect(),
                Take::All => queue.drain(..).map(|(_, t)| t).collect(),
            };
            let n = items.len();
            running.push(run(key.clone(), items).map(move |ok| (key, n, ok)));
        }
        if !open && running.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some((key, n, ok)) = running.next() => {
                held -= n;
                if ok {
                    settled(n);
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

    /// Feeds `batches` of `(key, value)` into a flow and returns what each run got, in the
    /// order runs started, and what was never started.
    async fn drive(
        batches: Vec<Vec<(&'static str, u32)>>,
        limits: FlowLimits,
        slow_key: Option<&'static str>,
        cancel_after: Option<Duration>,
    ) -> (Vec<(&'static str, Vec<u32>)>, Vec<u32>) {
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
            limits,
            |b: Vec<(&'static str, u32)>| async move { b },
            |key, items: Vec<u32>| {
                runs.lock().unwrap().push((key, items));
                let cancel = cancel.clone();
                async move {
                    let pause = if Some(key) == slow_key { 200 } else { 5 };
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(pause)) => true,
                        _ = cancel.cancelled() => false,
                    }
                }
            },
            |_| {},
            &cancel,
        );
        let (_, left) = tokio::join!(feed, flow);
        (runs.into_inner().unwrap(), left)
    }

    fn limits(take: Take) -> FlowLimits {
        FlowLimits {
            slots: 4,
            max_held: 100,
            take,
        }
    }

    #[tokio::test]
    async fn each_key_runs_its_items_in_order_one_run_at_a_time() {
        let batches = vec![vec![("a", 1), ("b", 2), ("a", 3)], vec![("a", 4), ("b", 5)]];
        let (runs, left) = drive(batches, limits(Take::One), None, None).await;
        let of = |k| {
            runs.iter()
                .filter(|(key, _)| *key == k)
                .flat_map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(of("a"), vec![1, 3, 4]);
        assert_eq!(of("b"), vec![2, 5]);
        assert!(runs.iter().all(|(_, v)| v.len() == 1), "{runs:?}");
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn no_more_than_slots_keys_run_at_once() {
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
            FlowLimits {
                slots: 3,
                max_held: 100,
                take: Take::One,
            },
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
            |_| {},
            &cancel,
        );
        tokio::join!(feed, flow);
        assert_eq!(*peak.lock().unwrap(), 3, "3 keys at once, and 3 used");
    }

    #[tokio::test]
    async fn take_all_gives_a_run_every_item_waiting_for_its_key() {
        // "a" runs 1 while 3 and 4 arrive; its next run takes both.
        let batches = vec![vec![("a", 1)], vec![("a", 3), ("b", 2)], vec![("a", 4)]];
        let (runs, _) = drive(batches, limits(Take::All), None, None).await;
        let a: Vec<_> = runs.iter().filter(|(k, _)| *k == "a").collect();
        assert_eq!(a[0].1, vec![1]);
        assert_eq!(a[1].1, vec![3, 4], "{runs:?}");
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
            limits(Take::One),
            |b: Vec<(&'static str, u32)>| async move { b },
            |key, items: Vec<u32>| {
                let runs = &runs;
                async move {
                    let pause = if key == "slow" { 200 } else { 5 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    runs.lock().unwrap().push((items[0], started.elapsed()));
                    true
                }
            },
            |_| {},
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
        let batches = vec![vec![("slow", 1), ("slow", 2), ("slow", 3), ("b", 4)]];
        let l = FlowLimits {
            slots: 1,
            max_held: 100,
            take: Take::One,
        };
        let (runs, left) = drive(batches, l, Some("slow"), Some(Duration::from_millis(50))).await;
        assert_eq!(runs, vec![("slow", vec![1])]);
        assert_eq!(left, vec![2, 3, 4]);
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
            FlowLimits {
                slots: 2,
                max_held: 4,
                take: Take::One,
            },
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
            |n| *settled_total.lock().unwrap() += n,
            &cancel,
        );
        tokio::join!(feed, flow);
        assert_eq!(*settled_total.lock().unwrap(), 20);
        // Taken in while fewer than 4 were held: at most 3 + one batch of 2.
        assert!(*peak.lock().unwrap() <= 5, "peak {}", peak.lock().unwrap());
    }
}
