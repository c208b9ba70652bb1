//! What a notice is about, shared by the texts and composer (what it says)
//! and the engine (when, to whom, through which channel).

/// An admin alert's event: the `event` field of webhooks, the label of the
/// notices metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// An account cannot sign in; its mail waits in `held/`.
    AccountHeld,
    /// Sign-in works again; `count` messages went out.
    AccountReleased,
    /// The provider refused a message (or some recipients) for good.
    MessageRejected,
    /// A message was given up after `delivery.max_age`.
    MessageExpired,
    /// A message is still undelivered after `notify.delay_warning`.
    MessageDelayed,
    /// An OAuth 2.0 refresh token was refused: someone must sign in again
    /// (`sendbridge oauth login ACCOUNT`).
    SigninNeeded,
    /// The spool's disk is full: new mail gets `452 4.3.1`.
    SpoolFull,
    /// `sendbridge notify test`: notices reach their channels.
    Test,
}

impl Event {
    pub const ALL: [Event; 8] = [
        Event::AccountHeld,
        Event::AccountReleased,
        Event::MessageRejected,
        Event::MessageExpired,
        Event::MessageDelayed,
        Event::SigninNeeded,
        Event::SpoolFull,
        Event::Test,
    ];

    /// The stable name operators and scripts rely on.
    pub fn name(self) -> &'static str {
        match self {
            Event::AccountHeld => "account_held",
            Event::AccountReleased => "account_released",
            Event::MessageRejected => "message_rejected",
            Event::MessageExpired => "message_expired",
            Event::MessageDelayed => "message_delayed",
            Event::SigninNeeded => "signin_needed",
            Event::SpoolFull => "spool_full",
            Event::Test => "test",
        }
    }
}

/// An admin alert, as email and webhook render it. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub event: Event,
    pub account: Option<String>,
    /// The spool id, for events about one message.
    pub message_id: Option<String>,
    pub recipients: Vec<String>,
    /// The provider's reply, whole (all its lines, joined by newlines).
    pub reply: Option<String>,
    /// What to do, naming the configuration key where there is one.
    pub hint: Option<String>,
    /// How many messages wait (held) or went out (released).
    pub count: Option<usize>,
    /// Unix milliseconds.
    pub at: u64,
    /// `server.hostname` of the relay that raised it.
    pub relay: String,
}

/// A recipient a notice to the sender is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoticeRecipient {
    pub address: String,
    /// The enhanced status code, e.g. `[5, 1, 1]` (RFC 3463).
    pub status: [u8; 3],
    /// The provider's reply, whole; `None` when there was none (a timeout,
    /// an unreachable server).
    pub reply: Option<String>,
}

/// Which notice goes to the envelope sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderNoticeKind {
    /// Refused for good or given up: a DSN with `Action: failed`.
    Bounce,
    /// Still undelivered: a DSN with `Action: delayed`.
    DelayWarning,
}

/// A notice to the envelope sender about one message (RFC 3464).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderNotice {
    pub kind: SenderNoticeKind,
    /// `server.hostname`: the Reporting-MTA.
    pub relay: String,
    /// The envelope sender, who gets the notice.
    pub sender: String,
    /// The spool id.
    pub message_id: String,
    /// When the relay accepted the message (unix milliseconds).
    pub received_at: u64,
    /// Unix milliseconds.
    pub now: u64,
    /// Only the recipients the notice is about (not those delivered).
    pub recipients: Vec<NoticeRecipient>,
    /// What to do, in plain words, naming the key where there is one.
    pub hint: Option<String>,
    /// For a delay warning: when the relay gives up (unix milliseconds).
    pub give_up_at: Option<u64>,
    /// The original message's header section, as stored.
    pub original_headers: Vec<u8>,
}
