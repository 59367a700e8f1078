//! The whole configuration file: one section per service plus the shared ones.

use std::path::{Path, PathBuf};

use figment::Figment;
use herald_activator::ActivatorConfig;
use herald_common::server::BindError;
use herald_common::{
    CommonConfig, ConfigError, ControlConfig, LogConfig, NatsConfig, TopologyConfig,
};
use herald_ingest::IngestConfig;
use herald_processor::ProcessorConfig;
use serde::{Deserialize, Serialize};

/// Herald's configuration: defaults < file < `HERALD__SECTION__KEY` env.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Stream and bucket names and limits.
    pub topology: TopologyConfig,
    /// Logging.
    pub log: LogConfig,
    /// The control APIs' bearer token (`control.token` or `control.token_file`).
    pub control: ControlConfig,
    /// The ingest service.
    pub ingest: IngestConfig,
    /// The processor service.
    pub processor: ProcessorConfig,
    /// The activator service.
    pub activator: ActivatorConfig,
}

impl Config {
    /// Loads the config, with `extra` layered between the defaults and the file; an error
    /// carries a hint about where to look.
    pub fn load(file: Option<&Path>, extra: Option<Figment>) -> anyhow::Result<Self> {
        Self::load_checked(file, extra).map_err(|e| {
            let place = match file {
                Some(f) => format!("{} and the HERALD__* variables", f.display()),
                None => "the HERALD__* variables".into(),
            };
            crate::output::hint(
                e,
                format!("check {place}; docs/operations.md lists every key"),
            )
        })
    }

    fn load_checked(file: Option<&Path>, extra: Option<Figment>) -> Result<Self, ConfigError> {
        let cfg: Config = herald_common::config::load(file, extra)?;
        cfg.topology.validate()?;
        Ok(cfg)
    }

    /// The sections every service shares.
    pub fn common(&self) -> CommonConfig {
        CommonConfig {
            nats: self.nats.clone(),
            topology: self.topology.clone(),
            control: self.control.clone(),
        }
    }
}

/// `--config`, on the commands that load the configuration (the roles and `herald dev`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// TOML config file (layered over defaults; HERALD__SECTION__KEY env vars win).
    #[arg(long, short, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The arguments of a service role (`herald ingest`, `processor`, `activator`).
#[derive(Debug, clap::Args)]
pub struct RoleArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Tokio worker threads. The processor and the activator run one by default: a replica's
    /// work is many small tasks, which a second thread only passes back and forth, and they
    /// scale out by replicas over partitions. Ingest runs one per CPU by default.
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

/// One address a service listens on: where it is configured and what it serves.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    /// The config section (`ingest`, `processor`, `activator`).
    pub section: &'static str,
    /// The key in the section (`http_addr`, ...).
    pub key: &'static str,
    /// What the port serves, for messages ("HTTP API port").
    pub what: &'static str,
}

impl Listen {
    /// The `HERALD__SECTION__KEY` variable that sets it.
    pub fn env_var(&self) -> String {
        format!(
            "HERALD__{}__{}",
            self.section.to_uppercase(),
            self.key.to_uppercase()
        )
    }
}

impl Config {
    /// Every address the services listen on, with its configured value.
    pub fn listens(&self) -> [(Listen, &str); 8] {
        let l = |section, key, what| Listen { section, key, what };
        [
            (
                l("ingest", "http_addr", "HTTP API port"),
                &self.ingest.http_addr,
            ),
            (
                l("ingest", "grpc_addr", "gRPC control port"),
                &self.ingest.grpc_addr,
            ),
            (
                l("ingest", "admin_addr", "admin port"),
                &self.ingest.admin_addr,
            ),
            (
                l("processor", "http_addr", "profile API port"),
                &self.processor.http_addr,
            ),
            (
                l("processor", "grpc_addr", "gRPC control port"),
                &self.processor.grpc_addr,
            ),
            (
                l("processor", "admin_addr", "admin port"),
                &self.processor.admin_addr,
            ),
            (
                l("activator", "grpc_addr", "gRPC control port"),
                &self.activator.grpc_addr,
            ),
            (
                l("activator", "admin_addr", "admin port"),
                &self.activator.admin_addr,
            ),
        ]
    }

    /// Adds a hint to a service's start error when an address could not be bound: which
    /// setting it is and how to move it. `run` is the command that was run (`herald dev`,
    /// `herald ingest`); `flags` maps a `section.key` to the command's flag for it.
    pub fn bind_hint(
        &self,
        err: anyhow::Error,
        run: &str,
        flags: &[(&str, &str)],
    ) -> anyhow::Error {
        let Some(bind) = err.chain().find_map(|c| c.downcast_ref::<BindError>()) else {
            return err;
        };
        let Some((listen, _)) = self.listens().into_iter().find(|(_, v)| *v == bind.addr) else {
            return err;
        };
        let setting = format!("{}.{}", listen.section, listen.key);
        let how = match flags.iter().find(|(k, _)| *k == setting) {
            Some((_, flag)) => format!("{flag} / {}", listen.env_var()),
            None => format!("{setting} in --config / {}", listen.env_var()),
        };
        let why = if bind.source.kind() == std::io::ErrorKind::AddrInUse {
            format!("{} is in use: another {run}? stop it, or", bind.addr)
        } else {
            format!("{} cannot be used:", bind.addr)
        };
        let hint = format!("{why} move {}'s {} with {how}", listen.section, listen.what);
        crate::output::hint(err, hint)
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Toml};

    use super::*;

    #[test]
    fn every_service_has_a_shutdown_timeout_defaulting_to_10_seconds() {
        let defaults = Config::load(None, None).expect("defaults load");
        assert_eq!(defaults.ingest.shutdown_timeout_seconds, 10);
        assert_eq!(defaults.processor.shutdown_timeout_seconds, 10);
        assert_eq!(defaults.activator.shutdown_timeout_seconds, 10);
        let file = Toml::string(
            "[ingest]\nshutdown_timeout_seconds = 3\n\
             [processor]\nshutdown_timeout_seconds = 25\n\
             [activator]\nshutdown_timeout_seconds = 40\n",
        );
        let cfg = Config::load(None, Some(Figment::from(file))).expect("loads");
        assert_eq!(cfg.ingest.shutdown_timeout_seconds, 3);
        assert_eq!(cfg.processor.shutdown_timeout_seconds, 25);
        assert_eq!(cfg.activator.shutdown_timeout_seconds, 40);
    }
}
