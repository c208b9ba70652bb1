//! The delivery engine: spool first, then deliver (DESIGN.md, "Delivery
//! model").
//!
//! `submit` stores a message durably and hands it to its account's workers.
//! Workers keep upstream connections open for reuse. Temporary failures are
//! retried with exponential backoff by the scheduler; permanent rejections go
//! to `rejected/`; a refused sign-in puts the whole account on hold, where
//! one probe login at a time checks whether it works again.

mod hold;
mod scheduler;
mod settle;
mod submit;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::access_tokens::TokenSource;
use crate::config::{AccountConfig, Config, DeliveryConfig};
use crate::reply::Reply;
use crate::send_window::SendWindow;
use crate::spool::{Spool, State};
use crate::spool_space::SpaceWatch;
use crate::transport::smtp::Upstream;

pub use hold::Hold;
use scheduler::Unsaved;
use settle::describe;
pub use submit::Submitted;
use worker::{Job, queue_job};

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
