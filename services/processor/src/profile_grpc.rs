//! `herald.v1.ProfileService`: profiles by any identity, erasure and suppression. Served on the
//! processor's gRPC port behind the control token (checked by `herald_common::server`).

use std::sync::Arc;

use herald_proto::v1 as pb;
use herald_proto::v1::profile_service_server::ProfileService;
use tonic::{Request, Response, Status};

use crate::identity::IdentityKey;
use crate::profile::Profile;
use crate::resolver::Profiles;
use crate::store::{ErasureRecord, ErasureState, ProfileError};
use crate::timestamp::to_proto;

/// The gRPC service over a replica's [`Profiles`].
pub(crate) struct ProfileControl {
    pub profiles: Arc<Profiles>,
}

fn identity(i: Option<pb::Identity>) -> Result<IdentityKey, Status> {
    let i = i.unwrap_or_default();
    let key = IdentityKey::new(&i.r#type, &i.value);
    if key.kind.is_empty() || key.value.is_empty() {
        return Err(Status::invalid_argument(
            "identity needs a type and a value, e.g. type \"email\", value \"ann@example.com\"",
        ));
    }
    Ok(key)
}

fn status(e: ProfileError) -> Status {
    match e {
        ProfileError::NotReady | ProfileError::Kv { .. } => Status::unavailable(e.to_string()),
        ProfileError::Contended(_) => Status::aborted(e.to_string()),
        ProfileError::Corrupt { .. } => Status::internal(e.to_string()),
    }
}

fn proto_identity(k: &IdentityKey) -> pb::Identity {
    pb::Identity {
        r#type: k.kind.clone(),
        value: k.value.clone(),
    }
}

/// A stored profile in its protobuf form.
pub(crate) fn proto_profile(p: &Profile, revision: u64) -> pb::Profile {
    pb::Profile {
        id: p.id.clone(),
        identities: p.proto_identities(),
        traits: p
            .traits
            .iter()
            .filter(|(_, t)| !t.deleted)
            .map(|(k, t)| {
                (
                    k.clone(),
                    pb::ProfileTrait {
                        value_json: t.value.to_string(),
                        updated_at: Some(to_proto(t.at)),
                    },
                )
            })
            .collect(),
        first_seen: p.first_seen.map(to_proto),
        last_seen: p.last_seen.map(to_proto),
        event_count: p.event_count,
        event_counts: p
            .event_counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        consent: p.consent.snapshot(),
        merged_from: p.merged_from.clone(),
        revision,
        schema_version: p.schema_version,
        created_at: Some(to_proto(p.created_at)),
    }
}

fn proto_status(r: &ErasureRecord) -> pb::ErasureStatus {
    pb::ErasureStatus {
        request_id: r.request_id.clone(),
        request: r.request.clone(),
        identity: Some(proto_identity(&r.identity)),
        state: match r.state {
            ErasureState::Pending => pb::ErasureState::Pending,
            ErasureState::Completed => pb::ErasureState::Completed,
            ErasureState::Failed => pb::ErasureState::Failed,
        } as i32,
        profile_id: r.profile_id.clone().unwrap_or_default(),
        erased_profiles: r.erased_profiles.clone(),
        identities: r.identities.iter().map(proto_identity).collect(),
        events_published: r.events_published,
        requested_at: Some(to_proto(r.requested_at)),
        completed_at: r.completed_at.map(to_proto),
        error: r.error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl ProfileService for ProfileControl {
    async fn get_profile(
        &self,
        req: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let key = identity(req.into_inner().identity)?;
        match self.profiles.lookup(&key).await.map_err(status)? {
            Some((rev, p)) => Ok(Response::new(pb::GetProfileResponse {
                profile: Some(proto_profile(&p, rev)),
            })),
            None => Err(Status::not_found(format!("no profile has identity {key}"))),
        }
    }

    async fn erase(
        &self,
        req: Request<pb::EraseRequest>,
    ) -> Result<Response<pb::EraseResponse>, Status> {
        let key = identity(req.into_inner().identity)?;
        let record = self.profiles.erase(&key).await.map_err(status)?;
        Ok(Response::new(pb::EraseResponse {
            status: Some(proto_status(&record)),
        }))
    }

    async fn suppress(
        &self,
        req: Request<pb::SuppressRequest>,
    ) -> Result<Response<pb::SuppressResponse>, Status> {
        let key = identity(req.into_inner().identity)?;
        let record = self.profiles.suppress(&key).await.map_err(status)?;
        Ok(Response::new(pb::SuppressResponse {
            request_id: record.request_id.clone(),
            identities: record.identities.iter().map(proto_identity).collect(),
        }))
    }

    async fn unsuppress(
        &self,
        req: Request<pb::UnsuppressRequest>,
    ) -> Result<Response<pb::UnsuppressResponse>, Status> {
        let key = identity(req.into_inner().identity)?;
        let lifted = self.profiles.unsuppress(&key).await.map_err(status)?;
        Ok(Response::new(pb::UnsuppressResponse {
            identities: lifted.iter().map(proto_identity).collect(),
        }))
    }

    async fn get_erasure_status(
        &self,
        req: Request<pb::GetErasureStatusRequest>,
    ) -> Result<Response<pb::GetErasureStatusResponse>, Status> {
        let id = req.into_inner().request_id;
        match self.profiles.request_status(&id).await.map_err(status)? {
            Some(r) => Ok(Response::new(pb::GetErasureStatusResponse {
                status: Some(proto_status(&r)),
            })),
            None => Err(Status::not_found(format!("no request {id:?}"))),
        }
    }
}
