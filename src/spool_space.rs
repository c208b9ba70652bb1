//! Whether the spool's disk is full, told without flooding the log.
//!
//! A full disk stops only what needs new space: storing new mail and
//! rewriting envelopes. Renames and removals still work, so delivery goes
//! on and frees space by itself. Everything that writes to the spool
//! reports here; the log gets one warning when a write first fails for lack
//! of space, again at most once a [`WARNING_INTERVAL`] while it lasts, and
//! one line when writing works again.

use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use crate::admin::metrics;

/// While the spool stays full, its warning repeats at most this often.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Out of space (ENOSPC) or over a disk quota (EDQUOT): freeing space
/// fixes it, unlike a permission or I/O error.
pub fn is_full(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The state of one spool's disk, shared by everything that writes to it.
pub struct SpaceWatch {
    dir: String,
    full: Mutex<Option<FullSpell>>,
}

/// A time the spool was full, in clock milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FullSpell {
    since: u64,
    warned_at: u64,
    /// Writes that failed since the last warning, without it.
    unreported: u64,
}

/// What the log says after a write.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Nothing,
    /// The spool is full; `failed` writes failed since the last warning.
    Full {
        failed: u64,
    },
    /// Writing works again after a spell of `full_for_ms`.
    Writable {
        full_for_ms: u64,
    },
}

/// The decision, apart from logging: a write at `now` that `succeeded` or
/// failed for lack of space, during `spell` (if the spool was full).
fn notice(spell: &mut Option<FullSpell>, succeeded: bool, now: u64) -> Notice {
    let interval = WARNING_INTERVAL.as_millis() as u64;
    match (spell.as_mut(), succeeded) {
        (None, true) => Notice::Nothing,
        (Some(full), true) => {
            let full_for_ms = now.saturating_sub(full.since);
            *spell = None;
            Notice::Writable { full_for_ms }
        }
        (None, false) => {
            *spell = Some(FullSpell {
                since: now,
                warned_at: now,
                unreported: 0,
            });
            Notice::Full { failed: 1 }
        }
        (Some(full), false) if now.saturating_sub(full.warned_at) >= interval => {
            let failed = full.unreported + 1;
            full.warned_at = now;
            full.unreported = 0;
            Notice::Full { failed }
        }
        (Some(full), false) => {
            full.unreported += 1;
            Notice::Nothing
        }
    }
}

impl SpaceWatch {
    pub fn new(dir: &Path) -> Self {
        metrics::spool_full(false);
        SpaceWatch {
            dir: dir.display().to_string(),
            full: Mutex::new(None),
        }
    }

    /// What an operator does about it; for the log and refused clients.
    pub fn hint(&self) -> String {
        format!(
            "free space on the disk of spool.dir ({}); queued mail still goes out and its removal frees space",
            self.dir
        )
    }

    /// A spool write succeeded at `now` (clock milliseconds).
    pub fn wrote(&self, now: u64) {
        self.report(true, now);
    }

    /// A spool write failed for lack of space ([`is_full`]) at `now`.
    pub fn failed(&self, now: u64) {
        self.report(false, now);
    }

    fn report(&self, succeeded: bool, now: u64) {
        let notice = notice(&mut self.full.lock().expect("space lock"), succeeded, now);
        match notice {
            Notice::Nothing => {}
            Notice::Full { failed } => {
                metrics::spool_full(true);
                warn!(spool = %self.dir, failed_writes = failed, reason = "spool_full", hint = %self.hint(), "spool is full: new mail is refused with 452 4.3.1 until space is freed; delivery goes on");
            }
            Notice::Writable { full_for_ms } => {
                metrics::spool_full(false);
                info!(spool = %self.dir, full_for_s = full_for_ms / 1000, "spool writable again: new mail is accepted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_is_said_at_once_then_once_a_minute_and_writable_once() {
        let minute = WARNING_INTERVAL.as_millis() as u64;
        // (now, the write succeeded, what the log says)
        let table = [
            (0, true, Notice::Nothing),
            (1_000, false, Notice::Full { failed: 1 }),
            (1_001, false, Notice::Nothing),
            (minute, false, Notice::Nothing),
            (1_000 + minute, false, Notice::Full { failed: 3 }),
            (1_001 + minute, false, Notice::Nothing),
            (
                5_000 + minute,
                true,
                Notice::Writable {
                    full_for_ms: 4_000 + minute,
                },
            ),
            (5_001 + minute, true, Notice::Nothing),
            (6_000 + minute, false, Notice::Full { failed: 1 }),
        ];
        let mut spell = None;
        for (now, succeeded, expected) in table {
            assert_eq!(
                notice(&mut spell, succeeded, now),
                expected,
                "at {now} ms, succeeded: {succeeded}"
            );
        }
    }

    #[test]
    fn only_space_and_quota_errors_mean_full() {
        let full = [libc::ENOSPC, libc::EDQUOT];
        let other = [libc::EACCES, libc::EIO, libc::EFBIG, libc::ENOENT];
        for errno in full {
            assert!(is_full(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in other {
            assert!(!is_full(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }
}
