//! What the spool keeps about a message besides its bytes: its state, its
//! envelope and history, and how to tell versions of an envelope file apart.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::reply::Reply;
use crate::transport::BodyFlags;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    Deferred,
    Held,
    Rejected,
}

impl State {
    pub const ALL: [State; 4] = [State::Active, State::Deferred, State::Held, State::Rejected];

    pub fn dir_name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Deferred => "deferred",
            State::Held => "held",
            State::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// One line of a message's history, shown by `queue show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at: u64,
    pub what: String,
}

/// Everything about a message except its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Time-ordered and unique; assigned by [`Spool::accept`].
    pub id: String,
    pub account: String,
    /// MAIL FROM as the client sent it (upstream uses the account's sender).
    pub mail_from: String,
    pub recipients: Vec<String>,
    #[serde(default)]
    pub flags: BodyFlags,
    /// Local user that signed in; `None` for trusted-network clients.
    pub user: Option<String>,
    pub client: String,
    pub session_id: String,
    pub size: u64,
    /// Unix milliseconds.
    pub received_at: u64,
    pub attempts: u32,
    /// Unix milliseconds; meaningful in `deferred/`.
    pub next_attempt_at: u64,
    pub last_reply: Option<String>,
    /// Set by `queue retry`: an operator asked to try again even though the
    /// account is on hold (unix milliseconds of the request).
    #[serde(default)]
    pub retry_requested_at: Option<u64>,
    #[serde(default)]
    pub history: Vec<Event>,
    /// Recipients the upstream accepted in earlier attempts or parts; never
    /// sent to again.
    #[serde(default)]
    pub delivered: Vec<String>,
    /// Recipients the upstream refused for good, with its reply.
    #[serde(default)]
    pub refused: Vec<RefusedRecipient>,
    /// The notices about this message already dealt with, written in the
    /// same update as the state change that raised them, so a restart
    /// never repeats one.
    #[serde(default)]
    pub notices: Notices,
    /// A notice the relay generated (bounce, delay warning, alert): never
    /// itself the subject of a notice.
    #[serde(default)]
    pub is_notice: bool,
}

/// Which notices about a message were dealt with (sent, or left out on
/// purpose: a null sender, a report, a rate limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notices {
    pub bounced: bool,
    pub delay_warned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRecipient {
    pub address: String,
    pub reply: Reply,
}

impl Envelope {
    /// Recipients still to be delivered to.
    pub fn pending(&self) -> Vec<String> {
        let settled: std::collections::HashSet<&String> = self
            .delivered
            .iter()
            .chain(self.refused.iter().map(|refused| &refused.address))
            .collect();
        self.recipients
            .iter()
            .filter(|address| !settled.contains(address))
            .cloned()
            .collect()
    }

    pub fn record(&mut self, at: u64, what: impl Into<String>) {
        self.history.push(Event {
            at,
            what: what.into(),
        });
    }
}

/// Tells two versions of an envelope file apart: every update writes a new
/// file (a new inode) and renames it into place; the modification time
/// alone can repeat within the kernel's clock tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    pub(super) inode: u64,
    pub(super) modified: SystemTime,
}
