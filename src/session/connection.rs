//! The client's connection under a session: the stream with its input and
//! output buffers. Every read from the socket happens here, each within an
//! idle timeout, a deadline and the server's closing of sessions; command
//! lines are framed here (bounded in length and in total time); and what
//! crosses the wire goes to the session's record for its transcript.

use std::time::Duration;

use bytes::BufMut;
use smtp_proto::request::receiver::MAX_LINE_LENGTH;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SessionRecord;
use crate::reply::Reply;

/// Read buffer per connection: small, so idle connections stay cheap.
pub(super) const READ_BUFFER: usize = 8 * 1024;

/// The most one read adds to a message's own buffer (see
/// [`Connection::read_content_with`]): a large message takes few reads.
pub(super) const CONTENT_READ: usize = 64 * 1024;

/// How much the next read into a message's buffer may add: as much as the
/// message holds so far, from one read buffer up to [`CONTENT_READ`], so a
/// small message keeps a small buffer.
pub(super) fn content_read(so_far: usize) -> usize {
    so_far.clamp(READ_BUFFER, CONTENT_READ)
}

/// Why the connection stopped reading.
pub(super) enum Stop {
    Eof,
    Timeout,
    /// The shutdown grace period is over.
    Shutdown,
    /// The first bytes were a TLS handshake on the plain port.
    TlsOnPlainPort,
    Io(std::io::Error),
}

/// What [`Connection::read_line`] left in [`Connection::line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Line {
    /// A whole line, with its line end.
    Complete,
    /// Longer than [`MAX_LINE_LENGTH`]: everything up to its LF was read
    /// and dropped, so no tail of it runs as a command.
    TooLong,
}

/// What takes input through [`Connection::read_with`]: a command line, a
/// message.
pub(super) trait Reader {
    type Output: Send;

    /// Takes what it wants of `input`. Returns how many bytes it took and,
    /// once it has all it wants, the result.
    fn take(&mut self, input: &[u8]) -> (usize, Option<Self::Output>);

    /// Runs when all input was taken, before more is read; a result ends the
    /// reading there.
    fn before_reading_more(&mut self) -> impl Future<Output = Option<Self::Output>> + Send {
        std::future::ready(None)
    }
}

/// A [`Reader`] that keeps what it takes in a buffer of its own (message
/// content): input the connection has not buffered yet is read straight
/// into that buffer instead of being copied there.
pub(super) trait KeepingReader: Reader {
    /// The buffer the next read appends to, with room for
    /// [`content_read`] of its length more bytes.
    fn buffer(&mut self) -> &mut Vec<u8>;

    /// Takes what the last read appended to [`KeepingReader::buffer`] from
    /// `from` on; the bytes after the end of what it wants go to
    /// `after_end`. Returns the result once it has all it wants.
    fn take_appended(&mut self, from: usize, after_end: &mut Vec<u8>) -> Option<Self::Output>;
}

/// How input read with [`Connection::read_with`] goes into the transcript.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Byte for byte: command lines.
    AsSent,
    /// One `***` per line: a SASL response.
    Hidden,
    /// Not here: message content, whose header section the session records
    /// once the message is whole.
    NotHere,
}

pub(super) struct Connection<S> {
    stream: S,
    /// On a plain connection a TLS handshake as the first bytes means a
    /// client that expects implicit TLS.
    plain: bool,
    input: Box<[u8]>,
    /// Unconsumed bytes are `input[start..end]`.
    start: usize,
    end: usize,
    output: Vec<u8>,
    /// The command line last read, kept while it is handled.
    line: Vec<u8>,
    lines_read: u64,
    /// `server.command_timeout` of the settings the session uses now: for
    /// writes, a whole command line and a wait for a password check.
    command_timeout: Duration,
    /// Cancelled when the shutdown grace period is over.
    close_sessions: CancellationToken,
    /// Carried across STARTTLS with the stream.
    pub(super) record: SessionRecord,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(super) fn new(
        stream: S,
        plain: bool,
        command_timeout: Duration,
        close_sessions: CancellationToken,
        record: SessionRecord,
    ) -> Self {
        Connection {
            stream,
            plain,
            input: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            output: Vec::new(),
            line: Vec::new(),
            lines_read: 0,
            command_timeout,
            close_sessions,
            record,
        }
    }

    /// A reload may change it between commands.
    pub(super) fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// The command line last read, with its line end.
    pub(super) fn line(&self) -> &[u8] {
        &self.line
    }

    /// Queues `reply` for the next flush.
    pub(super) fn reply(&mut self, reply: &Reply) {
        reply.write_to(&mut self.output);
    }

    /// Queues bytes of a reply written out by the caller.
    pub(super) fn write(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    /// Sends the queued replies within `server.command_timeout`.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        self.record.server(&self.output);
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.command_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.output.clear();
        Ok(())
    }

    /// Sends what is queued and closes the stream.
    pub(super) async fn close(mut self) -> SessionRecord {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        self.record
    }

    /// Sends the reply to STARTTLS and hands back the bare stream for the
    /// TLS handshake. Input buffered so far goes with the buffers: it
    /// arrived in plaintext and must not be executed inside the TLS session
    /// (RFC 3207, CVE-2011-0411).
    pub(super) async fn start_tls(mut self) -> Result<(S, SessionRecord), SessionRecord> {
        match self.flush().await {
            Ok(()) => Ok((self.stream, self.record)),
            Err(_) => Err(self.record),
        }
    }

    /// Reads the next command line into [`Connection::line`]. The whole line
    /// must arrive within `server.command_timeout`, however slowly it
    /// trickles.
    pub(super) async fn read_line(&mut self) -> Result<Line, Stop> {
        self.read_line_as(Recorded::AsSent).await
    }

    /// Reads a line of a SASL exchange, like [`Connection::read_line`]; the
    /// transcript shows `***` for it.
    pub(super) async fn read_secret_line(&mut self) -> Result<Line, Stop> {
        self.read_line_as(Recorded::Hidden).await
    }

    async fn read_line_as(&mut self, recorded: Recorded) -> Result<Line, Stop> {
        let timeout = self.command_timeout;
        let deadline = Instant::now() + timeout;
        // The line buffer is lent to the framer while `read_with` borrows
        // `self`, and comes back whatever the outcome.
        let line = std::mem::take(&mut self.line);
        let mut framer = LineFramer::new(line, self.plain && self.lines_read == 0);
        let framed = self
            .read_with(timeout, deadline, recorded, &mut framer)
            .await;
        self.line = framer.line;
        match framed? {
            Framed::Line(line) => {
                self.lines_read += 1;
                Ok(line)
            }
            Framed::TlsHandshake => Err(Stop::TlsOnPlainPort),
        }
    }

    /// Hands the buffered input to `reader` until it has a result, and
    /// reads more whenever it has taken all of it: each read waits at most
    /// `idle` and never past `deadline`.
    pub(super) async fn read_with<R: Reader>(
        &mut self,
        idle: Duration,
        deadline: Instant,
        recorded: Recorded,
        reader: &mut R,
    ) -> Result<R::Output, Stop> {
        loop {
            let available = &self.input[self.start..self.end];
            let (used, value) = reader.take(available);
            if recorded == Recorded::AsSent {
                self.record.client(&available[..used]);
            }
            self.start += used;
            if let Some(value) = value {
                if recorded == Recorded::Hidden {
                    self.record.client_secret();
                }
                return Ok(value);
            }
            if let Some(value) = reader.before_reading_more().await {
                return Ok(value);
            }
            self.read_more_until(idle, deadline).await?;
        }
    }

    /// [`Connection::read_with`] for message content, without the copy:
    /// what the connection has buffered is handed to `reader` first, then
    /// every read goes straight into the reader's buffer, up to
    /// [`content_read`] bytes at a time. Bytes read past the end of the
    /// content (commands a client pipelined after it) are the connection's
    /// next input.
    pub(super) async fn read_content_with<R: KeepingReader>(
        &mut self,
        idle: Duration,
        deadline: Instant,
        reader: &mut R,
    ) -> Result<R::Output, Stop> {
        let (used, value) = reader.take(&self.input[self.start..self.end]);
        self.start += used;
        if let Some(value) = value {
            return Ok(value);
        }
        debug_assert_eq!(self.start, self.end, "all buffered input is taken");
        let mut after_end = Vec::new();
        loop {
            if let Some(value) = reader.before_reading_more().await {
                return Ok(value);
            }
            self.flush().await.map_err(Stop::Io)?;
            let buffer = reader.buffer();
            let from = buffer.len();
            let mut room = buffer.limit(content_read(from));
            let read = self.stream.read_buf(&mut room);
            wait_for(read, idle, deadline, &self.close_sessions).await?;
            if let Some(value) = reader.take_appended(from, &mut after_end) {
                self.put_back(&after_end);
                return Ok(value);
            }
        }
    }

    /// Makes `bytes` the next input, in a buffer grown for them if need be.
    fn put_back(&mut self, bytes: &[u8]) {
        if bytes.len() > self.input.len() {
            self.input = vec![0; bytes.len()].into_boxed_slice();
        }
        self.input[..bytes.len()].copy_from_slice(bytes);
        self.start = 0;
        self.end = bytes.len();
    }

    /// Sends what is queued, then reads more bytes into the empty input
    /// buffer, waiting at most `idle` and never past `deadline`.
    async fn read_more_until(&mut self, idle: Duration, deadline: Instant) -> Result<(), Stop> {
        self.flush().await.map_err(Stop::Io)?;
        debug_assert_eq!(self.start, self.end, "all buffered input is consumed first");
        if self.input.len() > READ_BUFFER {
            // Grown for bytes put back, which are taken now.
            self.input = vec![0; READ_BUFFER].into_boxed_slice();
            (self.start, self.end) = (0, 0);
        }
        let read = self.stream.read(&mut self.input);
        self.end = wait_for(read, idle, deadline, &self.close_sessions).await?;
        self.start = 0;
        Ok(())
    }

    /// Sends what is queued, then waits for `wanted` (a password check, or
    /// the delay before one) within `server.command_timeout`, while watching
    /// the client: when it hangs up, the wait is dropped and the session
    /// ends. Bytes it pipelines meanwhile are kept in the spare part of the
    /// input buffer for the next command; with no spare room left, only
    /// `wanted` is awaited.
    pub(super) async fn unless_hung_up<T>(
        &mut self,
        wanted: impl Future<Output = T>,
    ) -> Result<T, Stop> {
        self.flush().await.map_err(Stop::Io)?;
        let timeout = self.command_timeout;
        let close_sessions = self.close_sessions.clone();
        let watched = async {
            tokio::pin!(wanted);
            loop {
                let spare = self.end < self.input.len();
                tokio::select! {
                    value = &mut wanted => return Ok(value),
                    read = self.stream.read(&mut self.input[self.end..]), if spare => match read {
                        Ok(0) => return Err(Stop::Eof),
                        Ok(n) => self.end += n,
                        Err(err) => return Err(Stop::Io(err)),
                    },
                }
            }
        };
        tokio::select! {
            watched = tokio::time::timeout(timeout, watched) => watched.unwrap_or(Err(Stop::Timeout)),
            _ = close_sessions.cancelled() => Err(Stop::Shutdown),
        }
    }
}

/// What [`LineFramer::take`] found once it had a whole line.
#[derive(Debug, PartialEq, Eq)]
enum Framed {
    Line(Line),
    /// The first bytes of a plain connection were a TLS handshake.
    TlsHandshake,
}

/// Frames one command line from input that arrives in pieces; pure, so its
/// rules have table tests.
struct LineFramer {
    line: Vec<u8>,
    /// Look for a TLS handshake in the first bytes.
    watch_tls: bool,
    too_long: bool,
}

impl LineFramer {
    fn new(mut line: Vec<u8>, watch_tls: bool) -> Self {
        line.clear();
        LineFramer {
            line,
            watch_tls,
            too_long: false,
        }
    }
}

impl Reader for LineFramer {
    type Output = Framed;

    /// Takes `input` into the line up to and including the first LF.
    fn take(&mut self, input: &[u8]) -> (usize, Option<Framed>) {
        let line = &mut self.line;
        let first_bytes = self.watch_tls && line.is_empty() && !self.too_long;
        if first_bytes && is_tls_client_hello(input) {
            return (0, Some(Framed::TlsHandshake));
        }
        let (taken, complete) = match memchr::memchr(b'\n', input) {
            Some(at) => (&input[..=at], true),
            None => (input, false),
        };
        if !self.too_long && line.len() + taken.len() <= MAX_LINE_LENGTH {
            line.extend_from_slice(taken);
        } else {
            self.too_long = true;
            line.clear();
        }
        let framed = match (complete, self.too_long) {
            (false, _) => None,
            (true, false) => Some(Framed::Line(Line::Complete)),
            (true, true) => Some(Framed::Line(Line::TooLong)),
        };
        (taken.len(), framed)
    }
}

/// Waits for `read` at most `idle` and never past `deadline`. Once the
/// shutdown grace period is over (`close_sessions`), the wait ends even
/// inside a message: nothing is lost, since only a stored message is ever
/// acknowledged. Returns the bytes read, never 0: that is the end of the
/// stream.
async fn wait_for(
    read: impl Future<Output = std::io::Result<usize>>,
    idle: Duration,
    deadline: Instant,
    close_sessions: &CancellationToken,
) -> Result<usize, Stop> {
    let until = deadline.min(Instant::now() + idle);
    let result = tokio::select! {
        result = tokio::time::timeout_at(until, read) => result,
        _ = close_sessions.cancelled() => return Err(Stop::Shutdown),
    };
    match result {
        Err(_) => Err(Stop::Timeout),
        Ok(Err(err)) => Err(Stop::Io(err)),
        Ok(Ok(0)) => Err(Stop::Eof),
        Ok(Ok(n)) => Ok(n),
    }
}

/// A TLS record starts with 0x16 (handshake) and version 3.x.
fn is_tls_client_hello(bytes: &[u8]) -> bool {
    matches!(bytes, [0x16, 0x03, ..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` one after the other, as reads would deliver them, and
    /// returns what was framed, the line, and the bytes taken of each piece.
    fn frame(watch_tls: bool, pieces: &[&[u8]]) -> (Option<Framed>, Vec<u8>, Vec<usize>) {
        let mut framer = LineFramer::new(Vec::new(), watch_tls);
        let mut taken = Vec::new();
        for piece in pieces {
            let (used, framed) = framer.take(piece);
            taken.push(used);
            if framed.is_some() {
                return (framed, framer.line, taken);
            }
        }
        (None, framer.line, taken)
    }

    #[test]
    fn reads_into_a_message_grow_with_it_up_to_a_bound() {
        let cases = [
            (0, READ_BUFFER),
            (READ_BUFFER + 1, READ_BUFFER + 1),
            (40_000, 40_000),
            (CONTENT_READ, CONTENT_READ),
            (25 << 20, CONTENT_READ),
        ];
        for (so_far, read) in cases {
            assert_eq!(content_read(so_far), read, "{so_far} bytes so far");
        }
    }

    #[test]
    fn lines_are_framed_up_to_their_lf_across_pieces() {
        let complete = || Some(Framed::Line(Line::Complete));
        let too_long = || Some(Framed::Line(Line::TooLong));
        let long = vec![b'x'; MAX_LINE_LENGTH];
        let at_limit = [&long[..MAX_LINE_LENGTH - 2], b"\r\n"].concat();
        let over = vec![b'x'; MAX_LINE_LENGTH + 1];
        type Case<'a> = (bool, Vec<&'a [u8]>, Option<Framed>, &'a [u8], Vec<usize>);
        let cases: Vec<Case> = vec![
            (false, vec![b"NOOP\r\n"], complete(), b"NOOP\r\n", vec![6]),
            // Pipelined commands: only the first line is taken.
            (
                false,
                vec![b"NOOP\r\nQUIT\r\n"],
                complete(),
                b"NOOP\r\n",
                vec![6],
            ),
            (
                false,
                vec![b"NO", b"", b"OP\r", b"\n"],
                complete(),
                b"NOOP\r\n",
                vec![2, 0, 3, 1],
            ),
            (false, vec![b"NOOP\n"], complete(), b"NOOP\n", vec![5]),
            (false, vec![b"NOOP"], None, b"NOOP", vec![4]),
            // At the limit with its line end: still a line.
            (
                false,
                vec![&long[..MAX_LINE_LENGTH - 2], b"\r\n"],
                complete(),
                &at_limit,
                vec![MAX_LINE_LENGTH - 2, 2],
            ),
            // Over it: read up to its LF and dropped; the next line is left.
            (
                false,
                vec![&over, b"tail\r\nNOOP\r\n"],
                too_long(),
                b"",
                vec![MAX_LINE_LENGTH + 1, 6],
            ),
            (
                false,
                vec![&long, b"\r", b"\n"],
                too_long(),
                b"",
                vec![MAX_LINE_LENGTH, 1, 1],
            ),
            // A TLS handshake is looked for in the first bytes, when asked.
            (
                true,
                vec![b"\x16\x03\x01\x02\x00"],
                Some(Framed::TlsHandshake),
                b"",
                vec![0],
            ),
            (
                true,
                vec![b"", b"\x16\x03\x01"],
                Some(Framed::TlsHandshake),
                b"",
                vec![0, 0],
            ),
            (
                false,
                vec![b"\x16\x03\x01\n"],
                complete(),
                b"\x16\x03\x01\n",
                vec![4],
            ),
            (
                true,
                vec![b"\x16", b"\x03\n"],
                complete(),
                b"\x16\x03\n",
                vec![1, 2],
            ),
            (
                true,
                vec![b"EHLO x\r\n"],
                complete(),
                b"EHLO x\r\n",
                vec![8],
            ),
        ];
        for (n, (watch_tls, pieces, framed, line, taken)) in cases.into_iter().enumerate() {
            assert_eq!(
                frame(watch_tls, &pieces),
                (framed, line.to_vec(), taken),
                "case {n}"
            );
        }
    }
}
