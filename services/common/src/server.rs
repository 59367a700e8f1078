//! Serving HTTP (axum) and gRPC (tonic, with health and reflection) on bound listeners, with
//! graceful shutdown.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::auth::ControlAuth;

/// Errors of binding or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("{0}")]
    Bind(#[source] BindError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// An address that could not be bound, with the OS error as its source. It stays in the error
/// chain of a service's start error, so a caller can tell which address (and so which setting)
/// it was: the `herald` CLI names the flag and environment variable that move that port.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    /// The address, as configured.
    pub addr: String,
    /// The cause (e.g. `AddrInUse`).
    #[source]
    pub source: std::io::Error,
}

/// Binds an address such as `127.0.0.1:0`.
pub async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| {
        ServeError::Bind(BindError {
            addr: addr.to_string(),
            source,
        })
    })
}

/// The bound address of a listener.
pub fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("a bound TCP listener has an address")
}

/// Serves an axum router until `shutdown`, then drains connections.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ServeError::Http)
}

/// Serves gRPC `routes` plus grpc.health.v1 (reporting `service_name` and the whole server as
/// serving) and reflection over Herald's descriptors, until `shutdown`. Every call to `routes`
/// must carry the control token `auth` checks; health and reflection stay open.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    service_name: &str,
    auth: ControlAuth,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("Herald's descriptor set is valid");
    // An axum layer wraps only the routes added before it: the control services (and the
    // fallback for unknown ones), not health and reflection added after.
    let control = routes
        .into_axum_router()
        .layer(tonic::service::InterceptorLayer::new(auth));
    let routes = Routes::from(control)
        .add_service(health)
        .add_service(reflection);
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}

/// A token cancelled on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received: finishing in-flight work");
        t.cancel();
    });
    token
}

/// A started service: the addresses it bound (port 0 resolved) and its task, which ends after
/// the shutdown token fires and in-flight work is finished.
#[derive(Debug)]
pub struct ServiceHandle {
    /// The service's name (`ingest`, `processor`, `activator`).
    pub name: &'static str,
    /// The public HTTP address, where the service has one.
    pub http_addr: Option<SocketAddr>,
    /// The gRPC control address.
    pub grpc_addr: SocketAddr,
    /// The admin address (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// Ends when the service has stopped.
    pub task: tokio::task::JoinHandle<()>,
}
