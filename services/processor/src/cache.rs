//! The hot-profile cache of a processor replica: profiles (with their KV revision) and identity
//! mappings, bounded by an approximate memory cap. It is never the authority: every write is a
//! compare-and-set against the KV revision, and a conflict refreshes the entry.

use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::{Equivalent, OptionsBuilder, Weighter};

use crate::events;
use bytes::Bytes;

/// Fixed per-entry overhead assumed on top of the key and value sizes (map slot, Arc, shard
/// bookkeeping).
const ENTRY_OVERHEAD: u64 = 96;

/// What the allocator holds beyond the bytes asked for, in percent of them, while entries are
/// evicted and replaced all the time (partly used pages). Every weight includes it, so the
/// cap bounds resident memory rather than live bytes. From `herald-bench processor`: with the
/// cap at 32 and 128 MiB, resident memory grew about 1.5 times as fast as the estimated bytes
/// (that was with parsed profiles, whose estimate was checked at 4 % in a probe).
const ALLOCATOR_SLACK_PERCENT: u64 = 25;

/// A cached profile: its stored JSON at a KV revision. Kept encoded (about a third of the
/// parsed profile's memory: B-tree nodes and many small strings), decoded on each hit.
#[derive(Debug, Clone)]
pub struct CachedProfile {
    /// Its KV revision when read or written.
    pub revision: u64,
    /// The stored JSON.
    pub bytes: Bytes,
}

#[derive(Debug, Clone)]
enum Entry {
    Profile(CachedProfile),
    Identity(Arc<str>),
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Profile,
    Identity,
}

/// An entry's key: a profile id, or an identity's bucket key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: Kind,
    id: Box<str>,
}

/// A [`Key`] to look up with, borrowing its text: no allocation per lookup. Hashes as the
/// `Key` it stands for (the same fields in the same order; `str` hashes as `Box<str>`).
#[derive(Hash)]
struct Lookup<'a> {
    kind: Kind,
    id: &'a str,
}

impl Equivalent<Key> for Lookup<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.kind == key.kind && self.id == &*key.id
    }
}

impl Lookup<'_> {
    /// The owned key it stands for, to insert with.
    fn to_key(&self) -> Key {
        Key {
            kind: self.kind,
            id: self.id.into(),
        }
    }
}

fn profile_key(id: &str) -> Lookup<'_> {
    Lookup {
        kind: Kind::Profile,
        id,
    }
}

fn identity_key(kv_key: &str) -> Lookup<'_> {
    Lookup {
        kind: Kind::Identity,
        id: kv_key,
    }
}

#[derive(Debug, Clone)]
struct ByBytes;

impl Weighter<Key, Entry> for ByBytes {
    fn weight(&self, key: &Key, val: &Entry) -> u64 {
        let live = heap_bytes(key.id.len()) as u64
            + ENTRY_OVERHEAD
            + match val {
                // The bytes, and the shared buffer's header.
                Entry::Profile(p) => heap_bytes(p.bytes.len()) as u64 + 32,
                // An Arc<str>: two counters and the text.
                Entry::Identity(id) => heap_bytes(16 + id.len()) as u64,
            };
        live + live * ALLOCATOR_SLACK_PERCENT / 100
    }
}

/// The cache; disabled (every lookup a miss) when its cap is 0.
pub struct HotCache {
    inner: Option<Cache<Key, Entry, ByBytes>>,
}

impl std::fmt::Debug for HotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCache")
            .field("bytes", &self.weight())
            .finish()
    }
}

impl HotCache {
    /// A cache holding at most about `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let inner = (max_bytes > 0).then(|| {
            // Profiles of about 2 KiB on average, to size the hash tables.
            let items = (max_bytes / 2048).clamp(64, 4_000_000) as usize;
            // Mostly recency: a person active now is likely active again soon, often only
            // once or twice more, so a new entry must survive a while without a second
            // access (the default keeps only 3 % of the space for such entries).
            let options = OptionsBuilder::new()
                .estimated_items_capacity(items)
                .weight_capacity(max_bytes)
                .hot_allocation(0.05)
                .build()
                .expect("cache options are complete");
            Cache::with_options(options, ByBytes, Default::default(), Default::default())
        });
        Self { inner }
    }

    /// Whether it holds anything at all (its cap is above 0).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether identity `kv_key` is cached (not counted as a lookup).
    pub fn knows_identity(&self, kv_key: &str) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|c| c.contains_key(&identity_key(kv_key)))
    }

    /// Approximate bytes held.
    pub fn weight(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| c.weight())
    }

    /// The cached profile `id`, counting a hit or a miss.
    pub fn profile(&self, id: &str) -> Option<CachedProfile> {
        let hit = self
            .inner
            .as_ref()
            .and_then(|c| match c.get(&profile_key(id)) {
                Some(Entry::Profile(p)) => Some(p),
                _ => None,
            });
        events::CacheLookup { hit: hit.is_some() }.emit();
        hit
    }

    /// Caches profile `id` at `revision`, as stored (`bytes`). Always a copy of exactly
    /// `bytes.len()`: what callers hold is a slice of a connection's read buffer, or an
    /// encoder's `Vec`, whose capacity is up to twice its length (by doubling); kept as they
    /// are, those would hold more than the weight counts.
    pub fn put_profile(&self, id: &str, revision: u64, bytes: &[u8]) {
        if let Some(c) = &self.inner {
            let bytes = Bytes::copy_from_slice(bytes);
            c.insert(
                profile_key(id).to_key(),
                Entry::Profile(CachedProfile { revision, bytes }),
            );
            events::CacheSize { bytes: c.weight() }.emit();
        }
    }

    /// The cached profile id of identity bucket key `kv_key`, counting a hit or a miss.
    pub fn identity(&self, kv_key: &str) -> Option<Arc<str>> {
        let hit = self
            .inner
            .as_ref()
            .and_then(|c| match c.get(&identity_key(kv_key)) {
                Some(Entry::Identity(p)) => Some(p),
                _ => None,
            });
        events::CacheLookup { hit: hit.is_some() }.emit();
        hit
    }

    /// Caches that identity `kv_key` maps to `profile_id`.
    pub fn put_identity(&self, kv_key: &str, profile_id: &str) {
        if let Some(c) = &self.inner {
            c.insert(
                identity_key(kv_key).to_key(),
                Entry::Identity(profile_id.into()),
            );
        }
    }

    /// Forgets profile `id`.
    pub fn forget_profile(&self, id: &str) {
        if let Some(c) = &self.inner {
            c.remove(&profile_key(id));
        }
    }

    /// Forgets identity `kv_key`.
    pub fn forget_identity(&self, kv_key: &str) {
        if let Some(c) = &self.inner {
            c.remove(&identity_key(kv_key));
        }
    }

    /// Forgets everything (e.g. when this replica stops owning partitions).
    pub fn clear(&self) {
        if let Some(c) = &self.inner {
            c.clear();
            events::CacheSize { bytes: 0 }.emit();
        }
    }
}

/// Bytes an allocation of `len` bytes takes (0 for none): rounded up to 16.
fn heap_bytes(len: usize) -> usize {
    if len == 0 { 0 } else { (len + 15) & !15 }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn stays_within_its_cap() {
        let cache = HotCache::new(64 * 1024);
        for i in 0..10_000 {
            cache.put_profile(&format!("p{i}"), i, &[b'x'; 400]);
            cache.put_identity(&format!("user_id.{i}"), &format!("p{i}"));
        }
        assert!(cache.weight() <= 64 * 1024, "{}", cache.weight());
        cache.put_profile("hot", 7, b"{}");
        assert_eq!(cache.profile("hot").map(|c| c.revision), Some(7));
        cache.forget_profile("hot");
        assert!(cache.profile("hot").is_none());
    }

    /// Lookups (borrowed keys) find what was put (owned keys), and a profile and an identity
    /// with the same text are two entries.
    #[test]
    fn lookups_find_their_own_kind() {
        let cache = HotCache::new(1024 * 1024);
        cache.put_profile("same", 3, b"{}");
        assert!(!cache.knows_identity("same"));
        assert!(cache.identity("same").is_none());
        cache.put_identity("same", "p1");
        assert_eq!(cache.profile("same").map(|c| c.revision), Some(3));
        assert_eq!(cache.identity("same").as_deref(), Some("p1"));
        assert!(cache.knows_identity("same"));
        cache.forget_identity("same");
        assert!(cache.identity("same").is_none());
        assert_eq!(cache.profile("same").map(|c| c.revision), Some(3));
    }

    #[test]
    fn a_zero_cap_disables_it() {
        let cache = HotCache::new(0);
        cache.put_identity("user_id.x", "p");
        assert!(cache.identity("user_id.x").is_none());
    }
}
