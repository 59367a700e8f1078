//! The processor's control API.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use herald_common::ownership::PRIORITY_GROUP;
use herald_proto::v1::processor_service_server::ProcessorService;
use herald_proto::v1::{GetStatusRequest, GetStatusResponse, PartitionStatus};
use tonic::{Request, Response, Status};

use crate::Stats;
use crate::partitions::Partitions;

pub(crate) struct Control {
    pub stats: Arc<Stats>,
    pub partitions: Arc<Partitions>,
}

#[tonic::async_trait]
impl ProcessorService for Control {
    async fn get_status(
        &self,
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        if !self.partitions.joined() {
            return Err(Status::unavailable(
                "the processor has not joined its replicas yet (is the events stream there? check ingest)",
            ));
        }
        let snapshot = self.partitions.snapshot();
        let infos = futures_util::future::join_all(snapshot.owned.into_iter().map(
            |(partition, mut consumer, reader)| async move {
                let info = consumer.info().await.map_err(|e| {
                    Status::unavailable(format!(
                        "cannot read partition {partition}'s consumer: {e}"
                    ))
                })?;
                let pinned_client_id = info
                    .priority_groups
                    .iter()
                    .find(|g| g.group == PRIORITY_GROUP)
                    .and_then(|g| g.pinned_client_id.clone())
                    .unwrap_or_default();
                Ok::<_, Status>(PartitionStatus {
                    partition,
                    consumer: info.name.clone(),
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                    pin_id: reader.pin_id.unwrap_or_default(),
                    pinned_client_id,
                    active: reader.active,
                    term: reader.term,
                })
            },
        ))
        .await;
        let partitions = infos.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(GetStatusResponse {
            consumer: self.partitions.durable().to_string(),
            pending: partitions.iter().map(|p| p.pending).sum(),
            ack_pending: partitions.iter().map(|p| p.ack_pending).sum(),
            processed: self.stats.processed.load(Ordering::Relaxed),
            member_id: snapshot.member,
            members: snapshot.members,
            partitions,
        }))
    }
}
