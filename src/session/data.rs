//! DATA: receiving the message (dot-unstuffing and end detection, with the
//! size limit, the memory budget and the total deadline enforced while
//! reading), then rewriting, storing and answering it.
//!
//! The end is CRLF "." CRLF. For a client whose DATA command itself ended in
//! a bare LF (an old device that writes LF everywhere), a "." line ended or
//! started by a bare LF ends the message too, as Postfix allows for its own
//! networks. A client that speaks CRLF never gets that leniency, so a bare
//! `\n.\n` inside what it relays (the SMTP smuggling pattern) stays content;
//! the rewrite turns it into CRLF, and the upstream sees the one message we
//! saw.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::info;

use super::connection::{READ_BUFFER, Reader, Recorded};
use super::memory::Reservation;
use super::{Flow, Session, Stop};
use crate::reply::{Refusal, Reply};
use crate::rewrite::{RewriteError, Trace, rewrite};
use crate::spool::Envelope;

pub(super) enum DataEnd {
    /// The content, ending in the line end before the terminating dot;
    /// `bare_end`: the terminator used a bare LF. `memory` covers the
    /// message until it is dropped.
    Complete {
        message: Vec<u8>,
        bare_end: bool,
        memory: Reservation,
    },
    /// Over `server.max_message_size`; the rest was read and dropped.
    TooLarge,
    /// Over the memory budget; the rest was read and dropped.
    NoMemory,
}

/// Where the reader stands in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line.
    Text,
    /// After a CR inside a line (not yet known to end it).
    Cr,
    /// At the start of a line; `bare`: the previous line ended in a bare LF.
    LineStart { bare: bool },
    /// After a "." that starts a line.
    Dot { bare: bool },
    /// After "." CR at the start of a line.
    DotCr { bare: bool },
    /// The terminator was read.
    Done { bare: bool },
}

/// Dot-unstuffing and end detection over any split of the input.
pub(super) struct DotReader {
    state: State,
    /// Bare LF line ends may end the message.
    lenient: bool,
}

impl DotReader {
    /// `command_end_bare`: the DATA command ended in a bare LF; its line end
    /// starts the first line, so a lone "." is an empty message.
    pub(super) fn new(command_end_bare: bool) -> Self {
        DotReader {
            state: State::LineStart {
                bare: command_end_bare,
            },
            lenient: command_end_bare,
        }
    }

    /// Appends the content in `input` to `out` (when given) and returns how
    /// many bytes of `input` it consumed: all of them, or up to and
    /// including the terminator.
    pub(super) fn read(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> usize {
        let mut emit = |bytes: &[u8]| {
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(bytes);
            }
        };
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            self.state = match self.state {
                State::Text => {
                    // The common case: copy up to the next line-end byte.
                    let run =
                        memchr::memchr2(b'\r', b'\n', &input[at..]).unwrap_or(input.len() - at);
                    emit(&input[at..at + run]);
                    at += run;
                    match input.get(at) {
                        Some(b'\r') => State::Cr,
                        Some(_) => {
                            emit(b"\n");
                            State::LineStart { bare: true }
                        }
                        None => return at,
                    }
                }
                State::Cr if byte == b'\n' => {
                    emit(b"\r\n");
                    State::LineStart { bare: false }
                }
                State::Cr => {
                    emit(b"\r");
                    self.state = State::Text;
                    continue;
                }
                State::LineStart { bare } if byte == b'.' => State::Dot { bare },
                State::LineStart { .. } => {
                    self.state = State::Text;
                    continue;
                }
                State::Dot { bare } if byte == b'\r' => State::DotCr { bare },
                State::Dot { .. } if byte == b'\n' && self.lenient => State::Done { bare: true },
                State::Dot { bare } => {
                    self.unstuff(bare, &mut emit);
                    self.state = State::Text;
                    continue;
                }
                State::DotCr { bare } if byte == b'\n' && (!bare || self.lenient) => {
                    State::Done { bare }
                }
                State::DotCr { bare } => {
                    self.unstuff(bare, &mut emit);
                    self.state = State::Cr;
                    continue;
                }
                State::Done { .. } => return at,
            };
            at += 1;
            if let State::Done { .. } = self.state {
                return at;
            }
        }
        at
    }

    /// A dot that starts a line and is not the terminator: after CRLF it
    /// was stuffed by the client and goes (RFC 5321 4.5.2). After a bare
    /// end it stays: the rewrite unstuffs those lines, counting them.
    fn unstuff(&self, bare: bool, emit: &mut impl FnMut(&[u8])) {
        if bare {
            emit(b".");
        }
    }

    /// `Some(bare)` once the terminator was read.
    pub(super) fn finished(&self) -> Option<bool> {
        match self.state {
            State::Done { bare } => Some(bare),
            _ => None,
        }
    }
}

/// The rest of a message that is not kept: read up to its end and dropped.
impl Reader for DotReader {
    type Output = ();

    fn take(&mut self, input: &[u8]) -> (usize, Option<()>) {
        (self.read(input, None), self.finished().map(drop))
    }
}

/// A message being received, within its size limit and the memory budget.
struct Receiving {
    dots: DotReader,
    message: Vec<u8>,
    /// Covers `message` and the next read.
    memory: Reservation,
    max: usize,
}

impl Reader for Receiving {
    /// Whether a bare LF ended the message, or why it is not kept.
    type Output = Result<bool, DataEnd>;

    fn take(&mut self, input: &[u8]) -> (usize, Option<Self::Output>) {
        let used = self.dots.read(input, Some(&mut self.message));
        if let Some(bare_end) = self.dots.finished() {
            return (used, Some(Ok(bare_end)));
        }
        // `message` exceeds the limit by at most one read buffer.
        let too_large = self.message.len() > self.max;
        (used, too_large.then_some(Err(DataEnd::TooLarge)))
    }

    async fn before_reading_more(&mut self) -> Option<Self::Output> {
        let covered = self.memory.cover(self.message.len() + READ_BUFFER).await;
        (!covered).then_some(Err(DataEnd::NoMemory))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn data(&mut self) -> Result<Flow, Stop> {
        match &self.transaction {
            None => {
                self.error(Reply::new(503, [5, 5, 1], "Send MAIL first"));
                return Ok(Flow::Continue);
            }
            Some(transaction) if transaction.recipients.is_empty() => {
                self.error(Reply::new(503, [5, 5, 1], "Send RCPT first"));
                return Ok(Flow::Continue);
            }
            Some(_) => {}
        }
        self.reply(Reply::bare(354, "Start mail input; end with <CRLF>.<CRLF>"));
        let command_end_bare = !self.conn.line().ends_with(b"\r\n");
        let received = self.receive_message(command_end_bare).await?;
        let transaction = self.transaction.take().expect("checked above");
        // `_memory` is held until the message is stored.
        let (message, bare_end, _memory) = match received {
            DataEnd::Complete {
                message,
                bare_end,
                memory,
            } => (message, bare_end, memory),
            DataEnd::NoMemory => {
                self.conn
                    .record
                    .note("message over server.message_memory_budget, not kept");
                let reply = Reply::new(
                    452,
                    [4, 3, 1],
                    "Insufficient system resources, try again later",
                );
                let budget = self.settings.server.message_memory_budget;
                let hint = format!(
                    "messages being received at once exceeded server.message_memory_budget ({budget} bytes); the client retries later, or raise the budget"
                );
                self.rejected(&reply, Refusal::new("memory_budget", hint), None);
                self.reply(reply);
                return Ok(Flow::Continue);
            }
            DataEnd::TooLarge => {
                self.conn
                    .record
                    .note("message over server.max_message_size, not kept");
                let (reply, refusal) = self.too_large();
                self.rejected(&reply, refusal, None);
                self.reply(reply);
                return Ok(Flow::Continue);
            }
        };
        self.conn.record.message(&message);
        let account = transaction.account.clone();
        let Some(policy) = self.settings.rewrites.get(&account) else {
            // The account was removed by a reload during the transaction.
            let reply = Reply::new(451, [4, 3, 5], "No such upstream account configured");
            let hint = format!("add [accounts.{account}] to the configuration");
            self.rejected(&reply, Refusal::new("no_account", hint), None);
            self.reply(reply);
            return Ok(Flow::Continue);
        };
        let rewritten = match rewrite(message, policy, &self.trace()) {
            Ok(mut rewritten) => {
                if bare_end {
                    rewritten
                        .changes
                        .push("accepted <LF>.<LF> as the end of the message".to_string());
                }
                rewritten
            }
            Err(RewriteError::LineTooLong { line, length }) => {
                let reply = Reply::new(
                    550,
                    [5, 6, 0],
                    format!(
                        "Line {line} is {length} octets long; at most 998 are allowed (RFC 5322)"
                    ),
                );
                let hint = format!(
                    "the program sends lines over 998 octets; set accounts.{account}.long_lines = \"wrap\" to wrap them instead"
                );
                self.rejected(&reply, Refusal::new("long_lines", hint), None);
                self.reply(reply);
                return Ok(Flow::Continue);
            }
        };
        let envelope = Envelope {
            session_id: self.id.clone(),
            client: self.peer.to_string(),
            user: self.signed_in.as_ref().map(|s| s.user.clone()),
            account: transaction.account,
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
            flags: transaction.flags,
            ..Envelope::default()
        };
        let (user, from, recipients, size) = (
            envelope.user.clone(),
            envelope.mail_from.clone(),
            envelope.recipients.len(),
            rewritten.message.len(),
        );
        // The client hears nothing until the message is stored (and, per the
        // delivery mode, attempted): flush what we owe it now.
        self.conn.flush().await.map_err(Stop::Io)?;
        let started = Instant::now();
        let submitted = self.ctx.delivery.submit(envelope, rewritten.message).await;
        info!(
            id = submitted.id.as_deref().unwrap_or("-"),
            user = user.as_deref().unwrap_or("-"),
            account = %account,
            from = ?from,
            recipients,
            size,
            rewrites = ?rewritten.changes,
            reply = %submitted.reply,
            duration_ms = started.elapsed().as_millis() as u64,
            "message received"
        );
        match submitted.refusal {
            Some(refusal) => self.rejected(&submitted.reply, refusal, submitted.id),
            None => self.conn.record.accepted(),
        }
        self.reply(submitted.reply);
        Ok(Flow::Continue)
    }

    pub(super) fn too_large(&self) -> (Reply, Refusal) {
        let max = self.settings.server.max_message_size;
        let reply = Reply::new(
            552,
            [5, 3, 4],
            format!("Message size exceeds fixed maximum message size ({max} bytes)"),
        );
        let hint = format!(
            "the message is larger than server.max_message_size ({max} bytes); the provider's own limit (Gmail: 25 MB) applies too"
        );
        (reply, Refusal::new("too_large", hint))
    }

    /// Where the message came from, for the Received field.
    fn trace(&self) -> Trace {
        let protocol = match (self.extended, self.tls, self.signed_in.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPA",
            (true, true, false) => "ESMTPS",
            (true, true, true) => "ESMTPSA",
        };
        Trace {
            helo: self.helo.clone().unwrap_or_default(),
            client_ip: self.peer.ip(),
            protocol,
            session_id: self.id.clone(),
            now_unix: crate::spool::unix_millis() as i64 / 1000,
        }
    }

    pub(super) async fn receive_message(
        &mut self,
        command_end_bare: bool,
    ) -> Result<DataEnd, Stop> {
        let server = &self.settings.server;
        let idle = server.data_timeout;
        let deadline = Instant::now() + server.data_deadline;
        let mut receiving = Receiving {
            dots: DotReader::new(command_end_bare),
            message: Vec::new(),
            memory: self.ctx.memory.reservation(),
            max: server.max_message_size,
        };
        let end = self
            .conn
            .read_with(idle, deadline, Recorded::NotHere, &mut receiving)
            .await?;
        let Receiving {
            mut dots,
            message,
            memory,
            ..
        } = receiving;
        let over = match end {
            Ok(bare_end) => {
                return Ok(DataEnd::Complete {
                    message,
                    bare_end,
                    memory,
                });
            }
            Err(over) => over,
        };
        // Drain the rest so the connection stays usable, without keeping it.
        drop((message, memory));
        self.conn
            .read_with(idle, deadline, Recorded::NotHere, &mut dots)
            .await?;
        Ok(over)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input, and the content, bare terminator and bytes used it should give.
    type Case = (&'static str, Option<(&'static str, bool, usize)>);

    /// The content and whether a bare terminator ended it, or None when the
    /// input did not end the message; fed one byte at a time too.
    fn read(input: &[u8], command_end_bare: bool) -> Option<(String, bool, usize)> {
        let whole = {
            let mut reader = DotReader::new(command_end_bare);
            let mut out = Vec::new();
            let used = reader.read(input, Some(&mut out));
            reader
                .finished()
                .map(|bare| (String::from_utf8(out).unwrap(), bare, used))
        };
        let mut reader = DotReader::new(command_end_bare);
        let mut out = Vec::new();
        let mut used = 0;
        for chunk in input.chunks(1) {
            used += reader.read(chunk, Some(&mut out));
            if reader.finished().is_some() {
                break;
            }
        }
        let bytewise = reader
            .finished()
            .map(|bare| (String::from_utf8(out).unwrap(), bare, used));
        assert_eq!(whole, bytewise, "split reads agree for {input:?}");
        whole
    }

    fn check(cases: &[Case], command_end_bare: bool) {
        for (input, expected) in cases {
            let expected = expected.map(|(text, bare, used)| (text.to_string(), bare, used));
            assert_eq!(
                read(input.as_bytes(), command_end_bare),
                expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn crlf_clients_end_only_at_crlf_dot_crlf() {
        let cases: &[Case] = &[
            ("a\r\n.\r\nQUIT\r\n", Some(("a\r\n", false, 6))),
            (".\r\n", Some(("", false, 3))),
            ("..x\r\n.x\r\n.\r\n", Some((".x\r\nx\r\n", false, 12))),
            // Smuggling patterns stay content.
            (
                "a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                Some(("a\n.\nMAIL FROM:<x@y>\r\n", false, 24)),
            ),
            ("a\r\n.\nb\r\n.\r\n", Some(("a\r\n\nb\r\n", false, 11))),
            ("a\n.\r\nb\r\n.\r\n", Some(("a\n.\r\nb\r\n", false, 11))),
            ("a\r.\r\nb\r\n.\r\n", Some(("a\r.\r\nb\r\n", false, 11))),
            ("a\r\n.", None),
            ("a\r\n.\r", None),
        ];
        check(cases, false);
    }

    #[test]
    fn bare_lf_clients_may_end_with_lf_dot_lf() {
        let cases: &[Case] = &[
            ("a\nb\n.\nQUIT\n", Some(("a\nb\n", true, 6))),
            (".\n", Some(("", true, 2))),
            ("a\r\n.\r\n", Some(("a\r\n", false, 6))),
            ("a\n.\r\n", Some(("a\n", true, 5))),
            ("a\r\n.\n", Some(("a\r\n", true, 5))),
            // Stuffed after a bare LF: kept for the rewrite to unstuff.
            ("a\n..\n.\n", Some(("a\n..\n", true, 7))),
            ("a\n", None),
        ];
        check(cases, true);
    }
}
