//! The partitions this replica owns right now, shared by the partition tasks (which register
//! and unregister themselves) and the control API.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use herald_common::ordered::{ReaderStatus, ReaderStatusHandle};

/// One owned partition: its consumer and its reader's status.
#[derive(Clone)]
pub(crate) struct OwnedPartition {
    pub consumer: Consumer<PullConfig>,
    pub reader: ReaderStatusHandle,
}

#[derive(Default)]
struct Inner {
    member: String,
    members: Vec<String>,
    owned: BTreeMap<u32, OwnedPartition>,
}

/// This replica's place among the processor replicas.
pub(crate) struct Partitions {
    durable: String,
    inner: Mutex<Inner>,
}

/// A copy of [`Partitions`] at one moment.
pub(crate) struct Snapshot {
    pub member: String,
    pub members: Vec<String>,
    pub owned: Vec<(u32, Consumer<PullConfig>, ReaderStatus)>,
}

impl Partitions {
    pub fn new(durable: String) -> Self {
        Self {
            durable,
            inner: Mutex::default(),
        }
    }

    /// The base name of the partition consumers.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// Whether the replica has joined the member list yet.
    pub fn joined(&self) -> bool {
        !self.lock().member.is_empty()
    }

    pub fn set_view(&self, member: &str, members: &[String]) {
        let mut inner = self.lock();
        if inner.member != member {
            inner.member = member.to_string();
        }
        if inner.members != members {
            inner.members = members.to_vec();
        }
    }

    pub fn insert(&self, partition: u32, owned: OwnedPartition) {
        self.lock().owned.insert(partition, owned);
    }

    pub fn remove(&self, partition: u32) {
        self.lock().owned.remove(&partition);
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            member: inner.member.clone(),
            members: inner.members.clone(),
            owned: inner
                .owned
                .iter()
                .map(|(p, o)| (*p, o.consumer.clone(), o.reader.get()))
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
