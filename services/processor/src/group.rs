//! The events of one partition key in a batch, applied to their profile with one write.
//!
//! Most events of a person change nothing but the profile itself: counts, seen times, traits,
//! consent. A key's events in a batch are applied one after another to the profile in memory
//! (a *run*), each keeping the consent in force as of itself for its output, and the run is
//! written with one compare-and-set when the key's events end, or before an event the run
//! cannot take: one naming an identity the profile does not list (it may change the identity
//! graph: a new profile, a link, a merge), or an alias. Such an event is resolved alone, as
//! it always was, its graph changes and profile written at once, and a new run starts on the
//! profile it wrote. A lost compare-and-set throws the run away and applies its events again
//! from what KV holds, so counters stay exact.
//!
//! Inputs are acked only after their profile writes and the outputs' PubAcks, so a crash
//! before a run is written loses nothing: its events are delivered again. The worker lets a
//! run that changes no consent publish its events while it is written
//! ([`KeyEvents::publish_early`]: one round trip less for a known person); everything else is
//! published after its writes. A consent change is written with its run (then the `herald-consent`
//! record, before anything is published): the profile remembers the last event that changed
//! its consent, as it did when each event was written alone, so a redelivered change is
//! published again either way.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_proto::v1::{Consent, Event, Identity, ProcessedEvent};

use crate::consent::{self, ConsentRecord};
use crate::events;
use crate::identity::IdentityKey;
use crate::output::{Output, publish_all};
use crate::profile::Profile;
use crate::resolver::{Loaded, Outcome, Prepared, Profiles, apply_event};
use crate::store::{ProfileError, Store};

/// The events of one partition key in a batch, in order, and what became of each. Kept
/// across retries of [`Profiles::process_group`]: what is finished is not done again.
#[derive(Debug)]
pub struct KeyEvents {
    /// The events; an event moves into its outcome when it is published.
    events: Vec<Option<Event>>,
    /// The outcome of each finished event.
    outcomes: Vec<Option<Outcome>>,
    /// The consent record of a profile written with a consent change, while not yet written.
    consent_due: Option<ConsentRecord>,
    /// Whether a run's events may be published while its profile is written.
    early: bool,
}

impl KeyEvents {
    /// The events of one key, in order.
    pub fn new(events: Vec<Event>) -> Self {
        Self {
            outcomes: events.iter().map(|_| None).collect(),
            events: events.into_iter().map(Some).collect(),
            consent_due: None,
            early: false,
        }
    }

    /// Lets a run publish its events while its profile is written, instead of after: one
    /// round trip less for a known person's events. Only a run that changes no consent, and
    /// only once every earlier event of the key is out, so the key's order holds; its outcomes
    /// are then [`Outcome::Published`]. The events are published as applied to the profile in
    /// memory (its id, identities and consent). If the write then loses to another writer,
    /// the run is applied again from what KV holds (counters stay exact) and its events are
    /// published again with the same ids, which the server drops as copies: what was
    /// published stands, as if the run had come just before the other write. The activator
    /// checks consent and suppressions at send time, so an opt-out or an erasure written
    /// meanwhile still holds. A crash after the publish and before the write loses nothing:
    /// the inputs are not acked, so they come back, are written, and their copies dropped. A
    /// failed early publish leaves the events to the worker's publish after the write
    /// (retried, and counted, there).
    pub fn publish_early(mut self) -> Self {
        self.early = true;
        self
    }

    /// Whether every event before the last of `run` (indexes, in order) that is not one of
    /// them is finished with nothing left to publish: the run's events may go out first.
    fn out_before(&self, run: &[(usize, Option<Consent>, bool)]) -> bool {
        let mut members = run.iter().map(|(i, _, _)| *i).peekable();
        let last = run.last().map_or(0, |(i, _, _)| *i);
        (0..last).all(|i| {
            if members.peek() == Some(&i) {
                members.next();
                return true;
            }
            matches!(
                self.outcomes[i],
                Some(Outcome::Published | Outcome::Suppressed)
            )
        })
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The outcome of each event, in order, once [`Profiles::process_group`] returned `Ok`.
    pub fn into_outcomes(self) -> Vec<Outcome> {
        self.outcomes
            .into_iter()
            .map(|o| o.expect("every event of a processed group has its outcome"))
            .collect()
    }

    /// The events back, in order (from their outcomes where they moved there).
    pub fn into_events(self) -> Vec<Event> {
        self.events
            .into_iter()
            .zip(self.outcomes)
            .filter_map(|(event, outcome)| match (event, outcome) {
                (Some(e), _) => Some(e),
                (None, Some(Outcome::Publish(list))) => list.into_iter().next()?.event,
                (None, _) => None,
            })
            .collect()
    }

    fn event(&self, i: usize) -> &Event {
        self.events[i]
            .as_ref()
            .expect("an unfinished event is held")
    }

    fn take(&mut self, i: usize) -> Event {
        self.events[i].take().expect("an unfinished event is held")
    }

    fn suppressed(&mut self, i: usize) {
        events::Suppressed {
            event_id: &self.event(i).id,
        }
        .emit();
        self.outcomes[i] = Some(Outcome::Suppressed);
    }

    /// Published without profile data: it names no usable identity.
    fn unresolved(&mut self, i: usize) {
        events::EventsHandled {
            outcome: "unresolved",
            count: 1,
        }
        .emit();
        self.outcomes[i] = Some(bare(self.take(i)));
    }

    /// Published without profile data: a stored value it needs cannot be read, and one bad
    /// value must not block a partition.
    fn unreadable(&mut self, i: usize, error: &ProfileError) {
        events::ProfileUnreadable {
            event_id: &self.event(i).id,
            error,
        }
        .emit();
        self.outcomes[i] = Some(bare(self.take(i)));
    }

    /// Published with its profile (`consent`: the consent in force as of the event).
    fn published(
        &mut self,
        i: usize,
        profile: &Profile,
        identities: Vec<Identity>,
        consent: Option<Consent>,
        consent_changed: bool,
    ) {
        let processed = ProcessedEvent {
            profile_id: profile.id.clone(),
            identities,
            consent,
            event: Some(self.take(i)),
        };
        self.outcomes[i] = Some(if consent_changed {
            events::ConsentChanged.emit();
            let changed = consent::changed_event(&processed);
            Outcome::Publish(vec![processed, changed])
        } else {
            Outcome::Publish(vec![processed])
        });
    }
}

/// An event published as it came, without profile data.
fn bare(event: Event) -> Outcome {
    let consent = event.consent.clone();
    Outcome::Publish(vec![ProcessedEvent {
        event: Some(event),
        profile_id: String::new(),
        identities: Vec::new(),
        consent,
    }])
}

/// Events applied to one profile in memory and not written yet.
struct Run {
    /// The first event it may hold (where it starts again after a conflict).
    start: usize,
    /// The revision its write compares against.
    revision: u64,
    /// The profile with the events applied.
    profile: Profile,
    /// Identities known to map to the profile and listed on it: an event naming only these
    /// changes nothing in the identity graph.
    ids: Vec<IdentityKey>,
    /// The events applied: index, consent in force as of it, whether it changed consent.
    applied: Vec<(usize, Option<Consent>, bool)>,
}

impl Run {
    /// A run from event `start` on `loaded` (as written, or in memory), which event
    /// identities `ids` resolved to.
    fn on(start: usize, loaded: Loaded, ids: &[IdentityKey]) -> Self {
        let profile = Arc::unwrap_or_clone(loaded.profile);
        let ids = ids
            .iter()
            .filter(|k| profile.identities.contains(k))
            .cloned()
            .collect();
        Self {
            start,
            revision: loaded.revision,
            profile,
            ids,
            applied: Vec::new(),
        }
    }

    /// Whether an event with these identities belongs to this run.
    fn takes(&self, ids: &[IdentityKey], explicit: bool) -> bool {
        !explicit && ids.iter().all(|k| self.ids.contains(k))
    }

    /// Records event `i` as applied to the profile in memory.
    fn record(&mut self, i: usize, consent_changed: bool) {
        self.applied
            .push((i, self.profile.consent.snapshot(), consent_changed));
    }

    /// Applies event `i` to the profile in memory.
    fn apply(&mut self, i: usize, event: &Event, at: DateTime<Utc>) {
        let before = self.profile.consent.effective();
        let changed = apply_event(&mut self.profile, event, at, &before);
        self.record(i, changed);
    }
}

impl Profiles {
    /// Resolves `event` to its profile, updates the profile, and returns what to publish: a
    /// batch of one event (see [`Profiles::process_group`]). On error the event comes back with
    /// it, to retry when [`ProfileError::retryable`] (when only the consent record could not be
    /// written, the profile holds the event already and a retry applies it again: the worker
    /// retries its [`KeyEvents`] instead, which remember that).
    pub async fn process(&self, event: Event) -> Result<Outcome, (ProfileError, Event)> {
        let mut group = KeyEvents::new(vec![event]);
        match self.process_group(&mut group).await {
            Ok(()) => Ok(group
                .into_outcomes()
                .pop()
                .expect("a finished group has an outcome per event")),
            Err(e) => Err((
                e,
                group
                    .into_events()
                    .pop()
                    .expect("a group gives its events back"),
            )),
        }
    }

    /// Processes the events of one partition key of a batch, in order: each is resolved to its
    /// profile and applied; the profile is written once for every run of events that change
    /// nothing but it (see the module documentation), and at once for an event that changes
    /// the identity graph. Returns only retryable errors: an event whose profile cannot be
    /// read is published without profile data. After an error, call again with the same
    /// `group`: what was written is not applied again.
    pub async fn process_group(&self, group: &mut KeyEvents) -> Result<(), ProfileError> {
        let store = self.store()?;
        self.write_consent_due(store, group).await?;
        let mut run: Option<Run> = None;
        let mut attempt = 1u32;
        let mut i = 0;
        loop {
            if i < group.len() && group.outcomes[i].is_some() {
                i += 1;
                continue;
            }
            // The event's identities; `None` past the last event.
            let prepared = if i < group.len() {
                match self.prepare(store, group.event(i)).await {
                    Ok(Prepared::Suppressed) => {
                        group.suppressed(i);
                        i += 1;
                        continue;
                    }
                    Ok(Prepared::Unresolved) => {
                        group.unresolved(i);
                        i += 1;
                        continue;
                    }
                    Ok(Prepared::Identified { ids, explicit, at }) => Some((ids, explicit, at)),
                    Err(e) if !e.retryable() => {
                        group.unreadable(i, &e);
                        i += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            if let (Some(r), Some((ids, explicit, at))) = (&mut run, &prepared)
                && r.takes(ids, *explicit)
            {
                r.apply(i, group.event(i), *at);
                i += 1;
                continue;
            }
            // The run ends here: write it.
            if let Some(r) = run.take() {
                let (start, id) = (r.start, r.profile.id.clone());
                if !self.flush(store, r, group).await? {
                    attempt += 1;
                    self.before_attempt(attempt, || id).await?;
                    i = start;
                    continue;
                }
                attempt = 1;
            }
            let Some((ids, explicit, at)) = prepared else {
                return Ok(());
            };
            // This event alone, as it always was: it may change the identity graph.
            let applied = match self
                .resolve_and_apply(store, group.event(i), &ids, explicit, at)
                .await
            {
                Ok(Some(applied)) => applied,
                Ok(None) => {
                    group.suppressed(i);
                    i += 1;
                    continue;
                }
                Err(e) if !e.retryable() => {
                    group.unreadable(i, &e);
                    i += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if applied.written {
                let loaded = applied.loaded;
                let p = &loaded.profile;
                events::EventsHandled {
                    outcome: "processed",
                    count: 1,
                }
                .emit();
                if applied.consent_changed {
                    group.consent_due = Some(ConsentRecord::of(&p.id, &p.consent, loaded.revision));
                }
                group.published(
                    i,
                    p,
                    p.proto_identities(),
                    p.consent.snapshot(),
                    applied.consent_changed,
                );
                self.write_consent_due(store, group).await?;
                run = Some(Run::on(i + 1, loaded, &ids));
            } else {
                let mut r = Run::on(i, applied.loaded, &ids);
                r.record(i, applied.consent_changed);
                run = Some(r);
            }
            i += 1;
        }
    }

    /// Writes a run's profile with one compare-and-set and finishes its events (then writes
    /// the consent record if one changed it). False when another writer got there first: the
    /// run is thrown away, nothing of it finished.
    async fn flush(
        &self,
        store: &Store,
        run: Run,
        group: &mut KeyEvents,
    ) -> Result<bool, ProfileError> {
        if run.applied.is_empty() {
            return Ok(true);
        }
        let mut p = run.profile;
        p.updated_at = Utc::now();
        let consent_changed = run.applied.iter().any(|(_, _, changed)| *changed);
        let early = (group.early && !consent_changed && group.out_before(&run.applied))
            .then(|| self.early_outputs(&p, &run.applied, group));
        let (written, published) = match &early {
            Some(outputs) => {
                let (w, o) = tokio::join!(
                    self.write_profile(store, p, run.revision),
                    publish_all(&self.js, outputs)
                );
                (w?, o.is_ok())
            }
            None => (self.write_profile(store, p, run.revision).await?, false),
        };
        let Some(written) = written else {
            return Ok(false);
        };
        let p = &written.profile;
        let identities = p.proto_identities();
        events::EventsHandled {
            outcome: "processed",
            count: run.applied.len() as u64,
        }
        .emit();
        for (i, consent, changed) in run.applied {
            if published {
                group.take(i);
                group.outcomes[i] = Some(Outcome::Published);
            } else {
                group.published(i, p, identities.clone(), consent, changed);
            }
        }
        if consent_changed {
            group.consent_due = Some(ConsentRecord::of(&p.id, &p.consent, written.revision));
            self.write_consent_due(store, group).await?;
        }
        Ok(true)
    }

    /// The outputs of a run's events (none of which changed consent) as applied to `p` in
    /// memory, for [`KeyEvents::publish_early`]. The events stay in the group.
    fn early_outputs(
        &self,
        p: &Profile,
        applied: &[(usize, Option<Consent>, bool)],
        group: &mut KeyEvents,
    ) -> Vec<Output> {
        let identities = p.proto_identities();
        applied
            .iter()
            .map(|(i, consent, _)| {
                let mut processed = ProcessedEvent {
                    profile_id: p.id.clone(),
                    identities: identities.clone(),
                    consent: consent.clone(),
                    event: Some(group.take(*i)),
                };
                let output = Output::of(&self.topology, &processed);
                group.events[*i] = processed.event.take();
                output
            })
            .collect()
    }

    /// Writes the group's due consent record, if any; it stays due on a retryable error.
    async fn write_consent_due(
        &self,
        store: &Store,
        group: &mut KeyEvents,
    ) -> Result<(), ProfileError> {
        let Some(record) = group.consent_due.take() else {
            return Ok(());
        };
        match self.write_consent(store, record.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if !e.retryable() => {
                events::ConsentUnwritable {
                    profile_id: &record.profile_id,
                    error: &e,
                }
                .emit();
                Ok(())
            }
            Err(e) => {
                group.consent_due = Some(record);
                Err(e)
            }
        }
    }
}
