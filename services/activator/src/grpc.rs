//! The activator's control API (`herald.v1.DestinationService`). The bearer token is checked by
//! the server ([`herald_common::server::serve_grpc`]), not here. Secrets are shown as `***`.

use std::sync::atomic::Ordering;

use async_nats::jetstream;
use herald_common::Topology;
use herald_proto::v1 as pb;
use herald_proto::v1::destination_service_server::{DestinationService, DestinationServiceServer};
use tonic::{Request, Response, Status};

use crate::config::{DestinationConfig, DestinationKind};
use crate::filter::UnknownConsent;
use crate::live::StatsMap;
use crate::record::{DestinationRecord, Settings, Start};
use crate::store::{DestinationError, DestinationStore};
use crate::worker::consumer_names;

/// The fully qualified gRPC service name, as reported by grpc.health.v1.
pub const SERVICE_NAME: &str = "herald.v1.DestinationService";

/// Implements `DestinationService` over the destinations in the config bucket.
#[derive(Clone)]
pub(crate) struct DestinationGrpc {
    pub store: DestinationStore,
    pub stats: StatsMap,
    pub js: jetstream::Context,
    pub topology: Topology,
}

impl DestinationGrpc {
    /// The tonic server wrapping it.
    pub fn into_server(self) -> DestinationServiceServer<Self> {
        DestinationServiceServer::new(self)
    }

    async fn status(&self, r: &DestinationRecord) -> Result<pb::DestinationStatus, Status> {
        let (delivered, failed_attempts) = self
            .stats
            .lock()
            .expect("stats lock")
            .get(&r.id)
            .map(|s| {
                (
                    s.delivered.load(Ordering::Relaxed),
                    s.failed_attempts.load(Ordering::Relaxed),
                )
            })
            .unwrap_or_default();
        let mut status = pb::DestinationStatus {
            id: r.id.clone(),
            kind: r.kind.as_str().into(),
            delivered,
            failed_attempts,
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(self.topology.processed_stream())
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the processed stream: {e}")))?;
        // Summed over every consumer the destination has (the partitions' or the shared one).
        for name in consumer_names(&r.id, self.topology.partitions()) {
            if let Ok(info) = stream.consumer_info(name).await {
                status.pending += info.num_pending;
                status.ack_pending += info.num_ack_pending as u64;
                status.consumer_exists = true;
            }
        }
        Ok(status)
    }
}

fn status(e: DestinationError) -> Status {
    let message = e.to_string();
    match e {
        DestinationError::NotFound(_) => Status::not_found(message),
        DestinationError::AlreadyExists(_) => Status::already_exists(message),
        DestinationError::Invalid(_) => Status::invalid_argument(message),
        DestinationError::Unavailable(_) => Status::unavailable(message),
        DestinationError::Conflict(_) => Status::aborted(message),
    }
}

/// The definition a request gives, as a config entry.
pub fn from_proto(spec: Option<pb::DestinationSpec>) -> Result<DestinationConfig, String> {
    let s = spec.ok_or("the request needs a spec")?;
    Ok(DestinationConfig {
        id: s.id,
        kind: DestinationKind::parse(&s.kind)?,
        settings: Settings(s.settings.into_iter().collect()),
        event_types: s.event_types,
        event_names: s.event_names,
        filter: Some(s.filter).filter(|f| !f.trim().is_empty()),
        require_purposes: s.require_purposes,
        unknown_consent: UnknownConsent::parse(&s.unknown_consent)?,
        start: Start::parse(&s.start)?,
        ordered: s.ordered,
        rate_limit: Some(s.rate_limit).filter(|n| *n > 0),
        max_attempts: Some(s.max_attempts).filter(|n| *n > 0),
        max_age_seconds: Some(s.max_age_seconds).filter(|n| *n > 0),
        record_deliveries: Some(s.record_deliveries).filter(|r| *r),
        ..Default::default()
    })
}

/// The API's view of a stored destination, secrets masked.
pub fn to_proto(r: &DestinationRecord) -> pb::Destination {
    let r = r.masked();
    pb::Destination {
        spec: Some(pb::DestinationSpec {
            id: r.id.clone(),
            kind: r.kind.as_str().into(),
            settings: r.settings.0.into_iter().collect(),
            event_types: r.event_types,
            event_names: r.event_names,
            filter: r.filter.unwrap_or_default(),
            require_purposes: r.require_purposes,
            unknown_consent: r.unknown_consent.as_str().into(),
            start: r.start.to_string(),
            ordered: Some(r.ordered),
            rate_limit: r.rate_limit.unwrap_or_default(),
            max_attempts: r.max_attempts,
            max_age_seconds: r.max_age_seconds,
            record_deliveries: r.record_deliveries,
        }),
        paused: r.paused,
        created_at: Some(herald_proto::time::to_proto(r.created_at)),
        updated_at: Some(herald_proto::time::to_proto(r.updated_at)),
        revision: r.revision,
        from_config: r.config_sha256.is_some(),
    }
}

#[tonic::async_trait]
impl DestinationService for DestinationGrpc {
    async fn create_destination(
        &self,
        request: Request<pb::CreateDestinationRequest>,
    ) -> Result<Response<pb::CreateDestinationResponse>, Status> {
        let spec = from_proto(request.into_inner().spec).map_err(Status::invalid_argument)?;
        let record = self.store.create(&spec).await.map_err(status)?;
        Ok(Response::new(pb::CreateDestinationResponse {
            destination: Some(to_proto(&record)),
        }))
    }

    async fn update_destination(
        &self,
        request: Request<pb::UpdateDestinationRequest>,
    ) -> Result<Response<pb::UpdateDestinationResponse>, Status> {
        let spec = from_proto(request.into_inner().spec).map_err(Status::invalid_argument)?;
        let record = self.store.update(&spec).await.map_err(status)?;
        Ok(Response::new(pb::UpdateDestinationResponse {
            destination: Some(to_proto(&record)),
        }))
    }

    async fn get_destination(
        &self,
        request: Request<pb::GetDestinationRequest>,
    ) -> Result<Response<pb::GetDestinationResponse>, Status> {
        let record = self
            .store
            .get(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetDestinationResponse {
            destination: Some(to_proto(&record)),
        }))
    }

    async fn list_destinations(
        &self,
        _request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        let records = self.store.list().await.map_err(status)?;
        let mut items = Vec::with_capacity(records.len());
        for r in &records {
            items.push(pb::DestinationWithStatus {
                destination: Some(to_proto(r)),
                status: Some(self.status(r).await?),
            });
        }
        Ok(Response::new(pb::ListDestinationsResponse { items }))
    }

    async fn pause_destination(
        &self,
        request: Request<pb::PauseDestinationRequest>,
    ) -> Result<Response<pb::PauseDestinationResponse>, Status> {
        let record = self
            .store
            .set_paused(&request.into_inner().id, true)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PauseDestinationResponse {
            destination: Some(to_proto(&record)),
        }))
    }

    async fn resume_destination(
        &self,
        request: Request<pb::ResumeDestinationRequest>,
    ) -> Result<Response<pb::ResumeDestinationResponse>, Status> {
        let record = self
            .store
            .set_paused(&request.into_inner().id, false)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ResumeDestinationResponse {
            destination: Some(to_proto(&record)),
        }))
    }

    async fn delete_destination(
        &self,
        request: Request<pb::DeleteDestinationRequest>,
    ) -> Result<Response<pb::DeleteDestinationResponse>, Status> {
        self.store
            .delete(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteDestinationResponse {}))
    }
}
