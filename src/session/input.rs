//! The session's input side: command lines framed here (bounded in length
//! and in total time) and the one place that reads from the socket.

use std::time::Duration;

use smtp_proto::request::receiver::MAX_LINE_LENGTH;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;

use super::{Session, Stop};

/// What [`Session::read_line`] left in `Session::line`.
pub(super) enum Line {
    /// A whole line, with its line end.
    Complete,
    /// Longer than [`MAX_LINE_LENGTH`]: everything up to its LF was read
    /// and dropped, so no tail of it runs as a command.
    TooLong,
}

/// How a line goes into the transcript.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recorded {
    AsSent,
    /// A secret: `***`.
    Hidden,
}

/// A TLS record starts with 0x16 (handshake) and version 3.x.
fn is_tls_client_hello(bytes: &[u8]) -> bool {
    matches!(bytes, [0x16, 0x03, ..])
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Reads the next command line into `self.line`. The whole line must
    /// arrive within `server.command_timeout`, however slowly it trickles.
    pub(super) async fn read_line(&mut self) -> Result<Line, Stop> {
        self.read_line_as(Recorded::AsSent).await
    }

    /// Reads a line of a SASL exchange, like [`Session::read_line`]; the
    /// transcript shows `***` for it.
    pub(super) async fn read_secret_line(&mut self) -> Result<Line, Stop> {
        self.read_line_as(Recorded::Hidden).await
    }

    async fn read_line_as(&mut self, recorded: Recorded) -> Result<Line, Stop> {
        let timeout = self.settings.server.command_timeout;
        let deadline = Instant::now() + timeout;
        self.line.clear();
        let mut too_long = false;
        loop {
            let available = &self.input[self.start..self.end];
            let first_bytes = self.lines_read == 0 && self.line.is_empty() && !too_long;
            if first_bytes && !self.tls && is_tls_client_hello(available) {
                return Err(Stop::TlsOnPlainPort);
            }
            let (taken, complete) = match memchr::memchr(b'\n', available) {
                Some(at) => (&available[..=at], true),
                None => (available, false),
            };
            if !too_long && self.line.len() + taken.len() <= MAX_LINE_LENGTH {
                self.line.extend_from_slice(taken);
            } else {
                too_long = true;
                self.line.clear();
            }
            if recorded == Recorded::AsSent {
                self.record.client(taken);
            }
            self.start += taken.len();
            if complete {
                if recorded == Recorded::Hidden {
                    self.record.client_secret();
                }
                self.lines_read += 1;
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Complete
                });
            }
            self.read_more_until(timeout, deadline).await?;
        }
    }

    /// Reads more bytes into the empty input buffer, waiting at most `idle`
    /// and never past `deadline`. Once shutdown's grace period is over, the
    /// wait ends even inside a message: nothing is lost, since only a
    /// stored message is ever acknowledged.
    pub(super) async fn read_more_until(
        &mut self,
        idle: Duration,
        deadline: Instant,
    ) -> Result<(), Stop> {
        self.flush().await.map_err(Stop::Io)?;
        debug_assert_eq!(self.start, self.end, "all buffered input is consumed first");
        let until = deadline.min(Instant::now() + idle);
        let shutdown = self.ctx.shutdown.clone();
        let read = tokio::time::timeout_at(until, self.stream.read(&mut self.input));
        let result = tokio::select! {
            result = read => result,
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        match result {
            Err(_) => Err(Stop::Timeout),
            Ok(Err(err)) => Err(Stop::Io(err)),
            Ok(Ok(0)) => Err(Stop::Eof),
            Ok(Ok(n)) => {
                self.start = 0;
                self.end = n;
                Ok(())
            }
        }
    }
}
