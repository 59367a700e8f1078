//! Stable partitioning of partition keys.

/// FNV-1a 64-bit: stable across processes, platforms and releases (unlike `DefaultHasher`), so
/// every replica and every version routes a key to the same partition.
pub fn stable_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The partition of `key` among `partitions` (at least 1).
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (stable_hash(key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // Changing these breaks routing of existing data: see docs on partition migration.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(partition_for("user-1", 16), partition_for("user-1", 16));
    }

    #[test]
    fn spreads_keys() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_for(&format!("user-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700 && c < 1300), "{counts:?}");
    }
}
