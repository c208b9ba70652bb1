//! The delivery engine: spool first, then deliver (DESIGN.md, "Delivery
//! model").
//!
//! `submit` stores a message durably and hands it to its account's workers.
//! Workers keep upstream connections open for reuse. Temporary failures are
//! retried with exponential backoff by the scheduler; permanent rejections go
//! to `rejected/`; a refused sign-in puts the whole account on hold, where
//! one probe login at a time checks whether it works again.

mod account;
mod delays;
mod hold;
mod notices;
mod scheduler;
mod settle;
mod submit;
mod worker;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_tokens::TokenSource;
use crate::config::{Config, DeliveryConfig};
use crate::notify::{Notifier, Recent};
use crate::reply::Reply;
use crate::spool::{Spool, State};
use crate::spool_space::SpaceWatch;
use account::{Account, AccountSettings};
use scheduler::Unsaved;

pub use hold::Hold;
pub use submit::{Submission, Submitted};

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

pub struct Delivery {
    spool: Arc<Spool>,
    settings: DeliveryConfig,
    clock: Clock,
    accounts: RwLock<HashMap<String, Arc<Account>>>,
    /// For the `auth = "oauth2"` accounts of this and reloaded configurations.
    tokens: TokenSource,
    /// Whether the spool's disk is full; says so in the log.
    space: SpaceWatch,
    /// Tells people about mail that is refused, given up, delayed or held.
    notifier: Arc<Notifier>,
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
        let spool = Arc::new(spool);
        let delivery = Arc::new(Delivery {
            notifier: Arc::new(Notifier::new(config, spool.clone())),
            spool,
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
            let settings = AccountSettings::new(
                name,
                account_config,
                &config.server.hostname,
                &delivery.tokens,
            )?;
            let account = Account::new(name, settings, &delivery.spool, clock.now());
            // Held mail from the last run: the password may have been fixed
            // while the relay was stopped, so probe at once.
            if held.iter().any(|envelope| &envelope.account == name) {
                let reply =
                    Reply::new(535, [5, 7, 8], "held at the previous run; checking sign-in");
                let failure = account.settings().transport.sign_in_refused(reply);
                *account.hold.lock().expect("hold lock") = Some(Hold {
                    since: None,
                    failure,
                });
            }
            delivery.add_account(account, account_config.max_connections);
        }
        delivery.tell_when_the_spool_fills();
        delivery.tasks.spawn(delivery.clone().scheduler());
        delivery.tasks.close();
        Ok(delivery)
    }

    /// Registers an account and starts its workers and its hold prober.
    fn add_account(self: &Arc<Self>, account: Account, workers: usize) {
        let account = Arc::new(account);
        for _ in 0..workers {
            self.tasks.spawn(self.clone().worker(account.clone()));
        }
        self.tasks.spawn(self.clone().prober(account.clone()));
        self.accounts
            .write()
            .expect("accounts lock")
            .insert(account.name.clone(), account);
    }

    fn account(&self, name: &str) -> Option<Arc<Account>> {
        self.accounts
            .read()
            .expect("accounts lock")
            .get(name)
            .cloned()
    }

    /// Applies a reloaded configuration's accounts. Existing ones take their
    /// new settings whole (idle connections opened with the old ones are
    /// closed), new ones start, removed ones stop (their queued mail waits
    /// until they are configured again), and a hold is released when the
    /// account's sign-in changed. Nothing changes when an account is
    /// invalid. `AccountSettings::new` says what each key does.
    pub async fn reload(self: &Arc<Self>, config: &Config) -> anyhow::Result<()> {
        let mut snapshots = Vec::new();
        for (name, account) in &config.accounts {
            let settings =
                AccountSettings::new(name, account, &config.server.hostname, &self.tokens)?;
            snapshots.push((name, settings));
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
        for (name, settings) in snapshots {
            let Some(account) = self.account(name) else {
                let account = Account::new(name, settings, &self.spool, self.clock.now());
                self.add_account(account, config.accounts[name].max_connections);
                info!(account = %name, "account added by a reload");
                continue;
            };
            let sign_in_changed = account.replace(settings);
            if sign_in_changed && account.hold().is_some() {
                self.release_hold(&account, "its credentials changed").await;
            }
        }
        self.notifier.reload(config);
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

    /// Each account's transport (`smtp`, `graph`, …), by account name.
    pub fn account_transports(&self) -> BTreeMap<String, &'static str> {
        self.accounts
            .read()
            .expect("accounts lock")
            .iter()
            .map(|(name, account)| (name.clone(), account.settings().transport.kind().name()))
            .collect()
    }

    /// The last notices (bounces, warnings, alerts), newest first.
    pub fn recent_notices(&self) -> Vec<Recent> {
        self.notifier.recent()
    }

    /// Re-reads the queue now instead of at the next `scan_interval`, e.g.
    /// after a retry requested on the status page.
    pub fn scan_now(&self) {
        self.wake_scheduler.notify_one();
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
