//! Following a KV prefix: a full load first, every change after it, and a reload after the
//! server restarted (the watch's consumer is gone with it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, kv};
use herald_common::kvwatch::{Follower, follow};
use herald_testkit::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

/// What the follower saw: `reload:<keys>` per load, `put:<key>=<value>` or `del:<key>` per change.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn has(&self, line: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l == line)
    }

    fn reloads(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("reload:"))
            .count()
    }
}

impl Follower for Seen {
    async fn reload(&mut self, kv: &kv::Store) -> Result<(), String> {
        use futures_util::TryStreamExt as _;
        let mut keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        keys.retain(|k| k.starts_with("things."));
        keys.sort();
        self.0
            .lock()
            .unwrap()
            .push(format!("reload:{}", keys.join(",")));
        Ok(())
    }

    async fn changed(&mut self, entry: kv::Entry) {
        let line = match entry.operation {
            kv::Operation::Put => format!(
                "put:{}={}",
                entry.key,
                String::from_utf8_lossy(&entry.value)
            ),
            _ => format!("del:{}", entry.key),
        };
        self.0.lock().unwrap().push(line);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_first_then_follows_changes_and_reloads_after_a_server_restart() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let kv = js
        .create_key_value(kv::Config {
            bucket: "follow-test".into(),
            ..Default::default()
        })
        .await?;
    kv.put("things.a", "1".into()).await?;
    kv.put("other.x", "ignored".into()).await?;

    let seen = Seen::default();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let (kv, client, cancel, mut seen) =
            (kv.clone(), client.clone(), cancel.clone(), seen.clone());
        async move { follow(&kv, &client, "things.>", "things", &mut seen, &cancel).await }
    });
    let deadline = Duration::from_secs(10);
    wait_until("the first load", deadline, || async {
        seen.has("reload:things.a")
    })
    .await?;

    kv.put("things.b", "2".into()).await?;
    kv.put("other.y", "ignored".into()).await?;
    kv.delete("things.a").await?;
    wait_until("the changes", deadline, || async {
        seen.has("put:things.b=2") && seen.has("del:things.a")
    })
    .await?;
    assert!(
        !seen.0.lock().unwrap().iter().any(|l| l.contains("other.")),
        "only the filter's keys are followed"
    );

    // A restart loses the watch's ephemeral consumer; the follower reloads once the client is
    // back, and keeps following.
    let reloads = seen.reloads();
    nats.restart().await?;
    wait_until(
        "a reload after the restart",
        Duration::from_secs(30),
        || async { seen.reloads() > reloads },
    )
    .await?;
    kv.put("things.c", "3".into()).await?;
    wait_until(
        "a change after the restart",
        Duration::from_secs(30),
        || async { seen.has("put:things.c=3") },
    )
    .await?;

    cancel.cancel();
    tokio::time::timeout(deadline, task).await??;
    Ok(())
}
