//! AUTH (RFC 4954): the SASL PLAIN, LOGIN and CRAM-MD5 exchanges with the
//! client and the answer to a password check.

use std::net::IpAddr;
use std::sync::{Arc, MutexGuard};

use smtp_proto::{AUTH_CRAM_MD5, AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::connection::{Line, Stop};
use super::sasl::{self, SaslError};
use super::throttle::{Budget, SignInThrottle, Verdict};
use super::{Flow, MAX_AUTH_FAILURES, Session, SessionContext};
use crate::config::AuthMechanism;
use crate::reply::{Refusal, Reply};
use crate::secret::Secret;
use crate::users::{Checked, SignedIn, cram_md5};

/// A user name and its proof from a SASL exchange.
type Credentials = (String, Proof);

/// How a client proves it knows the user's password.
enum Proof {
    /// PLAIN and LOGIN send the password itself.
    Password(Secret),
    /// CRAM-MD5: the HMAC-MD5 of our challenge keyed with the password.
    CramMd5 { challenge: String, digest: String },
}

/// The smtp-proto bits of the mechanisms in `server.auth_mechanisms`.
pub(super) fn offered(mechanisms: &[AuthMechanism]) -> u64 {
    mechanisms
        .iter()
        .map(|mechanism| match mechanism {
            AuthMechanism::Plain => AUTH_PLAIN,
            AuthMechanism::Login => AUTH_LOGIN,
            AuthMechanism::CramMd5 => AUTH_CRAM_MD5,
        })
        .fold(0, |bits, bit| bits | bit)
}

enum PasswordCheck {
    /// With how: `"argon2"`, `"cache"` or `"cram-md5"`, for the log.
    Matched(SignedIn, &'static str),
    Wrong,
    /// Refused before a check; the client has its answer.
    NotRun,
}

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
        let mechanisms = &self.settings.server.auth_mechanisms;
        let credentials = match mechanism & offered(mechanisms) {
            AUTH_PLAIN => self.sasl_plain(initial_response).await?,
            AUTH_LOGIN => self.sasl_login(initial_response).await?,
            AUTH_CRAM_MD5 => self.sasl_cram_md5(initial_response).await?,
            _ => {
                let names: Vec<&str> = mechanisms.iter().map(AuthMechanism::name).collect();
                self.error(Reply::new(
                    504,
                    [5, 5, 4],
                    format!(
                        "Unrecognized authentication type; use {}",
                        names.join(" or ")
                    ),
                ));
                return Ok(Flow::Continue);
            }
        };
        let (username, proof) = match credentials {
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
        let (signed_in, verified_by) = match self.check_password(&username, proof).await? {
            PasswordCheck::Matched(signed_in, verified_by) => (signed_in, verified_by),
            PasswordCheck::Wrong => return Ok(self.wrong_credentials(&username)),
            PasswordCheck::NotRun => return Ok(Flow::Continue),
        };
        // At info level the session's closing line says it (user,
        // verified_by), and "message received" the account: one line fewer
        // per connection of a program that signs in for every message.
        debug!(user = %signed_in.user, verified_by, "client signed in");
        self.conn.record.signed_in(&signed_in.user, verified_by);
        self.signed_in = Some(signed_in);
        self.reply(Reply::new(235, [2, 7, 0], "Authentication successful"));
        Ok(Flow::Continue)
    }

    /// Checks the password, unless the client's address is over its budget
    /// of failures or every checker is busy: both are answered `454` here,
    /// without running argon2. Credentials verified recently are accepted
    /// from the cache, and CRAM-MD5 answers checked, after the same
    /// admission. A client that hangs up meanwhile ends the session and
    /// drops its check.
    async fn check_password(
        &mut self,
        username: &str,
        proof: Proof,
    ) -> Result<PasswordCheck, Stop> {
        let address = self.peer.ip();
        let server = &self.settings.server;
        let budget = Budget {
            failures: server.auth_failure_limit,
            window: server.auth_failure_window,
        };
        let admission = self.throttle().admit(address, Instant::now(), budget);
        if admission.first_throttled {
            warn!(
                address = %address.to_canonical(),
                failures = admission.failures,
                limit = budget.failures,
                window_s = budget.window.as_secs(),
                hint = "a client at this address keeps signing in with a wrong user name or password: its sign-ins now wait before being checked, and after server.auth_failure_limit failures within server.auth_failure_window they get 454 without a check until the window ends. Fix the SMTP user and password in the sending program, or block the address if it is not yours",
                "sign-ins from this address are throttled after repeated failures"
            );
        }
        let delay = match admission.verdict {
            Verdict::Check { delay } => delay,
            Verdict::Refuse { remaining } => {
                // Logged once per window above, not per session: a flood
                // must not turn into a flood of log lines and transcripts.
                debug!(
                    remaining_s = remaining.as_secs(),
                    "sign-in refused: address over its budget"
                );
                self.conn
                    .record
                    .note("sign-in refused without a check: too many failures from this address");
                self.error(Reply::new(
                    454,
                    [4, 7, 0],
                    "Too many failed sign-ins from your address, try again later",
                ));
                return Ok(PasswordCheck::NotRun);
            }
        };
        // Counted as failed unless settled otherwise, also when the client
        // hangs up before its answer.
        let attempt = Attempt {
            ctx: self.ctx.clone(),
            address,
            settled: false,
        };
        if !delay.is_zero() {
            self.conn.unless_hung_up(tokio::time::sleep(delay)).await?;
        }
        let password = match proof {
            Proof::Password(password) => password,
            Proof::CramMd5 { challenge, digest } => {
                let users = &self.settings.users;
                let Some(signed_in) = users.check_cram_md5(username, &challenge, &digest) else {
                    return Ok(PasswordCheck::Wrong);
                };
                attempt.settle(SignInThrottle::succeeded);
                return Ok(PasswordCheck::Matched(signed_in, "cram-md5"));
            }
        };
        let ttl = server.auth_cache_ttl;
        let checked = self
            .settings
            .users
            .check(username, password, &self.ctx.credentials, ttl);
        let Ok(checked) = checked else {
            attempt.settle(SignInThrottle::not_checked);
            let reply = Reply::new(
                454,
                [4, 7, 0],
                "Temporary authentication failure, try again later",
            );
            let hint = "every password check is busy and the queue is full: many sign-ins arrive at once, perhaps a flood from many addresses; the client was told to try again later";
            self.rejected(&reply, Refusal::new("auth_busy", hint), None);
            self.reply(reply);
            return Ok(PasswordCheck::NotRun);
        };
        let matched = match checked {
            Checked::Cached(signed_in) => PasswordCheck::Matched(signed_in, "cache"),
            Checked::Pending(check) => match self.conn.unless_hung_up(check.outcome()).await? {
                Some(signed_in) => PasswordCheck::Matched(signed_in, "argon2"),
                None => return Ok(PasswordCheck::Wrong),
            },
        };
        attempt.settle(SignInThrottle::succeeded);
        Ok(matched)
    }

    /// Answers a failed check: `535`, and after a few in one session, `421`.
    fn wrong_credentials(&mut self, username: &str) -> Flow {
        self.auth_failures += 1;
        let shown = self.settings.users.loggable(username);
        debug!(user = %shown, "local sign-in failed");
        crate::observe::metrics::local_auth_failure();
        let reply = Reply::new(535, [5, 7, 8], "Authentication credentials invalid");
        let hint = format!(
            "wrong user name or password for user {shown}: compare the SMTP user and password set in the sending program with [users] in the sendbridge config"
        );
        self.rejected(&reply, Refusal::new("auth_failed", hint), None);
        self.error(reply);
        if self.auth_failures < MAX_AUTH_FAILURES {
            return Flow::Continue;
        }
        self.reply(Reply::new(
            421,
            [4, 7, 0],
            "Too many failed sign-ins, closing connection",
        ));
        Flow::Quit
    }

    /// AUTH on unencrypted connections is allowed unless configured
    /// otherwise; loopback clients never cross a network.
    pub(super) fn auth_allowed(&self) -> bool {
        self.tls || !self.settings.server.require_tls_for_auth || self.peer.ip().is_loopback()
    }

    fn throttle(&self) -> MutexGuard<'_, SignInThrottle> {
        self.ctx.sign_in_throttle.lock().expect("throttle lock")
    }

    async fn sasl_plain(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let response = if initial.is_empty() {
            self.reply(Reply::bare(334, ""));
            match self.read_auth_line().await? {
                Ok(line) => line,
                Err(err) => return Ok(Err(err)),
            }
        } else {
            initial
        };
        Ok(sasl::decode_response(&response)
            .and_then(|decoded| sasl::parse_plain(&decoded))
            .map(|(user, password)| (user, Proof::Password(password))))
    }

    async fn sasl_login(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let username = if initial.is_empty() {
            self.reply(Reply::bare(334, sasl::LOGIN_USERNAME_CHALLENGE));
            match self.read_auth_line().await? {
                Ok(line) => line,
                Err(err) => return Ok(Err(err)),
            }
        } else {
            initial
        };
        let username = match sasl::decode_response(&username).and_then(sasl::parse_login_field) {
            Ok(username) => username,
            Err(err) => return Ok(Err(err)),
        };
        self.reply(Reply::bare(334, sasl::LOGIN_PASSWORD_CHALLENGE));
        Ok(self.read_auth_line().await?.and_then(|password| {
            sasl::decode_response(&password)
                .and_then(sasl::parse_login_field)
                .map(|password| (username, Proof::Password(Secret::new(password))))
        }))
    }

    /// CRAM-MD5 has no initial response (RFC 2195): the challenge comes
    /// first, and is new for every exchange.
    async fn sasl_cram_md5(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        if !initial.is_empty() {
            return Ok(Err(SaslError::Malformed));
        }
        let now = crate::spool::unix_millis() / 1000;
        let challenge = cram_md5::challenge(&self.settings.server.hostname, now);
        self.reply(Reply::bare(334, sasl::encode_challenge(&challenge)));
        Ok(self.read_auth_line().await?.and_then(|line| {
            let (user, digest) = sasl::parse_cram_md5(&sasl::decode_response(&line)?)?;
            Ok((user, Proof::CramMd5 { challenge, digest }))
        }))
    }

    /// One line of a SASL exchange, without its line end. It holds a
    /// secret: never log it. A line too long to be one is answered as
    /// undecodable.
    async fn read_auth_line(&mut self) -> Result<Result<String, SaslError>, Stop> {
        Ok(match self.conn.read_secret_line().await? {
            Line::Complete => Ok(String::from_utf8_lossy(self.conn.line())
                .trim_end()
                .to_string()),
            Line::TooLong => Err(SaslError::Malformed),
        })
    }
}

/// A sign-in the throttle admitted; it counts as failed when dropped
/// unsettled (wrong password, or the client left before its answer).
struct Attempt {
    ctx: Arc<SessionContext>,
    address: IpAddr,
    settled: bool,
}

impl Attempt {
    fn settle(mut self, how: fn(&mut SignInThrottle, IpAddr)) {
        self.settled = true;
        how(
            &mut self.ctx.sign_in_throttle.lock().expect("throttle lock"),
            self.address,
        );
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            let mut throttle = self.ctx.sign_in_throttle.lock().expect("throttle lock");
            throttle.failed(self.address);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use tokio::io::{AsyncWriteExt, BufReader, DuplexStream};
    use tokio::time::Instant;

    use super::super::SessionContext;
    use super::super::tests::{context, line, start};
    use super::*;

    const LIMIT: u32 = 4;

    fn config() -> String {
        format!(
            "[server]\nauth_failure_limit = {LIMIT}\n\
             [accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"x\"\n\
             [users.invoices]\npassword = \"old-password\""
        )
    }

    fn auth_plain(password: &str) -> Vec<u8> {
        let response = BASE64.encode(format!("\0invoices\0{password}"));
        format!("AUTH PLAIN {response}\r\n").into_bytes()
    }

    /// The address every test session comes from.
    const PEER: &str = "192.0.2.10";

    fn budget(ctx: &SessionContext) -> Budget {
        let server = &ctx.settings().server;
        Budget {
            failures: server.auth_failure_limit,
            window: server.auth_failure_window,
        }
    }

    /// Counts `failures` failed checks for `PEER`, as earlier sessions would.
    fn failed_before(ctx: &SessionContext, failures: u32) {
        let mut throttle = ctx.sign_in_throttle.lock().unwrap();
        for _ in 0..failures {
            throttle.admit(PEER.parse().unwrap(), Instant::now(), budget(ctx));
            throttle.failed(PEER.parse().unwrap());
        }
    }

    /// The failures counted for `PEER` so far.
    fn failures(ctx: &SessionContext) -> u32 {
        let mut throttle = ctx.sign_in_throttle.lock().unwrap();
        let peer = PEER.parse().unwrap();
        let failures = throttle.admit(peer, Instant::now(), budget(ctx)).failures;
        throttle.not_checked(peer);
        failures
    }

    /// Reads the greeting, says EHLO and reads its reply.
    async fn greeted(client: &mut BufReader<DuplexStream>) {
        assert!(line(client).await.starts_with("220 "));
        client
            .get_mut()
            .write_all(b"EHLO printer\r\n")
            .await
            .unwrap();
        while line(client).await.starts_with("250-") {}
    }

    /// A new session, greeted, that has just sent AUTH PLAIN with `password`.
    async fn signing_in(
        ctx: &(Arc<SessionContext>, tempfile::TempDir),
        password: &str,
    ) -> (BufReader<DuplexStream>, tokio::task::JoinHandle<()>) {
        let (mut client, task) = start(ctx);
        greeted(&mut client).await;
        client
            .get_mut()
            .write_all(&auth_plain(password))
            .await
            .unwrap();
        (client, task)
    }

    #[tokio::test(start_paused = true)]
    async fn over_its_budget_an_address_gets_454_without_a_check() {
        let ctx = context(&config());
        failed_before(&ctx.0, LIMIT);
        let started = Instant::now();

        // The right password: a check would have signed the client in.
        let (mut client, _task) = signing_in(&ctx, "old-password").await;
        let reply = line(&mut client).await;

        assert_eq!(
            reply,
            "454 4.7.0 Too many failed sign-ins from your address, try again later\r\n"
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_hangs_up_while_its_check_waits_ends_the_session_and_the_check() {
        let ctx = context(&config());
        failed_before(&ctx.0, LIMIT - 1);
        let started = Instant::now();

        let (mut client, task) = signing_in(&ctx, "guess").await;
        client.get_mut().shutdown().await.unwrap();
        task.await.unwrap();

        assert!(started.elapsed() < Duration::from_secs(1), "no 1 s delay");
        assert_eq!(line(&mut client).await, "", "no answer");
    }

    /// The first reply to a correct AUTH in a new session.
    async fn answer(ctx: &(Arc<SessionContext>, tempfile::TempDir)) -> String {
        let (mut client, _task) = signing_in(ctx, "old-password").await;
        line(&mut client).await
    }

    /// Real time, as below.
    #[tokio::test]
    async fn cached_credentials_still_pass_the_throttle_and_settle_it() {
        let ctx = context(&config());
        let signed_in = "235 2.7.0 Authentication successful\r\n";
        assert_eq!(answer(&ctx).await, signed_in, "checked by argon2");

        failed_before(&ctx.0, LIMIT - 2);
        assert_eq!(answer(&ctx).await, signed_in, "from the cache");
        assert_eq!(failures(&ctx.0), 0, "success resets the address");

        failed_before(&ctx.0, LIMIT);
        assert_eq!(
            answer(&ctx).await,
            "454 4.7.0 Too many failed sign-ins from your address, try again later\r\n"
        );
    }

    /// Real time: password checks run on threads, which a paused clock
    /// would not wait for.
    #[tokio::test]
    async fn commands_pipelined_while_a_check_waits_are_answered_after_it() {
        let ctx = context(&config());
        failed_before(&ctx.0, LIMIT - 1);
        let started = Instant::now();

        let (mut client, _task) = signing_in(&ctx, "old-password").await;
        // Into the 1 s wait before the check.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.get_mut().write_all(b"NOOP\r\n").await.unwrap();

        assert_eq!(
            line(&mut client).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(line(&mut client).await, "250 2.0.0 OK\r\n");
        assert_eq!(failures(&ctx.0), 0, "success resets the address");
    }
}
