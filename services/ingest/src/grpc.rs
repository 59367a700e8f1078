//! The gRPC control API for sources (`herald.v1.SourceService`). The bearer token is checked by
//! the server ([`herald_common::server::serve_grpc`]), not here.

use herald_proto::v1 as pb;
use herald_proto::v1::source_service_server::{SourceService, SourceServiceServer};
use tonic::{Request, Response, Status};

use crate::config::SourceSettings;
use crate::source_registry::SourceRecord;
use crate::source_store::{NewSource, SourceError, SourceStore};

/// The fully qualified gRPC service name, as reported by grpc.health.v1.
pub const SERVICE_NAME: &str = "herald.v1.SourceService";

/// Implements `SourceService` over the sources in the config bucket.
#[derive(Clone)]
pub struct SourceGrpc {
    store: SourceStore,
}

impl SourceGrpc {
    /// The service over this store.
    pub fn new(store: SourceStore) -> Self {
        Self { store }
    }

    /// The tonic server wrapping it.
    pub fn into_server(self) -> SourceServiceServer<Self> {
        SourceServiceServer::new(self)
    }
}

fn status(e: SourceError) -> Status {
    let message = e.to_string();
    match e {
        SourceError::NotFound(_) => Status::not_found(message),
        SourceError::AlreadyExists(_) | SourceError::KeyInUse => Status::already_exists(message),
        SourceError::Invalid(_) => Status::invalid_argument(message),
        SourceError::Unavailable(_) => Status::unavailable(message),
        SourceError::Conflict(_) => Status::aborted(message),
    }
}

/// The API's view of a stored source.
pub fn to_proto(r: &SourceRecord) -> pb::Source {
    pb::Source {
        id: r.id.clone(),
        name: r.name.clone(),
        enabled: r.enabled,
        settings: Some(pb::SourceSettings {
            atomic_publish: r.settings.atomic_publish,
            rate_limit_per_second: r.settings.rate_limit_per_second,
            rate_limit_burst: r.settings.rate_limit_burst,
        }),
        has_write_secret: r.write_secret_sha256.is_some(),
        from_config: r.config_sha256.is_some(),
        created_at: Some(herald_proto::time::to_proto(r.created_at)),
        updated_at: Some(herald_proto::time::to_proto(r.updated_at)),
    }
}

fn settings(s: Option<pb::SourceSettings>) -> SourceSettings {
    s.map(|s| SourceSettings {
        atomic_publish: s.atomic_publish,
        rate_limit_per_second: s.rate_limit_per_second,
        rate_limit_burst: s.rate_limit_burst,
    })
    .unwrap_or_default()
}

#[tonic::async_trait]
impl SourceService for SourceGrpc {
    async fn create_source(
        &self,
        request: Request<pb::CreateSourceRequest>,
    ) -> Result<Response<pb::CreateSourceResponse>, Status> {
        let r = request.into_inner();
        let (record, creds) = self
            .store
            .create(NewSource {
                id: r.id,
                name: r.name,
                write_key: r.write_key,
                write_secret: r.write_secret,
                settings: settings(r.settings),
            })
            .await
            .map_err(status)?;
        tracing::info!(source = %record.id, "source created");
        Ok(Response::new(pb::CreateSourceResponse {
            source: Some(to_proto(&record)),
            write_key: creds.write_key,
            write_secret: creds.write_secret,
        }))
    }

    async fn list_sources(
        &self,
        _request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let records = self.store.list().await.map_err(status)?;
        Ok(Response::new(pb::ListSourcesResponse {
            sources: records.iter().map(to_proto).collect(),
        }))
    }

    async fn get_source(
        &self,
        request: Request<pb::GetSourceRequest>,
    ) -> Result<Response<pb::GetSourceResponse>, Status> {
        let record = self
            .store
            .get(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetSourceResponse {
            source: Some(to_proto(&record)),
        }))
    }

    async fn rotate_source_key(
        &self,
        request: Request<pb::RotateSourceKeyRequest>,
    ) -> Result<Response<pb::RotateSourceKeyResponse>, Status> {
        let r = request.into_inner();
        let (record, creds) = self
            .store
            .rotate(&r.id, r.write_key, r.write_secret)
            .await
            .map_err(status)?;
        tracing::info!(source = %record.id, "source key rotated");
        Ok(Response::new(pb::RotateSourceKeyResponse {
            source: Some(to_proto(&record)),
            write_key: creds.write_key,
            write_secret: creds.write_secret,
        }))
    }

    async fn disable_source(
        &self,
        request: Request<pb::DisableSourceRequest>,
    ) -> Result<Response<pb::DisableSourceResponse>, Status> {
        let record = self
            .store
            .set_enabled(&request.into_inner().id, false)
            .await
            .map_err(status)?;
        tracing::info!(source = %record.id, "source disabled");
        Ok(Response::new(pb::DisableSourceResponse {
            source: Some(to_proto(&record)),
        }))
    }

    async fn enable_source(
        &self,
        request: Request<pb::EnableSourceRequest>,
    ) -> Result<Response<pb::EnableSourceResponse>, Status> {
        let record = self
            .store
            .set_enabled(&request.into_inner().id, true)
            .await
            .map_err(status)?;
        tracing::info!(source = %record.id, "source enabled");
        Ok(Response::new(pb::EnableSourceResponse {
            source: Some(to_proto(&record)),
        }))
    }

    async fn delete_source(
        &self,
        request: Request<pb::DeleteSourceRequest>,
    ) -> Result<Response<pb::DeleteSourceResponse>, Status> {
        let id = request.into_inner().id;
        self.store.delete(&id).await.map_err(status)?;
        tracing::info!(source = %id, "source deleted");
        Ok(Response::new(pb::DeleteSourceResponse {}))
    }
}
