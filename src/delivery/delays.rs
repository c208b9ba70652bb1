//! Delay warnings: a message still waiting in `deferred/` or `held/` after
//! `notify.delay_warning` gets one notice to its sender. The scheduler runs
//! the check, so no other task moves a deferred envelope meanwhile.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tracing::error;

use super::Delivery;
use crate::spool::{Envelope, FileVersion, Spool, State};

/// The waiting messages, by id: the version of the envelope read last and
/// when its warning is due (`None`: never, e.g. already warned).
#[derive(Default)]
pub(super) struct DelayWatch {
    entries: HashMap<String, (FileVersion, Option<u64>)>,
}

/// When a message's delay warning is due, if ever.
fn warning_due(envelope: &Envelope, delay: Duration) -> Option<u64> {
    let never = delay.is_zero() || envelope.is_notice || envelope.notices.delay_warned;
    (!never).then(|| envelope.received_at + delay.as_millis() as u64)
}

impl DelayWatch {
    /// Brings the watch up to date (reading only envelopes that changed),
    /// marks the messages due at `now` as warned in their envelopes, and
    /// returns them with the next time a warning is due.
    fn check(
        &mut self,
        spool: &Spool,
        delay: Duration,
        now: u64,
    ) -> std::io::Result<(Vec<Envelope>, Option<u64>)> {
        let mut listed = Vec::new();
        for state in [State::Deferred, State::Held] {
            for (id, version) in spool.versions(state)? {
                listed.push((state, id, version));
            }
        }
        let present: HashSet<&String> = listed.iter().map(|(_, id, _)| id).collect();
        self.entries.retain(|id, _| present.contains(id));
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        for (state, id, version) in listed {
            let at = match self.entries.get(&id) {
                Some((known, at)) if *known == version => *at,
                _ => match spool.read_envelope(state, &id) {
                    Ok(envelope) => {
                        let at = warning_due(&envelope, delay);
                        self.entries.insert(id.clone(), (version, at));
                        at
                    }
                    // Moved on meanwhile.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                },
            };
            match at {
                Some(at) if at <= now => due.push((state, id)),
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        let mut warned = Vec::new();
        for (state, id) in due {
            self.entries.remove(&id);
            // Marked first: a warning is never repeated, even when queueing
            // it fails (which the log says).
            let mut envelope = match spool.read_envelope(state, &id) {
                Ok(envelope) => envelope,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            envelope.notices.delay_warned = true;
            envelope.record(now, "delay warning");
            match spool.update(&envelope, state, state) {
                Ok(()) => warned.push(envelope),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok((warned, next))
    }
}

impl Delivery {
    /// Sends the delay warnings due now; returns when the next one is due.
    pub(super) async fn warn_of_delays(&self, watch: &mut DelayWatch) -> Option<u64> {
        let delay = self.notifier.delay_warning();
        if delay.is_zero() {
            return None;
        }
        let now = self.clock.now();
        let mut current = std::mem::take(watch);
        let checked = self
            .io(move |spool| {
                let result = current.check(spool, delay, now);
                Ok((current, result))
            })
            .await;
        let (warned, next) = match checked {
            Ok((current, result)) => {
                *watch = current;
                match result {
                    Ok(found) => found,
                    Err(err) => {
                        error!(error = %err, "cannot check the queue for delayed mail");
                        return None;
                    }
                }
            }
            Err(err) => {
                error!(error = %err, "cannot check the queue for delayed mail");
                return None;
            }
        };
        if !warned.is_empty() {
            self.notice(move |notifier, accounts, now| {
                for envelope in &warned {
                    notifier.message_delayed(envelope, accounts, now);
                }
            })
            .await;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_message_after_the_delay() {
        let delay = Duration::from_secs(60);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let queued = |state, received_at, is_notice| {
            let mut envelope = Envelope {
                account: "gmail".into(),
                mail_from: "a@b".into(),
                recipients: vec!["c@d".into()],
                received_at,
                is_notice,
                ..Envelope::default()
            };
            spool
                .accept(
                    &mut envelope,
                    &std::sync::Arc::new(b"Subject: s\r\n\r\nx\r\n".to_vec()),
                    state,
                )
                .unwrap();
            envelope.id
        };
        let deferred = queued(State::Deferred, 1_000, false);
        let held = queued(State::Held, 30_000, false);
        let _notice = queued(State::Deferred, 0, true);
        let mut watch = DelayWatch::default();

        let (warned, next) = watch.check(&spool, delay, 60_999).unwrap();
        assert!(warned.is_empty());
        assert_eq!(next, Some(61_000));

        let (warned, next) = watch.check(&spool, delay, 61_000).unwrap();
        let ids: Vec<&str> = warned.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, [deferred.as_str()]);
        assert_eq!(next, Some(90_000));
        assert!(
            spool
                .read_envelope(State::Deferred, &deferred)
                .unwrap()
                .notices
                .delay_warned
        );

        let (warned, next) = watch.check(&spool, delay, 1_000_000).unwrap();
        let ids: Vec<&str> = warned.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, [held.as_str()], "held mail too, and each once");
        assert_eq!(next, None);

        // A fresh watch (a restart) reads the marks.
        let (warned, _) = DelayWatch::default()
            .check(&spool, delay, 2_000_000)
            .unwrap();
        assert!(warned.is_empty());
    }
}
