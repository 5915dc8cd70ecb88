//! What a changed config means for the running plugins, decided apart from
//! doing it: a pure function from the entries that run to the entries
//! wanted, unit-tested without a broker; `host` carries the steps out.

use std::collections::BTreeMap;

use crate::config::PluginConfig;

/// One thing to do to one plugin, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Removed from the config: drain and stop.
    Stop(String),
    /// Its entry changed: load the new build first, and only if it loads,
    /// stop the old consumer and start the new one.
    Restart(String),
    /// Added to the config: load and start.
    Start(String),
}

/// The steps from `running` to `wanted`: stops first, then restarts, then
/// starts, each in name order. Unchanged entries are left alone.
pub fn plan(
    running: &BTreeMap<String, PluginConfig>,
    wanted: &BTreeMap<String, PluginConfig>,
) -> Vec<Step> {
    let stops = running
        .keys()
        .filter(|name| !wanted.contains_key(*name))
        .map(|name| Step::Stop(name.clone()));
    let restarts = wanted
        .iter()
        .filter(|(name, entry)| running.get(*name).is_some_and(|old| old != *entry))
        .map(|(name, _)| Step::Restart(name.clone()));
    let starts = wanted
        .keys()
        .filter(|name| !running.contains_key(*name))
        .map(|name| Step::Start(name.clone()));
    stops.chain(restarts).chain(starts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, &str)]) -> BTreeMap<String, PluginConfig> {
        list.iter()
            .map(|(name, path)| (name.to_string(), PluginConfig::new(*name, *path)))
            .collect()
    }

    #[test]
    fn nothing_changed_means_nothing_to_do() {
        let both = entries(&[("a", "a.wasm"), ("b", "b.wasm")]);
        assert_eq!(plan(&both, &both), []);
    }

    #[test]
    fn removed_changed_and_added_entries_stop_restart_and_start_in_that_order() {
        let running = entries(&[("a", "a.wasm"), ("b", "b.wasm"), ("c", "c.wasm")]);
        let wanted = entries(&[("b", "b2.wasm"), ("c", "c.wasm"), ("d", "d.wasm")]);
        assert_eq!(
            plan(&running, &wanted),
            [
                Step::Stop("a".into()),
                Step::Restart("b".into()),
                Step::Start("d".into())
            ]
        );
    }

    #[test]
    fn any_changed_setting_restarts() {
        let running = entries(&[("a", "a.wasm")]);
        let mut wanted = running.clone();
        wanted.get_mut("a").unwrap().concurrency += 1;
        assert_eq!(plan(&running, &wanted), [Step::Restart("a".into())]);
    }
}
