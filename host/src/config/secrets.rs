//! Secrets read from the environment or a file, never written in the config:
//! `SecretSource` (a plugin's `[plugin.secrets]`) and `[credentials]`.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// `[credentials]`: where the host reads the access key and secret key of
/// the RocketMQ user it connects as; like a plugin's secrets, never
/// written in the config itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub access_key: SecretSource,
    pub secret_key: SecretSource,
}

impl CredentialsConfig {
    /// Both keys, read now; the error names where each was looked for.
    pub fn read(&self) -> Result<crate::mq::Credentials, ConfigError> {
        let read = |what: &str, source: &SecretSource| {
            source
                .read()
                .map_err(|why| ConfigError::Credentials(format!("{what}: {why}")))
        };
        Ok(crate::mq::Credentials {
            access_key: read("access_key", &self.access_key)?,
            secret_key: read("secret_key", &self.secret_key)?,
        })
    }
}

/// Where the host reads one secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "where to read the secret: { env = \"VARIABLE\" } or { file = \"/path\" } \
                 (a secret's value is never written in the config)"
)]
pub struct SecretSource {
    /// An environment variable of the host process.
    pub env: Option<String>,
    /// A file (relative paths are relative to the config file); one
    /// trailing newline is dropped.
    pub file: Option<PathBuf>,
}

/// Longest config key or secret name.
pub const MAX_CONFIG_KEY_BYTES: usize = 256;

/// Longest config value or secret.
pub const MAX_CONFIG_VALUE_BYTES: usize = 64 * 1024;

impl SecretSource {
    /// The secret's value; the error names where it was looked for, never
    /// what was found.
    pub(super) fn read(&self) -> Result<String, String> {
        let whence = match (&self.env, &self.file) {
            (Some(var), None) => format!("environment variable {var}"),
            (None, Some(path)) => format!("file {}", path.display()),
            _ => String::new(),
        };
        let mut value = match (&self.env, &self.file) {
            (Some(var), None) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} is not set (or not UTF-8)"))?,
            (None, Some(path)) => {
                let bytes = std::fs::read(path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
                String::from_utf8(bytes)
                    .map_err(|_| format!("{} is not UTF-8 text", path.display()))?
            }
            _ => return Err("give exactly one of `env` or `file`".into()),
        };
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        if value.is_empty() {
            return Err(format!("{whence} is empty"));
        }
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(format!("{whence} is over {MAX_CONFIG_VALUE_BYTES} bytes"));
        }
        Ok(value)
    }
}
