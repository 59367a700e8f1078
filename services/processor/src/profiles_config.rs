//! Settings of identity resolution and profiles (`[processor.profiles]`, env
//! `HERALD__PROCESSOR__PROFILES__*`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Identity resolution guard rails, the hot-profile cache and compare-and-set retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilesConfig {
    /// Most identities of one type a profile may hold, by identity type (e.g. `email = 5`).
    /// An identity beyond its type's limit is not linked, and two profiles whose union would
    /// exceed a limit are not merged (an `alias` call, an explicit instruction, is exempt).
    pub identity_limits: BTreeMap<String, u32>,
    /// Limit of every identity type not listed in `identity_limits`.
    pub default_identity_limit: u32,
    /// Identity values that never link anything (compared case-insensitively after trimming;
    /// the empty value is always blocked).
    pub blocked_values: Vec<String>,
    /// Identity types in the order they decide which profile an event belongs to; types not
    /// listed follow in alphabetical order, `anonymous_id` last.
    pub identity_priority: Vec<String>,
    /// Memory cap of the hot-profile cache, in bytes (0 disables the cache).
    pub cache_max_bytes: u64,
    /// Most attempts of one compare-and-set write before the event's batch is retried.
    pub cas_max_attempts: u32,
    /// How long after its first pass an erasure sweeps again (milliseconds; 0: never), to
    /// undo a link made by a replica whose suppression list had not caught up yet.
    pub erasure_sweep_ms: u64,
}

impl Default for ProfilesConfig {
    fn default() -> Self {
        Self {
            identity_limits: [("user_id", 1), ("email", 5)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            default_identity_limit: 100,
            blocked_values: [
                "null",
                "undefined",
                "0",
                "-1",
                "nil",
                "none",
                "nan",
                "[object object]",
                // The advertising id of a device with ad tracking limited.
                "00000000-0000-0000-0000-000000000000",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            identity_priority: ["user_id", "customer_id", "mpid", "email"]
                .into_iter()
                .map(String::from)
                .collect(),
            cache_max_bytes: 256 * 1024 * 1024,
            cas_max_attempts: 50,
            erasure_sweep_ms: 2000,
        }
    }
}

impl ProfilesConfig {
    /// The limit of identity type `kind`.
    pub fn limit(&self, kind: &str) -> u32 {
        self.identity_limits
            .get(kind)
            .copied()
            .unwrap_or(self.default_identity_limit)
    }
}
