//! What `wasi:config/store` gives one plugin: the values of its
//! `[plugin.config]` table and its secrets, and the redaction that keeps the
//! secrets out of the host's log.

use std::collections::BTreeMap;

use crate::wasm::bindings::v0_2::wasi::config::store;

/// Replaces a secret's value in a plugin's log line or `err` reason.
pub const REDACTED: &str = "[secret]";

/// One plugin's config values and secrets. Its `Debug` shows key names
/// only.
#[derive(Default)]
pub struct ConfigValues {
    values: BTreeMap<String, String>,
    /// Keys the plugin asked for that its entry does not grant.
    missing: super::noted::Noted,
    keys: Vec<String>,
    secret_keys: Vec<String>,
    /// Secret values, longest first, so a secret that contains another is
    /// redacted whole.
    secrets: Vec<String>,
}

impl ConfigValues {
    /// `config` values and resolved `secrets` (key to value); a secret's key
    /// shadows a config value of the same name.
    pub fn new(config: &BTreeMap<String, String>, secrets: BTreeMap<String, String>) -> Self {
        let mut variables = config.clone();
        let secret_keys: Vec<String> = secrets.keys().cloned().collect();
        let mut values = Vec::with_capacity(secrets.len());
        for (key, value) in secrets {
            variables.insert(key, value.clone());
            values.push(value);
        }
        values.retain(|value| !value.is_empty());
        values.sort_by_key(|value| std::cmp::Reverse(value.len()));
        values.dedup();
        ConfigValues {
            values: variables,
            missing: Default::default(),
            keys: config.keys().cloned().collect(),
            secret_keys,
            secrets: values,
        }
    }

    /// The value of `key`; a key not granted is remembered (see
    /// [`ConfigValues::missing`]) and, the first time, logged.
    pub fn get(&self, key: &str) -> Option<&str> {
        let value = self.values.get(key).map(String::as_str);
        if value.is_none() {
            let key =
                crate::text::inert_owned(key.to_string(), crate::config::MAX_CONFIG_KEY_BYTES);
            if self.missing.note(&key) {
                tracing::warn!(target: "mqplug::plugin", "asked for config key {key:?}, which its entry does not grant (neither [plugin.config] nor [plugin.secrets])");
            }
        }
        value
    }

    /// Every granted key with its value.
    pub fn all(&self) -> Vec<(String, String)> {
        self.values
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// Keys the plugin asked for that are not granted (at most 32).
    pub fn missing(&self) -> Vec<String> {
        self.missing.list()
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn redact(&self, text: String) -> String {
        if !self
            .secrets
            .iter()
            .any(|secret| text.contains(secret.as_str()))
        {
            return text;
        }
        let mut text = text;
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), REDACTED);
        }
        text
    }

    /// [`ConfigValues::redact`] for text written to disk: each secret
    /// also in the forms a URL or a JSON body carries it (percent-encoded,
    /// JSON-escaped).
    pub fn redact_every_form(&self, text: String) -> String {
        let mut text = self.redact(text);
        for secret in &self.secrets {
            let encoded = crate::text::percent_encoded(secret);
            let escaped = serde_json::to_string(secret).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            for form in [encoded.as_str(), escaped] {
                if form != secret && !form.is_empty() && text.contains(form) {
                    text = text.replace(form, REDACTED);
                }
            }
        }
        text
    }

    /// Whether `key` is a secret's.
    pub fn is_secret(&self, key: &str) -> bool {
        self.secret_keys.iter().any(|secret| secret == key)
    }

    /// The config keys, then the secret keys (names only).
    pub fn keys(&self) -> (&[String], &[String]) {
        (&self.keys, &self.secret_keys)
    }
}

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigValues")
            .field("keys", &self.keys)
            .field("secret_keys", &self.secret_keys)
            .finish_non_exhaustive()
    }
}

/// One instance's `wasi:config/store`: its plugin's values, nobody else's.
pub(crate) struct ConfigStore {
    pub(crate) values: std::sync::Arc<ConfigValues>,
    /// What the current event read, when the plugin records failures.
    pub(crate) tape: super::recording::Tape,
}

impl ConfigStore {
    /// Links `wasi:config/store`; `get` picks the instance's config out of
    /// the store's data.
    pub(crate) fn add_to_linker<T: Send + 'static>(
        linker: &mut wasmtime::component::Linker<T>,
        get: fn(&mut T) -> &mut ConfigStore,
    ) -> wasmtime::Result<()> {
        store::add_to_linker::<T, wasmtime::component::HasSelf<ConfigStore>>(linker, get)
    }
}

impl store::Host for ConfigStore {
    fn get(&mut self, key: String) -> Result<Option<String>, store::Error> {
        let value = self.values.get(&key);
        self.tape.config(&key, value, self.values.is_secret(&key));
        Ok(value.map(str::to_string))
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, store::Error> {
        let all = self.values.all();
        for (key, value) in &all {
            self.tape
                .config(key, Some(value), self.values.is_secret(key));
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_blanked_as_it_is_percent_encoded_and_json_escaped() {
        let secrets = [("token".to_string(), "a+b/c\"d".to_string())].into();
        let values = ConfigValues::new(&BTreeMap::new(), secrets);
        let text = r#"raw a+b/c"d url ?t=a%2Bb%2Fc%22d json "a+b/c\"d""#.to_string();
        assert_eq!(
            values.redact_every_form(text),
            r#"raw [secret] url ?t=[secret] json "[secret]""#
        );
    }

    fn values() -> ConfigValues {
        ConfigValues::new(
            &BTreeMap::from([("url".to_string(), "http://x".to_string())]),
            BTreeMap::from([
                ("token".to_string(), "s3cr3t".to_string()),
                ("long".to_string(), "s3cr3t-and-more".to_string()),
                ("empty".to_string(), String::new()),
            ]),
        )
    }

    #[test]
    fn secrets_are_redacted_whole_and_other_text_is_kept() {
        let values = values();
        assert_eq!(
            values.redact("a s3cr3t-and-more b s3cr3t c http://x".into()),
            "a [secret] b [secret] c http://x"
        );
        assert_eq!(values.redact("nothing here".into()), "nothing here");
    }

    #[test]
    fn debug_shows_key_names_and_never_values() {
        let shown = format!("{:?}", values());
        assert!(shown.contains("token") && shown.contains("url"), "{shown}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("http://x"),
            "{shown}"
        );
    }
}
