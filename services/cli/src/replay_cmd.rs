//! `herald replay --destination <id> --from <time> --to <time>`: re-sends the processed events
//! of a time window to one destination, with progress.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use herald_proto::v1::ReplayRequest;
use herald_proto::v1::replay_service_client::ReplayServiceClient;

use crate::control::{Control, rpc_error};

/// How often a long replay reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// `herald replay` arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The destination to re-send to (no other destination gets anything).
    #[arg(long)]
    pub destination: String,
    /// Start of the window (inclusive), an RFC 3339 time such as 2026-12-01T10:00:00Z,
    /// compared with the time the processed stream stored each event.
    #[arg(long, value_parser = parse_time)]
    pub from: DateTime<Utc>,
    /// End of the window (exclusive), an RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    pub to: DateTime<Utc>,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-12-01T10:00:00Z ({e})"))
}

/// Runs `herald replay`: progress at most once a second to stderr, then a summary to stdout.
pub async fn run(args: ReplayArgs, control: &Control) -> Result<()> {
    if args.from >= args.to {
        bail!(
            "the window is empty: --from ({}) must be before --to ({})",
            args.from,
            args.to
        );
    }
    let err = |e| rpc_error("activator", e);
    let mut c = ReplayServiceClient::new(control.channel().await?);
    let req = ReplayRequest {
        destination_id: args.destination.clone(),
        from: Some(herald_proto::time::to_proto(args.from)),
        to: Some(herald_proto::time::to_proto(args.to)),
    };
    let mut stream = c.replay(req).await.map_err(err)?.into_inner();
    let mut last = None;
    let mut last_report = Instant::now();
    while let Some(p) = stream.message().await.map_err(err)? {
        if !p.done && last_report.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "progress: {} events read ({} sent, {} not sent), at sequence {} of {}",
                p.read, p.sent, p.skipped, p.sequence, p.end_sequence
            );
            last_report = Instant::now();
        }
        last = Some(p);
    }
    match last {
        Some(p) if p.done => {
            println!(
                "Replayed {} events to {}: {} sent, {} not sent (filtered, consent, suppressed or failed).",
                p.read, args.destination, p.sent, p.skipped
            );
            Ok(())
        }
        _ => bail!("the replay ended before it was done; run it again"),
    }
}
