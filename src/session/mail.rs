//! MAIL, RCPT and RSET: the envelope of a transaction, and the refusals of
//! addresses smtp-proto lets through but RFC 5321 does not.

use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, Transaction};
use crate::address::{AddressError, Role, parse_command_path};
use crate::policy::{Denied, Trust};
use crate::reply::{Refusal, Reply};
use crate::routes::FromHeader;
use crate::transport::BodyFlags;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Why a client that did not sign in may not send, naming the key.
    fn relay_denied_hint(&self) -> String {
        let sign_in = "set the SMTP user and password from [users] in the sending program";
        let key = &self.listener.key;
        match self.listener.trust {
            Trust::Server => format!(
                "the client neither signed in nor is in server.trusted_networks: {sign_in}, or add its network to server.trusted_networks"
            ),
            Trust::Networks(_) => format!(
                "the client neither signed in nor is in {key}.trusted_networks: {sign_in}, or add its network to {key}.trusted_networks"
            ),
            Trust::Nobody => {
                format!("{key} has require_auth = true, and the client did not sign in: {sign_in}")
            }
        }
    }

    pub(super) fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            return self.error(Reply::new(503, [5, 5, 1], "Send HELO or EHLO first"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::new(503, [5, 5, 1], "Nested MAIL command"));
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        let mail_from = match parse_command_path(self.conn.line(), Role::Sender, smtputf8) {
            Ok(address) => address,
            Err(error) => return self.bad_address(error, Role::Sender),
        };
        // Who may send, and through which account, comes first: a client
        // that may not send learns nothing of the limits.
        let user = self.signed_in.as_ref().map(|s| s.user.as_str());
        let account = match self.settings.policy.account_for(
            user,
            self.peer.ip(),
            &self.listener.trust,
            &mail_from,
            FromHeader::NotYetReceived,
        ) {
            Ok(account) => account,
            Err(Denied { reply, refusal }) => {
                // Only the session knows the listener whose key to name.
                let refusal = match reply.code {
                    530 => Refusal::new("relay_denied", self.relay_denied_hint()),
                    _ => refusal,
                };
                self.rejected(&reply, refusal, None);
                return self.error(reply);
            }
        };
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return self.error(Reply::new(
                555,
                [5, 5, 4],
                "BODY=BINARYMIME is not supported",
            ));
        }
        if from.size > self.settings.server.max_message_size {
            let (reply, refusal) = self.too_large();
            self.rejected(&reply, refusal, None);
            return self.error(reply);
        }
        self.transaction = Some(Transaction {
            account,
            mail_from,
            recipients: Vec::new(),
            flags: BodyFlags {
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
                smtputf8,
            },
            declared_size: from.size,
        });
        self.reply(Reply::new(250, [2, 1, 0], "Sender OK"));
    }

    pub(super) fn rcpt(&mut self) {
        let max = self.settings.server.max_recipients;
        let Some(transaction) = self.transaction.as_mut() else {
            return self.error(Reply::new(503, [5, 5, 1], "Send MAIL first"));
        };
        let smtputf8 = transaction.flags.smtputf8;
        let address = match parse_command_path(self.conn.line(), Role::Recipient, smtputf8) {
            Ok(address) => address,
            Err(error) => return self.bad_address(error, Role::Recipient),
        };
        let transaction = self.transaction.as_mut().expect("checked above");
        if transaction.recipients.len() >= max {
            let reply = Reply::new(
                452,
                [4, 5, 3],
                format!("Too many recipients (at most {max})"),
            );
            let hint = format!(
                "the client sent more than server.max_recipients ({max}) recipients; raise it (messages over the provider's limit are sent in parts)"
            );
            self.rejected(&reply, Refusal::new("too_many_recipients", hint), None);
            return self.reply(reply);
        }
        transaction.recipients.push(address);
        self.reply(Reply::new(250, [2, 1, 5], "Recipient OK"));
    }

    pub(super) fn rset(&mut self) {
        self.transaction = None;
        self.reply(Reply::new(250, [2, 0, 0], "Reset"));
    }

    /// Refuses an address smtp-proto let through but RFC 5321 does not.
    fn bad_address(&mut self, error: AddressError, role: Role) {
        let status = match role {
            Role::Sender => [5, 1, 7],
            Role::Recipient => [5, 1, 3],
        };
        let reply = match error {
            AddressError::Syntax => Reply::new(501, status, "Invalid address syntax (RFC 5321)"),
            AddressError::ControlCharacter => Reply::new(
                501,
                status,
                "Control characters are not allowed in addresses",
            ),
            AddressError::NeedsSmtpUtf8 => Reply::new(
                553,
                [5, 6, 7],
                "Non-ASCII address without SMTPUTF8: declare it on MAIL FROM (RFC 6531)",
            ),
        };
        self.error(reply);
    }
}
