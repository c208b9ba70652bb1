//! The Gmail API transport (`accounts.<name>.transport = "gmail-api"`): a
//! message goes out as MIME through `users.messages.send` as the signed-in
//! mailbox (`users/me`), with an access token for the scope
//! `https://www.googleapis.com/auth/gmail.send` (a person's, through
//! `sendbridge oauth login`, or a service account's with domain-wide
//! delegation). That scope is far narrower than SMTP's
//! `https://mail.google.com/`.
//!
//! A small message goes as JSON (`{"raw": base64url}`); a larger one, up to
//! Gmail's 35 MB, through the upload URI as `message/rfc822` in a
//! resumable upload (Google's "Uploading Attachments": simple requests for
//! about 5 MB or less, resumable for larger ones); so does a small one
//! Google answers 413. What Google's answers mean is in `answers`.

mod answers;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use tracing::info;
use ureq::http::Method;

use super::api_recipients::for_api;
use super::http::{HttpClient, Request, Response};
use super::{Failure, Outcome, Sent};
use crate::access_tokens::{AccessTokens, TokenSource};
use crate::config::{AccountConfig, OAuthFlow};
use crate::observe::metrics;
use crate::reply::Reply;
use answers::{SEND_SCOPE, Signer, Verdict, cannot_send, judge};

/// Messages up to this size go as JSON: base64 makes the request a third
/// larger, and Google advises simple requests up to about 5 MB.
const JSON_UP_TO: usize = 3 * 1024 * 1024;
/// Gmail's limit for `messages.send` through the upload URI.
const MAX_MESSAGE: usize = 35 * 1024 * 1024;

pub struct GmailApiTransport {
    name: String,
    /// `username`, the mailbox signed in as.
    mailbox: String,
    /// `{api_url}`, the base every URL of this account starts with.
    api_url: String,
    http: HttpClient,
    tokens: Arc<dyn AccessTokens>,
    timeout: Duration,
    /// The service account's client ID, when one signs in (for hints).
    service_account: Option<String>,
}

impl GmailApiTransport {
    pub fn new(name: &str, account: &AccountConfig, tokens: &TokenSource) -> anyhow::Result<Self> {
        let http = HttpClient::new(account.ca_file.as_deref(), account.timeout)
            .map_err(|err| anyhow::anyhow!("accounts.{name}.ca_file: {err:#}"))?;
        let service_account = account
            .oauth2
            .as_ref()
            .filter(|oauth2| oauth2.flow == OAuthFlow::ServiceAccount)
            .map(|oauth2| oauth2.client_id.clone());
        Ok(GmailApiTransport {
            name: name.to_string(),
            mailbox: account.username.clone(),
            api_url: account
                .api_url()
                .expect("gmail-api has an API URL")
                .to_string(),
            http,
            tokens: tokens(name, account)?,
            timeout: account.timeout,
            service_account,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn signer(&self) -> Signer<'_> {
        Signer {
            account: &self.name,
            service_account: self.service_account.as_deref(),
        }
    }

    /// Gets an access token, and refuses one whose granted scopes (when
    /// the token endpoint lists them) cannot send. With only `gmail.send`
    /// no Gmail call proves the permission short of sending
    /// (`users.getProfile` needs a read scope), so that is all there is to
    /// check.
    pub async fn connect(&self) -> Result<(), Outcome> {
        super::access_token(self.tokens.as_ref(), self.timeout).await?;
        let granted = self.tokens.granted_scope();
        match granted.and_then(|granted| cannot_send(&self.signer(), &granted)) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// Proves that the token, its scope and the mailbox work without
    /// sending anything (for a hold's probe and `sendbridge check`): a
    /// message without recipients, which Google refuses with "Recipient
    /// address required" only once all of those passed.
    pub async fn probe(&self) -> Result<(), Outcome> {
        self.connect().await?;
        let nobody = format!(
            "From: {}\r\nSubject: sendbridge sign-in check\r\n\r\nNot sent: it has no recipients.\r\n",
            self.mailbox
        );
        match finished(self.send_json(nobody.as_bytes()).await) {
            Outcome::Delivered(_) => Ok(()),
            Outcome::Rejected(failure) if failure.reason == "invalid_recipient" => Ok(()),
            refused => Err(refused),
        }
    }

    /// What the token allows, for `sendbridge check`.
    pub fn access(&self) -> String {
        let granted = self
            .tokens
            .granted_scope()
            .unwrap_or_else(|| "scopes not listed by the token endpoint".to_string());
        format!(
            "signed in as {}; token grants: {granted}; with only {SEND_SCOPE} there is no read call (users.getProfile needs a read scope), so a message without recipients was sent, and Google refused it as it should (\"Recipient address required\")",
            self.mailbox
        )
    }

    /// A refused sign-in with `reply` (a hold carried over from the
    /// previous run), with what a 401 from Google means for this account.
    pub fn sign_in_refused(&self, reply: Reply) -> Failure {
        match judge(&self.signer(), 401, "") {
            Verdict::TokenRefused(Outcome::AuthFailed(failure)) => Failure { reply, ..failure },
            _ => unreachable!("a 401 is a refused token"),
        }
    }

    /// Sends `message` to exactly `recipients` (api_recipients): Google
    /// delivers to the copy's To, Cc and Bcc.
    pub async fn send(&self, recipients: &[String], message: &[u8]) -> Sent {
        let copy = for_api(message, recipients);
        if !copy.withheld.is_empty() {
            info!(
                account = %self.name,
                withheld = copy.withheld.len(),
                "gmail-api: header recipients outside this attempt's envelope are left out of the copy sent"
            );
        }
        let outcome = self.deliver(&copy.mime).await;
        if let Some(reply) = outcome.reply() {
            metrics::upstream_reply(&self.name, reply.code);
        }
        Sent {
            refused: Vec::new(),
            outcome: Some(outcome),
        }
    }

    async fn deliver(&self, mime: &[u8]) -> Outcome {
        if mime.len() > MAX_MESSAGE {
            let too_large = judge(&self.signer(), 413, "");
            let (Verdict::TooLarge(outcome) | Verdict::Done(outcome)) = too_large else {
                unreachable!("a 413 is too large");
            };
            return outcome;
        }
        if mime.len() <= JSON_UP_TO {
            match self.send_json(mime).await {
                Verdict::TooLarge(_) => {}
                verdict => return finished(verdict),
            }
        }
        finished(self.upload(mime).await)
    }

    /// A resumable upload: a session for the message's size, then the
    /// message in one request to the session's URL (Google's "Perform a
    /// resumable upload").
    async fn upload(&self, mime: &[u8]) -> Verdict {
        let url = format!(
            "{}/upload/gmail/v1/users/me/messages/send?uploadType=resumable",
            self.api_url
        );
        let started = self
            .call(
                |request| {
                    request
                        .header("X-Upload-Content-Type", "message/rfc822")
                        .header("X-Upload-Content-Length", mime.len().to_string())
                        .body("application/json; charset=UTF-8", b"{}".to_vec())
                },
                Method::POST,
                &url,
            )
            .await;
        let session = match started {
            Ok(response) if response.is_success() => response.location,
            answered => return self.judged(answered),
        };
        // The token goes only where this account's API is.
        let Some(session) = session.filter(|location| self.is_ours(location)) else {
            return Verdict::Done(Outcome::unavailable(
                format!(
                    "Google opened an upload session without a Location under {}",
                    self.api_url
                ),
                None,
            ));
        };
        let answered = self
            .call(
                |request| request.body("message/rfc822", mime.to_vec()),
                Method::PUT,
                &session,
            )
            .await;
        self.judged(answered)
    }

    fn is_ours(&self, url: &str) -> bool {
        url.strip_prefix(&self.api_url)
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// `messages.send` with the message as JSON (`raw`).
    async fn send_json(&self, mime: &[u8]) -> Verdict {
        let url = format!("{}/gmail/v1/users/me/messages/send", self.api_url);
        let body = serde_json::json!({ "raw": URL_SAFE.encode(mime) })
            .to_string()
            .into_bytes();
        let answered = self
            .call(
                |request| request.body("application/json", body.clone()),
                Method::POST,
                &url,
            )
            .await;
        self.judged(answered)
    }

    fn judged(&self, answered: Result<Response, Outcome>) -> Verdict {
        match answered {
            Ok(response) => with_retry_after(
                judge(
                    &self.signer(),
                    response.status,
                    &String::from_utf8_lossy(&response.body),
                ),
                &response,
            ),
            Err(outcome) => Verdict::Done(outcome),
        }
    }

    /// `method url` with what `build` adds, and the access token.
    async fn call(
        &self,
        build: impl Fn(Request) -> Request,
        method: Method,
        url: &str,
    ) -> Result<Response, Outcome> {
        let request = || build(Request::new(method.clone(), url));
        super::send_with_token(&self.http, self.tokens.as_ref(), self.timeout, request).await
    }
}

/// A deferral waits at least as long as Google's `Retry-After` says.
fn with_retry_after(verdict: Verdict, response: &Response) -> Verdict {
    match verdict {
        Verdict::Done(Outcome::Deferred(mut deferral)) => {
            deferral.retry_after = response.retry_after;
            Verdict::Done(Outcome::Deferred(deferral))
        }
        verdict => verdict,
    }
}

/// The outcome once no other request is left to try.
fn finished(verdict: Verdict) -> Outcome {
    match verdict {
        Verdict::Sent(reply) => Outcome::Delivered(reply),
        Verdict::TokenRefused(outcome) | Verdict::TooLarge(outcome) | Verdict::Done(outcome) => {
            outcome
        }
    }
}
