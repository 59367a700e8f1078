//! Telemetry of the shared plumbing: one struct per thing that happens, whose `emit()` writes
//! the log line and updates its metric together (only [`RuntimeStarted`] has one).

use std::time::Duration;

/// A supervised server or task failed (returned an error or panicked): the service stops.
pub(crate) struct UnitFailed<'a> {
    /// `ingest`, `processor`, `activator`.
    pub service: &'static str,
    /// The server or task, e.g. `grpc`.
    pub unit: &'a str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl UnitFailed<'_> {
    /// Logs it: an operator must act.
    pub fn emit(self) {
        tracing::error!(
            service = self.service,
            unit = self.unit,
            error = %self.error,
            "{} {} failed; stopping the service",
            self.service,
            self.unit
        );
    }
}

/// The service stops (shutdown signal, or a failed unit): in-flight work is finished within
/// the shutdown timeout.
pub(crate) struct ServiceStopping {
    /// The service.
    pub service: &'static str,
    /// `<service>.shutdown_timeout_seconds`.
    pub timeout: Duration,
}

impl ServiceStopping {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(
            service = self.service,
            timeout_seconds = self.timeout.as_secs_f64(),
            "{} stopping: finishing in-flight work",
            self.service
        );
    }
}

/// Shutdown ran out of time: what had not finished is abandoned (unacked messages are
/// redelivered after their ack wait).
pub(crate) struct ShutdownTimedOut<'a> {
    /// The service.
    pub service: &'static str,
    /// `<service>.shutdown_timeout_seconds`.
    pub timeout: Duration,
    /// The servers and tasks still running, and `nats drain` when the NATS connection had not
    /// drained.
    pub unfinished: &'a [&'a str],
}

impl ShutdownTimedOut<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            service = self.service,
            timeout_seconds = self.timeout.as_secs_f64(),
            unfinished = ?self.unfinished,
            "{} did not finish shutting down within its shutdown timeout; stopping anyway \
             (raise {}.shutdown_timeout_seconds if this repeats)",
            self.service,
            self.service
        );
    }
}

/// Draining the NATS connection failed at shutdown.
pub(crate) struct DrainFailed<'a> {
    /// The service.
    pub service: &'static str,
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl DrainFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(service = self.service, error = %self.error, "draining the NATS connection failed");
    }
}

/// The service has stopped.
pub(crate) struct ServiceStopped {
    /// The service.
    pub service: &'static str,
}

impl ServiceStopped {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(service = self.service, "{} stopped", self.service);
    }
}

/// This replica's suppression list did not catch up with a request's revision in time.
pub(crate) struct SuppressionsBehind {
    /// The revision waited for.
    pub revision: u64,
}

impl SuppressionsBehind {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            revision = self.revision,
            "the suppression list did not catch up in time; it will shortly"
        );
    }
}

/// The suppression list's watch failed; the list is read again.
pub(crate) struct SuppressionWatchFailed<'a> {
    /// What failed.
    pub error: &'a dyn std::fmt::Display,
}

impl SuppressionWatchFailed<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(error = %self.error, "suppression watch failed; re-reading the list");
    }
}

/// A service role started its tokio runtime: how many worker threads it has (`herald <role>
/// --worker-threads`).
pub struct RuntimeStarted {
    /// `ingest`, `processor`, `activator`.
    pub service: &'static str,
    /// The runtime's worker threads.
    pub worker_threads: usize,
}

impl RuntimeStarted {
    /// Logs it and sets `herald_runtime_worker_threads`.
    pub fn emit(self) {
        metrics::describe_gauge!(
            "herald_runtime_worker_threads",
            "Tokio worker threads of this service process (herald <role> --worker-threads; the processor and the activator run one unless told otherwise)."
        );
        metrics::gauge!("herald_runtime_worker_threads").set(self.worker_threads as f64);
        tracing::info!(
            service = self.service,
            worker_threads = self.worker_threads,
            "{} runs {} tokio worker thread(s)",
            self.service,
            self.worker_threads
        );
    }
}
