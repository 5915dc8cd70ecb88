//! A per-plugin cap on log lines and bytes per second, shared by all its
//! instances, so a plugin cannot flood the host's log.
//!
//! What is dropped is reported once its one-second window ends: by the next
//! line the plugin writes, or, if it went quiet, by the runtime's ticker,
//! which flushes every budget each second. Either way a warning names the
//! plugin and the count, and `HostEvent::LogsDropped` puts it on `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::observe::{HostEvent, Observers};

const WINDOW: Duration = Duration::from_secs(1);

pub struct LogBudget {
    plugin: Arc<str>,
    lines_per_second: u32,
    bytes_per_second: u64,
    observers: Observers,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    lines: u32,
    bytes: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

/// Lines and bytes dropped in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

impl LogBudget {
    pub fn new(
        plugin: Arc<str>,
        lines_per_second: u32,
        bytes_per_second: u64,
        observers: Observers,
    ) -> Self {
        LogBudget {
            plugin,
            lines_per_second,
            bytes_per_second,
            observers,
            window: Mutex::new(Window {
                started: Instant::now(),
                lines: 0,
                bytes: 0,
                dropped_lines: 0,
                dropped_bytes: 0,
            }),
        }
    }

    /// Whether a line of `bytes` may be written now.
    pub fn admit(&self, bytes: usize) -> bool {
        let (admitted, ended) = self.admit_at(Instant::now(), bytes);
        if let Some(dropped) = ended {
            self.report(dropped);
        }
        admitted
    }

    /// Reports what was dropped in a window that has ended, if anything; the
    /// ticker calls it every second.
    pub fn flush(&self) {
        if let Some(dropped) = self.flush_at(Instant::now()) {
            self.report(dropped);
        }
    }

    fn admit_at(&self, now: Instant, bytes: usize) -> (bool, Option<Dropped>) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let ended = window.roll(now);
        let bytes = bytes as u64;
        if window.lines >= self.lines_per_second
            || window.bytes.saturating_add(bytes) > self.bytes_per_second
        {
            window.dropped_lines += 1;
            window.dropped_bytes += bytes;
            return (false, ended);
        }
        window.lines += 1;
        window.bytes += bytes;
        (true, ended)
    }

    fn flush_at(&self, now: Instant) -> Option<Dropped> {
        self.window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .roll(now)
    }

    fn report(&self, dropped: Dropped) {
        tracing::warn!(
            target: "mqplug::plugin",
            plugin = %self.plugin,
            "log budget: dropped {} lines ({} bytes) of this plugin in the last second",
            dropped.lines,
            dropped.bytes
        );
        self.observers.emit(|| HostEvent::LogsDropped {
            plugin: self.plugin.clone(),
            lines: dropped.lines,
        });
    }
}

impl Window {
    /// Starts a new window if this one is over; returns what it dropped.
    fn roll(&mut self, now: Instant) -> Option<Dropped> {
        if now.duration_since(self.started) < WINDOW {
            return None;
        }
        let dropped = Dropped {
            lines: std::mem::take(&mut self.dropped_lines),
            bytes: std::mem::take(&mut self.dropped_bytes),
        };
        self.started = now;
        self.lines = 0;
        self.bytes = 0;
        (dropped.lines > 0).then_some(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(lines: u32, bytes: u64) -> LogBudget {
        LogBudget::new(Arc::from("p"), lines, bytes, Observers::default())
    }

    /// When `budget`'s first window began: the tests' time zero, so a pause
    /// between making the budget and reading the clock cannot move a window.
    fn window_start(budget: &LogBudget) -> Instant {
        budget.window.lock().unwrap().started
    }

    #[test]
    fn lines_over_the_budget_are_dropped_and_counted_when_the_window_ends() {
        let budget = budget(2, u64::MAX);
        let start = window_start(&budget);
        assert_eq!(budget.admit_at(start, 10), (true, None));
        assert_eq!(budget.admit_at(start, 10), (true, None));
        assert_eq!(budget.admit_at(start, 10), (false, None));
        assert_eq!(budget.admit_at(start, 10), (false, None));
        let later = start + Duration::from_millis(1001);
        assert_eq!(
            budget.admit_at(later, 10),
            (
                true,
                Some(Dropped {
                    lines: 2,
                    bytes: 20
                })
            )
        );
        assert_eq!(budget.admit_at(later, 10), (true, None));
    }

    #[test]
    fn bytes_over_the_budget_are_dropped_even_under_the_line_budget() {
        let budget = budget(1000, 100);
        let start = window_start(&budget);
        assert_eq!(budget.admit_at(start, 60), (true, None));
        assert_eq!(budget.admit_at(start, 60), (false, None), "120 > 100 bytes");
        assert_eq!(budget.admit_at(start, 40), (true, None), "exactly 100");
        assert_eq!(budget.admit_at(start, 1), (false, None));
    }

    #[test]
    fn a_plugin_that_goes_quiet_still_gets_its_summary_from_the_flush() {
        let budget = budget(1, u64::MAX);
        let start = window_start(&budget);
        budget.admit_at(start, 1);
        for _ in 0..320 {
            budget.admit_at(start, 1);
        }
        assert_eq!(budget.flush_at(start + Duration::from_millis(500)), None);
        assert_eq!(
            budget.flush_at(start + Duration::from_millis(1000)),
            Some(Dropped {
                lines: 320,
                bytes: 320
            })
        );
        assert_eq!(
            budget.flush_at(start + Duration::from_millis(3000)),
            None,
            "reported once"
        );
    }
}
