//! EHLO, HELO and STARTTLS: the greeting phase and what it advertises.

use smtp_proto::{
    EXT_8BIT_MIME, EXT_AUTH, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS, EhloResponse,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::sign_in::offered;
use super::{Flow, Session};
use crate::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) fn ehlo(&mut self, host: String, extended: bool) {
        self.transaction = None;
        self.helo = Some(host);
        self.extended = extended;
        let hostname = &self.settings.server.hostname;
        if !extended {
            self.reply(Reply::bare(250, hostname.clone()));
            return;
        }
        let mut ehlo = EhloResponse::new(hostname.as_str());
        ehlo.capabilities =
            EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8;
        ehlo.size = self.settings.server.max_message_size;
        if self.auth_allowed() && self.signed_in.is_none() {
            ehlo.capabilities |= EXT_AUTH;
            ehlo.auth_mechanisms = offered(&self.settings.server.auth_mechanisms);
        }
        if !self.tls && self.listener.offers_starttls {
            ehlo.capabilities |= EXT_START_TLS;
        }
        // smtp-proto's first line carries a joke; operators grep for ours.
        let mut lines = Vec::new();
        let _ = ehlo.write(&mut lines);
        let first_line_end = lines.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        let first_line = format!("250-{hostname} at your service\r\n");
        self.conn.write(first_line.as_bytes());
        self.conn.write(&lines[first_line_end..]);
    }

    pub(super) fn starttls(&mut self) -> Flow {
        if self.tls {
            self.error(Reply::new(503, [5, 5, 1], "Already running TLS"));
            return Flow::Continue;
        }
        if !self.listener.offers_starttls {
            self.error(Reply::new(502, [5, 5, 1], "STARTTLS not available"));
            return Flow::Continue;
        }
        self.reply(Reply::new(220, [2, 0, 0], "Ready to start TLS"));
        // Anything pipelined after STARTTLS is dropped with the connection's
        // buffers when the run loop hands the stream over for TLS.
        Flow::StartTls
    }
}
