//! The processor's control API.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::jetstream::consumer::Consumer;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use herald_proto::v1::processor_service_server::ProcessorService;
use herald_proto::v1::{GetStatusRequest, GetStatusResponse};
use tonic::{Request, Response, Status};

use crate::Stats;

pub(crate) struct Control {
    pub stats: Arc<Stats>,
    pub consumer: tokio::sync::watch::Receiver<Option<Consumer<PullConfig>>>,
}

#[tonic::async_trait]
impl ProcessorService for Control {
    async fn get_status(
        &self,
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let consumer = self.consumer.borrow().clone();
        let Some(mut consumer) = consumer else {
            return Err(Status::unavailable(
                "the processor has not bound its consumer yet (is the events stream there? check ingest)",
            ));
        };
        let info = consumer
            .info()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read consumer state: {e}")))?;
        Ok(Response::new(GetStatusResponse {
            consumer: info.name.clone(),
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            processed: self.stats.processed.load(Ordering::Relaxed),
        }))
    }
}
