//! Admin commands: one per control RPC, over gRPC, each call carrying the control token.

use std::path::Path;

use anyhow::{Result, anyhow};
use herald_common::auth::BearerToken;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, PartitionStatus};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::output::{hint, outln};

/// Where `herald dev` writes the token and the CLI looks for it by default.
pub const DEFAULT_TOKEN_FILE: &str = ".herald/token";

/// A channel whose every call carries `authorization: Bearer <token>`; wrap it in any generated
/// client: `FooServiceClient::new(control.channel().await?)`.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// `--token`, shared by every admin command.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArg {
    /// Bearer token of the control APIs (default: ./.herald/token, written by `herald dev`).
    #[arg(long, global = true, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Where the ingest control API is: the flags of the commands that use it.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestApi {
    /// gRPC URL of the ingest control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_INGEST_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub ingest_url: String,
    #[command(flatten)]
    pub token: TokenArg,
}

/// Where the processor control API is: the flags of the commands that use it.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessorApi {
    /// gRPC URL of the processor control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_PROCESSOR_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub processor_url: String,
    #[command(flatten)]
    pub token: TokenArg,
}

/// Where the activator control API is: the flags of the commands that use it.
#[derive(Debug, Clone, clap::Args)]
pub struct ActivatorApi {
    /// gRPC URL of the activator control API.
    #[arg(
        long,
        global = true,
        env = "HERALD_ACTIVATOR_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub activator_url: String,
    #[command(flatten)]
    pub token: TokenArg,
}

impl IngestApi {
    /// How to reach the ingest control API.
    pub fn control(&self) -> Control {
        Control::new("ingest", "--ingest-url", &self.ingest_url, &self.token)
    }
}

impl ProcessorApi {
    /// How to reach the processor control API.
    pub fn control(&self) -> Control {
        Control::new(
            "processor",
            "--processor-url",
            &self.processor_url,
            &self.token,
        )
    }
}

impl ActivatorApi {
    /// How to reach the activator control API.
    pub fn control(&self) -> Control {
        Control::new(
            "activator",
            "--activator-url",
            &self.activator_url,
            &self.token,
        )
    }
}

/// How an admin command reaches one service's control API: its URL and the bearer token.
#[derive(Debug, Clone)]
pub struct Control {
    /// The service (`ingest`, `processor`, `activator`).
    pub service: &'static str,
    /// The flag that sets [`Control::url`].
    pub flag: &'static str,
    /// gRPC URL of the service's control API.
    pub url: String,
    /// `--token` (or `HERALD_TOKEN`), if given.
    pub token: Option<String>,
}

impl Control {
    fn new(service: &'static str, flag: &'static str, url: &str, token: &TokenArg) -> Self {
        Self {
            service,
            flag,
            url: url.to_string(),
            token: token.token.clone(),
        }
    }

    /// Connects to the control API with the token.
    pub async fn channel(&self) -> Result<AuthChannel> {
        let (service, flag, url) = (self.service, self.flag, &self.url);
        let token = self.bearer()?;
        let channel = Channel::from_shared(url.clone())
            .map_err(|e| {
                hint(
                    anyhow!("{flag} {url:?} is not a valid URL: {e}"),
                    format!("pass a URL such as http://127.0.0.1:50051 to {flag}"),
                )
            })?
            .connect()
            .await
            .map_err(|e| {
                hint(
                    anyhow::Error::new(e)
                        .context(format!("cannot reach the {service} control API at {url}")),
                    format!(
                        "is `herald {service}` (or `herald dev`) running? start it, or point \
                         {flag} at its control API"
                    ),
                )
            })?;
        Ok(InterceptedService::new(channel, token))
    }

    fn bearer(&self) -> Result<BearerToken> {
        let token = resolve_token(self.token.as_deref(), Path::new(DEFAULT_TOKEN_FILE))?;
        BearerToken::new(&token).map_err(|e| anyhow!("{e}: check --token or HERALD_TOKEN"))
    }
}

/// The control token: `flag` (from `--token` or `HERALD_TOKEN`), else the content of
/// `default_file`.
pub fn resolve_token(flag: Option<&str>, default_file: &Path) -> Result<String> {
    if let Some(t) = flag.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    match std::fs::read_to_string(default_file) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => Err(anyhow!(
            "no control token: pass --token, set HERALD_TOKEN, or run where `herald dev` wrote {} \
             (a deployed Herald's token is the one its services read from control.token or \
             control.token_file)",
            default_file.display()
        )),
    }
}

/// Turns a failed RPC into an error that says what to do next.
pub fn rpc_error(service: &str, status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::Unauthenticated => hint(
            anyhow!("the {service} control API refused the token ({message})"),
            "pass the token the services are configured with (control.token) via --token or \
             HERALD_TOKEN",
        ),
        Code::Unavailable => hint(
            anyhow!("the {service} control API is unavailable: {message}"),
            "check that it runs and is ready (its /readyz), then retry",
        ),
        Code::Unimplemented => hint(
            anyhow!("the {service} control API does not know this call ({message})"),
            "is the server the same Herald version as this CLI?",
        ),
        Code::DeadlineExceeded => hint(
            anyhow!("the {service} control API did not answer in time: {message}"),
            "retry; if it persists, check the service's /readyz and its logs",
        ),
        Code::Internal | Code::Unknown | Code::DataLoss => hint(
            anyhow!("the {service} control API failed: {message}"),
            format!("see the {service}'s logs"),
        ),
        // The services' own messages name the fix (e.g. "... not found: see herald sources list").
        _ => anyhow!("{message}"),
    }
}

/// `herald status`: the processor's position, its partitions' consumers and what each is doing.
pub async fn processor_status(control: &Control) -> Result<()> {
    let mut c = ProcessorServiceClient::new(control.channel().await?);
    let s = c
        .get_status(GetStatusRequest {})
        .await
        .map_err(|e| rpc_error("processor", e))?
        .into_inner();
    let consumers: Vec<&str> = s.partitions.iter().map(|p| p.consumer.as_str()).collect();
    outln!("consumers    {}", span(&consumers));
    outln!("pending      {}", s.pending);
    outln!("ack pending  {}", s.ack_pending);
    outln!("processed    {}", s.processed);
    outln!("member       {}", s.member_id);
    outln!("members      {}", s.members.join(", "));
    let mut by_state: [(&str, Vec<String>); 3] = [
        ("active", Vec::new()),
        ("idle", Vec::new()),
        ("standby", Vec::new()),
    ];
    for p in &s.partitions {
        by_state[partition_state(p) as usize]
            .1
            .push(p.partition.to_string());
    }
    if s.partitions.is_empty() {
        outln!("partitions   none owned by this replica");
    }
    for (state, partitions) in by_state {
        if !partitions.is_empty() {
            outln!("{state:<12} {}", partitions.join(", "));
        }
    }
    Ok(())
}

/// What a partition the replica owns is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartitionState {
    /// Pinned to this replica and processing.
    Active = 0,
    /// Nothing to process and no reader pinned yet: no event has reached it.
    Idle = 1,
    /// Waiting for a previous owner to let go (its pin, or its unacknowledged events).
    Standby = 2,
}

fn partition_state(p: &PartitionStatus) -> PartitionState {
    if p.active {
        PartitionState::Active
    } else if p.pinned_client_id.is_empty() && p.pending == 0 && p.ack_pending == 0 {
        PartitionState::Idle
    } else {
        PartitionState::Standby
    }
}

/// `a, b, c`, or `first … last (n)` for a long list.
fn span(names: &[&str]) -> String {
    match names {
        [] => "none".into(),
        [first, .., last] if names.len() > 3 => format!("{first} … {last} ({})", names.len()),
        _ => names.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_states() {
        let p = |active, pinned: &str, pending, ack_pending| PartitionStatus {
            active,
            pinned_client_id: pinned.into(),
            pending,
            ack_pending,
            ..Default::default()
        };
        for (status, state) in [
            (p(true, "a", 0, 0), PartitionState::Active),
            (p(false, "", 0, 0), PartitionState::Idle),
            (p(false, "", 3, 0), PartitionState::Standby),
            (p(false, "other", 0, 0), PartitionState::Standby),
            (p(false, "", 0, 2), PartitionState::Standby),
        ] {
            assert_eq!(partition_state(&status), state, "{status:?}");
        }
        assert_eq!(span(&["a", "b"]), "a, b");
        assert_eq!(span(&["p0", "p1", "p2", "p3"]), "p0 … p3 (4)");
    }

    #[test]
    fn token_from_flag_then_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        assert_eq!(resolve_token(Some(" t1 "), &file).expect("flag"), "t1");
        let err = resolve_token(None, &file).unwrap_err().to_string();
        assert!(
            err.contains("--token") && err.contains("HERALD_TOKEN"),
            "{err}"
        );
        std::fs::write(&file, "t2\n").expect("write");
        assert_eq!(resolve_token(None, &file).expect("file"), "t2");
        assert_eq!(resolve_token(Some(""), &file).expect("file"), "t2");
    }
}
