//! The activator's control API.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use herald_proto::v1::activator_service_server::ActivatorService;
use herald_proto::v1::{DestinationStatus, ListDestinationsRequest, ListDestinationsResponse};
use tonic::{Request, Response, Status};

use crate::config::DestinationConfig;
use crate::worker::DestinationStats;

pub(crate) struct Control {
    pub destinations: Vec<(DestinationConfig, Arc<DestinationStats>)>,
}

#[tonic::async_trait]
impl ActivatorService for Control {
    async fn list_destinations(
        &self,
        _req: Request<ListDestinationsRequest>,
    ) -> Result<Response<ListDestinationsResponse>, Status> {
        let mut out = Vec::with_capacity(self.destinations.len());
        for (cfg, stats) in &self.destinations {
            let consumer = stats.consumer.lock().expect("stats lock").clone();
            let (pending, ack_pending) = match consumer {
                Some(mut c) => match c.info().await {
                    Ok(info) => (info.num_pending, info.num_ack_pending as u64),
                    Err(e) => {
                        return Err(Status::unavailable(format!(
                            "cannot read consumer of destination {}: {e}",
                            cfg.id
                        )));
                    }
                },
                None => (0, 0),
            };
            out.push(DestinationStatus {
                id: cfg.id.clone(),
                kind: cfg.kind.as_str().into(),
                pending,
                ack_pending,
                delivered: stats.delivered.load(Ordering::Relaxed),
                failed_attempts: stats.failed_attempts.load(Ordering::Relaxed),
            });
        }
        Ok(Response::new(ListDestinationsResponse {
            destinations: out,
        }))
    }
}
