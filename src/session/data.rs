//! Receiving the message after DATA: dot-unstuffing and end detection by
//! smtp-proto (only CRLF "." CRLF ends it, so a bare `\n.\n` cannot smuggle
//! a second message), with the size limit enforced while reading.

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, Stop};

pub(super) enum DataEnd {
    /// The content, ending in the CRLF before the terminating dot.
    Complete(Vec<u8>),
    /// Over the limit; the rest was read and dropped.
    TooLarge,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn receive_message(&mut self) -> Result<DataEnd, Stop> {
        let max = self.settings.server.max_message_size;
        let timeout = self.settings.server.data_timeout;
        let mut receiver = DataReceiver::new();
        let mut message = Vec::new();
        // The CRLF that ended the DATA command starts the first line: without
        // it an empty message (a lone ".") would not end, and a stuffed dot
        // on the first line would not be removed.
        receiver.ingest(&mut b"\r\n".iter(), &mut message);
        message.clear();
        loop {
            let mut bytes = self.input[self.start..self.end].iter();
            let complete = receiver.ingest(&mut bytes, &mut message);
            self.start = self.end - bytes.len();
            if complete {
                return Ok(DataEnd::Complete(message));
            }
            // `message` exceeds the limit by at most one read buffer.
            if message.len() > max {
                break;
            }
            self.read_more(timeout).await?;
        }
        // Drain the rest so the connection stays usable, without keeping it.
        drop(message);
        let mut drain = DummyDataReceiver::new_data(&receiver);
        loop {
            let mut bytes = self.input[self.start..self.end].iter();
            let complete = drain.ingest(&mut bytes);
            self.start = self.end - bytes.len();
            if complete {
                return Ok(DataEnd::TooLarge);
            }
            self.read_more(timeout).await?;
        }
    }
}
