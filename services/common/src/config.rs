//! Typed configuration, layered: built-in defaults < optional file (TOML) < `HERALD__SECTION__KEY`
//! environment variables. Each service crate defines its own section; the binary composes them.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of configuration environment variables; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "HERALD__";

/// Errors while loading configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable did not fit the typed config.
    #[error(
        "invalid configuration: {0} (check the config file and HERALD__* environment variables)"
    )]
    Invalid(#[from] Box<figment::Error>),
    /// The config file does not exist.
    #[error(
        "config file {0} not found: pass an existing file with --config, or none to use defaults"
    )]
    MissingFile(PathBuf),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Value(String),
}

/// Loads `T` from its defaults, then `extra` (if any), then the file, then the environment.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    extra: Option<Figment>,
) -> Result<T, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(extra) = extra {
        fig = fig.merge(extra);
    }
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_path_buf()));
        }
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::prefixed(ENV_PREFIX).split("__"));
    fig.extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// A secret string: deserialised like a string, redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret's value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// How to reach NATS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Comma-separated server URLs, e.g. `nats://a:4222,nats://b:4222`.
    pub servers: String,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<Secret>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// Path of a `.creds` file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// NKey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// CA certificate (PEM) to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
    /// Require TLS even without certificates configured.
    pub tls_required: bool,
    /// Timeout of one JetStream API call or publish acknowledgement.
    pub request_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            request_timeout_ms: 5_000,
        }
    }
}

/// Names and limits of the streams and buckets every service agrees on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Prefix of subjects, streams and buckets: lower-case letters, digits and `-`.
    pub prefix: String,
    /// Number of partitions events are spread over by partition key.
    pub partitions: u32,
    /// Stream replicas: 1 in development, 3 in production.
    pub replicas: usize,
    /// JetStream duplicate window for Nats-Msg-Id deduplication.
    pub duplicate_window_seconds: u64,
    /// Maximum bytes of the events stream (-1: unlimited). Full means 429/503 at ingest.
    pub events_max_bytes: i64,
    /// Maximum bytes of the processed stream (-1: unlimited).
    pub processed_max_bytes: i64,
    /// How long processed events are kept for replay.
    pub processed_max_age_seconds: u64,
    /// How long quarantine records are kept before JetStream expires them.
    pub quarantine_max_age_seconds: u64,
    /// Maximum bytes of the quarantine stream (-1: unlimited). When full, new records are
    /// refused (DiscardNew): NATS intake stops acking and HTTP batches with invalid items get 503.
    pub quarantine_max_bytes: i64,
    /// Maximum bytes of the NATS intake stream (-1: unlimited). When full, producers' publishes
    /// to `<prefix>.in.<source>` fail and they must retry.
    pub intake_max_bytes: i64,
    /// How long dead letters (the activator's DLQ) are kept before JetStream expires them.
    pub dlq_max_age_seconds: u64,
    /// Maximum bytes of the DLQ stream (-1: unlimited). When full, new dead letters are
    /// refused (DiscardNew): the failing event is retried until there is room.
    pub dlq_max_bytes: i64,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            prefix: "herald".into(),
            partitions: 16,
            replicas: 1,
            duplicate_window_seconds: 600,
            events_max_bytes: -1,
            processed_max_bytes: -1,
            processed_max_age_seconds: 7 * 24 * 3600,
            quarantine_max_age_seconds: 30 * 24 * 3600,
            quarantine_max_bytes: -1,
            intake_max_bytes: -1,
            dlq_max_age_seconds: 14 * 24 * 3600,
            dlq_max_bytes: -1,
        }
    }
}

impl TopologyConfig {
    /// Checks the values a service cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.prefix.is_empty()
            && self
                .prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(ConfigError::Value(format!(
                "topology.prefix {:?} must be lower-case letters, digits and '-'",
                self.prefix
            )));
        }
        if self.partitions == 0 {
            return Err(ConfigError::Value(
                "topology.partitions must be at least 1".into(),
            ));
        }
        // JetStream refuses a stream whose duplicate window is longer than its max age (0 is
        // no age limit).
        for (name, age) in [
            ("processed_max_age_seconds", self.processed_max_age_seconds),
            (
                "quarantine_max_age_seconds",
                self.quarantine_max_age_seconds,
            ),
            ("dlq_max_age_seconds", self.dlq_max_age_seconds),
        ] {
            if age != 0 && age < self.duplicate_window_seconds {
                return Err(ConfigError::Value(format!(
                    "topology.{name} ({age}) is shorter than topology.duplicate_window_seconds \
                     ({}), which JetStream refuses: raise the max age or lower the duplicate window",
                    self.duplicate_window_seconds
                )));
            }
        }
        Ok(())
    }
}

/// Logging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `herald_ingest=debug,info`; `RUST_LOG` wins when set.
    pub filter: Option<String>,
    /// Log JSON lines instead of human-readable text.
    pub json: bool,
}

/// The control APIs (gRPC): the bearer token every control RPC must carry. Health and
/// reflection stay open.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The token itself (e.g. from `HERALD__CONTROL__TOKEN`).
    pub token: Option<Secret>,
    /// A file holding the token (e.g. a mounted Kubernetes secret); surrounding whitespace is
    /// ignored. Read once at start.
    pub token_file: Option<PathBuf>,
}

impl ControlConfig {
    /// A config with this token.
    pub fn with_token(token: impl Into<String>) -> Self {
        Self {
            token: Some(Secret(token.into())),
            token_file: None,
        }
    }

    /// The configured token: `token`, else the content of `token_file`. A service refuses to
    /// start without one.
    pub fn resolve_token(&self) -> Result<Secret, ConfigError> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Value(
                    "set only one of control.token and control.token_file".into(),
                ));
            }
            (Some(t), None) => t.expose().trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError::Value(format!(
                        "cannot read control.token_file {}: {e} (mount the token there, or set control.token)",
                        path.display()
                    ))
                })?
                .trim()
                .to_string(),
            (None, None) => {
                return Err(ConfigError::Value(
                    "no control token: set control.token or control.token_file \
                     (HERALD__CONTROL__TOKEN or a mounted file); admin commands pass the same \
                     token with --token or HERALD_TOKEN"
                        .into(),
                ));
            }
        };
        if token.is_empty() {
            return Err(ConfigError::Value(
                "the control token is empty: set control.token or control.token_file".into(),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Value(
                "the control token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(Secret(token))
    }
}

/// What every service shares.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommonConfig {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Stream and bucket names and limits.
    pub topology: TopologyConfig,
    /// The control APIs' bearer token.
    pub control: ControlConfig,
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Top {
        nats: NatsConfig,
        topology: TopologyConfig,
    }

    #[test]
    fn layers_defaults_file_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("h.toml", "[topology]\npartitions = 4\nprefix = \"file\"\n")?;
            jail.set_env("HERALD__TOPOLOGY__PREFIX", "env");
            let top: Top = load(Some(Path::new("h.toml")), None).expect("loads");
            assert_eq!(top.topology.partitions, 4);
            assert_eq!(top.topology.prefix, "env");
            assert_eq!(top.topology.duplicate_window_seconds, 600);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("h.toml", "[topology]\npartitionz = 4\n")?;
            let err = load::<Top>(Some(Path::new("h.toml")), None).unwrap_err();
            assert!(err.to_string().contains("partitionz"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_redacted() {
        let cfg = NatsConfig {
            password: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn control_token_from_value_or_file() {
        let err = ControlConfig::default().resolve_token().unwrap_err();
        assert!(
            err.to_string()
                .contains("set control.token or control.token_file"),
            "{err}"
        );
        let t = ControlConfig::with_token(" abc\n")
            .resolve_token()
            .expect("token");
        assert_eq!(t.expose(), "abc");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").expect("write");
        let cfg = ControlConfig {
            token: None,
            token_file: Some(path.clone()),
        };
        assert_eq!(cfg.resolve_token().expect("token").expose(), "from-file");
        let both = ControlConfig {
            token: Some(Secret("x".into())),
            token_file: Some(path),
        };
        assert!(both.resolve_token().is_err());
        let missing = ControlConfig {
            token: None,
            token_file: Some(dir.path().join("nope")),
        };
        assert!(
            missing
                .resolve_token()
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        for bad in ["", "  ", "has space"] {
            assert!(
                ControlConfig::with_token(bad).resolve_token().is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn prefix_is_checked() {
        let mut t = TopologyConfig::default();
        assert!(t.validate().is_ok());
        t.prefix = "Bad_Prefix".into();
        assert!(t.validate().is_err());
    }

    #[test]
    fn a_max_age_shorter_than_the_duplicate_window_is_refused() {
        let mut t = TopologyConfig {
            processed_max_age_seconds: 60,
            ..Default::default()
        };
        let e = t.validate().expect_err("refused").to_string();
        assert!(
            e.contains("topology.processed_max_age_seconds (60)")
                && e.contains("duplicate_window_seconds (600)"),
            "{e}"
        );
        t.duplicate_window_seconds = 60;
        assert!(t.validate().is_ok());
        t.processed_max_age_seconds = 0;
        t.dlq_max_age_seconds = 30;
        assert!(t.validate().is_err());
    }
}
