//! Sources and their write keys. For now they come from configuration; the lookup sits behind
//! [`SourceRegistry`] so that a later store (the `herald-config` KV bucket) only changes this
//! module.

use std::collections::HashMap;
use std::sync::Arc;

use herald_common::partition::stable_hash;

use crate::config::SourceConfig;
use crate::error::IngestError;

/// A source as request handling sees it: never its write key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Stable source id.
    pub id: Arc<str>,
    /// Human-readable name.
    pub name: Arc<str>,
    /// Whether the source accepts events.
    pub enabled: bool,
}

struct Entry {
    key: Box<[u8]>,
    /// The mParticle secret paired with the key, if the source has one.
    secret: Option<Box<[u8]>>,
    source: Source,
}

/// Why a key and secret pair was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairAuthError {
    /// No source has this key.
    UnknownKey,
    /// The key is known but the secret does not match (or the source has none).
    BadSecret,
}

/// Looks up sources by write key, comparing keys in constant time.
///
/// Keys are indexed by a non-secret hash of the key; the candidates with the same hash are then
/// compared byte for byte without an early exit, so timing reveals nothing about how much of a
/// guessed key was right.
pub struct SourceRegistry {
    by_hash: HashMap<u64, Vec<Entry>>,
    list: Vec<Source>,
}

impl std::fmt::Debug for SourceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRegistry")
            .field("sources", &self.list)
            .finish()
    }
}

impl SourceRegistry {
    /// Builds the registry from configured sources. Ids and write keys must be unique and
    /// non-empty.
    pub fn from_config(sources: &[SourceConfig]) -> Result<Self, IngestError> {
        let mut by_hash: HashMap<u64, Vec<Entry>> = HashMap::new();
        let mut list = Vec::with_capacity(sources.len());
        for s in sources {
            let bad =
                |why: &str| IngestError::Config(format!("ingest.sources: source {:?} {why}", s.id));
            if s.id.is_empty() || s.id.chars().any(|c| c.is_control() || c == ':') {
                return Err(bad(
                    "needs a non-empty id without ':' or control characters",
                ));
            }
            if list.iter().any(|o: &Source| *o.id == *s.id) {
                return Err(bad("is configured twice"));
            }
            let key = s.write_key.expose();
            if key.is_empty() {
                return Err(bad("has an empty write_key"));
            }
            let bucket = by_hash.entry(stable_hash(key)).or_default();
            if bucket.iter().any(|e| ct_eq(&e.key, key.as_bytes())) {
                return Err(bad("reuses another source's write_key"));
            }
            let source = Source {
                id: s.id.as_str().into(),
                name: s.name.as_str().into(),
                enabled: s.enabled,
            };
            bucket.push(Entry {
                key: key.as_bytes().into(),
                secret: s
                    .write_secret
                    .as_ref()
                    .map(|x| x.expose().as_bytes().into()),
                source: source.clone(),
            });
            list.push(source);
        }
        Ok(Self { by_hash, list })
    }

    /// The source whose write key is `key`, if any (enabled or not).
    pub fn authenticate(&self, key: &str) -> Option<&Source> {
        let candidates = self.by_hash.get(&stable_hash(key))?;
        let mut found = None;
        for e in candidates {
            if ct_eq(&e.key, key.as_bytes()) && found.is_none() {
                found = Some(&e.source);
            }
        }
        found
    }

    /// The source whose key is `key` and whose secret is `secret` (mParticle's Basic
    /// `key:secret`), compared in constant time.
    pub fn authenticate_pair(&self, key: &str, secret: &str) -> Result<&Source, PairAuthError> {
        let candidates = self
            .by_hash
            .get(&stable_hash(key))
            .ok_or(PairAuthError::UnknownKey)?;
        let entry = candidates
            .iter()
            .find(|e| ct_eq(&e.key, key.as_bytes()))
            .ok_or(PairAuthError::UnknownKey)?;
        match &entry.secret {
            Some(s) if ct_eq(s, secret.as_bytes()) => Ok(&entry.source),
            _ => Err(PairAuthError::BadSecret),
        }
    }

    /// Every source, in configuration order.
    pub fn list(&self) -> &[Source] {
        &self.list
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use herald_common::Secret;

    use super::*;

    fn src(id: &str, key: &str, enabled: bool) -> SourceConfig {
        SourceConfig {
            id: id.into(),
            name: format!("{id} name"),
            write_key: Secret(key.into()),
            write_secret: Some(Secret(format!("{key}-secret"))),
            enabled,
        }
    }

    #[test]
    fn authenticates_key_and_secret_pairs() {
        let reg = SourceRegistry::from_config(&[src("app", "k1", true)]).expect("valid");
        assert_eq!(
            &*reg.authenticate_pair("k1", "k1-secret").expect("pair").id,
            "app"
        );
        assert_eq!(
            reg.authenticate_pair("k1", "nope"),
            Err(PairAuthError::BadSecret)
        );
        assert_eq!(
            reg.authenticate_pair("k9", "k1-secret"),
            Err(PairAuthError::UnknownKey)
        );
    }

    #[test]
    fn authenticates_by_key() {
        let reg = SourceRegistry::from_config(&[src("web", "k1", true), src("ios", "k2", false)])
            .expect("valid");
        assert_eq!(&*reg.authenticate("k1").expect("known").id, "web");
        let ios = reg.authenticate("k2").expect("known");
        assert!(!ios.enabled);
        assert!(reg.authenticate("k3").is_none());
        assert!(reg.authenticate("k").is_none());
        assert!(reg.authenticate("").is_none());
        assert_eq!(reg.list().len(), 2);
        assert!(!format!("{reg:?}").contains("k1"));
    }

    #[test]
    fn rejects_bad_source_lists() {
        for (sources, why) in [
            (vec![src("a", "k", true), src("a", "j", true)], "twice"),
            (vec![src("a", "k", true), src("b", "k", true)], "reuses"),
            (vec![src("a", "", true)], "empty write_key"),
            (vec![src("", "k", true)], "non-empty id"),
            (vec![src("a:b", "k", true)], "non-empty id"),
        ] {
            let err = SourceRegistry::from_config(&sources).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
