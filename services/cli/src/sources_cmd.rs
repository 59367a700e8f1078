//! `herald sources ...`: the ingest control API for sources.

use anyhow::Result;
use herald_proto::v1::source_service_client::SourceServiceClient;
use herald_proto::v1::{
    CreateSourceRequest, DeleteSourceRequest, DisableSourceRequest, EnableSourceRequest,
    GetSourceRequest, ListSourcesRequest, RotateSourceKeyRequest, Source, SourceSettings,
};

use crate::control::{AuthChannel, Control, rpc_error};
use crate::output::outln;

/// `herald sources <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum SourcesCommand {
    /// Create a source; prints its write key and secret (shown only once).
    Create {
        /// The id: letters, digits, '-' and '_'.
        id: String,
        /// Human-readable name.
        #[arg(long)]
        name: Option<String>,
        /// Use this write key (e.g. the one your SDKs already send) instead of a generated one.
        #[arg(long)]
        write_key: Option<String>,
        /// Use this mParticle secret instead of a generated one.
        #[arg(long)]
        write_secret: Option<String>,
        /// Store bulk requests all-or-nothing (atomic batch publish).
        #[arg(long)]
        atomic_publish: bool,
        /// Events per second accepted from the source (0: unlimited).
        #[arg(long, default_value_t = 0.0)]
        rate_limit_per_second: f64,
        /// Burst of the rate limit (0: one second's worth).
        #[arg(long, default_value_t = 0)]
        rate_limit_burst: u32,
    },
    /// List sources.
    List,
    /// Show one source.
    Get {
        /// The source's id.
        id: String,
    },
    /// Give a source a new write key and secret; the old ones stop working within a second.
    Rotate {
        /// The source's id.
        id: String,
        /// Use this new write key instead of a generated one.
        #[arg(long)]
        write_key: Option<String>,
        /// Use this new mParticle secret instead of a generated one.
        #[arg(long)]
        write_secret: Option<String>,
    },
    /// Disable a source: its requests get 403 until it is enabled again.
    Disable {
        /// The source's id.
        id: String,
    },
    /// Enable a disabled source.
    Enable {
        /// The source's id.
        id: String,
    },
    /// Delete a source: its key gets 401.
    Delete {
        /// The source's id.
        id: String,
    },
}

/// Runs one `herald sources` command against the ingest control API.
pub async fn run(cmd: SourcesCommand, control: &Control) -> Result<()> {
    let mut c = SourceServiceClient::new(control.channel().await?);
    let err = |e| rpc_error("ingest", e);
    match cmd {
        SourcesCommand::Create {
            id,
            name,
            write_key,
            write_secret,
            atomic_publish,
            rate_limit_per_second,
            rate_limit_burst,
        } => {
            let res = c
                .create_source(CreateSourceRequest {
                    id,
                    name: name.unwrap_or_default(),
                    write_key,
                    write_secret,
                    settings: Some(SourceSettings {
                        atomic_publish,
                        rate_limit_per_second,
                        rate_limit_burst,
                    }),
                })
                .await
                .map_err(err)?
                .into_inner();
            let s = res.source.unwrap_or_default();
            outln!("Created source {}.\n", s.id);
            print_credentials(&s.id, &res.write_key, &res.write_secret);
        }
        SourcesCommand::List => {
            let res = c
                .list_sources(ListSourcesRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if res.sources.is_empty() {
                outln!("No sources. Create one with `herald sources create <id>`.");
                return Ok(());
            }
            outln!(
                "{:<24} {:<8} {:<7} {:<12} {:<7} NAME",
                "ID",
                "ENABLED",
                "SECRET",
                "RATE_LIMIT",
                "CONFIG"
            );
            for s in res.sources {
                let settings = s.settings.unwrap_or_default();
                outln!(
                    "{:<24} {:<8} {:<7} {:<12} {:<7} {}",
                    s.id,
                    yes_no(s.enabled),
                    yes_no(s.has_write_secret),
                    rate(&settings),
                    yes_no(s.from_config),
                    s.name
                );
            }
        }
        SourcesCommand::Get { id } => {
            let s = c
                .get_source(GetSourceRequest { id })
                .await
                .map_err(err)?
                .into_inner()
                .source
                .unwrap_or_default();
            print_source(&s);
        }
        SourcesCommand::Rotate {
            id,
            write_key,
            write_secret,
        } => {
            let res = c
                .rotate_source_key(RotateSourceKeyRequest {
                    id,
                    write_key,
                    write_secret,
                })
                .await
                .map_err(err)?
                .into_inner();
            let s = res.source.unwrap_or_default();
            outln!(
                "Rotated the key of source {}: the old key and secret stop working within a second.\n",
                s.id
            );
            print_credentials(&s.id, &res.write_key, &res.write_secret);
        }
        SourcesCommand::Disable { id } => {
            c.disable_source(DisableSourceRequest { id: id.clone() })
                .await
                .map_err(err)?;
            outln!(
                "Source {id} disabled: its requests now get 403. Enable it again with `herald sources enable {id}`."
            );
        }
        SourcesCommand::Enable { id } => {
            c.enable_source(EnableSourceRequest { id: id.clone() })
                .await
                .map_err(err)?;
            outln!("Source {id} enabled: it accepts events again.");
        }
        SourcesCommand::Delete { id } => delete(&mut c, id).await?,
    }
    Ok(())
}

async fn delete(c: &mut SourceServiceClient<AuthChannel>, id: String) -> Result<()> {
    let err = |e| rpc_error("ingest", e);
    let from_config = c
        .get_source(GetSourceRequest { id: id.clone() })
        .await
        .map_err(err)?
        .into_inner()
        .source
        .is_some_and(|s| s.from_config);
    c.delete_source(DeleteSourceRequest { id: id.clone() })
        .await
        .map_err(err)?;
    outln!("Source {id} deleted: its write key now gets 401.");
    if from_config {
        outln!(
            "It is also in the config file (ingest.sources): remove it there too, or it comes back at the next start."
        );
    }
    Ok(())
}

fn print_credentials(id: &str, key: &str, secret: &str) {
    outln!("  write key:     {key}");
    outln!("  write secret:  {secret}   (mParticle: key:secret)");
    outln!(
        "\nStore them now: they are not shown again (`herald sources rotate {id}` issues new ones)."
    );
}

fn print_source(s: &Source) {
    let settings = s.settings.unwrap_or_default();
    outln!("id              {}", s.id);
    outln!("name            {}", s.name);
    outln!("enabled         {}", yes_no(s.enabled));
    outln!("write secret    {}", yes_no(s.has_write_secret));
    outln!("atomic publish  {}", yes_no(settings.atomic_publish));
    outln!("rate limit      {}", rate(&settings));
    outln!("from config     {}", yes_no(s.from_config));
    outln!("created         {}", time(s.created_at.as_ref()));
    outln!("updated         {}", time(s.updated_at.as_ref()));
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn rate(s: &SourceSettings) -> String {
    if s.rate_limit_per_second <= 0.0 {
        "unlimited".into()
    } else if s.rate_limit_burst == 0 {
        format!("{}/s", s.rate_limit_per_second)
    } else {
        format!("{}/s burst {}", s.rate_limit_per_second, s.rate_limit_burst)
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    crate::output::time(t, chrono::SecondsFormat::Secs)
}
