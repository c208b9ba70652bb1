//! What a connection leaves behind: one log line when it ends, saying how
//! (with a stable reason code and a hint when something was refused), and
//! the transcript when `[log] transcripts` asks for it. Carried across
//! STARTTLS, so a connection ends with exactly one line.

use std::net::SocketAddr;

use tracing::{info, warn};

use super::SessionContext;
use super::transcript::Transcript;
use crate::config::Transcripts;
use crate::observe::metrics;
use crate::reply::{Refusal, Reply};
use crate::spool_space::is_full;

/// The last refusal of a session.
struct Rejection {
    reply: Reply,
    refusal: Refusal,
    message_id: Option<String>,
}

pub struct SessionRecord {
    id: String,
    peer: SocketAddr,
    transcript: Option<Transcript>,
    rejection: Option<Rejection>,
    rejections: u32,
    messages: u32,
    user: Option<String>,
    /// How the user's password was verified: `argon2` or `cache`.
    verified_by: Option<&'static str>,
}

impl SessionRecord {
    pub fn new(ctx: &SessionContext, id: &str, peer: SocketAddr) -> Self {
        let transcript =
            (ctx.settings().transcripts != Transcripts::Off).then(|| Transcript::new(id, peer));
        metrics::session_opened();
        SessionRecord {
            id: id.to_string(),
            peer,
            transcript,
            rejection: None,
            rejections: 0,
            messages: 0,
            user: None,
            verified_by: None,
        }
    }

    pub(super) fn client(&mut self, bytes: &[u8]) {
        if let Some(transcript) = &mut self.transcript {
            transcript.client(bytes);
        }
    }

    pub(super) fn client_secret(&mut self) {
        if let Some(transcript) = &mut self.transcript {
            transcript.client_secret();
        }
    }

    pub(super) fn server(&mut self, output: &[u8]) {
        if let Some(transcript) = &mut self.transcript {
            transcript.server(output);
        }
    }

    pub(super) fn message(&mut self, message: &[u8]) {
        if let Some(transcript) = &mut self.transcript {
            transcript.message(message);
        }
    }

    pub(super) fn note(&mut self, text: &str) {
        if let Some(transcript) = &mut self.transcript {
            transcript.note(text);
        }
    }

    pub(super) fn signed_in(&mut self, user: &str, verified_by: &'static str) {
        self.user = Some(user.to_string());
        self.verified_by = Some(verified_by);
    }

    pub(super) fn accepted(&mut self) {
        self.messages += 1;
    }

    pub(super) fn rejected(&mut self, reply: &Reply, refusal: Refusal, message_id: Option<String>) {
        self.rejections += 1;
        self.rejection = Some(Rejection {
            reply: reply.clone(),
            refusal,
            message_id,
        });
    }

    /// Saves the transcript if wanted and writes the session's closing line.
    pub async fn finish(mut self, ctx: &SessionContext) {
        metrics::session_closed();
        let keep = match ctx.settings().transcripts {
            Transcripts::Off => false,
            Transcripts::Rejected => self.rejection.is_some(),
            Transcripts::All => true,
        };
        let transcript = match self.transcript.take().filter(|_| keep) {
            Some(transcript) => {
                let (dir, id) = (ctx.transcripts_dir.clone(), self.id.clone());
                let saved = tokio::task::spawn_blocking(move || transcript.save(&dir, &id)).await;
                match saved {
                    Ok(Ok(path)) => Some(path.display().to_string()),
                    // Said by the spool's own warning, once a minute.
                    Ok(Err(err)) if is_full(&err) => {
                        ctx.delivery.spool_space().failed();
                        None
                    }
                    Ok(Err(err)) => {
                        warn!(error = %err, "cannot save the session transcript");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let transcript = transcript.as_deref().unwrap_or("-");
        let user = self.user.as_deref().unwrap_or("-");
        let verified_by = self.verified_by.unwrap_or("-");
        match &self.rejection {
            None => info!(
                session = %self.id,
                client = %self.peer,
                user,
                verified_by,
                messages = self.messages,
                transcript,
                "session closed"
            ),
            Some(rejection) => warn!(
                session = %self.id,
                client = %self.peer,
                user,
                verified_by,
                messages = self.messages,
                rejections = self.rejections,
                reason = rejection.refusal.reason,
                reply = %rejection.reply,
                hint = rejection.refusal.hint.as_deref().unwrap_or("-"),
                message_id = rejection.message_id.as_deref().unwrap_or("-"),
                transcript,
                "session closed after a rejection"
            ),
        }
    }
}
