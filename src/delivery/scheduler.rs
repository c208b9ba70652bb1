//! The retry scheduler: the deferred index, due messages, unsaved results.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::Delivery;
use super::delays::DelayWatch;
use super::worker::queue_job;
use crate::spool::{Envelope, FileVersion, Spool, State};
use crate::spool_space::is_full;

/// An attempt's result that the spool could not take (see
/// `Delivery::store`): the new envelope and the state it goes to.
pub(super) struct Unsaved {
    pub(super) envelope: Envelope,
    pub(super) to: State,
}

impl Unsaved {
    /// Whether to attempt it again as it is, without waiting for the write:
    /// a deferred message at its time, a held one when its account's hold
    /// was lifted. A rejected one waits for the operator anyway.
    fn is_due(&self, account_on_hold: bool, now: u64) -> bool {
        match self.to {
            State::Deferred => self.envelope.next_attempt_at <= now,
            State::Held => !account_on_hold,
            State::Active | State::Rejected => false,
        }
    }
}

impl Delivery {
    /// Hands the unsaved messages that are due again (their hold lifted, for
    /// held ones) to the workers as they are, and writes the others (see
    /// `store`). Returns when the next one is due.
    async fn resume_unsaved(&self, now: u64) -> Option<u64> {
        let mut next = None;
        let mut due = Vec::new();
        let pending: Vec<(Envelope, State)> = {
            let mut unsaved = self.unsaved.lock().expect("unsaved lock");
            unsaved.retain(|_, entry| {
                let Some(account) = self.account(&entry.envelope.account) else {
                    // Removed by a reload: written to its state, and waits.
                    return true;
                };
                let is_due = entry.is_due(account.hold().is_some(), now);
                if is_due {
                    due.push((account, entry.envelope.clone()));
                } else if entry.to == State::Deferred {
                    let at = entry.envelope.next_attempt_at;
                    next = Some(next.map_or(at, |n: u64| n.min(at)));
                }
                !is_due
            });
            unsaved
                .values()
                .map(|entry| (entry.envelope.clone(), entry.to))
                .collect()
        };
        for (account, envelope) in due {
            queue_job(&account, envelope);
        }
        if pending.is_empty() {
            return next;
        }
        let written = self
            .io(move |spool| {
                let (mut done, mut wrote) = (Vec::new(), false);
                for (envelope, to) in pending {
                    match spool.update(&envelope, State::Active, to) {
                        Ok(()) => wrote = true,
                        // Deleted by an operator meanwhile.
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        // The rest would not fit either; next scan.
                        Err(err) => return Ok((done, wrote, Some(err))),
                    }
                    done.push(envelope.id);
                }
                Ok((done, wrote, None))
            })
            .await;
        if let Ok((done, wrote, failure)) = written {
            let mut unsaved = self.unsaved.lock().expect("unsaved lock");
            for id in &done {
                unsaved.remove(id);
            }
            match failure {
                Some(err) if is_full(&err) => self.space.failed(),
                // Logged when the attempt settled.
                Some(_) => {}
                None if wrote => self.space.wrote(),
                None => {}
            }
        }
        next
    }

    /// Moves due messages from `deferred/` to the workers. Re-reads the
    /// directory at least every `scan_interval` so that changes made by
    /// `sendbridge queue` from outside are picked up.
    pub(super) async fn scheduler(self: Arc<Self>) {
        let mut index = DeferredIndex::default();
        let mut delays = DelayWatch::default();
        loop {
            let next_warning = self.warn_of_delays(&mut delays).await;
            let now = self.clock.now();
            let next_unsaved = self.resume_unsaved(now).await;
            let configured: Vec<String> = self
                .accounts
                .read()
                .expect("accounts lock")
                .keys()
                .cloned()
                .collect();
            let previous = std::mem::take(&mut index);
            let scanned = self
                .io(move |spool| previous.scan(spool, &configured, now))
                .await
                .map(|(scanned, due, next)| {
                    index = scanned;
                    (due, next)
                });
            let mut wait = self.settings.scan_interval;
            match scanned {
                Ok((due, next)) => {
                    for envelope in due {
                        let Some(account) = self.account(&envelope.account) else {
                            // Removed by a reload since the scan.
                            let moved = self
                                .io(move |spool| {
                                    spool.move_to(&envelope.id, State::Active, State::Deferred)
                                })
                                .await;
                            if let Err(err) = moved {
                                error!(error = %err, "cannot return a message to deferred/");
                            }
                            continue;
                        };
                        queue_job(&account, envelope);
                    }
                    let next = [next, next_unsaved, next_warning]
                        .into_iter()
                        .flatten()
                        .min();
                    if let Some(next) = next {
                        // From the time the scan ended, which may be later.
                        let until_next = next.saturating_sub(self.clock.now());
                        wait = wait.min(Duration::from_millis(until_next));
                    }
                }
                Err(err) => error!(error = %err, "cannot read the queue"),
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake_scheduler.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

/// What the scheduler knows of `deferred/`, so that a scan reads only the
/// envelopes that changed since the last one (a queue over a daily cap can
/// hold thousands, scanned every `scan_interval`).
#[derive(Default)]
struct DeferredIndex {
    entries: HashMap<String, Indexed>,
}

struct Indexed {
    version: FileVersion,
    account: String,
    next_attempt_at: u64,
}

impl DeferredIndex {
    /// Brings the index up to date and moves the messages due at `now` to
    /// `active/`, oldest first. Returns them and the next due time.
    fn scan(
        mut self,
        spool: &Spool,
        configured: &[String],
        now: u64,
    ) -> std::io::Result<(Self, Vec<Envelope>, Option<u64>)> {
        let listed = spool.versions(State::Deferred)?;
        let present: HashSet<&String> = listed.iter().map(|(id, _)| id).collect();
        self.entries.retain(|id, _| present.contains(id));
        for (id, version) in &listed {
            if self
                .entries
                .get(id)
                .is_some_and(|entry| entry.version == *version)
            {
                continue;
            }
            let Some(envelope) = read_deferred(spool, id)? else {
                continue;
            };
            if !configured.contains(&envelope.account) {
                // Said once per change; it stays deferred until the account
                // is configured again.
                warn!(id = %envelope.id, account = %envelope.account, "queued message for an account that is no longer configured");
            }
            let entry = Indexed {
                version: *version,
                account: envelope.account,
                next_attempt_at: envelope.next_attempt_at,
            };
            self.entries.insert(id.clone(), entry);
        }
        let mut due_ids = Vec::new();
        let mut next: Option<u64> = None;
        for (id, entry) in &self.entries {
            if !configured.contains(&entry.account) {
                continue;
            }
            if entry.next_attempt_at <= now {
                due_ids.push(id.clone());
            } else {
                next = Some(next.map_or(entry.next_attempt_at, |n| n.min(entry.next_attempt_at)));
            }
        }
        // Ids sort by arrival.
        due_ids.sort();
        let mut due = Vec::new();
        for id in due_ids {
            self.entries.remove(&id);
            let Some(mut envelope) = read_deferred(spool, &id)? else {
                continue;
            };
            // A rename, which a full disk allows; the note is written when
            // the attempt settles.
            match spool.move_to(&id, State::Deferred, State::Active) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                moved => moved?,
            }
            envelope.record(now, "retrying");
            info!(id = %envelope.id, account = %envelope.account, attempts = envelope.attempts, "message retrying");
            due.push(envelope);
        }
        Ok((self, due, next))
    }
}

/// A deferred envelope; `None` when it moved on meanwhile (a `queue delete`
/// or `retry` from outside).
fn read_deferred(spool: &Spool, id: &str) -> std::io::Result<Option<Envelope>> {
    match spool.read_envelope(State::Deferred, id) {
        Ok(envelope) => Ok(Some(envelope)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsaved_results_are_due_again_without_their_write() {
        let at = |next_attempt_at| Envelope {
            next_attempt_at,
            ..Envelope::default()
        };
        // (state it goes to, due at, account on hold, due at 1000)
        let table = [
            (State::Deferred, 1_000, false, true),
            (State::Deferred, 1_000, true, true),
            (State::Deferred, 1_001, false, false),
            (State::Held, 0, true, false),
            (State::Held, 0, false, true),
            (State::Rejected, 0, false, false),
        ];
        for (to, next_attempt_at, on_hold, expected) in table {
            let unsaved = Unsaved {
                envelope: at(next_attempt_at),
                to,
            };
            assert_eq!(
                unsaved.is_due(on_hold, 1_000),
                expected,
                "{to} at {next_attempt_at}, on hold: {on_hold}"
            );
        }
    }

    /// A deferred message in `spool` for `account`, due at `next_attempt_at`.
    fn deferred(spool: &Spool, account: &str, next_attempt_at: u64) -> Envelope {
        let mut envelope = Envelope {
            account: account.into(),
            recipients: vec!["a@example.com".into()],
            next_attempt_at,
            ..Envelope::default()
        };
        spool
            .accept(
                &mut envelope,
                &std::sync::Arc::new(b"Subject: s\r\n\r\nx\r\n".to_vec()),
                State::Deferred,
            )
            .unwrap();
        envelope
    }

    #[test]
    fn the_deferred_index_sees_changes_made_from_outside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let later = deferred(&spool, "gmail", 10_000);
        let orphan = deferred(&spool, "removed", 0);
        let configured = ["gmail".to_string()];

        let (index, due, next) = DeferredIndex::default()
            .scan(&spool, &configured, 5_000)
            .unwrap();
        assert!(due.is_empty(), "an unconfigured account's mail waits");
        assert_eq!(next, Some(10_000));

        // `sendbridge queue retry` rewrites the envelope right away, within
        // the same clock tick as likely as not.
        let mut retried = spool.read_envelope(State::Deferred, &later.id).unwrap();
        retried.next_attempt_at = 5_000;
        spool
            .update(&retried, State::Deferred, State::Deferred)
            .unwrap();
        let (index, due, next) = index.scan(&spool, &configured, 5_000).unwrap();

        assert_eq!(due.len(), 1);
        assert_eq!(due[0].id, later.id);
        assert_eq!(spool.find(&later.id).unwrap(), Some(State::Active));
        assert_eq!(next, None);
        assert!(index.entries.contains_key(&orphan.id));
        assert!(!index.entries.contains_key(&later.id));
    }
}
