//! Admin commands: one per control RPC, over gRPC, each call carrying the control token.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use herald_common::auth::BearerToken;
use herald_proto::v1::activator_service_client::ActivatorServiceClient;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, ListDestinationsRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where `herald dev` writes the token and the CLI looks for it by default.
pub const DEFAULT_TOKEN_FILE: &str = ".herald/token";

/// A channel whose every call carries `authorization: Bearer <token>`; wrap it in any generated
/// client: `FooServiceClient::new(control.ingest().await?)`.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// How admin commands reach the control APIs: their URLs and the bearer token.
#[derive(Debug, Clone)]
pub struct Control {
    /// gRPC URL of ingest.
    pub ingest_url: String,
    /// gRPC URL of the processor.
    pub processor_url: String,
    /// gRPC URL of the activator.
    pub activator_url: String,
    /// `--token` (or `HERALD_TOKEN`), if given.
    pub token: Option<String>,
}

impl Control {
    /// The ingest control API.
    pub async fn ingest(&self) -> Result<AuthChannel> {
        self.connect(&self.ingest_url, "ingest", "--ingest-url")
            .await
    }

    /// The processor control API.
    pub async fn processor(&self) -> Result<AuthChannel> {
        self.connect(&self.processor_url, "processor", "--processor-url")
            .await
    }

    /// The activator control API.
    pub async fn activator(&self) -> Result<AuthChannel> {
        self.connect(&self.activator_url, "activator", "--activator-url")
            .await
    }

    /// Connects to `url` (the control API of `service`, set with `flag`) with the token.
    pub async fn connect(&self, url: &str, service: &str, flag: &str) -> Result<AuthChannel> {
        let token = self.bearer()?;
        let channel = Channel::from_shared(url.to_string())
            .with_context(|| format!("{flag} {url:?} is not a valid URL"))?
            .connect()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the {service} control API at {url}: is `herald {service}` (or `herald dev`) running? Point {flag} at it"
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
        Code::Unauthenticated => anyhow!(
            "the {service} control API refused the token ({message}); pass the token the \
             services are configured with (control.token) via --token or HERALD_TOKEN"
        ),
        Code::Unavailable => anyhow!(
            "the {service} control API is unavailable: {message}; check that it runs and is \
             ready (its /readyz), then retry"
        ),
        Code::Unimplemented => anyhow!(
            "the {service} control API does not know this call ({message}); is the server the \
             same Herald version as this CLI?"
        ),
        _ => anyhow!("{message}"),
    }
}

/// `herald status`: the processor's consumer position.
pub async fn processor_status(control: &Control) -> Result<()> {
    let mut c = ProcessorServiceClient::new(control.processor().await?);
    let s = c
        .get_status(GetStatusRequest {})
        .await
        .map_err(|e| rpc_error("processor", e))?
        .into_inner();
    println!("consumer     {}", s.consumer);
    println!("pending      {}", s.pending);
    println!("ack pending  {}", s.ack_pending);
    println!("processed    {}", s.processed);
    println!("member       {}", s.member_id);
    println!("members      {}", s.members.join(", "));
    let active: Vec<String> = s
        .partitions
        .iter()
        .map(|p| {
            if p.active {
                p.partition.to_string()
            } else {
                format!("{} (standby)", p.partition)
            }
        })
        .collect();
    println!("partitions   {}", active.join(", "));
    Ok(())
}

/// `herald destinations list`.
pub async fn destinations_list(control: &Control) -> Result<()> {
    let mut c = ActivatorServiceClient::new(control.activator().await?);
    let res = c
        .list_destinations(ListDestinationsRequest {})
        .await
        .map_err(|e| rpc_error("activator", e))?
        .into_inner();
    println!(
        "{:<24} {:<8} {:>10} {:>12} {:>10} {:>8}",
        "ID", "KIND", "PENDING", "ACK_PENDING", "DELIVERED", "FAILED"
    );
    for d in res.destinations {
        println!(
            "{:<24} {:<8} {:>10} {:>12} {:>10} {:>8}",
            d.id, d.kind, d.pending, d.ack_pending, d.delivered, d.failed_attempts
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
