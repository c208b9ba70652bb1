//! What every transport returns: how an attempt ended, per recipient and
//! for the message (DESIGN.md, "Outcome classes").

pub mod smtp;

use crate::reply::Reply;

/// How one attempt to hand a message to the upstream ended (DESIGN.md,
/// "Outcome classes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream accepted the message (its 2xx reply).
    Delivered(Reply),
    /// A permanent rejection of the message or a recipient.
    Rejected(Reply),
    /// The upstream refused our sign-in: the account's secret needs fixing.
    AuthFailed(Reply),
    /// The provider's sending limit (Gmail 550 5.4.5): wait for its window;
    /// never a bounce.
    OverLimit(Reply),
    /// Worth retrying: a 4xx reply, or no reply at all (`reason` says why).
    Deferred {
        reply: Option<Reply>,
        reason: String,
    },
}

impl Outcome {
    /// The upstream's reply, unless there was none (unreachable server, TLS
    /// failure, timeout).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Outcome::Delivered(reply)
            | Outcome::Rejected(reply)
            | Outcome::AuthFailed(reply)
            | Outcome::OverLimit(reply) => Some(reply),
            Outcome::Deferred { reply, .. } => reply.as_ref(),
        }
    }
}

/// What the client declared in MAIL FROM that the upstream must hear too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BodyFlags {
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// What one upstream transaction did.
#[derive(Debug)]
pub struct Sent {
    /// Recipients refused at RCPT, each with its own outcome.
    pub refused: Vec<(String, Outcome)>,
    /// The verdict for the other recipients: the DATA reply, or what ended
    /// the transaction. `None` when every recipient was refused.
    pub outcome: Option<Outcome>,
}
