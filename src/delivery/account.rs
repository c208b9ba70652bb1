//! One upstream account as delivery sees it: an immutable settings snapshot
//! that a reload swaps whole (DESIGN.md, "Reload"), and the only state that
//! changes while it runs: the hold, the send window and the job queue its
//! workers share (each worker owns its connection).

use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::hold::Hold;
use super::worker::Job;
use crate::access_tokens::TokenSource;
use crate::config::{AccountConfig, AuthMethod, OAuth2Config, TransportKind};
use crate::observe::metrics;
use crate::secret::Secret;
use crate::send_window::SendWindow;
use crate::spool::Spool;
use crate::transport::Transport;

/// An account's settings, built whole from its configuration.
pub(super) struct AccountSettings {
    pub(super) transport: Transport,
    /// The provider's limit of recipients per transaction.
    pub(super) recipients_per_message: usize,
    pub(super) daily_message_limit: Option<u32>,
    pub(super) daily_recipient_limit: Option<u32>,
    /// What signing in depends on: when a reload changes it, a hold ends.
    sign_in: SignIn,
}

#[derive(PartialEq)]
enum SignIn {
    Password {
        username: String,
        password: Option<Secret>,
    },
    OAuth2 {
        username: String,
        oauth2: Option<Box<OAuth2Config>>,
        /// A token for one API is no token for another.
        transport: TransportKind,
        api_url: Option<String>,
    },
}

impl AccountSettings {
    /// Every key of `[accounts.<name>]` is named here, so that a new key
    /// compiles only once it says what a reload does with it.
    pub(super) fn new(
        name: &str,
        config: &AccountConfig,
        helo_name: &str,
        tokens: &TokenSource,
    ) -> anyhow::Result<Self> {
        let AccountConfig {
            // The transport's: built anew below.
            provider: _,
            host: _,
            port: _,
            tls: _,
            ca_file: _,
            sender: _,
            timeout: _,
            username,
            password,
            // Read into `password` when the configuration is loaded.
            password_file: _,
            auth,
            oauth2,
            max_recipients_per_message,
            daily_message_limit,
            daily_recipient_limit,
            // Workers start once per account: applies after a restart.
            max_connections: _,
            // The session's (policy and rewrites), not delivery's.
            from_policy: _,
            allowed_from: _,
            remove_headers: _,
            long_lines: _,
            transport,
            api_url,
            // The transport's: built anew below.
            save_to_sent_items: _,
        } = config;
        Ok(AccountSettings {
            transport: Transport::new(name, config, helo_name, tokens)?,
            recipients_per_message: *max_recipients_per_message,
            daily_message_limit: *daily_message_limit,
            daily_recipient_limit: *daily_recipient_limit,
            sign_in: match auth {
                AuthMethod::Password => SignIn::Password {
                    username: username.clone(),
                    password: password.clone(),
                },
                AuthMethod::Oauth2 => SignIn::OAuth2 {
                    username: username.clone(),
                    oauth2: oauth2.clone().map(Box::new),
                    transport: *transport,
                    api_url: api_url.clone(),
                },
            },
        })
    }
}

pub(super) struct Account {
    pub(super) name: String,
    /// Replaced whole by a reload; in-flight deliveries finish with the old
    /// one, and workers drop connections opened with it.
    settings: RwLock<Arc<AccountSettings>>,
    pub(super) window: Mutex<SendWindow>,
    pub(super) jobs: mpsc::UnboundedSender<Job>,
    pub(super) queue: tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>,
    pub(super) hold: Mutex<Option<Hold>>,
    /// Wakes the prober when a hold starts.
    pub(super) hold_started: Notify,
    /// Cancelled when a reload removes the account: its tasks end.
    pub(super) retired: CancellationToken,
}

impl Account {
    pub(super) fn new(name: &str, settings: AccountSettings, spool: &Spool, now: u64) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let window = SendWindow::load(
            spool.limits_path(name),
            settings.daily_message_limit,
            settings.daily_recipient_limit,
            now,
        );
        metrics::account_transport(name, settings.transport.kind().name(), true);
        Account {
            name: name.to_string(),
            settings: RwLock::new(Arc::new(settings)),
            window: Mutex::new(window),
            jobs,
            queue: tokio::sync::Mutex::new(queue),
            hold: Mutex::new(None),
            hold_started: Notify::new(),
            retired: CancellationToken::new(),
        }
    }

    pub(super) fn settings(&self) -> Arc<AccountSettings> {
        self.settings.read().expect("settings lock").clone()
    }

    pub(super) fn hold(&self) -> Option<Hold> {
        self.hold.lock().expect("hold lock").clone()
    }

    /// Swaps in a reload's settings; the send window takes their limits.
    /// Returns whether signing in changed.
    pub(super) fn replace(&self, settings: AccountSettings) -> bool {
        let mut current = self.settings.write().expect("settings lock");
        let sign_in_changed = current.sign_in != settings.sign_in;
        let (was, is) = (current.transport.kind(), settings.transport.kind());
        if was != is {
            metrics::account_transport(&self.name, was.name(), false);
            metrics::account_transport(&self.name, is.name(), true);
        }
        self.window
            .lock()
            .expect("window lock")
            .set_limits(settings.daily_message_limit, settings.daily_recipient_limit);
        *current = Arc::new(settings);
        sign_in_changed
    }
}
