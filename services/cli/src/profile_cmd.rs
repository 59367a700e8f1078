//! `herald profile get`, `herald erase`, `herald suppress`, `herald unsuppress`,
//! `herald erasure status`: the processor's ProfileService.

use anyhow::{Result, bail};
use herald_proto::v1::profile_service_client::ProfileServiceClient;
use herald_proto::v1::{
    EraseRequest, ErasureState, ErasureStatus, GetErasureStatusRequest, GetProfileRequest,
    Identity, Profile, SuppressRequest, UnsuppressRequest,
};

use crate::control::{AuthChannel, Control, rpc_error};
use crate::output::outln;

/// `herald profile <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Show the profile an identity belongs to, e.g. `herald profile get email:ann@example.com`.
    Get {
        /// `<type>:<value>`, e.g. `user_id:42`, `email:ann@example.com`, `anonymous_id:…`.
        identity: String,
    },
}

/// `herald erasure <command>`.
#[derive(Debug, clap::Subcommand)]
pub enum ErasureCommand {
    /// Show where an erasure (or suppression) request stands, with its audit record.
    Status {
        /// The request id `herald erase` (or `herald suppress`) printed.
        request_id: String,
    },
}

/// Parses `<type>:<value>`.
pub fn parse_identity(s: &str) -> Result<Identity> {
    match s.split_once(':') {
        Some((kind, value)) if !kind.trim().is_empty() && !value.trim().is_empty() => {
            Ok(Identity {
                r#type: kind.trim().to_string(),
                value: value.trim().to_string(),
            })
        }
        _ => bail!(
            "{s:?} is not an identity: write <type>:<value>, e.g. email:ann@example.com or \
             user_id:42"
        ),
    }
}

async fn client(control: &Control) -> Result<ProfileServiceClient<AuthChannel>> {
    Ok(ProfileServiceClient::new(control.channel().await?))
}

fn err(e: tonic::Status) -> anyhow::Error {
    rpc_error("processor", e)
}

fn show_identities(ids: &[Identity]) -> String {
    ids.iter()
        .map(|i| format!("{}:{}", i.r#type, i.value))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_time(ts: &Option<prost_types::Timestamp>) -> String {
    crate::output::time(ts.as_ref(), chrono::SecondsFormat::Millis)
}

fn print_profile(p: &Profile) {
    outln!("profile      {}", p.id);
    outln!("identities   {}", show_identities(&p.identities));
    outln!("first seen   {}", show_time(&p.first_seen));
    outln!("last seen    {}", show_time(&p.last_seen));
    let mut counts: Vec<_> = p.event_counts.iter().collect();
    counts.sort();
    let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    outln!("events       {} ({})", p.event_count, counts.join(", "));
    match &p.consent {
        None => outln!("consent      none recorded"),
        Some(c) => {
            let mut purposes: Vec<_> = c.purposes.iter().collect();
            purposes.sort();
            let purposes: Vec<String> = purposes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            outln!(
                "consent      {}{} (updated {})",
                purposes.join(" "),
                if c.opted_out { " OPTED OUT" } else { "" },
                show_time(&c.updated_at)
            );
        }
    }
    if !p.merged_from.is_empty() {
        outln!("merged from  {}", p.merged_from.join(", "));
    }
    let mut traits: Vec<_> = p.traits.iter().collect();
    traits.sort_by(|a, b| a.0.cmp(b.0));
    outln!("traits");
    for (k, t) in traits {
        outln!("  {k} = {}", t.value_json);
    }
}

fn print_status(s: &ErasureStatus) {
    let state = ErasureState::try_from(s.state)
        .map(|st| {
            st.as_str_name()
                .trim_start_matches("ERASURE_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    outln!("request      {}", s.request_id);
    outln!("kind         {}", s.request);
    outln!(
        "identity     {}",
        s.identity
            .as_ref()
            .map(|i| format!("{}:{}", i.r#type, i.value))
            .unwrap_or_default()
    );
    outln!("state        {state}");
    if !s.profile_id.is_empty() {
        outln!("profile      {}", s.profile_id);
    }
    if !s.erased_profiles.is_empty() {
        outln!("erased       {}", s.erased_profiles.join(", "));
    }
    outln!("identities   {}", show_identities(&s.identities));
    if s.request == "erase" {
        outln!("events       {}", s.events_published);
    }
    outln!("requested    {}", show_time(&s.requested_at));
    outln!("completed    {}", show_time(&s.completed_at));
    if !s.error.is_empty() {
        outln!("error        {}", s.error);
    }
}

/// `herald profile get <type>:<value>`.
pub async fn profile(cmd: ProfileCommand, control: &Control) -> Result<()> {
    match cmd {
        ProfileCommand::Get { identity } => {
            let identity = parse_identity(&identity)?;
            let res = client(control)
                .await?
                .get_profile(GetProfileRequest {
                    identity: Some(identity),
                })
                .await
                .map_err(err)?
                .into_inner();
            if let Some(p) = res.profile {
                print_profile(&p);
            }
        }
    }
    Ok(())
}

/// `herald erase <type>:<value>`.
pub async fn erase(identity: &str, control: &Control) -> Result<()> {
    let identity = parse_identity(identity)?;
    let res = client(control)
        .await?
        .erase(EraseRequest {
            identity: Some(identity),
        })
        .await
        .map_err(err)?
        .into_inner();
    let status = res.status.unwrap_or_default();
    print_status(&status);
    if status.state != ErasureState::Completed as i32 {
        bail!(
            "erasure {} did not complete: {}; run `herald erase` again",
            status.request_id,
            status.error
        );
    }
    Ok(())
}

/// `herald suppress <type>:<value>`.
pub async fn suppress(identity: &str, control: &Control) -> Result<()> {
    let identity = parse_identity(identity)?;
    let res = client(control)
        .await?
        .suppress(SuppressRequest {
            identity: Some(identity),
        })
        .await
        .map_err(err)?
        .into_inner();
    outln!("request      {}", res.request_id);
    outln!("suppressed   {}", show_identities(&res.identities));
    Ok(())
}

/// `herald unsuppress <type>:<value>`.
pub async fn unsuppress(identity: &str, control: &Control) -> Result<()> {
    let identity = parse_identity(identity)?;
    let res = client(control)
        .await?
        .unsuppress(UnsuppressRequest {
            identity: Some(identity),
        })
        .await
        .map_err(err)?
        .into_inner();
    if res.identities.is_empty() {
        outln!("not suppressed");
    } else {
        outln!("unsuppressed {}", show_identities(&res.identities));
    }
    Ok(())
}

/// `herald erasure status <request id>`.
pub async fn erasure(cmd: ErasureCommand, control: &Control) -> Result<()> {
    match cmd {
        ErasureCommand::Status { request_id } => {
            let res = client(control)
                .await?
                .get_erasure_status(GetErasureStatusRequest { request_id })
                .await
                .map_err(err)?
                .into_inner();
            print_status(&res.status.unwrap_or_default());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse() {
        let i = parse_identity("email:ann@example.com").expect("valid");
        assert_eq!(
            (i.r#type.as_str(), i.value.as_str()),
            ("email", "ann@example.com")
        );
        let i = parse_identity("user_id:a:b").expect("valid");
        assert_eq!(i.value, "a:b");
        for bad in ["ann@example.com", "email:", ":x", ""] {
            assert!(parse_identity(bad).is_err(), "{bad:?}");
        }
    }
}
