//! DATA: receiving the message, within the size limit, the memory budget
//! and the total deadline, then rewriting, storing and answering it.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::info;

use super::connection::{CONTENT_READ, KeepingReader, Reader, Recorded, content_read};
use super::dot_reader::DotReader;
use super::memory::Reservation;
use super::{Flow, Session, Stop, Transaction};
use crate::observe;
use crate::policy::{Choice, Denied};
use crate::reply::{Refusal, Reply};
use crate::rewrite::{RewriteError, Trace, from_address, rewrite};
use crate::routes::FromHeader;
use crate::spool::{Envelope, State};

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

/// The rest of a message that is not kept: read up to its end and dropped.
impl Reader for DotReader {
    type Output = ();

    fn take(&mut self, input: &[u8]) -> (usize, Option<()>) {
        (self.read(input, None), self.finished().map(drop))
    }
}

/// Room the message buffer keeps after the content for what the rewrite
/// adds to the header (Received, perhaps Date and Message-ID): splicing
/// that in then moves the body within the buffer, instead of reallocating
/// and copying a message that happened to fill its buffer to the byte.
const HEADER_ROOM: usize = 4096;

/// A message being received, within its size limit and the memory budget.
struct Receiving {
    dots: DotReader,
    /// The content is `message[..written]`; bytes the dot reader holds may
    /// follow (see `DotReader::read_in_place`).
    message: Vec<u8>,
    written: usize,
    /// Covers `message` and the next read.
    memory: Reservation,
    max: usize,
}

impl Receiving {
    /// The buffer is allocated for a declared size (up to `max`) at once,
    /// rather than grown and copied on the way; untouched capacity costs no
    /// memory until the content arrives.
    fn new(dots: DotReader, memory: Reservation, max: usize, declared_size: usize) -> Self {
        let capacity = match declared_size {
            0 => 0,
            declared => declared.min(max) + CONTENT_READ + HEADER_ROOM,
        };
        Receiving {
            dots,
            message: Vec::with_capacity(capacity),
            written: 0,
            memory,
            max,
        }
    }

    /// Over the limit, whether complete or not, or the end of the message;
    /// `None` while it goes on.
    fn outcome(&self) -> Option<Result<bool, DataEnd>> {
        if self.written > self.max {
            return Some(Err(DataEnd::TooLarge));
        }
        self.dots.finished().map(Ok)
    }
}

impl Reader for Receiving {
    /// Whether a bare LF ended the message, or why it is not kept.
    type Output = Result<bool, DataEnd>;

    /// Content that came with the DATA command is copied from the
    /// connection's buffer; the rest is read into `message` directly.
    fn take(&mut self, input: &[u8]) -> (usize, Option<Self::Output>) {
        if input.is_empty() {
            // The usual case: the content is still on its way.
            return (0, self.outcome());
        }
        self.message.reserve(input.len() + HEADER_ROOM);
        let used = self.dots.read(input, Some(&mut self.message));
        self.written = self.message.len();
        (used, self.outcome())
    }

    async fn before_reading_more(&mut self) -> Option<Self::Output> {
        let next_read = content_read(self.message.len());
        let covered = self.memory.cover(self.message.len() + next_read).await;
        (!covered).then_some(Err(DataEnd::NoMemory))
    }
}

impl KeepingReader for Receiving {
    /// Grows as a Vec does (doubling), with the header's room on top.
    fn buffer(&mut self) -> &mut Vec<u8> {
        // After a copy the held bytes are in the reader only: their place
        // in the buffer comes first.
        self.message.resize(self.written + self.dots.held(), 0);
        let room = content_read(self.message.len());
        self.message.reserve(room + HEADER_ROOM);
        &mut self.message
    }

    fn take_appended(&mut self, from: usize, after_end: &mut Vec<u8>) -> Option<Self::Output> {
        self.dots
            .read_in_place(&mut self.message, &mut self.written, from, after_end);
        self.outcome()
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
        let Some(account) = self.account_of(&transaction, &message) else {
            return Ok(Flow::Continue);
        };
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
            account: account.clone(),
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
        let submission = self.ctx.delivery.submit(envelope, rewritten.message).await;
        // Logged once stored, before the first attempt's own line.
        let stored = submission.stored();
        info!(
            id = stored.id.as_deref().unwrap_or("-"),
            state = stored.state.map_or("-", State::dir_name),
            user = user.as_deref().unwrap_or("-"),
            account = %account,
            from = from.as_str(),
            recipients,
            size,
            rewrites = observe::list(&rewritten.changes),
            reply = %stored.reply,
            duration_ms = started.elapsed().as_millis() as u64,
            "message received"
        );
        let submitted = submission.answer().await;
        match submitted.refusal {
            Some(refusal) => self.rejected(&submitted.reply, refusal, submitted.id),
            None => self.conn.record.accepted(),
        }
        self.reply(submitted.reply);
        Ok(Flow::Continue)
    }

    /// The transaction's account. A route on the From field decides now,
    /// by the message's; a sender no route allows is refused (answered,
    /// `None`) with the same reply as at MAIL.
    fn account_of(&mut self, transaction: &Transaction, message: &[u8]) -> Option<String> {
        let from = match &transaction.account {
            Choice::Account(account) => return Some(account.clone()),
            Choice::AfterData => from_address(message),
        };
        let user = self.signed_in.as_ref().map(|s| s.user.as_str());
        let from = FromHeader::Received(from.as_deref());
        let chosen = self.settings.policy.account_for(
            user,
            self.peer.ip(),
            &self.listener.trust,
            &transaction.mail_from,
            from,
        );
        match chosen {
            Ok(Choice::Account(account)) => Some(account),
            Ok(Choice::AfterData) => unreachable!("with the From field known, routes decide"),
            Err(Denied { reply, refusal }) => {
                self.rejected(&reply, refusal, None);
                self.reply(reply);
                None
            }
        }
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
        let declared_size = self
            .transaction
            .as_ref()
            .map_or(0, |transaction| transaction.declared_size);
        let mut receiving = Receiving::new(
            DotReader::new(command_end_bare),
            self.ctx.memory.reservation(),
            server.max_message_size,
            declared_size,
        );
        let end = self
            .conn
            .read_content_with(idle, deadline, &mut receiving)
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
    use crate::session::memory::MemoryBudget;

    const MAX: usize = 1 << 20;

    fn receiving(max: usize, declared_size: usize) -> Receiving {
        let budget = MemoryBudget::new(8 * MAX, max);
        Receiving::new(
            DotReader::new(false),
            budget.reservation(),
            max,
            declared_size,
        )
    }

    /// `len` bytes of 78-octet lines, the last one ended too.
    fn content(len: usize) -> Vec<u8> {
        let line =
            b"0123456789012345678901234567890123456789012345678901234567890123456789012345\r\n";
        let mut content: Vec<u8> = line.iter().copied().cycle().take(len - 2).collect();
        content.extend_from_slice(b"\r\n");
        content
    }

    /// Feeds `content` and the terminator as the connection does: the
    /// first `buffered` bytes through `take` (they came with DATA), the
    /// rest read into the message's buffer, as much at a time as
    /// `content_read` allows.
    fn receive(
        receiving: &mut Receiving,
        content: &[u8],
        buffered: usize,
    ) -> Option<Result<bool, DataEnd>> {
        let input = [content, b".\r\n"].concat();
        let (first, rest) = input.split_at(buffered.min(input.len()));
        let (used, mut end) = receiving.take(first);
        assert_eq!(used, first.len());
        let mut after_end = Vec::new();
        let mut rest = rest;
        while !rest.is_empty() {
            assert!(end.is_none(), "content after the end");
            let buffer = receiving.buffer();
            let from = buffer.len();
            let (read, after) = rest.split_at(content_read(from).min(rest.len()));
            assert!(buffer.capacity() - from >= read.len(), "no room for a read");
            buffer.extend_from_slice(read);
            end = receiving.take_appended(from, &mut after_end);
            rest = after;
        }
        assert!(after_end.is_empty());
        end
    }

    #[test]
    fn a_message_that_would_fill_its_buffer_still_has_room_for_the_header() {
        for (len, buffered) in [
            (64 * 1024, 0),
            (512 * 1024, 0),
            (100_000, 9000),
            (3000, 5000),
        ] {
            let mut receiving = receiving(MAX, 0);
            let end = receive(&mut receiving, &content(len), buffered);
            assert!(matches!(end, Some(Ok(false))), "{len} bytes: no end");
            let message = receiving.message;
            assert_eq!(message, content(len));
            assert!(
                message.capacity() - message.len() >= HEADER_ROOM,
                "{len} bytes in a buffer of {}",
                message.capacity()
            );
        }
    }

    #[test]
    fn a_declared_size_is_allocated_at_once_and_never_moved() {
        for len in [10_000, 300_000, MAX] {
            let mut receiving = receiving(MAX, len);
            let allocated = receiving.message.as_ptr();
            let end = receive(&mut receiving, &content(len), 0);
            assert!(matches!(end, Some(Ok(false))), "{len} bytes: no end");
            let message = receiving.message;
            assert_eq!(message.len(), len);
            assert_eq!(message.as_ptr(), allocated, "{len} bytes: reallocated");
            assert!(message.capacity() - message.len() >= HEADER_ROOM);
        }
        // A declared size over the limit allocates no more than the limit.
        let capacity = receiving(MAX, usize::MAX).message.capacity();
        assert!(capacity <= MAX + CONTENT_READ + HEADER_ROOM);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_even_when_it_ends_in_the_same_read() {
        for buffered in [0, 5000] {
            let mut receiving = receiving(1000, 0);
            let end = receive(&mut receiving, &content(2000), buffered);
            assert!(matches!(end, Some(Err(DataEnd::TooLarge))));
        }
        let mut receiving = receiving(1000, 0);
        assert!(matches!(
            receive(&mut receiving, &content(1000), 0),
            Some(Ok(false))
        ));
    }
}
