//! Text that a plugin or a message controls, made inert before it reaches a
//! log, a page or a header: control characters (newlines, carriage returns,
//! terminal escapes) and bidirectional overrides are escaped, so a plugin
//! cannot write a line that looks like the host's own, and the text is cut
//! at a byte limit, so a 40 MiB error reason costs the log 16 KiB.

use std::borrow::Cow;

/// The most bytes of untrusted text kept in one log line or error cause.
pub const MAX_UNTRUSTED_BYTES: usize = 16 * 1024;

/// What a cut text ends with.
pub const TRUNCATED: &str = " [truncated]";

/// `text` with control characters and bidirectional overrides escaped
/// (`\n`, `\u{1b}`, `\u{202e}`), cut at a character boundary once the result
/// reaches `max_bytes`, and then marked with [`TRUNCATED`]. Text that needs
/// neither (the usual case, on the message path too) is borrowed, not copied.
pub fn inert(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes && !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(escape_and_cut(text, max_bytes))
}

/// [`inert`] for an owned `text`, kept as it is when it is already inert.
pub fn inert_owned(text: String, max_bytes: usize) -> String {
    match inert(&text, max_bytes) {
        Cow::Borrowed(_) => text,
        Cow::Owned(escaped) => escaped,
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

fn escape_and_cut(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + TRUNCATED.len());
    for c in text.chars() {
        let escape = needs_escape(c);
        let width = if escape {
            c.escape_default().count()
        } else {
            c.len_utf8()
        };
        if out.len() + width > max_bytes {
            out.push_str(TRUNCATED);
            return out;
        }
        if escape {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What replaces a URL's password, user or query value in host-written text.
pub const HIDDEN: &str = "***";

/// `text` with every byte but letters, digits, `-`, `_`, `.` and `~`
/// written as `%XX` (RFC 3986's unreserved characters kept).
pub fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// `url` as the host may write it in a log line, an error or a page: the
/// userinfo (`user:password@`) and every query value hidden, the fragment
/// dropped; scheme, host, port, path and the query's parameter names kept,
/// which is what finding a refused or failed request needs. Anything after
/// the authority that is not a path (no `/`) is hidden whole. Not escaped or
/// cut: pass the result through [`inert`].
pub fn url_without_secrets(url: &str) -> Cow<'_, str> {
    let rest_at = url.find("://").map_or(0, |at| at + 3);
    let (scheme, rest) = url.split_at(rest_at);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (path_and_query, fragment) = match tail.split_once('#') {
        Some((before, _)) => (before, true),
        None => (tail, false),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let userinfo = authority.rfind('@');
    if userinfo.is_none() && query.is_none_or(str::is_empty) && !fragment {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match userinfo {
        Some(at) => {
            out.push_str(HIDDEN);
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    out.push_str(path);
    if let Some(query) = query.filter(|query| !query.is_empty()) {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(HIDDEN);
                }
                // A bare token (`?s3cr3t`) may be the secret itself.
                None if !pair.is_empty() => out.push_str(HIDDEN),
                None => {}
            }
        }
    }
    Cow::Owned(out)
}

/// Characters that reorder how the text around them is displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_and_unicode_pass_unchanged() {
        assert_eq!(
            inert("测试活动 granted 10 points", 100),
            "测试活动 granted 10 points"
        );
    }

    #[test]
    fn a_newline_cannot_start_a_line_of_its_own() {
        let forged = "ok\n2026-11-27T05:00:00Z  INFO mqplug: FORGED admin login accepted";
        let shown = inert(forged, MAX_UNTRUSTED_BYTES);
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("ok\\n2026-11-27"), "{shown}");
    }

    #[test]
    fn terminal_escapes_carriage_returns_and_bidi_overrides_are_escaped() {
        let shown = inert("a\u{1b}[31mred\rb\u{202e}c", 100);
        assert_eq!(shown, "a\\u{1b}[31mred\\rb\\u{202e}c");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_marked() {
        let shown = inert_owned("活".repeat(10_000), 1000);
        assert!(shown.ends_with(TRUNCATED));
        assert!(shown.len() <= 1000 + TRUNCATED.len());
        assert!(shown.trim_end_matches(TRUNCATED).chars().all(|c| c == '活'));
        // Escapes count against the limit too.
        let escaped = inert_owned("\n".repeat(1000), 100);
        assert!(escaped.len() <= 100 + TRUNCATED.len(), "{}", escaped.len());
    }

    #[test]
    fn a_url_keeps_where_it_goes_and_hides_credentials_and_query_values() {
        assert_eq!(
            url_without_secrets(
                "https://bob:hunter2@rewards.example:8443/v1/grant?user=7&token=s3cr3t#frag"
            ),
            "https://***@rewards.example:8443/v1/grant?user=***&token=***"
        );
        assert_eq!(
            url_without_secrets("redis://:p4ss@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(
            url_without_secrets("http://x/a?s3cr3t&k=v"),
            "http://x/a?***&k=***"
        );
        // An `@` in the path or query is not userinfo.
        assert_eq!(
            url_without_secrets("http://x/mail/a@b?to=c@d"),
            "http://x/mail/a@b?to=***"
        );
        // Nothing to hide: borrowed as it is.
        assert!(matches!(
            url_without_secrets("http://127.0.0.1:8080/grant"),
            Cow::Borrowed("http://127.0.0.1:8080/grant")
        ));
    }

    #[test]
    fn text_at_the_limit_is_kept_whole() {
        assert_eq!(inert("abcd", 4), "abcd");
        assert_eq!(inert("abcde", 4), "abcd [truncated]");
    }
}
