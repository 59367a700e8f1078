//! `herald destinations ...`: the activator control API for destinations.

use anyhow::{Result, anyhow};
use herald_proto::v1::destination_service_client::DestinationServiceClient;
use herald_proto::v1::{
    CreateDestinationRequest, DeleteDestinationRequest, Destination, DestinationSpec,
    GetDestinationRequest, ListDestinationsRequest, PauseDestinationRequest,
    ResumeDestinationRequest, UpdateDestinationRequest,
};

use crate::control::{Control, rpc_error};
use crate::output::{hint, outln};

/// What a destination is: the flags of `create` and `update`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpecArgs {
    /// A setting `key=value` (repeatable): webhook `url`, `timeout_ms`, `batch_max`, `secret`,
    /// `header.<Name>`; log `log_file`. A value `@path` is read from that file, `env:NAME` from
    /// that environment variable, so a secret need not appear in the command line.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Only events of this type (repeatable): track, identify, page, screen, group, alias...
    #[arg(long = "event-type", value_name = "TYPE")]
    pub event_types: Vec<String>,
    /// Only events of this name (repeatable), e.g. "Order Completed".
    #[arg(long = "event-name", value_name = "NAME")]
    pub event_names: Vec<String>,
    /// Only events for which this CEL condition over `event` holds.
    #[arg(long, value_name = "CEL")]
    pub filter: Option<String>,
    /// A consent purpose each person must have granted (repeatable).
    #[arg(long = "require-purpose", value_name = "PURPOSE")]
    pub require_purposes: Vec<String>,
    /// A person with no recorded choice on a required purpose: allow or deny (default).
    #[arg(long, value_name = "allow|deny")]
    pub unknown_consent: Option<String>,
    /// Where a new destination starts: now (default), all, or an RFC 3339 time.
    #[arg(long, value_name = "now|all|TIME")]
    pub start: Option<String>,
    /// Keep each user's events in order (default true).
    #[arg(long, value_name = "true|false")]
    pub ordered: Option<bool>,
    /// Most events per second (0: unlimited).
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// Most send attempts of one event (default 10).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Longest an event is retried, from its first attempt, e.g. 24h, 90m, 3600s (default 24h).
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
    /// Record every delivered event in its delivery status (`herald delivery`), not only
    /// failures and retries (default false: each record costs nats-server memory for its TTL).
    #[arg(long, value_name = "true|false")]
    pub record_deliveries: Option<bool>,
}

/// `herald destinations <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum DestinationsCommand {
    /// Create a destination; every activator starts delivering to it within a second.
    Create {
        /// The id: letters, digits, '-' and '_'.
        id: String,
        /// The kind: webhook, log or nats.
        #[arg(long)]
        kind: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Change a destination: the flags given replace those fields (`--set` changes only the
    /// settings it names); its delivery restarts from where it was.
    Update {
        /// The destination's id.
        id: String,
        /// A new kind: webhook, log or nats.
        #[arg(long)]
        kind: Option<String>,
        /// Remove a setting (repeatable).
        #[arg(long = "unset", value_name = "KEY")]
        unset: Vec<String>,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Show one destination (secrets as ***).
    Get {
        /// The destination's id.
        id: String,
    },
    /// List destinations with their backlog and delivery counters.
    List,
    /// Stop delivering to a destination; its backlog is kept.
    Pause {
        /// The destination's id.
        id: String,
    },
    /// Resume a paused destination from where it stopped.
    Resume {
        /// The destination's id.
        id: String,
    },
    /// Delete a destination and its backlog.
    Delete {
        /// The destination's id.
        id: String,
    },
}

/// A `--set` value: `@path` is the file's content (one trailing newline dropped), `env:NAME`
/// the variable's value, anything else itself.
pub fn setting_value(key: &str, value: &str) -> Result<String> {
    if let Some(path) = value.strip_prefix('@') {
        let text = std::fs::read_to_string(path).map_err(|e| {
            hint(
                anyhow!("--set {key}=@{path}: cannot read {path}: {e}"),
                "give the path of a readable file, or the value itself",
            )
        })?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        return Ok(text.strip_suffix('\r').unwrap_or(text).to_string());
    }
    if let Some(name) = value.strip_prefix("env:") {
        return std::env::var(name).map_err(|_| {
            hint(
                anyhow!("--set {key}=env:{name}: the environment variable {name} is not set"),
                format!("export {name}=... first, or give the value itself"),
            )
        });
    }
    Ok(value.to_string())
}

fn parse_set(s: &str) -> Result<(String, String)> {
    let (key, value) = s.split_once('=').ok_or_else(|| {
        hint(
            anyhow!("--set {s:?} is not key=value"),
            "write it as --set url=https://example.com/hook",
        )
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(hint(
            anyhow!("--set {s:?} has no key"),
            "write it as --set key=value",
        ));
    }
    Ok((key.to_string(), setting_value(key, value)?))
}

/// A duration such as `24h`, `90m`, `3600s` or `2d`, in seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        hint(
            anyhow!("--max-age {s:?} is not a duration"),
            "write e.g. 24h, 90m or 3600s",
        )
    })?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(hint(
                anyhow!("--max-age {s:?}: unknown unit {unit:?}"),
                "use s, m, h or d, e.g. 24h",
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|n| *n > 0)
        .ok_or_else(|| hint(anyhow!("--max-age {s:?} is out of range"), "write e.g. 24h"))
}

impl SpecArgs {
    /// Applies the flags given to `spec`.
    fn apply(self, spec: &mut DestinationSpec) -> Result<()> {
        for s in &self.set {
            let (k, v) = parse_set(s)?;
            spec.settings.insert(k, v);
        }
        if !self.event_types.is_empty() {
            spec.event_types = self.event_types;
        }
        if !self.event_names.is_empty() {
            spec.event_names = self.event_names;
        }
        if let Some(f) = self.filter {
            spec.filter = f;
        }
        if !self.require_purposes.is_empty() {
            spec.require_purposes = self.require_purposes;
        }
        if let Some(u) = self.unknown_consent {
            spec.unknown_consent = u;
        }
        if let Some(s) = self.start {
            spec.start = s;
        }
        if let Some(o) = self.ordered {
            spec.ordered = Some(o);
        }
        if let Some(n) = self.rate_limit {
            spec.rate_limit = n;
        }
        if let Some(n) = self.max_attempts {
            spec.max_attempts = n;
        }
        if let Some(a) = self.max_age {
            spec.max_age_seconds = parse_duration(&a)?;
        }
        if let Some(r) = self.record_deliveries {
            spec.record_deliveries = r;
        }
        Ok(())
    }
}

/// Runs one `herald destinations` command against the activator control API.
pub async fn run(cmd: DestinationsCommand, control: &Control) -> Result<()> {
    let mut c = DestinationServiceClient::new(control.channel().await?);
    let err = |e| rpc_error("activator", e);
    match cmd {
        DestinationsCommand::Create { id, kind, spec } => {
            let mut s = DestinationSpec {
                id,
                kind,
                ..Default::default()
            };
            spec.apply(&mut s)?;
            let d = c
                .create_destination(CreateDestinationRequest { spec: Some(s) })
                .await
                .map_err(err)?
                .into_inner()
                .destination
                .unwrap_or_default();
            let s = d.spec.clone().unwrap_or_default();
            outln!(
                "Created destination {} ({}); every activator starts delivering to it within a second.\n",
                s.id,
                s.kind
            );
            print_destination(&d);
        }
        DestinationsCommand::Update {
            id,
            kind,
            unset,
            spec,
        } => {
            let current = c
                .get_destination(GetDestinationRequest { id: id.clone() })
                .await
                .map_err(err)?
                .into_inner()
                .destination
                .unwrap_or_default();
            // Secrets come back as ***, which the server reads as "keep the stored value".
            let mut s = current.spec.unwrap_or_default();
            if let Some(k) = kind {
                s.kind = k;
            }
            for key in &unset {
                if s.settings.remove(key).is_none() {
                    return Err(hint(
                        anyhow!("--unset {key}: destination {id} has no such setting"),
                        format!("`herald destinations get {id}` shows its settings"),
                    ));
                }
            }
            spec.apply(&mut s)?;
            let d = c
                .update_destination(UpdateDestinationRequest { spec: Some(s) })
                .await
                .map_err(err)?
                .into_inner()
                .destination
                .unwrap_or_default();
            outln!("Updated destination {id}; its delivery restarts within a second.\n");
            print_destination(&d);
        }
        DestinationsCommand::Get { id } => {
            let d = c
                .get_destination(GetDestinationRequest { id })
                .await
                .map_err(err)?
                .into_inner()
                .destination
                .unwrap_or_default();
            print_destination(&d);
        }
        DestinationsCommand::List => {
            let res = c
                .list_destinations(ListDestinationsRequest {})
                .await
                .map_err(err)?
                .into_inner();
            if res.items.is_empty() {
                outln!(
                    "No destinations. Create one with `herald destinations create <id> --kind webhook --set url=https://...`."
                );
                return Ok(());
            }
            outln!(
                "{:<24} {:<8} {:<7} {:>10} {:>12} {:>10} {:>8}",
                "ID",
                "KIND",
                "STATE",
                "PENDING",
                "ACK_PENDING",
                "DELIVERED",
                "FAILED"
            );
            for item in res.items {
                let d = item.destination.unwrap_or_default();
                let st = item.status.unwrap_or_default();
                let s = d.spec.unwrap_or_default();
                outln!(
                    "{:<24} {:<8} {:<7} {:>10} {:>12} {:>10} {:>8}",
                    s.id,
                    s.kind,
                    if d.paused { "paused" } else { "active" },
                    st.pending,
                    st.ack_pending,
                    st.delivered,
                    st.failed_attempts
                );
            }
        }
        DestinationsCommand::Pause { id } => {
            c.pause_destination(PauseDestinationRequest { id: id.clone() })
                .await
                .map_err(err)?;
            outln!(
                "Paused destination {id}: deliveries stop within a second; its backlog is kept. Resume with `herald destinations resume {id}`."
            );
        }
        DestinationsCommand::Resume { id } => {
            c.resume_destination(ResumeDestinationRequest { id: id.clone() })
                .await
                .map_err(err)?;
            outln!("Resumed destination {id}: deliveries restart within a second.");
        }
        DestinationsCommand::Delete { id } => {
            c.delete_destination(DeleteDestinationRequest { id: id.clone() })
                .await
                .map_err(err)?;
            outln!("Deleted destination {id} and its backlog.");
        }
    }
    Ok(())
}

fn print_destination(d: &Destination) {
    let s = d.spec.clone().unwrap_or_default();
    let list = |v: &[String]| {
        if v.is_empty() {
            "all".to_string()
        } else {
            v.join(", ")
        }
    };
    outln!("id:               {}", s.id);
    outln!("kind:             {}", s.kind);
    outln!(
        "state:            {}",
        if d.paused { "paused" } else { "active" }
    );
    for (k, v) in &s.settings {
        outln!("setting:          {k} = {v}");
    }
    outln!("event types:      {}", list(&s.event_types));
    outln!("event names:      {}", list(&s.event_names));
    if !s.filter.is_empty() {
        outln!("filter:           {}", s.filter);
    }
    if !s.require_purposes.is_empty() {
        outln!("require purposes: {}", s.require_purposes.join(", "));
        outln!("unknown consent:  {}", s.unknown_consent);
    }
    outln!("start:            {}", s.start);
    outln!("ordered:          {}", s.ordered.unwrap_or(true));
    if s.rate_limit > 0 {
        outln!("rate limit:       {}/s", s.rate_limit);
    }
    outln!("max attempts:     {}", s.max_attempts);
    outln!("max age:          {}s", s.max_age_seconds);
    outln!(
        "delivery records: {}",
        if s.record_deliveries {
            "every one"
        } else {
            "failures and retries only"
        }
    );
    outln!(
        "from config:      {}",
        if d.from_config { "yes" } else { "no" }
    );
    if let Some(t) = &d.created_at {
        outln!(
            "created:          {}",
            herald_proto::time::from_proto(t)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("24h", 86_400),
            ("90m", 5_400),
            ("3600s", 3_600),
            ("2d", 172_800),
            ("15", 15),
        ] {
            assert_eq!(parse_duration(s).expect(s), secs, "{s}");
        }
        for s in ["", "h", "0h", "5w", "-1h"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn set_values_from_files_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "whsec-from-file\n").expect("write");
        assert_eq!(
            parse_set(&format!("secret=@{}", file.display())).expect("file"),
            ("secret".into(), "whsec-from-file".into())
        );
        assert_eq!(
            parse_set("url=https://x/?a=b").expect("plain"),
            ("url".into(), "https://x/?a=b".into())
        );
        let missing = parse_set("secret=env:HERALD_TEST_SURELY_UNSET_VAR")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("HERALD_TEST_SURELY_UNSET_VAR"),
            "{missing}"
        );
        assert!(parse_set("novalue").is_err());
        assert!(parse_set(&format!("secret=@{}/nope", dir.path().display())).is_err());
    }
}
