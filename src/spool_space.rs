//! Whether the spool's disk is full, told without flooding the log.
//!
//! A full disk stops only what needs new space: storing new mail and
//! rewriting envelopes. Renames and removals still work, so delivery goes
//! on and frees space by itself. Writes of messages, envelopes and
//! transcripts report here; the log gets one warning when a write first
//! fails for lack of space, again at most once a [`WARNING_INTERVAL`] while
//! it lasts, and one line when writing works again.

use std::io;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::observe::metrics;

/// While the spool stays full, its warning repeats at most this often.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

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
    start: Instant,
    log: Mutex<SpaceLog>,
    /// Called once per time of failed writes that the log warned about.
    on_full: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// What the log was told, in milliseconds since the watch started.
#[derive(Debug, Default)]
struct SpaceLog {
    full: Option<FullSpell>,
    last_warning: Option<u64>,
    /// Writes that failed since the last warning, without it.
    unreported: u64,
}

/// A time during which writes failed.
#[derive(Debug)]
struct FullSpell {
    since: u64,
    /// A warning said so.
    warned: bool,
}

/// What the log says after a write.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Nothing,
    /// The spool is full; `failed` writes failed since the last warning;
    /// `first`: the first warning of this time of failures.
    Full {
        failed: u64,
        first: bool,
    },
    /// Writing works again after `full_for_ms` of failures.
    Writable {
        full_for_ms: u64,
    },
}

impl SpaceLog {
    /// The decision, apart from logging: a write at `now` that `succeeded`
    /// or failed for lack of space. Warnings are a minute apart even when
    /// the disk flips between full and not (small envelope updates fit
    /// where a message does not), and only a time of failures that was
    /// warned about ends with a line.
    fn notice(&mut self, succeeded: bool, now: u64) -> Notice {
        if succeeded {
            return match self.full.take() {
                Some(FullSpell {
                    since,
                    warned: true,
                }) => Notice::Writable {
                    full_for_ms: now.saturating_sub(since),
                },
                _ => Notice::Nothing,
            };
        }
        let full = self.full.get_or_insert(FullSpell {
            since: now,
            warned: false,
        });
        let interval = WARNING_INTERVAL.as_millis() as u64;
        if self
            .last_warning
            .is_some_and(|at| now.saturating_sub(at) < interval)
        {
            self.unreported += 1;
            return Notice::Nothing;
        }
        let first = !full.warned;
        full.warned = true;
        self.last_warning = Some(now);
        let failed = std::mem::take(&mut self.unreported) + 1;
        Notice::Full { failed, first }
    }
}

impl SpaceWatch {
    pub fn new(dir: &Path) -> Self {
        metrics::spool_full(false);
        SpaceWatch {
            dir: dir.display().to_string(),
            start: Instant::now(),
            log: Mutex::new(SpaceLog::default()),
            on_full: OnceLock::new(),
        }
    }

    /// Has `alert` called when the spool fills up: once per time of failed
    /// writes, with the first warning. Set once.
    pub fn when_full(&self, alert: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_full.set(Box::new(alert));
    }

    /// What an operator does about it; for the log and refused clients.
    pub fn hint(&self) -> String {
        format!(
            "free space on the disk of spool.dir ({}); queued mail still goes out and its removal frees space",
            self.dir
        )
    }

    /// A write to the spool succeeded.
    pub fn wrote(&self) {
        self.report(true);
    }

    /// A write to the spool failed for lack of space ([`is_full`]).
    pub fn failed(&self) {
        self.report(false);
    }

    fn report(&self, succeeded: bool) {
        metrics::spool_full(!succeeded);
        let now = self.start.elapsed().as_millis() as u64;
        let notice = self.log.lock().expect("space lock").notice(succeeded, now);
        match notice {
            Notice::Nothing => {}
            Notice::Full { failed, first } => {
                warn!(spool = %self.dir, failed_writes = failed, reason = "spool_full", hint = %self.hint(), "spool is full: new mail is refused with 452 4.3.1 until space is freed; delivery goes on");
                if let (true, Some(alert)) = (first, self.on_full.get()) {
                    alert();
                }
            }
            Notice::Writable { full_for_ms } => {
                info!(spool = %self.dir, full_for_s = full_for_ms / 1000, "spool writable again");
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
            (
                1_000,
                false,
                Notice::Full {
                    failed: 1,
                    first: true,
                },
            ),
            (1_001, false, Notice::Nothing),
            (minute, false, Notice::Nothing),
            (
                1_000 + minute,
                false,
                Notice::Full {
                    failed: 3,
                    first: false,
                },
            ),
            (1_001 + minute, false, Notice::Nothing),
            (
                5_000 + minute,
                true,
                Notice::Writable {
                    full_for_ms: 4_000 + minute,
                },
            ),
            (5_001 + minute, true, Notice::Nothing),
            // Full again within the minute: counted, not said, and so its
            // end is not said either.
            (6_000 + minute, false, Notice::Nothing),
            (7_000 + minute, true, Notice::Nothing),
            (
                1_000 + 2 * minute,
                false,
                Notice::Full {
                    failed: 3,
                    first: true,
                },
            ),
            (
                2_000 + 2 * minute,
                true,
                Notice::Writable { full_for_ms: 1_000 },
            ),
        ];
        let mut log = SpaceLog::default();
        for (now, succeeded, expected) in table {
            assert_eq!(
                log.notice(succeeded, now),
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
