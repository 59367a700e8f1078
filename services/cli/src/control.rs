//! Admin commands: one per control RPC, over gRPC.

use anyhow::{Context, Result};
use herald_proto::v1::activator_service_client::ActivatorServiceClient;
use herald_proto::v1::ingest_service_client::IngestServiceClient;
use herald_proto::v1::processor_service_client::ProcessorServiceClient;
use herald_proto::v1::{GetStatusRequest, ListDestinationsRequest, ListSourcesRequest};
use tonic::transport::Channel;

async fn channel(url: &str, service: &str, flag: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("{flag} {url:?} is not a valid URL"))?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the {service} control API at {url}: is `herald {service}` (or `herald dev`) running? Point {flag} at it"
            )
        })
}

/// `herald sources list`.
pub async fn sources_list(url: &str) -> Result<()> {
    let mut c = IngestServiceClient::new(channel(url, "ingest", "--ingest-url").await?);
    let res = c.list_sources(ListSourcesRequest {}).await?.into_inner();
    println!("{:<24} {:<8} NAME", "ID", "ENABLED");
    for s in res.sources {
        println!("{:<24} {:<8} {}", s.id, s.enabled, s.name);
    }
    Ok(())
}

/// `herald status`: the processor's consumer position.
pub async fn processor_status(url: &str) -> Result<()> {
    let mut c = ProcessorServiceClient::new(channel(url, "processor", "--processor-url").await?);
    let s = c.get_status(GetStatusRequest {}).await?.into_inner();
    println!("consumer     {}", s.consumer);
    println!("pending      {}", s.pending);
    println!("ack pending  {}", s.ack_pending);
    println!("processed    {}", s.processed);
    Ok(())
}

/// `herald destinations list`.
pub async fn destinations_list(url: &str) -> Result<()> {
    let mut c = ActivatorServiceClient::new(channel(url, "activator", "--activator-url").await?);
    let res = c
        .list_destinations(ListDestinationsRequest {})
        .await?
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
