//! `herald quarantine ...`: list and redrive what ingest could not accept.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use herald_proto::v1::quarantine_service_client::QuarantineServiceClient;
use herald_proto::v1::{
    ListQuarantineRequest, PayloadFormat, QuarantineEntry, RedriveOutcome,
    RedriveQuarantineProgress, RedriveQuarantineRequest,
};

use crate::control::{AuthChannel, Control, rpc_error};

/// How often a long redrive reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `herald quarantine <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum QuarantineCommand {
    /// List quarantine records (oldest first) with their sequence, source and reason.
    List {
        /// Only records of this source.
        #[arg(long)]
        source: Option<String>,
        /// Most records shown (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start at this stream sequence (the next page of a previous listing).
        #[arg(long, default_value_t = 0)]
        start_sequence: u64,
        /// Also print each record's payload.
        #[arg(long)]
        payload: bool,
    },
    /// Submit records again through validation: accepted ones go to the events stream and
    /// leave the quarantine; ones that fail again are quarantined anew with their new reason.
    #[command(group(
        clap::ArgGroup::new("which").required(true).args(["sequence", "all"])
    ))]
    Redrive {
        /// Stream sequences of the records (as `herald quarantine list` shows); repeatable.
        #[arg(long, num_args = 1..)]
        sequence: Vec<u64>,
        /// The source whose records to redrive (with --all).
        #[arg(long, requires = "all")]
        source: Option<String>,
        /// Redrive every record of --source present when the redrive starts.
        #[arg(long, requires = "source", conflicts_with = "sequence")]
        all: bool,
    },
}

/// Runs one `herald quarantine` command against the ingest control API.
pub async fn run(cmd: QuarantineCommand, control: &Control) -> Result<()> {
    let mut c = QuarantineServiceClient::new(control.channel().await?);
    match cmd {
        QuarantineCommand::List {
            source,
            limit,
            start_sequence,
            payload,
        } => {
            let mut out = std::io::stdout().lock();
            list(
                &mut c,
                source.unwrap_or_default(),
                limit,
                start_sequence,
                payload,
                &mut out,
            )
            .await
        }
        QuarantineCommand::Redrive {
            sequence,
            source,
            all,
        } => {
            let req = RedriveQuarantineRequest {
                sequences: sequence,
                source_id: source.unwrap_or_default(),
                all,
            };
            let mut out = std::io::stdout().lock();
            let mut progress = std::io::stderr().lock();
            redrive(&mut c, req, &mut out, &mut progress).await
        }
    }
}

/// `herald quarantine list`: one line per record, and how to get the next page.
pub async fn list(
    c: &mut QuarantineServiceClient<AuthChannel>,
    source_id: String,
    limit: u32,
    start_sequence: u64,
    payload: bool,
    out: &mut impl std::io::Write,
) -> Result<()> {
    let res = c
        .list_quarantine(ListQuarantineRequest {
            source_id,
            limit,
            start_sequence,
        })
        .await
        .map_err(|e| rpc_error("ingest", e))?
        .into_inner();
    if res.entries.is_empty() {
        writeln!(out, "The quarantine is empty.")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<16} {:<24} {:>7}  {:<24} {:<20} MESSAGE",
        "SEQUENCE", "SOURCE", "REASON", "ATTEMPT", "ORIGIN", "RECEIVED"
    )?;
    for entry in &res.entries {
        print_entry(entry, payload, out)?;
    }
    if res.next_sequence != 0 {
        writeln!(
            out,
            "\nMore records: add --start-sequence {} for the next page.",
            res.next_sequence
        )?;
    }
    Ok(())
}

fn print_entry(e: &QuarantineEntry, payload: bool, out: &mut impl std::io::Write) -> Result<()> {
    let r = e.record.clone().unwrap_or_default();
    writeln!(
        out,
        "{:>8}  {:<16} {:<24} {:>7}  {:<24} {:<20} {}",
        e.sequence,
        r.source_id,
        r.reason,
        r.attempt,
        r.origin,
        time(r.received_at.as_ref()),
        r.message
    )?;
    if payload {
        let body = match r.format() {
            PayloadFormat::ProtobufEvent => format!("(protobuf, {} bytes)", r.payload.len()),
            _ => String::from_utf8_lossy(&r.payload).into_owned(),
        };
        let cut = if r.payload_truncated {
            " (truncated)"
        } else {
            ""
        };
        writeln!(out, "          payload{cut}: {body}")?;
    }
    Ok(())
}

/// Counts of a redrive's outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Records accepted and removed from the quarantine.
    pub redriven: u64,
    /// Records that failed again and were quarantined anew.
    pub quarantined_again: u64,
    /// Sequences with no record.
    pub not_found: u64,
    /// Records left as they were because the redrive failed.
    pub failed: u64,
    /// Events published.
    pub events: u64,
}

impl Tally {
    fn add(&mut self, p: &RedriveQuarantineProgress) {
        match p.outcome() {
            RedriveOutcome::Redriven => self.redriven += 1,
            RedriveOutcome::QuarantinedAgain => self.quarantined_again += 1,
            RedriveOutcome::NotFound => self.not_found += 1,
            RedriveOutcome::Failed | RedriveOutcome::Unspecified => self.failed += 1,
        }
        self.events += u64::from(p.events_published);
    }
}

/// `herald quarantine redrive`: one line per record that did not simply pass to `out`,
/// progress at most once a second to `progress`, then a summary. Fails when a record could
/// not be redriven.
pub async fn redrive(
    c: &mut QuarantineServiceClient<AuthChannel>,
    req: RedriveQuarantineRequest,
    out: &mut impl std::io::Write,
    progress: &mut impl std::io::Write,
) -> Result<()> {
    let err = |e| rpc_error("ingest", e);
    let mut stream = c.redrive_quarantine(req).await.map_err(err)?.into_inner();
    let mut tally = Tally::default();
    let mut last_report = Instant::now();
    let mut last = (0u64, 0u64);
    while let Some(p) = stream.message().await.map_err(err)? {
        tally.add(&p);
        last = (p.done, p.total);
        match p.outcome() {
            RedriveOutcome::Redriven => {}
            RedriveOutcome::QuarantinedAgain => writeln!(
                out,
                "{}: quarantined again as {} ({}): {}",
                p.sequence,
                join(&p.new_sequences),
                p.reason,
                p.message
            )?,
            RedriveOutcome::NotFound => writeln!(out, "{}: no such record", p.sequence)?,
            _ => writeln!(out, "{}: not redriven: {}", p.sequence, p.message)?,
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            writeln!(
                progress,
                "progress: {}/{} records ({} redriven, {} quarantined again, {} failed)",
                p.done, p.total, tally.redriven, tally.quarantined_again, tally.failed
            )?;
            last_report = Instant::now();
        }
    }
    if last.0 == 0 {
        writeln!(out, "Nothing to redrive.")?;
        return Ok(());
    }
    writeln!(
        out,
        "Redrove {} records: {} accepted ({} events published), {} quarantined again, {} not found, {} failed.",
        last.0,
        tally.redriven,
        tally.events,
        tally.quarantined_again,
        tally.not_found,
        tally.failed
    )?;
    if tally.failed > 0 {
        bail!(
            "{} records could not be redriven and were left in the quarantine; see above, then retry",
            tally.failed
        );
    }
    Ok(())
}

fn join(seqs: &[u64]) -> String {
    seqs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    crate::output::time(t, chrono::SecondsFormat::Secs)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: QuarantineCommand,
    }

    #[test]
    fn redrive_needs_sequences_or_a_source_with_all() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["q"], args].concat());
        assert!(parse(&["redrive"]).is_err());
        assert!(parse(&["redrive", "--all"]).is_err());
        assert!(parse(&["redrive", "--source", "web"]).is_err());
        assert!(parse(&["redrive", "--sequence", "1", "--source", "web", "--all"]).is_err());
        match parse(&["redrive", "--sequence", "3", "5", "--sequence", "9"])
            .expect("valid")
            .cmd
        {
            QuarantineCommand::Redrive { sequence, all, .. } => {
                assert_eq!(sequence, [3, 5, 9]);
                assert!(!all);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["redrive", "--source", "web", "--all"])
            .expect("valid")
            .cmd
        {
            QuarantineCommand::Redrive { source, all, .. } => {
                assert_eq!(source.as_deref(), Some("web"));
                assert!(all);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["list", "--source", "web", "--limit", "5"]).is_ok());
    }

    #[test]
    fn tally_counts_outcomes() {
        let mut t = Tally::default();
        for (o, n) in [
            (RedriveOutcome::Redriven, 2),
            (RedriveOutcome::QuarantinedAgain, 0),
            (RedriveOutcome::Failed, 0),
        ] {
            t.add(&RedriveQuarantineProgress {
                outcome: o as i32,
                events_published: n,
                ..Default::default()
            });
        }
        assert_eq!(
            t,
            Tally {
                redriven: 1,
                quarantined_again: 1,
                not_found: 0,
                failed: 1,
                events: 2
            }
        );
    }
}
