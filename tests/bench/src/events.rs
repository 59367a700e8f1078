//! The events the benchmarks send: Segment batches of fixed-size events for the HTTP API, and
//! `herald.v1.Event` protobufs for the processor. Every event gets a unique message id (a
//! 16-digit hex counter written into a prepared template), so JetStream's duplicate window never
//! drops one.

use async_nats::Subject;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use herald_common::partition::partition_for;
use herald_proto::v1::{Event, EventType};
use prost::Message as _;
use serde_json::{Value, json};

/// Length of the hex counter in message ids.
const COUNTER_LEN: usize = 16;
/// Where the counter goes in a template before it is patched.
const MARKER: &[u8; COUNTER_LEN] = b"@@@@@@@@@@@@@@@@";
/// The source id events carry (ingest's bench source, and the processor's preload).
pub const SOURCE_ID: &str = "bench";

/// Writes `n` as 16 lower-case hex digits at every offset.
pub fn patch_counter(buf: &mut [u8], offsets: &[usize], n: u64) {
    let hex = format!("{n:016x}");
    for &off in offsets {
        buf[off..off + COUNTER_LEN].copy_from_slice(hex.as_bytes());
    }
}

/// Offsets of every occurrence of `needle` in `haystack`.
pub fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() {
        return Vec::new();
    }
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// The message id of event number `n` in run `run`: `bench-<run>-<16 hex digits>`.
pub fn message_id(run: &str, n: u64) -> String {
    format!("bench-{run}-{n:016x}")
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Filler text for padding events to their target size.
fn filler(len: usize) -> String {
    const WORDS: &str = "lightweight breathable trail running shoe with recycled mesh upper and \
                         responsive foam midsole for long distances on mixed terrain ";
    WORDS.chars().cycle().take(len).collect()
}

/// One analytics.js-style Segment `track` event of about `event_bytes` bytes of JSON.
fn segment_track(user: u64, message_id: &str, at: &str, event_bytes: usize) -> Value {
    let mut event = json!({
        "type": "track",
        "event": "Product Viewed",
        "userId": format!("user-{user:07}"),
        "anonymousId": format!("3f1c9a52-7d4e-4b8a-9c1f-{user:012}"),
        "messageId": message_id,
        "timestamp": at,
        "properties": {
            "product_id": format!("sku-{}", user % 5000),
            "category": "shoes",
            "price": 79.99,
            "currency": "EUR",
            "description": "",
        },
        "context": {
            "library": {"name": "analytics.js", "version": "5.2.1"},
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/124.0",
            "page": {"url": "https://shop.example.com/products/trail-runner"},
        },
    });
    let len = serde_json::to_vec(&event).map(|v| v.len()).unwrap_or(0);
    if event_bytes > len {
        event["properties"]["description"] = json!(filler(event_bytes - len));
    }
    event
}

/// Segment `/v1/batch` bodies: a few prepared templates of `batch` events each, with every
/// event's message id patched per request.
pub struct SegmentBatches {
    templates: Vec<(Vec<u8>, Vec<usize>)>,
    batch: usize,
    event_bytes: usize,
}

impl SegmentBatches {
    /// `templates` bodies of `batch` events of about `event_bytes` bytes, for run `run`; the
    /// users differ across templates.
    pub fn new(run: &str, batch: usize, event_bytes: usize, templates: usize) -> Self {
        Self::with_users(run, batch, event_bytes, templates, u64::MAX)
    }

    /// Like [`SegmentBatches::new`], with the events' users taken round-robin from `users`
    /// distinct ones (user `k % users` for the k-th event of the templates).
    pub fn with_users(
        run: &str,
        batch: usize,
        event_bytes: usize,
        templates: usize,
        users: u64,
    ) -> Self {
        let now = Utc::now();
        let at = rfc3339(now - chrono::Duration::milliseconds(250));
        let sent_at = rfc3339(now);
        let placeholder = format!(
            "bench-{run}-{}",
            std::str::from_utf8(MARKER).expect("ascii")
        );
        let mut actual_bytes = 0;
        let templates = (0..templates.max(1))
            .map(|t| {
                let items: Vec<Value> = (0..batch)
                    .map(|i| {
                        let user = (t * batch + i) as u64 % users.max(1);
                        segment_track(user, &placeholder, &at, event_bytes)
                    })
                    .collect();
                actual_bytes = serde_json::to_vec(&items[0]).map(|v| v.len()).unwrap_or(0);
                let body = serde_json::to_vec(&json!({"batch": items, "sentAt": sent_at}))
                    .expect("JSON encodes");
                let offsets = find_all(&body, MARKER);
                debug_assert_eq!(offsets.len(), batch);
                (body, offsets)
            })
            .collect();
        Self {
            templates,
            batch,
            event_bytes: actual_bytes,
        }
    }

    /// The body of request number `seq`; its events are numbered `seq * batch ..`.
    pub fn body(&self, seq: u64) -> Bytes {
        let (template, offsets) = &self.templates[(seq % self.templates.len() as u64) as usize];
        let mut body = template.clone();
        let first = seq * self.batch as u64;
        for (i, &off) in offsets.iter().enumerate() {
            patch_counter(&mut body, &[off], first + i as u64);
        }
        Bytes::from(body)
    }

    /// Bytes of one event's JSON.
    pub fn event_bytes(&self) -> usize {
        self.event_bytes
    }

    /// Bytes of one request body.
    pub fn body_bytes(&self) -> usize {
        self.templates[0].0.len()
    }
}

/// A stored event used as the template of raw publishes: its subject and payload, with the
/// offsets of its message id's counter (in the event id and the message id fields).
#[derive(Debug, Clone)]
pub struct RawTemplate {
    /// The subject to publish to.
    pub subject: Subject,
    /// The protobuf payload.
    pub payload: Vec<u8>,
    /// Where the counter sits in the payload.
    pub offsets: Vec<usize>,
}

impl RawTemplate {
    /// The template of a payload whose message id counter is `counter`; `None` when the
    /// counter cannot be found in it.
    pub fn new(subject: Subject, payload: Vec<u8>, counter: u64) -> Option<Self> {
        let offsets = find_all(&payload, format!("{counter:016x}").as_bytes());
        (!offsets.is_empty()).then_some(Self {
            subject,
            payload,
            offsets,
        })
    }

    /// The payload with counter `n`.
    pub fn payload(&self, n: u64) -> Bytes {
        let mut p = self.payload.clone();
        patch_counter(&mut p, &self.offsets, n);
        Bytes::from(p)
    }
}

/// Users per chunk of the event layout (see [`EventFactory`]).
pub const CHUNK_USERS: u64 = 100_000;

/// `herald.v1.Event`s as ingest would store them, for preloading the events stream.
///
/// `total` events for `users` users, each user getting `total / users` of them (at least one):
/// users come in chunks of [`CHUNK_USERS`]; a chunk's events go round after round over its
/// users, so a user's first event (an `identify` with an email trait) is followed by its
/// later ones (`track` and `page`, alternating) one chunk-round later. Any stretch of a few
/// chunks therefore has the whole run's mix of first-seen and returning users, and the
/// profile store still grows to every user. Every event carries a user id and an anonymous
/// id, as SDKs send them.
pub struct EventFactory {
    run: String,
    users: u64,
    total: u64,
    chunk: u64,
    partitions: u32,
    event_bytes: usize,
    prefix: String,
    now: prost_types::Timestamp,
    context: Vec<u8>,
}

impl EventFactory {
    /// `total` events of about `event_bytes` encoded bytes for `users` users.
    pub fn new(
        run: &str,
        users: u64,
        total: u64,
        partitions: u32,
        prefix: &str,
        event_bytes: usize,
    ) -> Self {
        let now = Utc::now();
        let context = json!({
            "library": {"name": "analytics.js", "version": "5.2.1"},
            "ip": "203.0.113.7",
            "locale": "en-GB",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
        });
        Self {
            run: run.to_string(),
            users: users.max(1),
            total,
            chunk: CHUNK_USERS.min(users.max(1)),
            partitions,
            event_bytes,
            prefix: prefix.to_string(),
            now: herald_proto::time::to_proto(now),
            context: serde_json::to_vec(&context).expect("JSON encodes"),
        }
    }

    /// Interleaves the events of at most `users` users at a time (the chunk; default
    /// [`CHUNK_USERS`]): fewer makes each user's events come closer together, as a visit's do.
    pub fn with_active_users(mut self, users: u64) -> Self {
        self.chunk = users.clamp(1, self.users);
        self
    }

    /// The user of event `n`, and whether it is that user's first event.
    pub fn user_of(&self, n: u64) -> (u64, bool) {
        let rounds = (self.total / self.users).max(1);
        let full = self.users * rounds;
        if n >= full {
            // The remainder of a total that is not a multiple of the users: returning users.
            return ((n - full) % self.users, false);
        }
        let start = n / (self.chunk * rounds) * self.chunk;
        let size = self.chunk.min(self.users - start);
        let offset = n - start * rounds;
        (start + offset % size, offset < size)
    }

    /// Event `n`: its subject, message id and encoded payload.
    pub fn event(&self, n: u64) -> (String, String, Bytes) {
        let (user, first) = self.user_of(n);
        let user_id = format!("user-{user:07}");
        let message_id = message_id(&self.run, n);
        let partition = partition_for(&user_id, self.partitions);
        let (ty, name, traits, properties) = if first {
            let traits = json!({
                "email": format!("{user_id}@example.com"),
                "name": format!("Bench User {user}"),
                "plan": if user.is_multiple_of(3) { "pro" } else { "free" },
            });
            (EventType::Identify, String::new(), traits, Value::Null)
        } else if n.is_multiple_of(2) {
            let props = json!({"product_id": format!("sku-{}", n % 5000), "price": 79.99, "currency": "EUR", "description": ""});
            (
                EventType::Track,
                "Product Viewed".to_string(),
                Value::Null,
                props,
            )
        } else {
            let props = json!({"path": "/products/trail-runner", "url": "https://shop.example.com/products/trail-runner", "description": ""});
            (EventType::Page, "Product".to_string(), Value::Null, props)
        };
        let to_bytes = |v: &Value| {
            if v.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(v).expect("JSON encodes")
            }
        };
        let mut event = Event {
            id: format!("{SOURCE_ID}:{message_id}"),
            message_id: message_id.clone(),
            source_id: SOURCE_ID.into(),
            r#type: ty as i32,
            name,
            user_id: user_id.clone(),
            anonymous_id: format!("3f1c9a52-7d4e-4b8a-9c1f-{user:012}"),
            properties: to_bytes(&properties),
            traits: to_bytes(&traits),
            context: self.context.clone(),
            original_timestamp: Some(self.now),
            sent_at: Some(self.now),
            received_at: Some(self.now),
            timestamp: Some(self.now),
            partition_key: user_id,
            partition,
            ..Default::default()
        };
        let len = event.encoded_len();
        if self.event_bytes > len + 4 {
            let pad = filler(self.event_bytes - len - 4);
            let mut v = if properties.is_null() {
                json!({})
            } else {
                properties
            };
            v["description"] = json!(pad);
            if ty == EventType::Identify {
                // Identify calls carry traits, not properties: pad the context instead.
                let mut ctx: Value = serde_json::from_slice(&self.context).unwrap_or_default();
                ctx["page"] = json!({"description": v["description"]});
                event.context = to_bytes(&ctx);
            } else {
                event.properties = to_bytes(&v);
            }
        }
        let subject = format!("{}.events.{partition}", self.prefix);
        let id = event.id.clone();
        (subject, id, Bytes::from(event.encode_to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_have_unique_ids_and_the_target_size() {
        let b = SegmentBatches::new("r1", 10, 600, 2);
        assert_eq!(b.event_bytes(), 600);
        let body: Value = serde_json::from_slice(&b.body(3)).expect("valid JSON");
        let items = body["batch"].as_array().expect("batch array");
        assert_eq!(items.len(), 10);
        assert_eq!(items[0]["messageId"], message_id("r1", 30));
        assert_eq!(items[9]["messageId"], message_id("r1", 39));
        let other: Value = serde_json::from_slice(&b.body(4)).expect("valid JSON");
        assert_ne!(other["batch"][0]["messageId"], items[0]["messageId"]);
    }

    #[test]
    fn raw_templates_patch_every_copy_of_the_counter() {
        let payload = b"id=bench-r-00000000000000aa;mid=bench-r-00000000000000aa".to_vec();
        let t = RawTemplate::new(Subject::from("s"), payload, 0xaa).expect("counter found");
        let p = t.payload(0x1234);
        assert_eq!(
            &p[..],
            b"id=bench-r-0000000000001234;mid=bench-r-0000000000001234"
        );
        assert!(RawTemplate::new(Subject::from("s"), b"nothing".to_vec(), 1).is_none());
    }

    #[test]
    fn every_user_gets_its_share_and_its_identify_first() {
        for (users, total, chunk) in [(10, 20, 4), (10, 25, 3), (7, 7, 100), (10, 4, 4)] {
            let mut f = EventFactory::new("r", users, total, 16, "herald", 0);
            f.chunk = chunk;
            let mut seen = std::collections::HashMap::<u64, u64>::new();
            for n in 0..total {
                let (user, first) = f.user_of(n);
                assert!(
                    user < users,
                    "{users}/{total}/{chunk}: event {n} -> user {user}"
                );
                let count = seen.entry(user).or_default();
                assert_eq!(first, *count == 0, "{users}/{total}/{chunk}: event {n}");
                *count += 1;
            }
            let rounds = (total / users).max(1);
            if total >= users {
                assert_eq!(seen.len() as u64, users);
                assert!(seen.values().all(|&c| c == rounds || c == rounds + 1));
            } else {
                assert_eq!(seen.len() as u64, total);
            }
        }
    }

    #[test]
    fn factory_events_round_trip_and_have_about_the_target_size() {
        let f = EventFactory::new("r2", 10, 20, 16, "herald", 600);
        for n in [0, 10, 11] {
            let (subject, id, payload) = f.event(n);
            let e = Event::decode(payload.as_ref()).expect("decodes");
            assert_eq!(e.id, id);
            assert_eq!(e.user_id, format!("user-{:07}", n % 10));
            assert_eq!(subject, format!("herald.events.{}", e.partition));
            assert!(
                (560..640).contains(&payload.len()),
                "{n}: {}",
                payload.len()
            );
        }
        let first = Event::decode(f.event(0).2.as_ref()).expect("decodes");
        assert_eq!(first.r#type, EventType::Identify as i32);
        let later = Event::decode(f.event(10).2.as_ref()).expect("decodes");
        assert_eq!(later.r#type, EventType::Track as i32);
    }
}
