//! Worker loops: connection reuse, and sending in parts within the daily
//! sending window.

use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::warn;

use super::Delivery;
use super::account::{Account, AccountSettings};
use super::settle::{Client, Verdict};
use crate::config::DeliveryMode;
use crate::reply::Reply;
use crate::spool::{Envelope, RefusedRecipient};
use crate::transport::{BodyFlags, Connection, Failure, Outcome, Sent, Transport};

/// A message for a worker, moved to `active/` by whoever queued it, with the
/// envelope as just written. `message` is the bytes when the session still
/// holds them (saves reading them back); `verdict` is the waiting session.
pub(super) struct Job {
    pub(super) envelope: Envelope,
    pub(super) message: Option<Arc<Vec<u8>>>,
    pub(super) verdict: Option<oneshot::Sender<Outcome>>,
}

impl Delivery {
    pub(super) async fn worker(self: Arc<Self>, account: Arc<Account>) {
        let mut connection: Option<Connection> = None;
        let mut settings = account.settings();
        loop {
            let next_job = async { account.queue.lock().await.recv().await };
            let job = tokio::select! {
                job = next_job => job,
                _ = tokio::time::sleep(self.settings.idle_timeout), if connection.is_some() => {
                    connection.take().expect("checked").quit().await;
                    continue;
                }
                _ = self.shutdown.cancelled() => None,
                _ = account.retired.cancelled() => None,
            };
            let Some(job) = job else { break };
            let current = account.settings();
            if !Arc::ptr_eq(&current, &settings) {
                // Opened with settings a reload replaced.
                if let Some(old) = connection.take() {
                    old.quit().await;
                }
                settings = current;
            }
            self.deliver(&account, &settings, job, &mut connection)
                .await;
        }
        if let Some(connection) = connection {
            connection.quit().await;
        }
    }

    async fn deliver(
        &self,
        account: &Account,
        settings: &AccountSettings,
        job: Job,
        connection: &mut Option<Connection>,
    ) {
        // Only a waiting passthrough client keeps the message itself; every
        // other message was acknowledged and must stay in the spool.
        let waits = job
            .verdict
            .as_ref()
            .is_some_and(|client| !client.is_closed());
        let client = Client {
            keeps_it: job.verdict.is_some() && self.settings.mode == DeliveryMode::Passthrough,
            waits,
        };
        let mut envelope = job.envelope;
        if let Some(hold) = account.hold() {
            if !hold.lets_through(envelope.retry_requested_at) {
                let verdict = Verdict::AuthFailed(hold.failure);
                self.settle(&mut envelope, &verdict, client).await;
                notify(job.verdict, verdict.into());
                return;
            }
        }
        let message = match job.message {
            Some(message) => message,
            None => {
                let id = envelope.id.clone();
                match self.io(move |spool| spool.read_message(&id)).await {
                    Ok(message) => Arc::new(message),
                    Err(err) => {
                        // Deleted by an operator meanwhile, or unreadable.
                        warn!(id = %envelope.id, error = %err, "queued message vanished before delivery");
                        return;
                    }
                }
            }
        };
        let verdict = self
            .attempt(account, settings, connection, &mut envelope, &message)
            .await;
        if verdict.is_attempt() {
            envelope.attempts += 1;
        }
        self.settle(&mut envelope, &verdict, client).await;
        match &verdict {
            Verdict::AuthFailed(failure) => self.start_hold(account, failure).await,
            Verdict::Delivered(_) if account.hold().is_some() => {
                self.release_hold(account, "a retried message was delivered")
                    .await;
            }
            _ => {}
        }
        notify(job.verdict, verdict.into());
    }

    /// Sends the message to its pending recipients in parts of at most the
    /// provider's per-message limit, within the account's sending window.
    /// Each recipient's result is recorded in the envelope, which is stored
    /// when the attempt settles, so a retry never sends to anyone twice (a
    /// crash before that may: delivery is at-least-once).
    async fn attempt(
        &self,
        account: &Account,
        settings: &AccountSettings,
        connection: &mut Option<Connection>,
        envelope: &mut Envelope,
        message: &[u8],
    ) -> Verdict {
        let pending = envelope.pending();
        let mut last_delivered = None;
        let mut problem = None;
        let mut parts = pending.chunks(settings.recipients_per_message);
        for part in parts.by_ref() {
            let admitted = account
                .window
                .lock()
                .expect("window lock")
                .admit(self.clock.now(), part.len() as u32);
            let send = match admitted {
                Ok(send) => send,
                Err(until) => {
                    let failure = over_window(&account.name);
                    return Verdict::Postponed { until, failure };
                }
            };
            let sent = send_part(
                &settings.transport,
                connection,
                part,
                envelope.flags,
                message,
            )
            .await;
            for (address, outcome) in &sent.refused {
                record_recipient(envelope, address, outcome, &mut problem);
            }
            let Some(outcome) = sent.outcome else {
                account.window.lock().expect("window lock").cancel(send);
                continue;
            };
            for address in part {
                if !sent.refused.iter().any(|(refused, _)| refused == address) {
                    record_recipient(envelope, address, &outcome, &mut problem);
                }
            }
            let mut window = account.window.lock().expect("window lock");
            if let Outcome::Delivered(reply) = outcome {
                window.confirm(send);
                last_delivered = Some(reply);
            } else {
                window.cancel(send);
                // The verdict was on the message or the connection: the
                // remaining parts would fare the same.
                if let Outcome::Rejected(_) = &outcome {
                    for address in parts.flatten() {
                        record_recipient(envelope, address, &outcome, &mut problem);
                    }
                }
                break;
            }
        }
        // Over the provider's limit, recipients stay pending: unfinished.
        let unfinished = !envelope.pending().is_empty();
        let outcome = match (problem, last_delivered) {
            (Some(problem), _) if unfinished => problem,
            // Delivered, to everyone or to all but refused recipients.
            (_, Some(reply)) => Outcome::Delivered(reply),
            // Every recipient refused.
            (Some(problem), None) => problem,
            (None, None) => Outcome::Delivered(Reply::new(
                250,
                [2, 0, 0],
                "already delivered to every recipient",
            )),
        };
        Verdict::of(outcome, || {
            let mut window = account.window.lock().expect("window lock");
            window.pause(self.clock.now())
        })
    }
}
/// One transaction over a reused or new connection. A reused connection the
/// server closed meanwhile is replaced once (not for an HTTP API, where a
/// request without an answer may have been sent: sending it again at once
/// could deliver twice).
async fn send_part(
    transport: &Transport,
    connection: &mut Option<Connection>,
    recipients: &[String],
    flags: BodyFlags,
    message: &[u8],
) -> Sent {
    for _ in 0..2 {
        let reused = connection
            .as_ref()
            .is_some_and(Connection::may_have_gone_stale);
        let mut current = match connection.take() {
            Some(current) => current,
            None => match transport.connect().await {
                Ok(current) => current,
                Err(outcome) => {
                    return Sent {
                        refused: Vec::new(),
                        outcome: Some(outcome),
                    };
                }
            },
        };
        let sent = transport
            .send(&mut current, recipients, flags, message)
            .await;
        match &sent.outcome {
            Some(Outcome::Deferred(deferral)) if deferral.reply.is_none() && reused => continue,
            // The connection is still in step after a verdict on the message.
            None | Some(Outcome::Delivered(_) | Outcome::Rejected(_) | Outcome::OverLimit(_)) => {
                *connection = Some(current)
            }
            _ => {}
        }
        return sent;
    }
    unreachable!("the second attempt uses a new connection and returns")
}

/// Our own sending window is full: the message waits, as over the
/// provider's limit.
fn over_window(account: &str) -> Failure {
    Failure {
        reply: Reply::new(451, [4, 7, 0], "over the account's daily sending limit"),
        reason: "daily_limit",
        hint: Some(format!(
            "the limit is accounts.{account}.daily_message_limit / daily_recipient_limit"
        )),
    }
}

/// Hands a message in `active/` to one of its account's workers.
pub(super) fn queue_job(account: &Account, envelope: Envelope) {
    let _ = account.jobs.send(Job {
        envelope,
        message: None,
        verdict: None,
    });
}

/// Notes one recipient's result in the envelope, and keeps in `problem`
/// the most pressing reason the message is not done.
fn record_recipient(
    envelope: &mut Envelope,
    address: &str,
    outcome: &Outcome,
    problem: &mut Option<Outcome>,
) {
    match outcome {
        Outcome::Delivered(_) => envelope.delivered.push(address.to_string()),
        Outcome::Rejected(failure) => envelope.refused.push(RefusedRecipient {
            address: address.to_string(),
            reply: failure.reply.clone(),
        }),
        _ => {}
    }
    let urgency = |outcome: &Outcome| match outcome {
        Outcome::Delivered(_) => 0,
        Outcome::Rejected(_) => 1,
        Outcome::Deferred(_) => 2,
        Outcome::OverLimit(_) => 3,
        Outcome::AuthFailed(_) => 4,
    };
    if urgency(outcome) > problem.as_ref().map_or(0, urgency) {
        *problem = Some(outcome.clone());
    }
}

pub(super) fn notify(verdict: Option<oneshot::Sender<Outcome>>, outcome: Outcome) {
    if let Some(verdict) = verdict {
        let _ = verdict.send(outcome);
    }
}
