//! The binaries' allocator: mimalloc (per-thread heaps without glibc's arena lock, which took a
//! quarter of ingest's samples under load, and much less fragmentation under many small
//! allocations), with Herald's settings.
//!
//! **Freed memory is kept.** By default mimalloc gives pages that stay unused for a second back
//! to the kernel, and the next burst faults them in again, each 2 MiB huge page zeroed by the
//! kernel: under a steady stream of small batches that churn cost the activator and the
//! processor about a tenth of their CPU (docs/benchmarks.md). [`tune`] turns that purging off,
//! so a service's resident memory stays at its high-water mark instead. `MIMALLOC_PURGE_DELAY`
//! (milliseconds; `-1` never) in the environment still wins, e.g. `MIMALLOC_PURGE_DELAY=1000`
//! for mimalloc's own default.

pub use mimalloc::MiMalloc;

/// mimalloc v3's `mi_option_purge_delay` (the crate's constants follow v2's numbering).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies Herald's allocator settings, where the environment does not set them; call first
/// thing in `main` (mimalloc reads these options as it goes, so they apply from then on).
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mimalloc options are plain integers, set and read atomically.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
    }
}

/// The purge delay in force (milliseconds, `-1`: never).
pub fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reads an option (mimalloc took the environment's value, if any, at start).
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tune_turns_purging_off_unless_the_environment_says_otherwise() {
        let env = std::env::var("MIMALLOC_PURGE_DELAY").ok();
        tune();
        let want = env.and_then(|v| v.parse().ok()).unwrap_or(-1);
        assert_eq!(purge_delay(), want);
    }
}
