//! How an identity (`user_id:…`, `anonymous_id:…`, `email:…`) is spelled, shared by the
//! processor (which resolves identities and keeps the suppression list) and the activator (which
//! refuses to deliver a suppressed identity's events), so both name an identity the same way.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The identity type of Segment `userId`.
pub const USER_ID: &str = "user_id";
/// The identity type of Segment `anonymousId`.
pub const ANONYMOUS_ID: &str = "anonymous_id";
/// The identity type of e-mail addresses.
pub const EMAIL: &str = "email";

/// Identity types are lower case; characters other than letters, digits and `_` become `_`
/// (so `Customer ID` is `customer_id`).
pub fn normalize_kind(kind: &str) -> String {
    kind.trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Values are trimmed; e-mail addresses are also lower-cased.
pub fn normalize_value(kind: &str, value: &str) -> String {
    let v = value.trim();
    if kind == EMAIL {
        v.to_lowercase()
    } else {
        v.to_string()
    }
}

/// The key of a (normalised) identity in the identities and suppressions buckets: the type, a
/// dot, and the value in unpadded URL-safe base64 (KV keys allow only `[-/_=.a-zA-Z0-9]`).
pub fn kv_key(kind: &str, value: &str) -> String {
    // One allocation of the final size (the processor makes a few per event).
    let mut key = String::with_capacity(kind.len() + 1 + (value.len() * 4).div_ceil(3));
    key.push_str(kind);
    key.push('.');
    URL_SAFE_NO_PAD.encode_string(value, &mut key);
    key
}

/// The bucket key of an identity as an event or a client names it: normalised, then
/// [`kv_key`].
pub fn normalized_kv_key(kind: &str, value: &str) -> String {
    let kind = normalize_kind(kind);
    let value = normalize_value(&kind, value);
    kv_key(&kind, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_normalised_and_encoded() {
        for (kind, value, want) in [
            ("user_id", "u-1", "user_id.dS0x"),
            (" User ID ", " u-1 ", "user_id.dS0x"),
            ("email", " Ann@Example.com", "email.YW5uQGV4YW1wbGUuY29t"),
            ("anonymous_id", "a/b+c", "anonymous_id.YS9iK2M"),
        ] {
            assert_eq!(normalized_kv_key(kind, value), want, "{kind}:{value}");
        }
    }
}
