//! Event builders shared by the processor's integration tests (`pipeline` and `profiles` use
//! every one of them; helpers only one binary needs live in that binary).

use herald_common::partition::partition_for;
use herald_common::{Topology, TopologyConfig};
use herald_proto::v1::{Consent, Event, EventType};

/// The default topology (16 partitions).
pub fn topology() -> Topology {
    Topology::new(TopologyConfig::default())
}

/// A timestamp `secs` seconds after a fixed instant.
pub fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: 1_760_000_000 + secs,
        nanos: 0,
    })
}

/// An event of type `ty` with the given ids, at `secs`, routed like ingest routes it.
pub fn event(id: &str, ty: EventType, user: &str, anon: &str, secs: i64) -> Event {
    let key = if user.is_empty() { anon } else { user };
    Event {
        id: format!("test:{id}"),
        message_id: id.to_string(),
        source_id: "test".into(),
        r#type: ty as i32,
        name: if ty == EventType::Track {
            "Viewed".into()
        } else {
            String::new()
        },
        user_id: user.into(),
        anonymous_id: anon.into(),
        timestamp: ts(secs),
        received_at: ts(secs),
        partition_key: key.into(),
        partition: partition_for(key, 16),
        ..Default::default()
    }
}

/// An identify call with traits (a JSON object).
pub fn identify(id: &str, user: &str, anon: &str, secs: i64, traits: &str) -> Event {
    Event {
        traits: traits.as_bytes().to_vec(),
        ..event(id, EventType::Identify, user, anon, secs)
    }
}

/// A consent statement.
pub fn consent(purposes: &[(&str, bool)], opted_out: bool, secs: i64) -> Option<Consent> {
    Some(Consent {
        purposes: purposes.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        opted_out,
        updated_at: ts(secs),
    })
}
