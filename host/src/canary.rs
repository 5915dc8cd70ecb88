//! Canary builds: a candidate build of a plugin takes a share of its
//! messages beside the current build, chosen by user, and is rolled back by
//! itself when it does measurably worse, or promoted or aborted on command.
//!
//! Every message is handled by exactly one build, once: the slot picks the
//! build before the call ([`Canary::takes`]), the call's outcome goes to the
//! broker as any other, and a message the candidate failed is redelivered
//! by the broker like any retry, to whichever build serves its user then
//! (the current one, once the candidate is rolled back).
//!
//! The comparison ([`judge`]) reads the last `window` outcomes of each
//! build (first deliveries only: a message retried again and again would
//! count many times), each time the candidate has `min_events` more. The
//! candidate is rolled back when, with at least `min_events` of its own:
//! - its failure rate is higher than the current build's beyond doubt: the
//!   lower end of its 99 % Wilson interval is above the upper end of the
//!   current build's (a candidate failing 20 of 20 against a current build
//!   failing 0 of 180 is; 2 of 20 against 5 of 180 is not); or
//! - its median handling time is more than twice the current build's and
//!   10 ms longer (the current build needs `min_events` too).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A plugin's `canary` entry, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The candidate's component file; relative paths are relative to the
    /// config file.
    pub path: std::path::PathBuf,
    /// The share of users whose messages the candidate handles, 1 to 99.
    pub percent: u8,
    /// Outcomes of each build the comparison reads: the last this many.
    #[serde(default = "default_window")]
    pub window: u32,
    /// Candidate outcomes before the candidate is judged at all.
    #[serde(default = "default_min_events")]
    pub min_events: u32,
}

fn default_window() -> u32 {
    200
}

fn default_min_events() -> u32 {
    20
}

/// The largest `window`.
pub const MAX_WINDOW: u32 = 10_000;

impl CanaryConfig {
    /// What is wrong with the entry, if anything.
    pub fn problem(&self) -> Option<String> {
        if !(1..=99).contains(&self.percent) {
            return Some(format!(
                "canary.percent is {}; it must be 1 to 99 (the current build keeps the rest)",
                self.percent
            ));
        }
        if !(10..=MAX_WINDOW).contains(&self.window) {
            return Some(format!(
                "canary.window is {}; it must be 10 to {MAX_WINDOW}",
                self.window
            ));
        }
        if self.min_events == 0 || self.min_events > self.window {
            return Some(format!(
                "canary.min_events is {}; it must be 1 to canary.window ({})",
                self.min_events, self.window
            ));
        }
        None
    }
}

/// Which build handled a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Current,
    Candidate,
}

/// Where a canary stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryState {
    /// Taking its share of messages.
    Running,
    /// Rolled back by the comparison: the reason says what it measured.
    RolledBack(String),
    /// Made the current build on command.
    Promoted,
    /// Stopped on command; the current build serves every message.
    Aborted,
}

impl CanaryState {
    pub fn name(&self) -> &'static str {
        match self {
            CanaryState::Running => "running",
            CanaryState::RolledBack(_) => "rolled-back",
            CanaryState::Promoted => "promoted",
            CanaryState::Aborted => "aborted",
        }
    }
}

/// One build's last outcomes: failed or not, and how long each took.
#[derive(Debug)]
struct Outcomes {
    cap: usize,
    last: VecDeque<(bool, Duration)>,
    /// Failures in `last`.
    failures: u64,
    /// Every outcome recorded, beyond the window too.
    handled: u64,
    failed: u64,
}

impl Outcomes {
    fn new(cap: u32) -> Self {
        Outcomes {
            cap: cap as usize,
            last: VecDeque::new(),
            failures: 0,
            handled: 0,
            failed: 0,
        }
    }

    fn record(&mut self, failed: bool, took: Duration) {
        if self.last.len() == self.cap
            && let Some((dropped, _)) = self.last.pop_front()
        {
            self.failures -= u64::from(dropped);
        }
        self.last.push_back((failed, took));
        self.failures += u64::from(failed);
        self.handled += 1;
        self.failed += u64::from(failed);
    }

    /// Forgets the window (the totals stay).
    fn forget(&mut self) {
        self.last.clear();
        self.failures = 0;
    }

    fn summary(&self) -> Summary {
        let mut times: Vec<Duration> = self.last.iter().map(|(_, took)| *took).collect();
        times.sort_unstable();
        Summary {
            events: self.last.len() as u64,
            failures: self.failures,
            median: times.get(times.len() / 2).copied(),
            handled: self.handled,
            failed: self.failed,
        }
    }
}

/// One build's side of the comparison, for `/plugins` and the judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Outcomes in the window, and how many of them failed.
    pub events: u64,
    pub failures: u64,
    /// The median handling time in the window.
    pub median: Option<Duration>,
    /// Since the canary started.
    pub handled: u64,
    pub failed: u64,
}

/// A canary's state and both builds' outcomes.
#[derive(Debug)]
pub struct Canary {
    pub percent: u8,
    pub min_events: u32,
    pub started: SystemTime,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: CanaryState,
    current: Outcomes,
    candidate: Outcomes,
}

/// A snapshot of a canary for status reports.
#[derive(Debug, Clone)]
pub struct CanaryStatus {
    pub percent: u8,
    pub state: CanaryState,
    pub started: SystemTime,
    pub current: Summary,
    pub candidate: Summary,
}

impl Canary {
    pub fn new(config: &CanaryConfig) -> Self {
        Canary {
            percent: config.percent,
            min_events: config.min_events,
            started: SystemTime::now(),
            inner: Mutex::new(Inner {
                state: CanaryState::Running,
                current: Outcomes::new(config.window),
                candidate: Outcomes::new(config.window),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> CanaryState {
        self.lock().state.clone()
    }

    /// Whether the candidate handles `user_id`'s messages: the same answer
    /// for a user every time, on every host.
    pub fn takes(&self, user_id: u64) -> bool {
        self.lock().state == CanaryState::Running && user_bucket(user_id) < self.percent
    }

    /// Records one outcome of `side`'s (a message that started before the
    /// canary ended counts too); `Some(reason)` when that rolled the
    /// candidate back (once: the state says so from then on).
    pub fn record(&self, side: Side, failed: bool, took: Duration) -> Option<String> {
        let mut inner = self.lock();
        match side {
            Side::Current => inner.current.record(failed, took),
            Side::Candidate => inner.candidate.record(failed, took),
        }
        // Judged each time the candidate has `min_events` more outcomes,
        // not after every message: each look at the numbers is a chance of
        // a false alarm, and sorting the windows is not free.
        if inner.state != CanaryState::Running
            || side != Side::Candidate
            || !inner
                .candidate
                .handled
                .is_multiple_of(u64::from(self.min_events))
        {
            return None;
        }
        let verdict = judge(
            &inner.current.summary(),
            &inner.candidate.summary(),
            self.min_events,
        )?;
        inner.state = CanaryState::RolledBack(verdict.clone());
        Some(verdict)
    }

    /// Starts the current build's window afresh: the build was reloaded.
    pub fn forget_current(&self) {
        self.lock().current.forget();
    }

    /// Ends a running canary in `state` (promoted or aborted); `Err` names
    /// the state it is in when it is not running.
    pub fn end(&self, state: CanaryState) -> Result<(), CanaryState> {
        let mut inner = self.lock();
        if inner.state != CanaryState::Running {
            return Err(inner.state.clone());
        }
        inner.state = state;
        Ok(())
    }

    pub fn status(&self) -> CanaryStatus {
        let inner = self.lock();
        CanaryStatus {
            percent: self.percent,
            state: inner.state.clone(),
            started: self.started,
            current: inner.current.summary(),
            candidate: inner.candidate.summary(),
        }
    }
}

/// A user's place among 100, from a fixed hash of the id (FNV-1a), so one
/// user's messages go to one build on every host and after every restart.
pub fn user_bucket(user_id: u64) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_id.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % 100) as u8
}

/// Whether the candidate does measurably worse than the current build (see
/// the module's documentation); the reason names the numbers.
pub fn judge(current: &Summary, candidate: &Summary, min_events: u32) -> Option<String> {
    let min = u64::from(min_events);
    if candidate.events < min {
        return None;
    }
    let (candidate_low, _) = wilson(candidate.failures, candidate.events);
    let (_, current_high) = wilson(current.failures, current.events);
    if candidate_low > current_high {
        return Some(format!(
            "the candidate failed {} of its last {} messages, the current build {} of {}",
            candidate.failures, candidate.events, current.failures, current.events
        ));
    }
    if current.events >= min
        && let (Some(slow), Some(fast)) = (candidate.median, current.median)
        && slow > fast * 2
        && slow - fast > Duration::from_millis(10)
    {
        return Some(format!(
            "the candidate's median handling time is {} ms, the current build's {} ms",
            slow.as_millis(),
            fast.as_millis()
        ));
    }
    None
}

/// The 99 % Wilson score interval of `failures` in `events`; (0, 1) when
/// there are none.
fn wilson(failures: u64, events: u64) -> (f64, f64) {
    if events == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 2.576;
    let n = events as f64;
    let p = failures as f64 / n;
    let z2 = Z * Z;
    let center = p + z2 / (2.0 * n);
    let spread = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denominator = 1.0 + z2 / n;
    (
        ((center - spread) / denominator).max(0.0),
        ((center + spread) / denominator).min(1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(events: u64, failures: u64, median_ms: u64) -> Summary {
        Summary {
            events,
            failures,
            median: Some(Duration::from_millis(median_ms)),
            handled: events,
            failed: failures,
        }
    }

    #[test]
    fn a_candidate_failing_everything_is_rolled_back_once_it_has_min_events() {
        let current = summary(180, 0, 2);
        assert_eq!(judge(&current, &summary(19, 19, 2), 20), None);
        let verdict = judge(&current, &summary(20, 20, 2), 20).unwrap();
        assert_eq!(
            verdict,
            "the candidate failed 20 of its last 20 messages, the current build 0 of 180"
        );
    }

    #[test]
    fn a_few_more_failures_than_the_current_build_are_not_enough() {
        assert_eq!(judge(&summary(180, 5, 2), &summary(20, 2, 2), 20), None);
        // Clearly worse, with only 20 outcomes: rolled back.
        assert!(judge(&summary(180, 1, 2), &summary(20, 4, 2), 20).is_some());
        // Both failing alike (a downstream outage) is not the candidate's fault.
        assert_eq!(judge(&summary(180, 170, 2), &summary(20, 19, 2), 20), None);
    }

    #[test]
    fn a_candidate_twice_as_slow_and_10_ms_slower_is_rolled_back() {
        let verdict = judge(&summary(100, 0, 20), &summary(20, 0, 45), 20).unwrap();
        assert!(verdict.contains("45 ms"), "{verdict}");
        // Twice as slow but only by microseconds: noise.
        assert_eq!(judge(&summary(100, 0, 1), &summary(20, 0, 3), 20), None);
        // The current build has too few messages to compare times with.
        assert_eq!(judge(&summary(5, 0, 20), &summary(20, 0, 45), 20), None);
    }

    #[test]
    fn users_are_spread_evenly_and_each_keeps_its_bucket() {
        let mut counts = [0u32; 100];
        for user in 0..100_000u64 {
            counts[user_bucket(user) as usize] += 1;
        }
        // 1,000 each on average; a fixed hash, so the bounds are exact.
        assert!(
            counts.iter().all(|count| (850..=1150).contains(count)),
            "{counts:?}"
        );
        assert_eq!(user_bucket(123), user_bucket(123));
    }

    #[test]
    fn the_window_keeps_the_last_outcomes_and_the_totals_keep_all() {
        let canary = Canary::new(&CanaryConfig {
            path: "c.wasm".into(),
            percent: 10,
            window: 10,
            min_events: 10,
        });
        for _ in 0..15 {
            assert_eq!(
                canary.record(Side::Current, true, Duration::from_millis(1)),
                None
            );
        }
        for _ in 0..10 {
            canary.record(Side::Current, false, Duration::from_millis(1));
        }
        let status = canary.status();
        assert_eq!((status.current.events, status.current.failures), (10, 0));
        assert_eq!((status.current.handled, status.current.failed), (25, 15));
    }

    #[test]
    fn a_rolled_back_canary_takes_no_one_and_cannot_be_promoted() {
        let canary = Canary::new(&CanaryConfig {
            path: "c.wasm".into(),
            percent: 99,
            window: 10,
            min_events: 10,
        });
        let taken = (0..1000).find(|user| canary.takes(*user)).unwrap();
        for _ in 0..10 {
            canary.record(Side::Current, false, Duration::from_millis(1));
        }
        let mut verdicts =
            (0..30).filter_map(|_| canary.record(Side::Candidate, true, Duration::from_millis(1)));
        assert!(verdicts.next().is_some());
        assert!(verdicts.next().is_none(), "rolled back once");
        assert!(!canary.takes(taken));
        assert!(matches!(
            canary.end(CanaryState::Promoted),
            Err(CanaryState::RolledBack(_))
        ));
    }

    #[test]
    fn judged_every_min_events_candidate_outcomes_and_a_reload_starts_the_current_side_afresh() {
        let canary = Canary::new(&CanaryConfig {
            path: "c.wasm".into(),
            percent: 50,
            window: 100,
            min_events: 5,
        });
        for _ in 0..20 {
            canary.record(Side::Current, true, Duration::from_millis(1));
        }
        // Failing alike: no verdict, whenever it is judged.
        for _ in 0..10 {
            assert_eq!(
                canary.record(Side::Candidate, true, Duration::from_millis(1)),
                None
            );
        }
        // The current build reloaded, and the new one fails nothing: the
        // next judgement (at 15) compares with it alone.
        canary.forget_current();
        for _ in 0..10 {
            canary.record(Side::Current, false, Duration::from_millis(1));
        }
        let verdicts: Vec<usize> = (11..=15)
            .filter(|_| {
                canary
                    .record(Side::Candidate, true, Duration::from_millis(1))
                    .is_some()
            })
            .collect();
        assert_eq!(verdicts, [15], "judged at the 15th candidate outcome only");
        let status = canary.status();
        assert_eq!((status.current.events, status.current.handled), (10, 30));
    }

    #[test]
    fn percent_window_and_min_events_are_checked() {
        let config = |percent, window, min_events| CanaryConfig {
            path: "c.wasm".into(),
            percent,
            window,
            min_events,
        };
        assert_eq!(config(10, 200, 20).problem(), None);
        assert!(config(0, 200, 20).problem().unwrap().contains("1 to 99"));
        assert!(config(100, 200, 20).problem().unwrap().contains("1 to 99"));
        assert!(config(10, 5, 5).problem().unwrap().contains("10 to"));
        assert!(config(10, 20, 21).problem().unwrap().contains("min_events"));
    }
}
