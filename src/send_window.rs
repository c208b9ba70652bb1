//! Rolling 24-hour sending caps per account. Mail over a cap waits in the
//! queue instead of going out and getting the account locked for a day by
//! the provider; the provider's own limit reply pauses the account the same
//! way. Sends are logged to a small file so a restart keeps counting.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;

use tracing::warn;

use crate::private_files;

pub const WINDOW_MS: u64 = 24 * 3600 * 1000;

/// One upstream transaction: when, and to how many recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub at: u64,
    pub recipients: u32,
}

pub struct SendWindow {
    message_limit: Option<u32>,
    recipient_limit: Option<u32>,
    /// Transactions of the last 24 hours, oldest first (with reservations
    /// for those in flight).
    sends: VecDeque<Send>,
    /// The recipients of `sends`, kept rather than summed per message.
    recipients: u64,
    /// Set when the provider said its own limit is reached.
    paused_until: Option<u64>,
    log: PathBuf,
    /// The log, open for appending once a send was written to it.
    log_file: Option<File>,
    /// Lines in the log file, to know when compacting it pays off.
    logged_lines: usize,
}

impl SendWindow {
    /// Loads the sends of the last 24 hours from `log` (missing: none).
    pub fn load(
        log: PathBuf,
        message_limit: Option<u32>,
        recipient_limit: Option<u32>,
        now: u64,
    ) -> Self {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let sends = text
            .lines()
            .filter_map(|line| {
                let (at, recipients) = line.split_once(' ')?;
                Some(Send {
                    at: at.parse().ok()?,
                    recipients: recipients.parse().ok()?,
                })
            })
            .filter(|send| send.at + WINDOW_MS > now)
            .collect::<VecDeque<Send>>();
        let mut window = SendWindow {
            message_limit,
            recipient_limit,
            recipients: sends.iter().map(|send| send.recipients as u64).sum(),
            sends,
            paused_until: None,
            log,
            log_file: None,
            logged_lines: text.lines().count(),
        };
        window.compact();
        window
    }

    /// New caps from a reload; the sends counted so far still count.
    pub fn set_limits(&mut self, message_limit: Option<u32>, recipient_limit: Option<u32>) {
        self.message_limit = message_limit;
        self.recipient_limit = recipient_limit;
    }

    /// Reserves a transaction for `recipients` now, or says when the window
    /// will have room. A transaction larger than a whole day's cap goes out
    /// alone, when the window is empty.
    pub fn admit(&mut self, now: u64, recipients: u32) -> Result<Send, u64> {
        self.expire(now);
        if let Some(until) = self.paused_until.filter(|&until| until > now) {
            return Err(until);
        }
        let mut messages = self.sends.len() as u64 + 1;
        let mut total = self.recipients + recipients as u64;
        let fits = |messages: u64, total: u64| {
            self.message_limit
                .is_none_or(|limit| messages <= limit as u64)
                && self
                    .recipient_limit
                    .is_none_or(|limit| total <= limit as u64)
        };
        if !fits(messages, total) {
            // Room appears when enough of the oldest sends have aged out.
            for send in &self.sends {
                messages -= 1;
                total -= send.recipients as u64;
                if fits(messages, total) || messages == 1 {
                    return Err(send.at + WINDOW_MS);
                }
            }
        }
        let send = Send {
            at: now,
            recipients,
        };
        self.sends.push_back(send);
        self.recipients += recipients as u64;
        Ok(send)
    }

    /// The reserved transaction went out: it counts from now on, and with a
    /// cap configured also after a restart (without one, the sends only
    /// estimate when a provider's own limit frees up, and are not worth a
    /// write per message).
    pub fn confirm(&mut self, send: Send) {
        if self.message_limit.is_none() && self.recipient_limit.is_none() {
            return;
        }
        let line = format!("{} {}\n", send.at, send.recipients);
        let file = match self.log_file.take() {
            Some(file) => Ok(file),
            None => private_files::options()
                .create(true)
                .append(true)
                .open(&self.log),
        };
        let written = file.and_then(|mut file| {
            file.write_all(line.as_bytes())?;
            Ok(file)
        });
        match written {
            Ok(file) => self.log_file = Some(file),
            Err(err) => {
                warn!(file = %self.log.display(), error = %err, "cannot record a send for the daily limits; a restart may under-count");
            }
        }
        self.logged_lines += 1;
        if self.logged_lines > 2 * self.sends.len() + 1000 {
            self.compact();
        }
    }

    /// The reserved transaction did not go out.
    pub fn cancel(&mut self, send: Send) {
        if let Some(index) = self.sends.iter().rposition(|s| *s == send) {
            self.sends.remove(index);
            self.recipients -= send.recipients as u64;
        }
    }

    /// The provider refused for its own daily limit: nothing goes out until
    /// the oldest send we know of leaves its 24-hour window (with none
    /// known, a full day). Returns that time.
    pub fn pause(&mut self, now: u64) -> u64 {
        self.expire(now);
        let until = self
            .sends
            .front()
            .map_or(now + WINDOW_MS, |oldest| oldest.at + WINDOW_MS);
        self.paused_until = Some(until);
        until
    }

    fn expire(&mut self, now: u64) {
        while let Some(send) = self.sends.front().filter(|send| send.at + WINDOW_MS <= now) {
            self.recipients -= send.recipients as u64;
            self.sends.pop_front();
        }
    }

    /// Rewrites the log with only the sends still in the window.
    fn compact(&mut self) {
        let text: String = self
            .sends
            .iter()
            .map(|send| format!("{} {}\n", send.at, send.recipients))
            .collect();
        let temporary = self.log.with_extension("tmp");
        let written = private_files::write(&temporary, text.as_bytes())
            .and_then(|()| fs::rename(&temporary, &self.log));
        // The next append opens the new file.
        self.log_file = None;
        match written {
            Ok(()) => self.logged_lines = self.sends.len(),
            Err(err) => {
                warn!(file = %self.log.display(), error = %err, "cannot rewrite the daily-limit log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600 * 1000;

    fn window(
        dir: &tempfile::TempDir,
        messages: Option<u32>,
        recipients: Option<u32>,
    ) -> SendWindow {
        SendWindow::load(dir.path().join("gmail.log"), messages, recipients, 0)
    }

    /// A transaction that went out at `at`.
    fn sent(window: &mut SendWindow, at: u64, recipients: u32) {
        let send = window.admit(at, recipients).unwrap();
        window.confirm(send);
    }

    #[test]
    fn message_cap_waits_for_the_oldest_send_to_age_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut window = window(&dir, Some(2), None);
        sent(&mut window, HOUR, 1);
        sent(&mut window, 2 * HOUR, 1);

        assert_eq!(window.admit(3 * HOUR, 1), Err(HOUR + WINDOW_MS));
        assert!(window.admit(HOUR + WINDOW_MS, 1).is_ok());
    }

    #[test]
    fn recipient_cap_counts_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let mut window = window(&dir, None, Some(10));
        sent(&mut window, HOUR, 6);
        sent(&mut window, 2 * HOUR, 3);

        assert!(window.admit(3 * HOUR, 1).is_ok());
        assert_eq!(window.admit(3 * HOUR, 5), Err(HOUR + WINDOW_MS));
        // More than a day's cap at once: alone, when the window is empty.
        assert_eq!(window.admit(3 * HOUR, 50), Err(3 * HOUR + WINDOW_MS));
    }

    #[test]
    fn cancelled_reservations_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut window = window(&dir, Some(1), None);
        let send = window.admit(HOUR, 1).unwrap();
        window.cancel(send);
        assert!(window.admit(HOUR, 1).is_ok());
    }

    #[test]
    fn sends_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = window(&dir, Some(1), None);
        sent(&mut first, HOUR, 1);

        let mut restarted = SendWindow::load(dir.path().join("gmail.log"), Some(1), None, 2 * HOUR);

        assert_eq!(restarted.admit(2 * HOUR, 1), Err(HOUR + WINDOW_MS));
    }

    #[test]
    fn a_provider_limit_pauses_until_the_oldest_send_ages_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut window = window(&dir, None, None);
        sent(&mut window, HOUR, 1);

        assert_eq!(window.pause(5 * HOUR), HOUR + WINDOW_MS);
        assert_eq!(window.admit(6 * HOUR, 1), Err(HOUR + WINDOW_MS));
        assert!(window.admit(HOUR + WINDOW_MS, 1).is_ok());
    }
}
