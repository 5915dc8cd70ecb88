//! What an operator sees of a plugin's buckets (`mqplug state`): its keys,
//! a value, and clearing a bucket. Keys and values are the plugin's, so
//! untrusted: escaped and cut before they reach a terminal.

use super::{Backend, Namespace, StoreError};
use crate::text::inert;

/// Most keys one listing reads.
pub const MAX_LISTED: usize = 10_000;
/// Most bytes of a value shown.
pub const MAX_SHOWN: usize = 4096;

/// One key and its value's size (`None`: it expired while listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub bytes: Option<usize>,
}

/// The keys of `ns`, at most [`MAX_LISTED`], and whether there were more.
pub fn list(store: &dyn Backend, ns: &Namespace) -> Result<(Vec<Entry>, bool), StoreError> {
    let mut entries = Vec::new();
    let mut cursor = None;
    loop {
        let (keys, next) = store.list_keys(ns, cursor)?;
        for key in keys {
            if entries.len() == MAX_LISTED {
                return Ok((entries, true));
            }
            let bytes = store.get(ns, &key)?.map(|value| value.len());
            entries.push(Entry { key, bytes });
        }
        match next {
            Some(next) => cursor = Some(next),
            None => return Ok((entries, false)),
        }
    }
}

/// Deletes every key of `ns`; how many there were.
pub fn clear(store: &dyn Backend, ns: &Namespace) -> Result<usize, StoreError> {
    let mut cleared = 0;
    loop {
        // Always the first page: deleting moves the rest forward.
        let (keys, _) = store.list_keys(ns, None)?;
        if keys.is_empty() {
            return Ok(cleared);
        }
        for key in &keys {
            store.delete(ns, key)?;
        }
        cleared += keys.len();
    }
}

/// A value as a line of text: UTF-8 escaped and cut, anything else as hex.
pub fn show(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => inert(text, MAX_SHOWN).into_owned(),
        Err(_) => {
            let shown = &value[..value.len().min(MAX_SHOWN / 2)];
            let hex: String = shown.iter().map(|byte| format!("{byte:02x}")).collect();
            if shown.len() < value.len() {
                format!("hex {hex}… ({} bytes)", value.len())
            } else {
                format!("hex {hex}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Embedded, Write};

    #[test]
    fn lists_gets_and_clears_one_bucket_and_leaves_the_others() {
        let store = Embedded::in_memory();
        let mine = Namespace::new("rewards", "seen");
        let other = Namespace::new("rewards", "granted");
        let theirs = Namespace::new("audit", "seen");
        for i in 0..250 {
            let key = format!("k{i:03}");
            store
                .write(&mine, &key, b"v", None, Write::Set, u64::MAX)
                .unwrap();
        }
        for ns in [&other, &theirs] {
            store
                .write(ns, "kept", b"x", None, Write::Set, u64::MAX)
                .unwrap();
        }
        let (entries, more) = list(&store, &mine).unwrap();
        assert_eq!(entries.len(), 250);
        assert!(!more);
        assert_eq!(
            entries[0],
            Entry {
                key: "k000".into(),
                bytes: Some(1)
            }
        );
        assert_eq!(clear(&store, &mine).unwrap(), 250);
        assert!(list(&store, &mine).unwrap().0.is_empty());
        for ns in [&other, &theirs] {
            assert_eq!(store.get(ns, "kept").unwrap(), Some(b"x".to_vec()));
        }
    }

    #[test]
    fn values_are_shown_inert() {
        assert_eq!(show(b"plain"), "plain");
        assert!(!show(b"red \x1b[31m").contains('\u{1b}'));
        assert_eq!(show(&[0xff, 0x00]), "hex ff00");
        assert!(show(&vec![0xff; 5000]).ends_with("(5000 bytes)"));
    }
}
