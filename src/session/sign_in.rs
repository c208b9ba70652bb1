//! AUTH (RFC 4954): the SASL PLAIN and LOGIN exchanges with the client
//! and the answer to a password check.

use smtp_proto::request::receiver::LineReceiver;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::auth::{self, SaslError};
use super::{Flow, MAX_AUTH_FAILURES, Session, Stop};
use crate::reply::{Refusal, Reply};
use crate::secret::Secret;

/// A user name and password from a SASL exchange.
type Credentials = (String, Secret);

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn auth(
        &mut self,
        mechanism: u64,
        initial_response: String,
    ) -> Result<Flow, Stop> {
        if self.helo.is_none() {
            self.error(Reply::new(503, [5, 5, 1], "Send EHLO first"));
            return Ok(Flow::Continue);
        }
        if self.signed_in.is_some() {
            self.error(Reply::new(503, [5, 5, 1], "Already authenticated"));
            return Ok(Flow::Continue);
        }
        if self.transaction.is_some() {
            self.error(Reply::new(
                503,
                [5, 5, 1],
                "AUTH not allowed during a mail transaction",
            ));
            return Ok(Flow::Continue);
        }
        if !self.auth_allowed() {
            let reply = Reply::new(538, [5, 7, 11], "Encryption required: use STARTTLS first");
            let hint = "the client signs in without TLS: enable STARTTLS/SSL in the sending program, or set server.require_tls_for_auth = false";
            self.rejected(&reply, Refusal::new("tls_required", hint), None);
            self.error(reply);
            return Ok(Flow::Continue);
        }
        let credentials = match mechanism {
            AUTH_PLAIN => self.sasl_plain(initial_response).await?,
            AUTH_LOGIN => self.sasl_login(initial_response).await?,
            _ => {
                self.error(Reply::new(
                    504,
                    [5, 5, 4],
                    "Unrecognized authentication type; use PLAIN or LOGIN",
                ));
                return Ok(Flow::Continue);
            }
        };
        let (username, password) = match credentials {
            Ok(credentials) => credentials,
            Err(SaslError::Cancelled) => {
                self.error(Reply::new(501, [5, 0, 0], "Authentication cancelled"));
                return Ok(Flow::Continue);
            }
            Err(SaslError::Malformed) => {
                self.error(Reply::new(
                    501,
                    [5, 5, 2],
                    "Cannot decode the AUTH response",
                ));
                return Ok(Flow::Continue);
            }
        };
        match self.settings.users.verify(&username, password).await {
            Some(signed_in) => {
                info!(user = %signed_in.user, account = %signed_in.account, "client signed in");
                self.record.signed_in(&signed_in.user);
                self.signed_in = Some(signed_in);
                self.reply(Reply::new(235, [2, 7, 0], "Authentication successful"));
            }
            None => {
                self.auth_failures += 1;
                debug!(user = ?username, "local sign-in failed");
                crate::admin::metrics::local_auth_failure();
                let reply = Reply::new(535, [5, 7, 8], "Authentication credentials invalid");
                let hint = format!(
                    "wrong user name or password for user {username:?}: compare the SMTP user and password set in the sending program with [users] in the sendbridge config"
                );
                self.rejected(&reply, Refusal::new("auth_failed", hint), None);
                self.error(reply);
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.reply(Reply::new(
                        421,
                        [4, 7, 0],
                        "Too many failed sign-ins, closing connection",
                    ));
                    return Ok(Flow::Quit);
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn sasl_plain(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let response = if initial.is_empty() {
            self.reply(Reply::bare(334, ""));
            self.read_auth_line().await?
        } else {
            initial
        };
        Ok(auth::decode_response(&response).and_then(|decoded| auth::parse_plain(&decoded)))
    }

    async fn sasl_login(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let username = if initial.is_empty() {
            self.reply(Reply::bare(334, auth::LOGIN_USERNAME_CHALLENGE));
            self.read_auth_line().await?
        } else {
            initial
        };
        let username = match auth::decode_response(&username).and_then(auth::parse_login_field) {
            Ok(username) => username,
            Err(err) => return Ok(Err(err)),
        };
        self.reply(Reply::bare(334, auth::LOGIN_PASSWORD_CHALLENGE));
        let password = self.read_auth_line().await?;
        Ok(auth::decode_response(&password)
            .and_then(auth::parse_login_field)
            .map(|password| (username, Secret::new(password))))
    }

    /// One line of a SASL exchange. It holds a secret: never log it.
    async fn read_auth_line(&mut self) -> Result<String, Stop> {
        let mut line = LineReceiver::new(());
        loop {
            let mut bytes = self.input[self.start..self.end].iter();
            let complete = line.ingest(&mut bytes);
            self.start = self.end - bytes.len();
            if complete {
                self.record.client_secret();
                return Ok(String::from_utf8_lossy(&line.buf).into_owned());
            }
            self.read_more(self.settings.server.command_timeout).await?;
        }
    }
}
