//! How much progress feedback one install run sends. hawkBit keeps at most 1000 status entries
//! per action and refuses more (403 up to 0.9.x, 429 since 0.10.0); a full artifact GET logs one
//! too. Progress therefore goes out in 10 % steps, otherwise at most once a minute, and never
//! more than [`MAX_PROGRESS_PER_RUN`] times, so even a slow download with retries stays far
//! below the quota. The runs of one action share a budget across restarts: the job counts its
//! download runs durably, and a run gets what the earlier ones left of
//! [`MAX_PROGRESS_PER_ACTION`] (counting each earlier run as having used its whole share, since a
//! crash may have cut it short without a record). Pure: the caller passes the time.

use std::time::Duration;

/// A progress report is due at least this often when no 10 % step was crossed.
pub const PROGRESS_GAP: Duration = Duration::from_secs(60);
/// Progress is reported at each step of this many percent.
pub const STEP_PERCENT: u64 = 10;
/// Hard cap of progress messages per install run (a run of `MAX_INSTALL_TRIES` stays at a few
/// hundred of hawkBit's 1000).
pub const MAX_PROGRESS_PER_RUN: u32 = 100;
/// Hard cap of progress messages per action, over all its runs (restarts and retries).
pub const MAX_PROGRESS_PER_ACTION: u32 = 3 * MAX_PROGRESS_PER_RUN;

/// Which stage a progress report is about (each has its own 10 % steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Downloading,
    Verifying,
}

/// The progress budget of one install run.
#[derive(Debug)]
pub struct ProgressBudget {
    /// Messages this run may send.
    cap: u32,
    sent: u32,
    last_sent_at: Option<Duration>,
    last_step: Option<(Stage, u64)>,
}

impl Default for ProgressBudget {
    fn default() -> Self {
        ProgressBudget::for_run(1)
    }
}

impl ProgressBudget {
    /// The budget of the action's `run`-th download run (1-based; 0, from a state written
    /// before runs were counted, counts as the first).
    pub fn for_run(run: u32) -> ProgressBudget {
        let earlier = run.max(1) - 1;
        ProgressBudget {
            cap: MAX_PROGRESS_PER_ACTION
                .saturating_sub(earlier.saturating_mul(MAX_PROGRESS_PER_RUN))
                .min(MAX_PROGRESS_PER_RUN),
            sent: 0,
            last_sent_at: None,
            last_step: None,
        }
    }

    /// Should the report of `done` of `total` bytes at `now` (time since the run started) be
    /// sent? Counts it when it is.
    pub fn admit(&mut self, stage: Stage, done: u64, total: Option<u64>, now: Duration) -> bool {
        if done == 0 || self.sent >= self.cap {
            return false;
        }
        let step = total
            .filter(|t| *t > 0)
            .map(|t| done.min(t) * 100 / t / STEP_PERCENT);
        let new_step = step.is_some_and(|s| self.last_step != Some((stage, s)));
        let gap_over = self
            .last_sent_at
            .is_none_or(|at| now.saturating_sub(at) >= PROGRESS_GAP);
        if !new_step && !gap_over {
            return false;
        }
        self.sent += 1;
        self.last_sent_at = Some(now);
        if let Some(s) = step {
            self.last_step = Some((stage, s));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_slow_download_reports_each_step_and_otherwise_once_a_minute() {
        let mut b = ProgressBudget::default();
        // 100 MiB at 10 KiB/s: about 2.8 hours, a report every second offered.
        let total = 100 * MIB;
        let mut sent = 0;
        for t in 1..=10_240u64 {
            if b.admit(Stage::Downloading, t * 10 * 1024, Some(total), secs(t)) {
                sent += 1;
            }
        }
        // 10 steps plus one per minute in between: far fewer than one per 5 s (2048).
        assert!((10..=10 + 10_240 / 60 + 1).contains(&sent), "{sent}");
    }

    #[test]
    fn a_fast_download_reports_at_most_one_per_step() {
        let mut b = ProgressBudget::default();
        let sent = (1..=1000u64)
            .filter(|i| b.admit(Stage::Downloading, i * MIB / 10, Some(100 * MIB), secs(0)))
            .count();
        // The first report (step 0, at 0.1 %), then one at each of the steps 10 % .. 100 %.
        assert_eq!(sent, 11);
        // Verification has its own steps.
        assert!(b.admit(Stage::Verifying, MIB, Some(100 * MIB), secs(1)));
    }

    #[test]
    fn unknown_size_is_reported_once_a_minute_and_zero_never() {
        let mut b = ProgressBudget::default();
        assert!(!b.admit(Stage::Downloading, 0, None, secs(0)));
        assert!(b.admit(Stage::Downloading, 1, None, secs(0)));
        assert!(!b.admit(Stage::Downloading, 2, None, secs(59)));
        assert!(b.admit(Stage::Downloading, 3, None, secs(60)));
    }

    #[test]
    fn the_hard_cap_holds_whatever_the_run_length() {
        let mut b = ProgressBudget::default();
        let sent = (1..=100_000u64)
            .filter(|t| b.admit(Stage::Downloading, *t, None, secs(t * 60)))
            .count();
        assert_eq!(sent, MAX_PROGRESS_PER_RUN as usize);
    }

    #[test]
    fn the_runs_of_one_action_share_its_cap() {
        let sent_in_run = |run| {
            let mut b = ProgressBudget::for_run(run);
            (1..=100_000u64)
                .filter(|t| b.admit(Stage::Downloading, *t, None, secs(t * 60)))
                .count() as u32
        };
        assert_eq!(sent_in_run(0), MAX_PROGRESS_PER_RUN);
        let total: u32 = (1..=50).map(sent_in_run).sum();
        assert_eq!(total, MAX_PROGRESS_PER_ACTION);
        assert_eq!(sent_in_run(4), 0);
    }
}
