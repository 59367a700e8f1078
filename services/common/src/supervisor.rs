//! The one service supervisor: it runs a service's servers and tasks, stops all of them when one
//! fails, and on shutdown drains within a timeout.
//!
//! A service's `start()` binds its listeners, creates a [`Supervisor`], spawns every server and
//! long-running task through it (each stops on [`Supervisor::token`]), and hands it the NATS
//! client with [`Supervisor::finish`], which returns the [`ServiceHandle`]. Then:
//! - a server or task that returns an error or panics cancels the token, so every other one
//!   stops too (the process should not limp on with its gRPC server gone);
//! - once the token is cancelled (the caller's shutdown token, e.g. SIGTERM, or a failure), the
//!   supervisor waits for every server and task to finish (workers finish their in-flight
//!   batch), then drains the NATS connection; all of that within the service's
//!   `shutdown_timeout_seconds`. Whatever has not finished by then is logged and aborted, and
//!   the handle's task ends anyway, so the pod exits before Kubernetes' grace period runs out.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::Client;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::events::{DrainFailed, ServiceStopped, ServiceStopping, ShutdownTimedOut, UnitFailed};
use crate::server::ServiceHandle;

/// Default of `<service>.shutdown_timeout_seconds`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 10;

/// The name [`ShutdownTimedOut`] gives a NATS connection that had not drained in time.
const NATS_DRAIN: &str = "nats drain";

/// One supervised server or task.
struct Unit {
    name: Cow<'static, str>,
    /// Aborts the unit itself when shutdown runs out of time.
    abort: AbortHandle,
    /// Ends when the unit has ended (and reported a failure).
    watcher: JoinHandle<()>,
}

/// Runs a service's servers and tasks; see the module docs.
pub struct Supervisor {
    service: &'static str,
    stop: CancellationToken,
    shutdown_timeout: Duration,
    units: Vec<Unit>,
}

impl Supervisor {
    /// A supervisor for `service` (`ingest`, `processor`, `activator`) that stops when
    /// `shutdown` fires and gives shutdown `shutdown_timeout` to finish.
    pub fn new(
        service: &'static str,
        shutdown: &CancellationToken,
        shutdown_timeout: Duration,
    ) -> Self {
        Self {
            service,
            stop: shutdown.child_token(),
            shutdown_timeout,
            units: Vec::new(),
        }
    }

    /// The token every server and task of the service stops on: cancelled by the caller's
    /// shutdown token, or when one of them fails.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs a server, or a task that can fail: when it returns an error or panics, the whole
    /// service stops. `name` names it in logs (`http`, `grpc`, `admin`, `worker`).
    pub fn spawn<E>(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        unit: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: std::fmt::Display + Send + 'static,
    {
        let name = name.into();
        let task = tokio::spawn(unit);
        let abort = task.abort_handle();
        let (service, stop, unit_name) = (self.service, self.stop.clone(), name.clone());
        let watcher = tokio::spawn(async move {
            let error = match task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                // Aborted by the supervisor itself, after shutdown ran out of time.
                Err(e) if e.is_cancelled() => return,
                Err(e) => e.to_string(),
            };
            UnitFailed {
                service,
                unit: &unit_name,
                error: &error,
            }
            .emit();
            stop.cancel();
        });
        self.units.push(Unit {
            name,
            abort,
            watcher,
        });
    }

    /// Runs a task that cannot fail but may panic (a panic stops the whole service).
    pub fn spawn_task(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Hands over the NATS client (drained last at shutdown) and the bound addresses, and
    /// returns the handle whose task ends once the service has stopped (see the module docs).
    pub fn finish(
        self,
        client: Client,
        http_addr: Option<SocketAddr>,
        grpc_addr: SocketAddr,
        admin_addr: SocketAddr,
    ) -> ServiceHandle {
        let Self {
            service,
            stop,
            shutdown_timeout,
            mut units,
        } = self;
        let task = tokio::spawn(async move {
            stop.cancelled().await;
            ServiceStopping {
                service,
                timeout: shutdown_timeout,
            }
            .emit();
            let mut drained = false;
            let finished = tokio::time::timeout(shutdown_timeout, async {
                for unit in &mut units {
                    let _ = (&mut unit.watcher).await;
                }
                // Every request has been answered and every batch settled: hand what is
                // buffered to the server and close.
                if let Err(e) = client.drain().await {
                    DrainFailed { service, error: &e }.emit();
                }
                drained = true;
            })
            .await;
            if finished.is_err() {
                let mut unfinished: Vec<&str> = units
                    .iter()
                    .filter(|u| !u.abort.is_finished())
                    .map(|u| u.name.as_ref())
                    .collect();
                if !drained {
                    unfinished.push(NATS_DRAIN);
                }
                ShutdownTimedOut {
                    service,
                    timeout: shutdown_timeout,
                    unfinished: &unfinished,
                }
                .emit();
                for unit in &units {
                    unit.abort.abort();
                    unit.watcher.abort();
                }
            }
            ServiceStopped { service }.emit();
        });
        ServiceHandle {
            name: service,
            http_addr,
            grpc_addr,
            admin_addr,
            task,
        }
    }
}
