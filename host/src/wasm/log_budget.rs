//! A per-plugin cap on log lines per second, shared by all its instances, so
//! a plugin cannot flood the host's log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogBudget {
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    used: u32,
    dropped: u64,
}

/// What to do with one log line.
#[derive(Debug, PartialEq, Eq)]
pub enum LogAdmission {
    Write,
    /// Write it, and say first that `dropped` lines were dropped in the last
    /// window.
    WriteAfterDropping {
        dropped: u64,
    },
    Drop,
}

impl LogBudget {
    pub fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            window: Mutex::new(Window {
                started: Instant::now(),
                used: 0,
                dropped: 0,
            }),
        }
    }

    pub fn admit(&self) -> LogAdmission {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> LogAdmission {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped_before = 0;
        if now.duration_since(window.started) >= Duration::from_secs(1) {
            dropped_before = std::mem::take(&mut window.dropped);
            window.started = now;
            window.used = 0;
        }
        if window.used >= self.per_second {
            window.dropped += 1;
            return LogAdmission::Drop;
        }
        window.used += 1;
        if dropped_before > 0 {
            LogAdmission::WriteAfterDropping {
                dropped: dropped_before,
            }
        } else {
            LogAdmission::Write
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_over_the_budget_are_dropped_and_counted_in_the_next_window() {
        let budget = LogBudget::new(2);
        let start = Instant::now();
        assert_eq!(budget.admit_at(start), LogAdmission::Write);
        assert_eq!(budget.admit_at(start), LogAdmission::Write);
        assert_eq!(budget.admit_at(start), LogAdmission::Drop);
        assert_eq!(budget.admit_at(start), LogAdmission::Drop);
        let later = start + Duration::from_millis(1001);
        assert_eq!(
            budget.admit_at(later),
            LogAdmission::WriteAfterDropping { dropped: 2 }
        );
        assert_eq!(budget.admit_at(later), LogAdmission::Write);
    }
}
