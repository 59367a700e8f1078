//! Builders for Segment-shaped input events.

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

/// A Segment `track` call for `Order Completed` by `user`, number `seq` of that user.
///
/// `messageId` is `"{user}-{seq}"`, so it is unique per (user, seq) and stable across calls (a
/// re-sent item is a duplicate). `properties` carry `seq` and a `revenue` derived from it;
/// `timestamp` is the current time in RFC 3339.
pub fn segment_track(user: &str, seq: usize) -> Value {
    // Deterministic, varied, and exact in binary floating point (a multiple of 1/4).
    let revenue = 10.0 + (seq % 100) as f64 * 0.25;
    json!({
        "type": "track",
        "event": "Order Completed",
        "userId": user,
        "messageId": format!("{user}-{seq}"),
        "properties": {
            "seq": seq,
            "revenue": revenue,
            "currency": "USD",
        },
        "timestamp": now_rfc3339(),
    })
}

/// A Segment `identify` call for `user` with the given `traits` (a JSON object). `messageId` is
/// `"{user}-identify"`.
pub fn segment_identify(user: &str, traits: Value) -> Value {
    json!({
        "type": "identify",
        "userId": user,
        "messageId": format!("{user}-identify"),
        "traits": traits,
        "timestamp": now_rfc3339(),
    })
}

/// A Segment batch body, `{"batch": items}`.
pub fn segment_batch(items: Vec<Value>) -> Value {
    json!({ "batch": items })
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{segment_batch, segment_identify, segment_track};

    #[test]
    fn track_has_the_segment_shape() {
        let event = segment_track("u1", 7);
        assert_eq!(event["type"], "track");
        assert_eq!(event["event"], "Order Completed");
        assert_eq!(event["userId"], "u1");
        assert_eq!(event["messageId"], "u1-7");
        assert_eq!(event["properties"]["seq"], 7);
        assert!(event["properties"]["revenue"].is_f64());
        let timestamp = event["timestamp"].as_str().expect("timestamp string");
        chrono::DateTime::parse_from_rfc3339(timestamp).expect("RFC 3339 timestamp");
    }

    #[test]
    fn message_ids_differ_by_user_and_seq() {
        let ids =
            [("a", 1), ("a", 2), ("b", 1)].map(|(u, s)| segment_track(u, s)["messageId"].clone());
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
    }

    #[test]
    fn identify_and_batch_wrap_items() {
        let identify = segment_identify("u2", json!({"plan": "pro"}));
        assert_eq!(identify["type"], "identify");
        assert_eq!(identify["traits"]["plan"], "pro");
        let batch = segment_batch(vec![segment_track("u2", 1), identify]);
        assert_eq!(batch["batch"].as_array().map(Vec::len), Some(2));
    }
}
