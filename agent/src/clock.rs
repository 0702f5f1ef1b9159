//! The device clock as feedback needs it: the time, and whether it is known to be right.
//! hawkBit (0.7.0+) moves a target's installed version forward only when the feedback
//! `timestamp` is newer than the previous installation date, so a device without RTC that
//! reports right after a reboot with a clock in the past would leave the old version shown.
//! The `timestamp` is therefore sent only when the clock is known synchronised (the server's
//! receive time is used otherwise). [`Clock`] is the seam tests fake.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The marker systemd-timesyncd creates once it has synchronised the clock.
const TIMESYNCD_MARKER: &str = "/run/systemd/timesync/synchronized";

/// The device clock.
pub trait Clock: Send + Sync {
    /// Milliseconds since the epoch.
    fn now_ms(&self) -> u64;
    /// The clock is known to be synchronised (NTP, GPS, ...), not just running.
    fn synchronized(&self) -> bool;
}

/// The system clock; synchronised when the kernel says so (`adjtimex` without `STA_UNSYNC`)
/// or systemd-timesyncd left its marker.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn synchronized(&self) -> bool {
        kernel_synchronized() || Path::new(TIMESYNCD_MARKER).exists()
    }
}

/// Reads the kernel's clock state without changing it (`modes` 0 needs no privilege).
fn kernel_synchronized() -> bool {
    // SAFETY: adjtimex with modes 0 only reads into the zeroed struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    synchronized_state(state, tx.status)
}

/// `adjtimex`'s answer means synchronised: no error, not `TIME_ERROR`, `STA_UNSYNC` clear.
fn synchronized_state(state: libc::c_int, status: libc::c_int) -> bool {
    state >= 0 && state != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsync_flag_or_an_error_state_means_unsynchronised() {
        assert!(synchronized_state(libc::TIME_OK, 0));
        assert!(!synchronized_state(libc::TIME_OK, libc::STA_UNSYNC));
        assert!(!synchronized_state(libc::TIME_ERROR, 0));
        assert!(!synchronized_state(-1, 0));
    }

    #[test]
    fn the_system_clock_runs_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
