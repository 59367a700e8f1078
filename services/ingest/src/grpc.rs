//! The gRPC control API (`herald.v1.IngestService`).

use herald_proto::v1::ingest_service_server::{IngestService, IngestServiceServer};
use herald_proto::v1::{ListSourcesRequest, ListSourcesResponse, Source};
use tonic::{Request, Response, Status};

use crate::http::AppState;

/// The fully qualified gRPC service name, as reported by grpc.health.v1.
pub const SERVICE_NAME: &str = "herald.v1.IngestService";

/// Implements `IngestService` over the service's state.
#[derive(Clone)]
pub struct IngestGrpc {
    state: AppState,
}

impl IngestGrpc {
    /// The service over this state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// The tonic server wrapping it.
    pub fn into_server(self) -> IngestServiceServer<Self> {
        IngestServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    async fn list_sources(
        &self,
        _request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        let sources = self
            .state
            .sources()
            .list()
            .iter()
            .map(|s| Source {
                id: s.id.to_string(),
                name: s.name.to_string(),
                enabled: s.enabled,
            })
            .collect();
        Ok(Response::new(ListSourcesResponse { sources }))
    }
}
