//! The notice engine: given what happened (from the delivery engine), it
//! decides whether anyone is told, whom, and through which channel, and
//! hands the notice over.
//!
//! Email notices are queued in the spool as messages of their own
//! (`Envelope::is_notice`), through an account that can sign in, so they
//! get retries, holds and durability like any mail and are never the
//! subject of a notice themselves. Webhooks are POSTed on a task of their
//! own with a timeout and retries, never holding up delivery.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use super::account_alerts::{AccountAlerts, HeldNotice};
use super::channels::{self, SendingAccount, WEBHOOK_BACKOFF, email_account, webhook_origin};
use super::compose;
use super::loops::{RateLimit, header_section, sender_notice_allowed};
use super::notice::{Alert, Event, NoticeRecipient, SenderNotice, SenderNoticeKind};
use super::recent::{Recent, RecentNotices};
use crate::config::{Config, NotifyConfig};
use crate::reply::Reply;
use crate::spool::{Envelope, Spool, State};
use crate::transport::{Failure, SIGN_IN_NEEDED};

/// The enhanced status of recipients given up after `delivery.max_age`
/// (RFC 3463 X.4.7, delivery time expired).
const EXPIRED: [u8; 3] = [4, 4, 7];
/// Of recipients still waiting, for a delay warning.
const WAITING: [u8; 3] = [4, 0, 0];

/// What the engine needs of the configuration; swapped whole on reload.
struct Settings {
    notify: NotifyConfig,
    hostname: String,
    max_age: Duration,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        Settings {
            notify: config.notify.clone(),
            hostname: config.server.hostname.clone(),
            max_age: config.delivery.max_age,
        }
    }

    /// The From of every notice.
    fn from(&self) -> String {
        format!("Mail Delivery System <mailer-daemon@{}>", self.hostname)
    }
}

pub struct Notifier {
    settings: RwLock<Arc<Settings>>,
    spool: Arc<Spool>,
    alerts_path: PathBuf,
    alerts: Mutex<AccountAlerts>,
    limit: Mutex<RateLimit>,
    recent: Arc<RecentNotices>,
}

/// A message refused for good (`MessageRejected`) or given up
/// (`MessageExpired`).
pub struct GivenUp<'a> {
    pub envelope: &'a Envelope,
    pub event: Event,
    pub hint: Option<String>,
    /// Whether its sender gets a bounce (not when a waiting client heard
    /// the refusal itself).
    pub bounce: bool,
}

impl Notifier {
    /// The engine for `config`, queueing email into `spool` and keeping
    /// its account alert state beside it.
    pub fn new(config: &Config, spool: Arc<Spool>) -> Notifier {
        let alerts_path = spool.root().join("notices.json");
        Notifier {
            settings: RwLock::new(Arc::new(Settings::new(config))),
            alerts: Mutex::new(AccountAlerts::load(&alerts_path)),
            alerts_path,
            spool,
            limit: Mutex::new(RateLimit::default()),
            recent: Arc::new(RecentNotices::default()),
        }
    }

    /// Takes a reloaded configuration's `[notify]`.
    pub fn reload(&self, config: &Config) {
        *self.settings.write().expect("settings lock") = Arc::new(Settings::new(config));
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// `notify.delay_warning`; zero: off.
    pub fn delay_warning(&self) -> Duration {
        self.settings().notify.delay_warning
    }

    /// The last notices, newest first.
    pub fn recent(&self) -> Vec<Recent> {
        self.recent.list()
    }

    /// A message refused for good or given up: the bounce to its sender
    /// (unless `notify.bounces` is off or loop protection says no) and the
    /// admin alert. Blocking: reads the message's header section and
    /// queues email.
    pub fn message_given_up(&self, given_up: GivenUp, accounts: &[SendingAccount], now: u64) {
        let GivenUp {
            envelope,
            event,
            hint,
            bounce,
        } = given_up;
        let settings = self.settings();
        let last_reply = envelope.last_reply.clone();
        let mut recipients: Vec<NoticeRecipient> = envelope
            .refused
            .iter()
            .map(|refused| NoticeRecipient {
                address: refused.address.clone(),
                status: refused.reply.status.unwrap_or([5, 0, 0]),
                reply: Some(whole(&refused.reply)),
            })
            .collect();
        // The alert quotes the reply of the first refused recipient whole
        // (the envelope's last reply is one line).
        let alert_reply = recipients.first().and_then(|r| r.reply.clone());
        if event == Event::MessageExpired {
            recipients.extend(
                envelope
                    .pending()
                    .into_iter()
                    .map(|address| NoticeRecipient {
                        address,
                        status: EXPIRED,
                        reply: last_reply.clone(),
                    }),
            );
        }
        if envelope.is_notice {
            // Never a notice about a notice, not even to the admin.
            info!(id = %envelope.id, "a notice could not be delivered; no notice about it");
            return;
        }
        if bounce && settings.notify.bounces {
            let notice = self.sender_notice(
                &settings,
                SenderNoticeKind::Bounce,
                envelope,
                recipients.clone(),
                hint.clone(),
                now,
            );
            self.to_sender(&settings, envelope, notice, accounts, now);
        }
        let alert = Alert {
            event,
            account: Some(envelope.account.clone()),
            message_id: Some(envelope.id.clone()),
            recipients: recipients.into_iter().map(|r| r.address).collect(),
            reply: alert_reply.or(last_reply),
            hint,
            count: None,
            at: now,
            relay: settings.hostname.clone(),
        };
        self.alert(&settings, alert, accounts, Some(&envelope.account), now);
    }

    /// A message still undelivered after `notify.delay_warning`: one
    /// warning to its sender and one `message_delayed` alert. Blocking.
    pub fn message_delayed(&self, envelope: &Envelope, accounts: &[SendingAccount], now: u64) {
        if envelope.is_notice {
            return;
        }
        let settings = self.settings();
        let recipients: Vec<NoticeRecipient> = envelope
            .pending()
            .into_iter()
            .map(|address| NoticeRecipient {
                address,
                status: WAITING,
                reply: envelope.last_reply.clone(),
            })
            .collect();
        let mut notice = self.sender_notice(
            &settings,
            SenderNoticeKind::DelayWarning,
            envelope,
            recipients,
            None,
            now,
        );
        notice.give_up_at = Some(envelope.received_at + settings.max_age.as_millis() as u64);
        let alert = Alert {
            event: Event::MessageDelayed,
            account: Some(envelope.account.clone()),
            message_id: Some(envelope.id.clone()),
            recipients: notice
                .recipients
                .iter()
                .map(|r| r.address.clone())
                .collect(),
            reply: envelope.last_reply.clone(),
            hint: None,
            count: None,
            at: now,
            relay: settings.hostname.clone(),
        };
        self.to_sender(&settings, envelope, notice, accounts, now);
        self.alert(&settings, alert, accounts, Some(&envelope.account), now);
    }

    /// `account` is (still) on hold after `failure`: the alert once per
    /// hold (`signin_needed` when an OAuth 2.0 refresh token was refused,
    /// else `account_held`), then a reminder at most daily. `waiting`: its
    /// messages in `held/`. Blocking.
    pub fn account_held(
        &self,
        account: &str,
        failure: &Failure,
        waiting: usize,
        accounts: &[SendingAccount],
        now: u64,
    ) {
        let event = match failure.reason {
            SIGN_IN_NEEDED => Event::SigninNeeded,
            _ => Event::AccountHeld,
        };
        let said = self.alerts.lock().expect("alerts lock").held(account, now);
        if said == HeldNotice::Nothing {
            return;
        }
        self.save_alerts();
        let settings = self.settings();
        let alert = Alert {
            event,
            account: Some(account.to_string()),
            message_id: None,
            recipients: Vec::new(),
            reply: Some(whole(&failure.reply)),
            hint: failure.hint.clone(),
            count: Some(waiting),
            at: now,
            relay: settings.hostname.clone(),
        };
        self.alert(&settings, alert, accounts, Some(account), now);
    }

    /// `account`'s hold ended and `released` messages are going out: said
    /// when its hold was alerted. Blocking.
    pub fn account_released(
        &self,
        account: &str,
        released: usize,
        accounts: &[SendingAccount],
        now: u64,
    ) {
        if !self.alerts.lock().expect("alerts lock").released(account) {
            return;
        }
        self.save_alerts();
        let settings = self.settings();
        let alert = Alert {
            event: Event::AccountReleased,
            account: Some(account.to_string()),
            message_id: None,
            recipients: Vec::new(),
            reply: None,
            hint: None,
            count: Some(released),
            at: now,
            relay: settings.hostname.clone(),
        };
        self.alert(&settings, alert, accounts, Some(account), now);
    }

    /// The spool's disk filled up (once per episode; see `SpaceWatch`).
    /// Email is tried but likely cannot be queued: the webhook carries it.
    pub fn spool_full(&self, hint: String, accounts: &[SendingAccount], now: u64) {
        let settings = self.settings();
        let alert = Alert {
            event: Event::SpoolFull,
            account: None,
            message_id: None,
            recipients: Vec::new(),
            reply: None,
            hint: Some(hint),
            count: None,
            at: now,
            relay: settings.hostname.clone(),
        };
        self.alert(&settings, alert, accounts, None, now);
    }

    fn save_alerts(&self) {
        let alerts = self.alerts.lock().expect("alerts lock");
        if let Err(err) = alerts.save(&self.alerts_path) {
            warn!(file = %self.alerts_path.display(), error = %err, "cannot record an account alert: it may be repeated after a restart");
        }
    }

    fn sender_notice(
        &self,
        settings: &Settings,
        kind: SenderNoticeKind,
        envelope: &Envelope,
        recipients: Vec<NoticeRecipient>,
        hint: Option<String>,
        now: u64,
    ) -> SenderNotice {
        let original_headers = self
            .spool
            .read_message(&envelope.id)
            .map(|message| header_section(&message).to_vec())
            .unwrap_or_default();
        SenderNotice {
            kind,
            relay: settings.hostname.clone(),
            sender: envelope.mail_from.clone(),
            message_id: envelope.id.clone(),
            received_at: envelope.received_at,
            now,
            recipients,
            hint,
            give_up_at: None,
            original_headers,
        }
    }

    /// Sends `notice` to the sender of `envelope`, unless loop protection
    /// or the rate limit says no.
    fn to_sender(
        &self,
        settings: &Settings,
        envelope: &Envelope,
        notice: SenderNotice,
        accounts: &[SendingAccount],
        now: u64,
    ) {
        let label = kind_label(notice.kind);
        if let Err(no) = sender_notice_allowed(envelope, &notice.original_headers) {
            info!(id = %envelope.id, notice = label, reason = no.reason(), "no notice to the sender");
            return;
        }
        if !self.admit(&notice.sender, now) {
            self.not_sent(label, &notice.sender, "rate limited", now);
            return;
        }
        let message = compose::sender_notice(&notice, &settings.from(), settings.notify.language);
        let to = [notice.sender.clone()];
        self.email(label, &to, message, accounts, Some(&envelope.account), now);
    }

    /// An admin alert: email to `notify.admin` and the webhook.
    fn alert(
        &self,
        settings: &Settings,
        alert: Alert,
        accounts: &[SendingAccount],
        own: Option<&str>,
        now: u64,
    ) {
        let label = alert.event.name();
        let admins: Vec<String> = settings
            .notify
            .admin
            .iter()
            .filter(|admin| {
                let admitted = self.admit(admin, now);
                if !admitted {
                    self.not_sent(label, admin, "rate limited", now);
                }
                admitted
            })
            .cloned()
            .collect();
        if !admins.is_empty() {
            let language = settings.notify.language;
            let message = compose::alert_email(&alert, &settings.from(), &admins, language);
            self.email(label, &admins, message, accounts, own, now);
        }
        if let Some(url) = &settings.notify.webhook {
            let body = compose::webhook_body(
                &alert,
                settings.notify.webhook_format,
                settings.notify.language,
            );
            self.webhook(label, url.clone(), body, now);
        }
        if settings.notify.admin.is_empty() && settings.notify.webhook.is_none() {
            info!(
                event = label,
                account = alert.account.as_deref().unwrap_or_default(),
                "no admin alert: set notify.admin or notify.webhook to hear of it"
            );
        }
    }

    fn admit(&self, address: &str, now: u64) -> bool {
        self.limit.lock().expect("limit lock").admit(address, now)
    }

    /// Queues `message` to `to` through an account that can sign in.
    fn email(
        &self,
        label: &'static str,
        to: &[String],
        message: Vec<u8>,
        accounts: &[SendingAccount],
        own: Option<&str>,
        now: u64,
    ) {
        let settings = self.settings();
        let list = to.join(", ");
        let Some(account) = email_account(accounts, settings.notify.account.as_deref(), own) else {
            warn!(notice = label, to = %list, hint = "fix the sign-in of an account (see its hold's hint, `sendbridge check`) or set notify.webhook", "notice could not be sent: no account can sign in");
            self.recent
                .add(now, label, list, "none", "no account can sign in".into());
            return;
        };
        let mut envelope = Envelope {
            account: account.clone(),
            recipients: to.to_vec(),
            client: "sendbridge".into(),
            session_id: "notice".into(),
            received_at: now,
            next_attempt_at: now,
            is_notice: true,
            ..Envelope::default()
        };
        envelope.record(now, format!("{label} notice generated"));
        match self.spool.accept(
            &mut envelope,
            &std::sync::Arc::new(message),
            State::Deferred,
        ) {
            Ok(()) => {
                info!(id = %envelope.id, notice = label, to = %list, account = %account, "notice queued");
                let outcome = format!("queued as {} via {account}", envelope.id);
                self.recent.add(now, label, list, "email", outcome);
            }
            Err(err) => {
                warn!(notice = label, to = %list, error = %err, hint = "free space on the disk of spool.dir", "notice could not be sent: cannot queue it");
                self.recent
                    .add(now, label, list, "none", format!("cannot queue it: {err}"));
            }
        }
    }

    /// POSTs to the webhook on a task of its own.
    fn webhook(&self, label: &'static str, url: String, body: compose::WebhookBody, now: u64) {
        let origin = webhook_origin(&url);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(notice = label, webhook = %origin, "notice could not be sent: no runtime for the webhook");
            return;
        };
        let recent = self.recent.clone();
        runtime.spawn(async move {
            match channels::post(url, Arc::new(body), &WEBHOOK_BACKOFF).await {
                Ok(status) => {
                    info!(notice = label, webhook = %origin, status, "webhook notified");
                    recent.add(now, label, origin, "webhook", format!("HTTP {status}"));
                }
                Err(err) => {
                    warn!(notice = label, webhook = %origin, error = %err, hint = "check notify.webhook and that the receiver is reachable", "notice could not be sent to the webhook");
                    recent.add(now, label, origin, "none", format!("webhook failed: {err}"));
                }
            }
        });
    }

    /// A notice left out on purpose (rate limited).
    fn not_sent(&self, label: &'static str, to: &str, why: &str, now: u64) {
        info!(notice = label, to = %to, why, "notice not sent");
        self.recent
            .add(now, label, to.to_string(), "none", why.to_string());
    }
}

/// A provider's reply with all its lines (joined by newlines), each with
/// the code as it came: Gmail puts its help link on the last one.
fn whole(reply: &Reply) -> String {
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    let text = String::from_utf8_lossy(&wire);
    text.trim_end().replace("\r\n", "\n")
}

/// The `event` label of a notice to the sender.
fn kind_label(kind: SenderNoticeKind) -> &'static str {
    match kind {
        SenderNoticeKind::Bounce => "bounce",
        SenderNoticeKind::DelayWarning => "delay_warning",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_quoted_whole() {
        let reply = Reply::new(
            550,
            [5, 1, 1],
            "No such user.\nhttps://support.google.com/mail/?p=NoSuchUser",
        );
        assert_eq!(
            whole(&reply),
            "550-5.1.1 No such user.\n550 5.1.1 https://support.google.com/mail/?p=NoSuchUser"
        );
    }
}
