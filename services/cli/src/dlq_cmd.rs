//! `herald dlq ...`: list, redrive and purge what the activator could not deliver.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use herald_proto::v1::dlq_service_client::DlqServiceClient;
use herald_proto::v1::{
    DlqEntry, DlqReason, DlqRedriveOutcome, ListDlqRequest, PurgeDlqRequest, RedriveDlqProgress,
    RedriveDlqRequest,
};
use serde_json::json;

use crate::control::{Control, rpc_error};
use crate::output::outln;

/// How often a long redrive reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `herald dlq <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List a destination's dead letters (oldest first): the event, attempts, last status and
    /// the start of the last answer's body.
    List {
        /// The destination.
        #[arg(long)]
        destination: String,
        /// One JSON object per dead letter: the event as its Segment-spec payload, the
        /// attempts, the last status and the body excerpt.
        #[arg(long)]
        json: bool,
        /// Most dead letters shown (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start at this stream sequence (the next page of a previous listing).
        #[arg(long, default_value_t = 0)]
        start_sequence: u64,
    },
    /// Send dead letters again through the destination (its consent gate included): delivered
    /// ones leave the DLQ; ones refused again stay, with their attempts and answer updated.
    #[command(group(
        clap::ArgGroup::new("which").required(true).args(["event", "all"])
    ))]
    Redrive {
        /// The destination.
        #[arg(long)]
        destination: String,
        /// Every dead letter of the destination present when the redrive starts.
        #[arg(long, conflicts_with = "event")]
        all: bool,
        /// The event ids of the dead letters (Herald's `<source>:<messageId>`, as
        /// `herald dlq list` shows); repeatable.
        #[arg(long, num_args = 1..)]
        event: Vec<String>,
    },
    /// Delete every dead letter of a destination.
    Purge {
        /// The destination.
        #[arg(long)]
        destination: String,
    },
}

/// Runs one `herald dlq` command against the activator control API.
pub async fn run(cmd: DlqCommand, control: &Control) -> Result<()> {
    let mut c = DlqServiceClient::new(control.channel().await?);
    let err = |e| rpc_error("activator", e);
    match cmd {
        DlqCommand::List {
            destination,
            json,
            limit,
            start_sequence,
        } => {
            let res = c
                .list_dlq(ListDlqRequest {
                    destination: destination.clone(),
                    limit,
                    start_sequence,
                })
                .await
                .map_err(err)?
                .into_inner();
            if json {
                for e in &res.entries {
                    outln!("{}", entry_json(e));
                }
                if res.next_sequence != 0 {
                    eprintln!(
                        "More dead letters: add --start-sequence {} for the next page.",
                        res.next_sequence
                    );
                }
                return Ok(());
            }
            if res.entries.is_empty() {
                outln!("The DLQ of {destination} is empty.");
                return Ok(());
            }
            outln!(
                "{:>8}  {:<32} {:>8} {:>6}  {:<9} {:<20} BODY",
                "SEQUENCE",
                "EVENT",
                "ATTEMPTS",
                "STATUS",
                "REASON",
                "LAST ATTEMPT"
            );
            for e in &res.entries {
                let r = e.record.clone().unwrap_or_default();
                let event_id = r
                    .event
                    .as_ref()
                    .and_then(|p| p.event.as_ref())
                    .map_or("", |e| e.id.as_str());
                let status = match r.last_status {
                    0 => r.last_error_kind.clone(),
                    s => s.to_string(),
                };
                outln!(
                    "{:>8}  {:<32} {:>8} {:>6}  {:<9} {:<20} {}",
                    e.sequence,
                    event_id,
                    r.attempts,
                    status,
                    reason(r.reason()),
                    crate::output::time(r.last_attempt_at.as_ref(), chrono::SecondsFormat::Secs),
                    r.body_excerpt.replace('\n', " ")
                );
            }
            if res.next_sequence != 0 {
                outln!(
                    "\nMore dead letters: add --start-sequence {} for the next page.",
                    res.next_sequence
                );
            }
            Ok(())
        }
        DlqCommand::Redrive {
            destination,
            all,
            event,
        } => {
            let mut stream = c
                .redrive_dlq(RedriveDlqRequest {
                    destination,
                    all,
                    event_ids: event,
                })
                .await
                .map_err(err)?
                .into_inner();
            let mut tally = Tally::default();
            let mut last_report = Instant::now();
            while let Some(p) = stream.message().await.map_err(err)? {
                tally.add(&p);
                match p.outcome() {
                    DlqRedriveOutcome::Delivered => {}
                    DlqRedriveOutcome::ConsentDropped => outln!(
                        "{}: not sent, consent no longer allows it; removed from the DLQ",
                        p.event_id
                    ),
                    DlqRedriveOutcome::NotFound => outln!("{}: {}", p.event_id, p.message),
                    _ => outln!("{}: not delivered: {}", p.event_id, p.message),
                }
                if last_report.elapsed() >= PROGRESS_EVERY {
                    eprintln!(
                        "progress: {}/{} dead letters ({} delivered, {} failed)",
                        p.done, p.total, tally.delivered, tally.failed
                    );
                    last_report = Instant::now();
                }
            }
            if tally.total() == 0 {
                outln!("Nothing to redrive.");
                return Ok(());
            }
            outln!(
                "Redrove {} dead letters: {} delivered, {} consent-dropped, {} not found, {} failed.",
                tally.total(),
                tally.delivered,
                tally.consent_dropped,
                tally.not_found,
                tally.failed
            );
            if tally.failed > 0 {
                bail!(
                    "{} dead letters were not delivered and stay in the DLQ; see above, then redrive again",
                    tally.failed
                );
            }
            Ok(())
        }
        DlqCommand::Purge { destination } => {
            let res = c
                .purge_dlq(PurgeDlqRequest {
                    destination: destination.clone(),
                })
                .await
                .map_err(err)?
                .into_inner();
            outln!("Purged {} dead letters of {destination}.", res.purged);
            Ok(())
        }
    }
}

/// One dead letter as the JSON line of `herald dlq list --json`.
pub fn entry_json(e: &DlqEntry) -> serde_json::Value {
    let r = e.record.clone().unwrap_or_default();
    let t = |t: Option<&prost_types::Timestamp>| {
        t.and_then(herald_proto::time::from_proto)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    };
    json!({
        "sequence": e.sequence,
        "destination": r.destination,
        "event": r.event.as_ref().map(herald_activator::payload::render),
        "attempts": r.attempts,
        "lastStatus": r.last_status,
        "lastError": r.last_error,
        "lastErrorKind": r.last_error_kind,
        "bodyExcerpt": r.body_excerpt,
        "reason": reason(r.reason()),
        "firstAttemptAt": t(r.first_attempt_at.as_ref()),
        "lastAttemptAt": t(r.last_attempt_at.as_ref()),
    })
}

fn reason(r: DlqReason) -> &'static str {
    match r {
        DlqReason::Permanent => "permanent",
        DlqReason::Attempts => "attempts",
        DlqReason::Age => "age",
        DlqReason::Unspecified => "-",
    }
}

/// Counts of a redrive's outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    delivered: u64,
    consent_dropped: u64,
    not_found: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, p: &RedriveDlqProgress) {
        match p.outcome() {
            DlqRedriveOutcome::Delivered => self.delivered += 1,
            DlqRedriveOutcome::ConsentDropped => self.consent_dropped += 1,
            DlqRedriveOutcome::NotFound => self.not_found += 1,
            DlqRedriveOutcome::Failed | DlqRedriveOutcome::Unspecified => self.failed += 1,
        }
    }

    fn total(&self) -> u64 {
        self.delivered + self.consent_dropped + self.not_found + self.failed
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: DlqCommand,
    }

    #[test]
    fn redrive_needs_all_or_event_ids() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["dlq"], args].concat());
        assert!(parse(&["redrive", "--destination", "d"]).is_err());
        assert!(parse(&["redrive", "--all"]).is_err());
        assert!(parse(&["redrive", "--destination", "d", "--all", "--event", "a"]).is_err());
        match parse(&[
            "redrive",
            "--destination",
            "d",
            "--event",
            "a",
            "b",
            "--event",
            "c",
        ])
        .expect("valid")
        .cmd
        {
            DlqCommand::Redrive { event, all, .. } => {
                assert_eq!(event, ["a", "b", "c"]);
                assert!(!all);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["redrive", "--destination", "d", "--all"]).is_ok());
        assert!(parse(&["list", "--destination", "d", "--json"]).is_ok());
        assert!(parse(&["list"]).is_err());
        assert!(parse(&["purge", "--destination", "d"]).is_ok());
    }
}
