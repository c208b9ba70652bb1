//! One alert per state change of an account, not per message: whether a
//! hold was alerted and when it was last said, kept in a small file under
//! the spool so a restart neither repeats nor forgets it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::private_files;

/// While an account stays on hold, a reminder at most this often.
pub const REMINDER_INTERVAL_MS: u64 = 24 * 3600 * 1000;

/// What to say about an account that is (still) on hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldNotice {
    /// The hold is new: the alert.
    Alert,
    /// Still held a day after the last alert or reminder.
    Reminder,
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Alerted {
    /// Unix milliseconds of the alert.
    at: u64,
    /// Of the alert or the last reminder.
    last_said: u64,
}

/// Accounts whose hold was alerted, by name.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountAlerts {
    held: BTreeMap<String, Alerted>,
}

impl AccountAlerts {
    /// The state in `path`; none when the file is missing or unreadable
    /// (said in the log: an alert may then repeat once).
    pub fn load(path: &Path) -> AccountAlerts {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                warn!(file = %path.display(), error = %err, "unreadable notice state: a hold alert may be repeated once");
                AccountAlerts::default()
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => AccountAlerts::default(),
            Err(err) => {
                warn!(file = %path.display(), error = %err, "unreadable notice state: a hold alert may be repeated once");
                AccountAlerts::default()
            }
        }
    }

    /// Writes the state to `path` (0600), replacing it whole.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let temp = PathBuf::from(format!("{}.tmp", path.display()));
        private_files::write(&temp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&temp, path)
    }

    /// `account` is on hold at `now`: the alert, a reminder or nothing.
    pub fn held(&mut self, account: &str, now: u64) -> HeldNotice {
        match self.held.get_mut(account) {
            None => {
                let alerted = Alerted {
                    at: now,
                    last_said: now,
                };
                self.held.insert(account.to_string(), alerted);
                HeldNotice::Alert
            }
            Some(alerted) if now.saturating_sub(alerted.last_said) >= REMINDER_INTERVAL_MS => {
                alerted.last_said = now;
                HeldNotice::Reminder
            }
            Some(_) => HeldNotice::Nothing,
        }
    }

    /// `account`'s hold ended; whether it had been alerted (and so its
    /// release is said too).
    pub fn released(&mut self, account: &str) -> bool {
        self.held.remove(account).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_is_alerted_once_reminded_daily_and_its_release_said_once() {
        let day = REMINDER_INTERVAL_MS;
        let mut alerts = AccountAlerts::default();
        // (account, at, what is said)
        let table = [
            ("gmail", 0, HeldNotice::Alert),
            ("gmail", 1_000, HeldNotice::Nothing),
            ("office", 1_000, HeldNotice::Alert),
            ("gmail", day - 1, HeldNotice::Nothing),
            ("gmail", day, HeldNotice::Reminder),
            ("gmail", day + 1, HeldNotice::Nothing),
            ("gmail", 2 * day, HeldNotice::Reminder),
        ];
        for (account, at, expected) in table {
            assert_eq!(alerts.held(account, at), expected, "{account} at {at}");
        }
        assert!(alerts.released("gmail"));
        assert!(!alerts.released("gmail"), "said once");
        assert_eq!(
            alerts.held("gmail", 2 * day + 5),
            HeldNotice::Alert,
            "a new hold"
        );
    }

    #[test]
    fn the_state_survives_a_restart_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.json");
        assert_eq!(AccountAlerts::load(&path), AccountAlerts::default());
        let mut alerts = AccountAlerts::default();
        alerts.held("gmail", 5);
        alerts.save(&path).unwrap();

        let mut loaded = AccountAlerts::load(&path);
        assert_eq!(loaded, alerts);
        assert_eq!(loaded.held("gmail", 6), HeldNotice::Nothing);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(AccountAlerts::load(&path), AccountAlerts::default());
    }
}
