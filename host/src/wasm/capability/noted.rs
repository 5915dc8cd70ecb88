//! Names a plugin asked for and was not given (config keys, origins,
//! topics, buckets), remembered for the kit's grant checks and so that each
//! is logged once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Names one plugin remembers at most, per kind.
pub(crate) const MAX_NOTED: usize = 32;

/// A bounded set of names, shared by every clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Noted(Arc<Mutex<BTreeSet<String>>>);

impl Noted {
    /// Remembers `name` while there is room; `true` the first time, so the
    /// caller logs it once.
    pub(crate) fn note(&self, name: &str) -> bool {
        let mut names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        names.len() < MAX_NOTED && !names.contains(name) && names.insert(name.to_string())
    }

    /// The names so far, sorted.
    pub(crate) fn list(&self) -> Vec<String> {
        let names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        names.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_new_once_and_the_set_stops_growing_at_its_bound() {
        let noted = Noted::default();
        assert!(noted.note("a"));
        assert!(!noted.note("a"));
        assert!(!noted.clone().note("a"), "clones share the set");
        for i in 0..100 {
            noted.note(&format!("n{i:03}"));
        }
        assert_eq!(noted.list().len(), MAX_NOTED);
        assert!(!noted.note("late"));
    }
}
