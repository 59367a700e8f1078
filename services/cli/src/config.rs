//! The whole configuration file: one section per service plus the shared ones.

use std::path::Path;

use figment::Figment;
use herald_activator::ActivatorConfig;
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
    /// Loads the config, with `extra` layered between the defaults and the file.
    pub fn load(file: Option<&Path>, extra: Option<Figment>) -> Result<Self, ConfigError> {
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
