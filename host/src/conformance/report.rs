//! The conformance kit's results: a table for people, JUnit XML for CI.

use std::fmt::{self, Write as _};
use std::time::Duration;

/// Which part of the contract a check belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Loads, exports the handler, imports only what the host provides,
    /// instantiates within the limits.
    Contract,
    /// The built-in events at the edges of every field.
    Suite,
    /// The same event twice gives the same outcome.
    Determinism,
    /// The author's own fixtures.
    Fixtures,
}

impl Group {
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Contract => "contract",
            Group::Suite => "suite",
            Group::Determinism => "determinism",
            Group::Fixtures => "fixtures",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// The check failed; the text says why, naming what to fix.
    Fail(String),
    /// Not run because an earlier check failed; the text says which.
    Skip(String),
}

/// One check and its result.
#[derive(Debug, Clone)]
pub struct Check {
    pub group: Group,
    pub name: String,
    pub status: Status,
    /// What was seen, for a passing check too (e.g. `ok`, `err: reason`).
    pub detail: String,
    pub duration: Duration,
}

/// Everything one run of the kit found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The component's file name, as given.
    pub plugin: String,
    pub checks: Vec<Check>,
    /// Linear memory of a fresh instance, when it instantiated.
    pub memory_at_instantiation: Option<usize>,
    /// The time of every handler call the kit made.
    pub event_times: Vec<Duration>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks
            .iter()
            .all(|check| matches!(check.status, Status::Pass))
    }

    fn count(&self, pick: fn(&Status) -> bool) -> usize {
        self.checks
            .iter()
            .filter(|check| pick(&check.status))
            .count()
    }

    pub fn failures(&self) -> usize {
        self.count(|status| matches!(status, Status::Fail(_)))
    }

    pub fn skipped(&self) -> usize {
        self.count(|status| matches!(status, Status::Skip(_)))
    }

    /// The one-line summary a CI log shows last.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}: {} checks, {} passed, {} failed, {} skipped",
            if self.passed() { "PASS" } else { "FAIL" },
            self.checks.len(),
            self.count(|status| matches!(status, Status::Pass)),
            self.failures(),
            self.skipped(),
        );
        if let Some(bytes) = self.memory_at_instantiation {
            let _ = write!(line, "; memory at instantiation {}", Bytes(bytes));
        }
        if let Some(max) = self.event_times.iter().max() {
            let total: Duration = self.event_times.iter().sum();
            let mean = total / u32::try_from(self.event_times.len()).unwrap_or(u32::MAX);
            let _ = write!(
                line,
                "; per event mean {}, max {} over {} calls",
                Micros(mean),
                Micros(*max),
                self.event_times.len()
            );
        }
        line
    }

    /// A table, one check a line, then the summary.
    pub fn table(&self) -> String {
        let mut out = format!("mqplug test {}\n", self.plugin);
        let width = self
            .checks
            .iter()
            .map(|check| check.name.chars().count())
            .max()
            .unwrap_or(0);
        for check in &self.checks {
            let (label, why) = match &check.status {
                Status::Pass => ("pass", None),
                Status::Fail(why) => ("FAIL", Some(why)),
                Status::Skip(why) => ("skip", Some(why)),
            };
            let _ = write!(
                out,
                "  {label}  {:<11} {:<width$}  {}",
                check.group.as_str(),
                check.name,
                check.detail,
            );
            if let Some(why) = why {
                let _ = write!(out, "\n        -> {why}");
            }
            out.push('\n');
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// JUnit XML: one `testsuite` per group, one `testcase` per check.
    pub fn junit(&self) -> String {
        let mut groups: Vec<Group> = self.checks.iter().map(|check| check.group).collect();
        groups.sort();
        groups.dedup();
        let total: Duration = self.checks.iter().map(|check| check.duration).sum();
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"mqplug test {}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.6}\">",
            xml(&self.plugin),
            self.checks.len(),
            self.failures(),
            self.skipped(),
            total.as_secs_f64(),
        );
        for group in groups {
            let checks: Vec<&Check> = self.checks.iter().filter(|c| c.group == group).collect();
            let failures = checks
                .iter()
                .filter(|c| matches!(c.status, Status::Fail(_)))
                .count();
            let skipped = checks
                .iter()
                .filter(|c| matches!(c.status, Status::Skip(_)))
                .count();
            let time: Duration = checks.iter().map(|c| c.duration).sum();
            let _ = writeln!(
                out,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.6}\">",
                group.as_str(),
                checks.len(),
                failures,
                skipped,
                time.as_secs_f64(),
            );
            for check in checks {
                let _ = write!(
                    out,
                    "    <testcase classname=\"mqplug.{}\" name=\"{}\" time=\"{:.6}\"",
                    group.as_str(),
                    xml(&check.name),
                    check.duration.as_secs_f64(),
                );
                match &check.status {
                    Status::Pass => {
                        let _ = writeln!(
                            out,
                            ">\n      <system-out>{}</system-out>\n    </testcase>",
                            xml(&check.detail)
                        );
                    }
                    Status::Fail(why) => {
                        let _ = writeln!(
                            out,
                            ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                            xml(why),
                            xml(&check.detail)
                        );
                    }
                    Status::Skip(why) => {
                        let _ = writeln!(
                            out,
                            ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                            xml(why)
                        );
                    }
                }
            }
            out.push_str("  </testsuite>\n");
        }
        out.push_str("</testsuites>\n");
        out
    }
}

/// Escapes text for an XML attribute or element; drops characters XML 1.0
/// cannot carry at all (most control characters).
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// A byte count for people: `1.1 MiB`, `64 KiB`.
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: f64 = 1024.0;
        let bytes = self.0 as f64;
        if bytes >= KIB * KIB {
            write!(f, "{:.1} MiB", bytes / KIB / KIB)
        } else {
            write!(f, "{:.0} KiB", bytes / KIB)
        }
    }
}

/// A duration in microseconds, or milliseconds when long.
pub struct Micros(pub Duration);

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_secs_f64() * 1e6;
        if micros >= 1000.0 {
            write!(f, "{:.1} ms", micros / 1000.0)
        } else {
            write!(f, "{micros:.0} us")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, status: Status) -> Check {
        Check {
            group: Group::Fixtures,
            name: name.into(),
            status,
            detail: "err: <bad> & \"worse\"".into(),
            duration: Duration::from_millis(2),
        }
    }

    #[test]
    fn junit_escapes_and_counts() {
        let report = Report {
            plugin: "p.wasm".into(),
            checks: vec![
                check("a<b", Status::Pass),
                check("c", Status::Fail("expected ok\u{1}".into())),
                check("d", Status::Skip("load failed".into())),
            ],
            ..Report::default()
        };
        let xml = report.junit();
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" skipped=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("name=\"a&lt;b\""), "{xml}");
        assert!(
            xml.contains("err: &lt;bad&gt; &amp; &quot;worse&quot;"),
            "{xml}"
        );
        assert!(xml.contains("expected ok\\u{1}"), "{xml}");
        assert!(!report.passed());
        assert!(
            report
                .summary()
                .starts_with("FAIL: 3 checks, 1 passed, 1 failed, 1 skipped")
        );
    }

    #[test]
    fn a_report_of_passes_passes() {
        let report = Report {
            plugin: "p.wasm".into(),
            checks: vec![check("a", Status::Pass)],
            ..Report::default()
        };
        assert!(report.passed());
        assert!(
            report.table().contains("  pass  fixtures"),
            "{}",
            report.table()
        );
    }
}
