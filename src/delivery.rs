//! The delivery engine: spool first, then deliver (DESIGN.md, "Delivery
//! model").
//!
//! `submit` stores a message durably and hands it to its account's workers.
//! Workers keep upstream connections open for reuse. Temporary failures are
//! retried with exponential backoff by the scheduler; permanent rejections go
//! to `rejected/`; a refused sign-in puts the whole account on hold, where
//! one probe login at a time checks whether it works again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::access_tokens::TokenSource;
use crate::config::{AccountConfig, Config, DeliveryConfig, DeliveryMode};
use crate::observe::metrics::{self, Event};
use crate::provider_replies::diagnose;
use crate::reply::{Refusal, Reply};
use crate::send_window::SendWindow;
use crate::spool::operations;
use crate::spool::{Envelope, FileVersion, RefusedRecipient, Spool, State};
use crate::spool_space::{SpaceWatch, is_full};
use crate::upstream::{BodyFlags, Connection, Outcome, Sent, Upstream};

/// Unix milliseconds that follow tokio's clock, so retry schedules can be
/// tested with a paused clock. Anchored to the wall clock at start.
#[derive(Clone, Copy)]
struct Clock {
    unix_at_start: u64,
    start: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Clock {
            unix_at_start: crate::spool::unix_millis(),
            start: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.unix_at_start + self.start.elapsed().as_millis() as u64
    }
}

/// A message for a worker, moved to `active/` by whoever queued it, with the
/// envelope as just written. `message` is the bytes when the session still
/// holds them (saves reading them back); `verdict` is the waiting session.
struct Job {
    envelope: Envelope,
    message: Option<Arc<Vec<u8>>>,
    verdict: Option<oneshot::Sender<Outcome>>,
}

/// An attempt's result that the spool could not take (see
/// `Delivery::store`): the new envelope and the state it goes to.
struct Unsaved {
    envelope: Envelope,
    to: State,
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

/// Why an account is on hold, and what to do about it.
#[derive(Clone)]
pub struct Hold {
    /// When it began (clock millis); `None` for a hold carried over from
    /// the previous run, which is probed at once and counts as older than
    /// any retry request.
    since: Option<u64>,
    pub reply: Reply,
    pub hint: String,
}

struct Account {
    /// Replaced by a reload; in-flight deliveries finish with the old one.
    upstream: RwLock<Arc<Upstream>>,
    /// Counts replacements, so workers drop connections opened before one.
    generation: AtomicU64,
    /// The provider's limit of recipients per transaction.
    recipients_per_message: AtomicUsize,
    window: Mutex<SendWindow>,
    jobs: mpsc::UnboundedSender<Job>,
    queue: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    hold: Mutex<Option<Hold>>,
    /// Wakes the prober when a hold starts.
    hold_started: Notify,
    /// Cancelled when a reload removes the account: its tasks end.
    retired: CancellationToken,
}

impl Account {
    fn new(
        name: &str,
        config: &AccountConfig,
        upstream: Upstream,
        spool: &Spool,
        now: u64,
    ) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let window = SendWindow::load(
            spool.limits_path(name),
            config.daily_message_limit,
            config.daily_recipient_limit,
            now,
        );
        Account {
            upstream: RwLock::new(Arc::new(upstream)),
            generation: AtomicU64::new(0),
            recipients_per_message: AtomicUsize::new(config.max_recipients_per_message),
            window: Mutex::new(window),
            jobs,
            queue: tokio::sync::Mutex::new(queue),
            hold: Mutex::new(None),
            hold_started: Notify::new(),
            retired: CancellationToken::new(),
        }
    }

    fn hold(&self) -> Option<Hold> {
        self.hold.lock().expect("hold lock").clone()
    }

    fn upstream(&self) -> Arc<Upstream> {
        self.upstream.read().expect("upstream lock").clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Takes a reloaded account's settings; returns whether its sign-in
    /// credentials changed.
    fn reconfigure(&self, config: &AccountConfig, upstream: Upstream) -> bool {
        let mut current = self.upstream.write().expect("upstream lock");
        let credentials_changed = !current.same_sign_in(&upstream);
        *current = Arc::new(upstream);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.recipients_per_message
            .store(config.max_recipients_per_message, Ordering::Release);
        self.window
            .lock()
            .expect("window lock")
            .set_limits(config.daily_message_limit, config.daily_recipient_limit);
        credentials_changed
    }
}

pub struct Delivery {
    spool: Arc<Spool>,
    settings: DeliveryConfig,
    clock: Clock,
    accounts: RwLock<HashMap<String, Arc<Account>>>,
    /// For the `auth = "oauth2"` accounts of this and reloaded configurations.
    tokens: TokenSource,
    /// Whether the spool's disk is full; says so in the log.
    space: SpaceWatch,
    /// Messages in `active/` whose last attempt could not be recorded, by id.
    unsaved: Mutex<HashMap<String, Unsaved>>,
    wake_scheduler: Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Delivery {
    /// Opens and recovers the spool and starts workers, the retry scheduler
    /// and hold probers. They stop when `shutdown` is cancelled. `tokens`
    /// gives `auth = "oauth2"` accounts their access tokens.
    pub fn start(
        config: &Config,
        shutdown: CancellationToken,
        tokens: TokenSource,
    ) -> anyhow::Result<Arc<Delivery>> {
        let spool = Spool::open(&config.spool.dir).map_err(|err| {
            anyhow::anyhow!(
                "spool.dir: cannot use {}: {err}",
                config.spool.dir.display()
            )
        })?;
        let recovered = spool.recover()?;
        if recovered != Default::default() {
            info!(
                removed = recovered.removed,
                requeued = recovered.reactivated,
                "spool recovered after an unclean stop: unacknowledged leftovers removed, interrupted deliveries requeued"
            );
        }
        let clock = Clock::new();
        let delivery = Arc::new(Delivery {
            spool: Arc::new(spool),
            settings: config.delivery.clone(),
            clock,
            accounts: RwLock::new(HashMap::new()),
            tokens,
            space: SpaceWatch::new(&config.spool.dir),
            unsaved: Mutex::new(HashMap::new()),
            wake_scheduler: Notify::new(),
            shutdown,
            tasks: TaskTracker::new(),
        });
        let held = delivery.spool.list(State::Held)?;
        for (name, account_config) in &config.accounts {
            let upstream = Upstream::new(
                name,
                account_config,
                &config.server.hostname,
                &delivery.tokens,
            )?;
            let account =
                Account::new(name, account_config, upstream, &delivery.spool, clock.now());
            // Held mail from the last run: the password may have been fixed
            // while the relay was stopped, so probe at once.
            if held.iter().any(|envelope| &envelope.account == name) {
                let reply =
                    Reply::new(535, [5, 7, 8], "held at the previous run; checking sign-in");
                let hint = account.upstream().sign_in_hint(&reply);
                *account.hold.lock().expect("hold lock") = Some(Hold {
                    since: None,
                    reply,
                    hint,
                });
            }
            delivery.add_account(name, account, account_config.max_connections);
        }
        delivery.tasks.spawn(delivery.clone().scheduler());
        delivery.tasks.close();
        Ok(delivery)
    }

    /// Registers an account and starts its workers and its hold prober.
    fn add_account(self: &Arc<Self>, name: &str, account: Account, workers: usize) {
        let account = Arc::new(account);
        for _ in 0..workers {
            self.tasks.spawn(self.clone().worker(account.clone()));
        }
        self.tasks
            .spawn(self.clone().prober(name.to_string(), account.clone()));
        self.accounts
            .write()
            .expect("accounts lock")
            .insert(name.to_string(), account);
    }

    fn account(&self, name: &str) -> Option<Arc<Account>> {
        self.accounts
            .read()
            .expect("accounts lock")
            .get(name)
            .cloned()
    }

    /// Applies a reloaded configuration's accounts. Changed ones take their
    /// new settings (idle connections opened with the old ones are closed),
    /// new ones start, removed ones stop (their queued mail waits until they
    /// are configured again), and a hold is released when the account's
    /// credentials changed. Nothing changes when an account is invalid.
    /// `max_connections` of an existing account applies after a restart.
    pub async fn reload(self: &Arc<Self>, config: &Config) -> anyhow::Result<()> {
        let mut upstreams = Vec::new();
        for (name, account) in &config.accounts {
            let upstream = Upstream::new(name, account, &config.server.hostname, &self.tokens)?;
            upstreams.push((name, upstream));
        }
        let removed: Vec<(String, Arc<Account>)> = {
            let mut accounts = self.accounts.write().expect("accounts lock");
            let names: Vec<String> = accounts
                .keys()
                .filter(|name| !config.accounts.contains_key(*name))
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|name| accounts.remove(&name).map(|account| (name, account)))
                .collect()
        };
        for (name, account) in removed {
            account.retired.cancel();
            warn!(account = %name, "account removed by a reload: its queued mail waits until it is configured again");
        }
        for (name, upstream) in upstreams {
            let account_config = &config.accounts[name];
            let Some(account) = self.account(name) else {
                let account = Account::new(
                    name,
                    account_config,
                    upstream,
                    &self.spool,
                    self.clock.now(),
                );
                self.add_account(name, account, account_config.max_connections);
                info!(account = %name, "account added by a reload");
                continue;
            };
            let credentials_changed = account.reconfigure(account_config, upstream);
            if credentials_changed && account.hold().is_some() {
                self.release_hold(name, &account, "its credentials changed")
                    .await;
            }
        }
        self.wake_scheduler.notify_one();
        Ok(())
    }

    /// Waits (bounded) for workers to finish in-flight deliveries after
    /// shutdown; what is cut off returns to `deferred/` at the next start.
    pub async fn stopped(&self, grace: Duration) {
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                "deliveries still running after the shutdown grace period; they resume at the next start"
            );
        }
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Whether the spool's disk is full; other writers to the spool report
    /// their failures there, so the log says it once a minute.
    pub fn spool_space(&self) -> &SpaceWatch {
        &self.space
    }

    /// Each account's name and, while it is on hold, why; sorted by name.
    /// For the admin interface.
    pub fn account_holds(&self) -> Vec<(String, Option<Hold>)> {
        let mut holds: Vec<_> = self
            .accounts
            .read()
            .expect("accounts lock")
            .iter()
            .map(|(name, account)| (name.clone(), account.hold()))
            .collect();
        holds.sort_by(|a, b| a.0.cmp(&b.0));
        holds
    }

    /// Re-reads the queue now instead of at the next `scan_interval`, e.g.
    /// after a retry requested on the status page.
    pub fn scan_now(&self) {
        self.wake_scheduler.notify_one();
    }

    /// Stores a message and answers the client per the delivery mode.
    pub async fn submit(&self, mut envelope: Envelope, message: Vec<u8>) -> Submitted {
        let account_name = envelope.account.clone();
        let Some(account) = self.account(&account_name) else {
            let reply = Reply::new(451, [4, 3, 5], "No such upstream account configured");
            let hint = format!("add [accounts.{account_name}] to the configuration");
            return Submitted::refused(reply, None, Refusal::new("no_account", hint));
        };
        let hold = account.hold();
        if let (Some(hold), DeliveryMode::Passthrough) = (&hold, self.settings.mode) {
            // The client keeps the message; no need to store it first.
            let outcome = Outcome::AuthFailed(hold.reply.clone());
            return Submitted::from_outcome(&account.upstream(), None, &outcome);
        }
        let state = if hold.is_some() {
            State::Held
        } else {
            State::Active
        };
        let now = self.clock.now();
        envelope.received_at = now;
        envelope.record(
            now,
            format!(
                "received from {} ({} bytes)",
                envelope.client,
                message.len()
            ),
        );
        let message = Arc::new(message);
        let stored = {
            let (spool, message) = (self.spool.clone(), message.clone());
            tokio::task::spawn_blocking(move || {
                spool
                    .accept(&mut envelope, &message, state)
                    .map(|()| envelope)
            })
            .await
        };
        let envelope = match stored {
            Ok(Ok(envelope)) => {
                self.space.wrote();
                envelope
            }
            Ok(Err(err)) => {
                let refusal = if is_full(&err) {
                    // Logged once a minute, not per message.
                    self.space.failed();
                    Refusal::new("spool_full", self.space.hint())
                } else {
                    let hint = format!(
                        "check free space and permissions of spool.dir ({})",
                        self.spool.root().display()
                    );
                    error!(error = %err, reason = "spool_failed", hint = %hint, "cannot store a message: nothing was acknowledged");
                    Refusal::new("spool_failed", hint)
                };
                let reply = Reply::new(
                    452,
                    [4, 3, 1],
                    "Insufficient system storage, try again later",
                );
                return Submitted::refused(reply, None, refusal);
            }
            Err(_) => {
                let reply = Reply::new(451, [4, 3, 0], "Internal error, try again later");
                return Submitted::refused(
                    reply,
                    None,
                    Refusal::new("internal", "see the error above"),
                );
            }
        };
        let id = envelope.id.clone();
        info!(id = %id, account = %envelope.account, state = %state, recipients = envelope.recipients.len(), size = envelope.size, "message spooled");
        metrics::message(&envelope.account, Event::Accepted);
        if state == State::Held {
            metrics::message(&envelope.account, Event::Held);
        }
        let queued = Submitted {
            reply: Reply::new(250, [2, 0, 0], format!("OK queued as {id}")),
            id: Some(id.clone()),
            refusal: None,
        };
        if hold.is_some() {
            return queued;
        }
        let wait = self.settings.mode != DeliveryMode::Queue;
        let (verdict, outcome) = if wait {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        let job = Job {
            envelope,
            message: wait.then_some(message),
            verdict,
        };
        if account.jobs.send(job).is_err() {
            // Shutting down: the message is safe in active/ and resumes at start.
            return queued;
        }
        let Some(outcome) = outcome else {
            return queued;
        };
        let id = Some(id);
        match self.settings.mode {
            DeliveryMode::Hybrid => {
                match tokio::time::timeout(self.settings.sync_timeout, outcome).await {
                    Ok(Ok(rejected @ Outcome::Rejected(_))) => {
                        Submitted::from_outcome(&account.upstream(), id, &rejected)
                    }
                    _ => queued,
                }
            }
            DeliveryMode::Passthrough => match outcome.await {
                Ok(Outcome::Delivered(_)) => queued,
                Ok(other) => Submitted::from_outcome(&account.upstream(), id, &other),
                Err(_) => {
                    let reply = Reply::new(451, [4, 3, 0], "Delivery interrupted, try again later");
                    Submitted::refused(reply, id, Refusal::new("internal", "the relay is stopping"))
                }
            },
            DeliveryMode::Queue => queued,
        }
    }

    async fn worker(self: Arc<Self>, account: Arc<Account>) {
        let mut connection: Option<Connection> = None;
        let mut generation = account.generation();
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
            if account.generation() != generation {
                // Opened with settings a reload replaced.
                if let Some(old) = connection.take() {
                    old.quit().await;
                }
                generation = account.generation();
            }
            self.deliver(&account, job, &mut connection).await;
        }
        if let Some(connection) = connection {
            connection.quit().await;
        }
    }

    async fn deliver(&self, account: &Account, job: Job, connection: &mut Option<Connection>) {
        // Only a waiting passthrough client keeps the message itself; every
        // other message was acknowledged and must stay in the spool.
        let client_keeps_it =
            job.verdict.is_some() && self.settings.mode == DeliveryMode::Passthrough;
        let mut envelope = job.envelope;
        if let Some(hold) = account.hold() {
            let operator_retry = envelope
                .retry_requested_at
                .is_some_and(|at| hold.since.is_none_or(|since| at >= since));
            if !operator_retry {
                let verdict = Verdict::Done(Outcome::AuthFailed(hold.reply.clone()));
                self.settle(&mut envelope, &verdict, client_keeps_it).await;
                notify(job.verdict, Outcome::AuthFailed(hold.reply));
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
            .attempt(account, connection, &mut envelope, &message)
            .await;
        if !matches!(verdict, Verdict::Postponed { .. }) {
            envelope.attempts += 1;
        }
        self.settle(&mut envelope, &verdict, client_keeps_it).await;
        let outcome = match verdict {
            Verdict::Done(outcome) => outcome,
            Verdict::Postponed { reply, .. } => Outcome::OverLimit(reply),
        };
        match &outcome {
            Outcome::AuthFailed(reply) => self.start_hold(&envelope.account, account, reply),
            Outcome::Delivered(_) if account.hold().is_some() => {
                self.release_hold(
                    &envelope.account,
                    account,
                    "a retried message was delivered",
                )
                .await;
            }
            _ => {}
        }
        notify(job.verdict, outcome);
    }

    /// Sends the message to its pending recipients in parts of at most the
    /// provider's per-message limit, within the account's sending window.
    /// Each recipient's result is recorded in the envelope, which is stored
    /// when the attempt settles, so a retry never sends to anyone twice (a
    /// crash before that may: delivery is at-least-once).
    async fn attempt(
        &self,
        account: &Account,
        connection: &mut Option<Connection>,
        envelope: &mut Envelope,
        message: &[u8],
    ) -> Verdict {
        let pending = envelope.pending();
        let mut last_delivered = None;
        let mut problem = None;
        let mut parts = pending.chunks(account.recipients_per_message.load(Ordering::Acquire));
        for part in parts.by_ref() {
            let admitted = account
                .window
                .lock()
                .expect("window lock")
                .admit(self.clock.now(), part.len() as u32);
            let send = match admitted {
                Ok(send) => send,
                Err(until) => {
                    let reply =
                        Reply::new(451, [4, 7, 0], "over the account's daily sending limit");
                    return Verdict::Postponed { until, reply };
                }
            };
            let sent = self
                .send_part(account, connection, part, envelope.flags, message)
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
                if let Outcome::Rejected(reply) = &outcome {
                    for address in parts.flatten() {
                        record_recipient(
                            envelope,
                            address,
                            &Outcome::Rejected(reply.clone()),
                            &mut problem,
                        );
                    }
                }
                break;
            }
        }
        if let Some(Outcome::OverLimit(reply)) = problem {
            let until = account
                .window
                .lock()
                .expect("window lock")
                .pause(self.clock.now());
            return Verdict::Postponed { until, reply };
        }
        let unfinished = !envelope.pending().is_empty();
        match (problem, last_delivered) {
            (Some(problem), _) if unfinished => Verdict::Done(problem),
            // Delivered, to everyone or to all but refused recipients.
            (_, Some(reply)) => Verdict::Done(Outcome::Delivered(reply)),
            // Every recipient refused.
            (Some(problem), None) => Verdict::Done(problem),
            (None, None) => Verdict::Done(Outcome::Delivered(Reply::new(
                250,
                [2, 0, 0],
                "already delivered to every recipient",
            ))),
        }
    }

    /// One upstream transaction over a reused or new connection. A reused
    /// connection the server closed meanwhile is replaced once.
    async fn send_part(
        &self,
        account: &Account,
        connection: &mut Option<Connection>,
        recipients: &[String],
        flags: BodyFlags,
        message: &[u8],
    ) -> Sent {
        let upstream = account.upstream();
        for _ in 0..2 {
            let reused = connection.is_some();
            let mut current = match connection.take() {
                Some(current) => current,
                None => match upstream.connect().await {
                    Ok(current) => current,
                    Err(outcome) => {
                        return Sent {
                            refused: Vec::new(),
                            outcome: Some(outcome),
                        };
                    }
                },
            };
            let sent = upstream
                .send(&mut current, recipients, flags, message)
                .await;
            match &sent.outcome {
                Some(Outcome::Deferred { reply: None, .. }) if reused => continue,
                // The connection is still in step after a verdict on the message.
                None
                | Some(Outcome::Delivered(_) | Outcome::Rejected(_) | Outcome::OverLimit(_)) => {
                    *connection = Some(current)
                }
                _ => {}
            }
            return sent;
        }
        unreachable!("the second attempt uses a new connection and returns")
    }

    /// Records an attempt's verdict in the spool. With `discard`, the client
    /// still holds the message (passthrough) and a failure deletes our copy.
    async fn settle(&self, envelope: &mut Envelope, verdict: &Verdict, discard: bool) {
        let now = self.clock.now();
        let id = envelope.id.clone();
        let account = envelope.account.clone();
        envelope.retry_requested_at = None;
        let outcome = match verdict {
            Verdict::Done(outcome) => outcome,
            Verdict::Postponed { until, reply } => {
                if discard {
                    info!(id = %id, account = %account, reason = "daily_limit", "message returned to the client (passthrough): over the daily sending limit");
                    metrics::message(&account, Event::Returned);
                    self.discard(State::Active, &id).await;
                    return;
                }
                envelope.next_attempt_at = *until;
                envelope.last_reply = Some(reply.to_string());
                let wait_s = until.saturating_sub(now) / 1000;
                let hint = diagnose(&account, reply).hint.unwrap_or_else(|| {
                    format!("the limit is accounts.{account}.daily_message_limit / daily_recipient_limit")
                });
                warn!(id = %id, account = %account, reason = "daily_limit", upstream_reply = %reply, resume_in_s = wait_s, hint = %hint, "message waits for the daily sending limit's window");
                metrics::message(&account, Event::Deferred);
                envelope.record(
                    now,
                    format!("deferred: daily sending limit; resumes in {wait_s}s"),
                );
                self.store(envelope, State::Deferred).await;
                return;
            }
        };
        let delivered = matches!(outcome, Outcome::Delivered(_));
        if discard && !delivered {
            info!(id = %id, account = %account, outcome = %describe(outcome), "message returned to the client (passthrough)");
            metrics::message(&account, Event::Returned);
            self.discard(State::Active, &id).await;
            return;
        }
        let to = match outcome {
            Outcome::Delivered(reply) if envelope.refused.is_empty() => {
                info!(id = %id, account = %account, attempts = envelope.attempts, recipients = envelope.delivered.len(), upstream_reply = %reply, "message delivered");
                metrics::delivered(
                    &account,
                    Duration::from_millis(now.saturating_sub(envelope.received_at)),
                );
                if let Err(err) = self.io(move |spool| spool.remove(State::Active, &id)).await {
                    error!(id = %envelope.id, error = %err, "delivered, but cannot remove it from the spool: it may be sent again");
                }
                return;
            }
            Outcome::Delivered(_) | Outcome::Rejected(_) => {
                let first = envelope.refused[0].reply.clone();
                let diagnosis = diagnose(&account, &first);
                let refused: Vec<&str> = envelope
                    .refused
                    .iter()
                    .map(|refused| refused.address.as_str())
                    .collect();
                warn!(id = %id, account = %account, reason = diagnosis.reason, delivered = envelope.delivered.len(), refused = ?refused, upstream_reply = %first, hint = diagnosis.hint.as_deref().unwrap_or(""), "upstream refused the message or some recipients; kept in rejected/ (`queue retry` sends to the refused recipients again)");
                metrics::message(&account, Event::Rejected);
                envelope.last_reply = Some(first.to_string());
                State::Rejected
            }
            Outcome::AuthFailed(reply) => {
                info!(id = %id, account = %account, "message held until the account's sign-in works");
                metrics::message(&account, Event::Held);
                envelope.last_reply = Some(reply.to_string());
                State::Held
            }
            Outcome::OverLimit(_) => unreachable!("over-limit outcomes are postponed"),
            Outcome::Deferred { reason, reply } => {
                envelope.last_reply = Some(reason.clone());
                let diagnosis = reply.as_ref().map(|reply| diagnose(&account, reply));
                let code = diagnosis
                    .as_ref()
                    .map_or("upstream_unavailable", |d| d.reason);
                let hint = diagnosis.and_then(|d| d.hint).unwrap_or_default();
                let age = Duration::from_millis(now.saturating_sub(envelope.received_at));
                if age >= self.settings.max_age {
                    warn!(id = %id, account = %account, attempts = envelope.attempts, last_reply = %reason, reason = "expired", hint = %hint, "message given up after delivery.max_age; kept in rejected/");
                    metrics::message(&account, Event::Rejected);
                    State::Rejected
                } else {
                    let delay = retry_delay(&self.settings, envelope.attempts);
                    envelope.next_attempt_at = now + delay.as_millis() as u64;
                    info!(id = %id, account = %account, attempts = envelope.attempts, retry_in_s = delay.as_secs(), reason = code, last_reply = %reason, hint = %hint, "message deferred");
                    metrics::message(&account, Event::Deferred);
                    State::Deferred
                }
            }
        };
        envelope.record(now, format!("{to}: {}", describe(outcome)));
        self.store(envelope, to).await;
    }

    /// Moves an envelope out of `active/` with its new contents.
    ///
    /// When they cannot be written (a full disk), the message stays in
    /// `active/`, which only this process touches (`queue retry` skips it; a
    /// restart returns it to `deferred/`), and the new envelope waits in
    /// `unsaved`: the scheduler writes it once there is space, or hands it to
    /// a worker as it is when it is due again. So a full disk delays no
    /// retry, and the recipients this attempt delivered to never get the
    /// message again while the relay runs; a restart before the write may
    /// repeat them, as a crash before any update may (at-least-once).
    async fn store(&self, envelope: &Envelope, to: State) {
        let updated = envelope.clone();
        let stored = self
            .io(move |spool| spool.update(&updated, State::Active, to))
            .await;
        let kept = match stored {
            Ok(()) => {
                self.space.wrote();
                false
            }
            // Deleted by an operator while it was being delivered.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                warn!(id = %envelope.id, error = %err, "message deleted from the spool during its delivery attempt");
                false
            }
            Err(err) => {
                if is_full(&err) {
                    self.space.failed();
                } else {
                    error!(id = %envelope.id, error = %err, "cannot record a delivery attempt in the spool; kept in memory and written again at the next scan");
                }
                let unsaved = Unsaved {
                    envelope: envelope.clone(),
                    to,
                };
                self.unsaved
                    .lock()
                    .expect("unsaved lock")
                    .insert(envelope.id.clone(), unsaved);
                true
            }
        };
        // The scheduler plans with every retry's time.
        if to == State::Deferred || kept {
            self.wake_scheduler.notify_one();
        }
    }

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

    fn start_hold(&self, name: &str, account: &Account, reply: &Reply) {
        let hint = account.upstream().sign_in_hint(reply);
        let mut hold = account.hold.lock().expect("hold lock");
        let new = hold.as_ref().is_none_or(|hold| hold.since.is_none());
        *hold = Some(Hold {
            since: Some(self.clock.now()),
            reply: reply.clone(),
            hint: hint.clone(),
        });
        drop(hold);
        if new {
            error!(
                account = %name,
                reason = "upstream_auth",
                upstream_reply = %reply,
                hint = %hint,
                "account on hold: the upstream refused sign-in; its mail waits in held/ and goes out by itself once sign-in works (probe, restart, or `sendbridge queue retry --account {name}`)"
            );
            account.hold_started.notify_one();
        }
    }

    /// Ends a hold and makes the account's held mail due now.
    async fn release_hold(&self, name: &str, account: &Account, why: &str) {
        if account.hold.lock().expect("hold lock").take().is_none() {
            return;
        }
        let now = self.clock.now();
        let name_owned = name.to_string();
        let released = self
            .io(move |spool| operations::release_held(spool, &name_owned, now))
            .await;
        match released {
            Ok(ids) => {
                for id in &ids {
                    info!(id = %id, account = %name, "message released from hold");
                }
                warn!(account = %name, released = ids.len(), why, "account hold released: held mail is being sent")
            }
            Err(err) => {
                error!(account = %name, error = %err, "hold released, but held mail could not be requeued")
            }
        }
        self.wake_scheduler.notify_one();
    }

    /// While the account is on hold, tries one sign-in at backoff intervals.
    async fn prober(self: Arc<Self>, name: String, account: Arc<Account>) {
        loop {
            let Some(hold) = account.hold() else {
                tokio::select! {
                    _ = account.hold_started.notified() => continue,
                    _ = self.shutdown.cancelled() => return,
                    _ = account.retired.cancelled() => return,
                }
            };
            // A hold carried over from the last run is probed at once.
            let mut delay = if hold.since.is_none() {
                Duration::ZERO
            } else {
                self.settings.retry_initial
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                if account.hold().is_none() {
                    break;
                }
                match account.upstream().probe().await {
                    Ok(()) => {
                        self.release_hold(&name, &account, "sign-in works again")
                            .await;
                        break;
                    }
                    Err(outcome) => {
                        if let Outcome::AuthFailed(reply) = &outcome {
                            self.start_hold(&name, &account, reply);
                        }
                        delay =
                            (delay * 2).clamp(self.settings.retry_initial, self.settings.retry_max);
                        warn!(account = %name, outcome = %describe(&outcome), next_probe_in_s = delay.as_secs(), "account still on hold");
                    }
                }
            }
        }
    }

    /// Moves due messages from `deferred/` to the workers. Re-reads the
    /// directory at least every `scan_interval` so that changes made by
    /// `sendbridge queue` from outside are picked up.
    async fn scheduler(self: Arc<Self>) {
        let mut index = DeferredIndex::default();
        loop {
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
                    let next = match (next, next_unsaved) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
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

    async fn discard(&self, state: State, id: &str) {
        let id = id.to_string();
        if let Err(err) = self.io(move |spool| spool.remove(state, &id)).await {
            error!(error = %err, "cannot remove a message from the spool");
        }
    }

    /// Runs blocking spool I/O (fsync) off the async workers.
    async fn io<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Spool) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || work(&spool))
            .await
            .map_err(std::io::Error::other)?
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

/// Hands a message in `active/` to one of its account's workers.
fn queue_job(account: &Account, envelope: Envelope) {
    let _ = account.jobs.send(Job {
        envelope,
        message: None,
        verdict: None,
    });
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

/// How delivering a message ended this time, over all its parts.
enum Verdict {
    Done(Outcome),
    /// Over a sending limit: the rest waits until `until`. Not an attempt,
    /// and never a reason to give the message up.
    Postponed {
        until: u64,
        reply: Reply,
    },
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
        Outcome::Rejected(reply) => envelope.refused.push(RefusedRecipient {
            address: address.to_string(),
            reply: reply.clone(),
        }),
        _ => {}
    }
    let urgency = |outcome: &Outcome| match outcome {
        Outcome::Delivered(_) => 0,
        Outcome::Rejected(_) => 1,
        Outcome::Deferred { .. } => 2,
        Outcome::OverLimit(_) => 3,
        Outcome::AuthFailed(_) => 4,
    };
    if urgency(outcome) > problem.as_ref().map_or(0, urgency) {
        *problem = Some(outcome.clone());
    }
}

fn notify(verdict: Option<oneshot::Sender<Outcome>>, outcome: Outcome) {
    if let Some(verdict) = verdict {
        let _ = verdict.send(outcome);
    }
}

/// `retry_initial`, doubling per attempt, at most `retry_max`.
fn retry_delay(settings: &DeliveryConfig, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    settings
        .retry_initial
        .saturating_mul(1 << doublings)
        .min(settings.retry_max)
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered(reply) => format!("delivered: {reply}"),
        Outcome::Rejected(reply) => format!("rejected: {reply}"),
        Outcome::AuthFailed(reply) => format!("sign-in refused: {reply}"),
        Outcome::OverLimit(reply) => format!("over the sending limit: {reply}"),
        Outcome::Deferred { reason, .. } => format!("deferred: {reason}"),
    }
}

/// What the client hears about a message it handed over.
#[derive(Debug)]
pub struct Submitted {
    pub reply: Reply,
    /// The spool id, when the message was stored.
    pub id: Option<String>,
    /// Why the message was refused, when it was.
    pub refusal: Option<Refusal>,
}

impl Submitted {
    fn refused(reply: Reply, id: Option<String>, refusal: Refusal) -> Self {
        Submitted {
            reply,
            id,
            refusal: Some(refusal),
        }
    }

    /// What a client hears when the upstream's verdict is its answer:
    /// verdicts on the message pass through; an upstream sign-in failure
    /// never looks like the client's own login failing.
    fn from_outcome(upstream: &Upstream, id: Option<String>, outcome: &Outcome) -> Self {
        let account = upstream.name();
        let diagnosed = |reply: &Reply| {
            let diagnosis = diagnose(account, reply);
            Refusal {
                reason: diagnosis.reason,
                hint: diagnosis.hint,
            }
        };
        let (reply, refusal) = match outcome {
            Outcome::Delivered(reply) => (reply.clone(), None),
            Outcome::Rejected(reply) => (reply.clone(), Some(diagnosed(reply))),
            Outcome::AuthFailed(reply) => {
                let hint = upstream.sign_in_hint(reply);
                let text =
                    format!("Upstream account {account} refused the sign-in ({reply}); {hint}");
                let refusal = Refusal::new("upstream_auth", hint);
                (Reply::new(454, [4, 7, 0], text), Some(refusal))
            }
            Outcome::OverLimit(reply) => {
                let text = format!(
                    "Upstream account {account} is over its daily sending limit ({reply}); try again later"
                );
                (Reply::new(451, [4, 7, 0], text), Some(diagnosed(reply)))
            }
            // 421 would tell the client that *we* are closing the connection.
            Outcome::Deferred {
                reply: Some(reply), ..
            } => {
                let code = if reply.code == 421 { 451 } else { reply.code };
                let refusal = diagnosed(reply);
                (
                    Reply {
                        code,
                        ..reply.clone()
                    },
                    Some(refusal),
                )
            }
            Outcome::Deferred {
                reply: None,
                reason,
            } => {
                let text = format!("Upstream unavailable: {reason}");
                let refusal = Refusal {
                    reason: "upstream_unavailable",
                    hint: None,
                };
                (Reply::new(451, [4, 4, 1], text), Some(refusal))
            }
        };
        Submitted { reply, id, refusal }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let settings = DeliveryConfig::default();
        let delays: Vec<u64> = (1..=8)
            .map(|n| retry_delay(&settings, n).as_secs())
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_delay(&settings, u32::MAX).as_secs(), 3600);
    }

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
            .accept(&mut envelope, b"Subject: s\r\n\r\nx\r\n", State::Deferred)
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
