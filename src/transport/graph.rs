//! The Microsoft Graph transport: a message goes out as MIME from the
//! mailbox `username` (`POST /v1.0/users/{username}/sendMail`, the MIME
//! base64-encoded as `text/plain`), signed in with an OAuth 2.0 access token
//! (app-only `client_credentials` with the application permission
//! `Mail.Send`, or delegated through `sendbridge oauth login`).
//!
//! A request to Graph may be about 4 MB; a larger message (up to
//! `server.max_message_size`) goes as a draft created from its MIME without
//! its largest attachments, which are then attached (those of 3 MB or more
//! through an upload session, in ranges), and the draft is sent. That needs
//! `Mail.ReadWrite` as well ("Attach large files to Outlook messages").
//!
//! Graph's answers become SMTP-style replies ("Graph 403 ErrorAccessDenied:
//! …") that the provider reply table (`provider_replies`) sorts into the
//! outcome classes, so logs, notices and `queue show` read as for SMTP.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tracing::info;
use ureq::http::Method;

use super::api_recipients::for_api;
use super::graph_large::{Attachment, split_attachments};
use super::http::{HttpClient, Request, Response};
use super::{Failure, Outcome, Sent};
use crate::access_tokens::{AccessTokens, TokenSource};
use crate::config::AccountConfig;
use crate::observe::metrics;
use crate::reply::Reply;

/// The largest request body Graph takes ("about 4 MB"), with room for
/// headers; the base64 of a message above it goes the large way.
const MAX_REQUEST: usize = 4_000_000;
/// Attachments from this size on go through an upload session; smaller ones
/// are attached in one request (Graph's documented threshold).
const UPLOAD_SESSION_FROM: usize = 3 * 1024 * 1024;
/// An upload session takes ranges of up to 4 MB per request; 320 KiB
/// multiples, as Microsoft's upload sessions elsewhere require.
const UPLOAD_CHUNK: usize = 10 * 320 * 1024;

pub struct GraphTransport {
    name: String,
    /// `{api_url}/v1.0/users/{username}`.
    mailbox_url: String,
    http: HttpClient,
    tokens: Arc<dyn AccessTokens>,
    timeout: Duration,
    save_to_sent_items: bool,
}

/// The probe's message: no recipient, so nothing can be sent.
const PROBE_MESSAGE: &[u8] =
    b"Subject: sendbridge access check (no recipients, never sent)\r\n\r\nNothing.\r\n";

/// What a Graph call ended in: an answer, or an outcome without one.
type Answered = Result<Response, Outcome>;

impl GraphTransport {
    pub fn new(name: &str, account: &AccountConfig, tokens: &TokenSource) -> anyhow::Result<Self> {
        let http = HttpClient::new(account.ca_file.as_deref(), account.timeout)
            .map_err(|err| anyhow::anyhow!("accounts.{name}.ca_file: {err:#}"))?;
        let api_url = account.api_url().expect("graph has an API URL");
        Ok(GraphTransport {
            name: name.to_string(),
            mailbox_url: format!("{api_url}/v1.0/users/{}", path_segment(&account.username)),
            http,
            tokens: tokens(name, account)?,
            timeout: account.timeout,
            save_to_sent_items: account.save_to_sent_items,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gets an access token: Graph has no sign-in of its own. What the
    /// token grants is not judged here: with RBAC for Applications, Exchange
    /// grants Mail.Send without the token naming it.
    pub async fn connect(&self) -> Result<(), Outcome> {
        super::access_token(self.tokens.as_ref(), self.timeout)
            .await
            .map(drop)
    }

    /// Proves that the mailbox may send, without sending: a message without
    /// recipients, which Graph refuses with `400 ErrorInvalidRecipients`
    /// only after the token, the permission and the mailbox passed (`403`
    /// and `404` come first). For the hold's probe and `sendbridge check`.
    pub async fn probe(&self) -> Result<(), Outcome> {
        let url = format!("{}/sendMail", self.mailbox_url);
        let nobody = BASE64.encode(PROBE_MESSAGE).into_bytes();
        let answered = self.call(Method::POST, &url, "text/plain", nobody).await;
        match self.outcome(answered) {
            Outcome::Delivered(_) => Ok(()),
            Outcome::Rejected(failure) if failure.reason == "unknown_recipient" => Ok(()),
            refused => Err(refused),
        }
    }

    /// For `sendbridge check`: what the access token grants, as far as it
    /// says (its claims, not verified), and what each way of sending needs.
    pub async fn access(&self) -> String {
        let token = super::access_token(self.tokens.as_ref(), self.timeout).await;
        let permissions = token
            .ok()
            .and_then(|token| super::graph_token::permissions(&token));
        access_report(permissions.as_deref(), self.save_to_sent_items)
    }

    /// A refused sign-in with `reply`: Graph's own answers get the table's
    /// hint; any other (a hold carried over from the previous run) says
    /// what the probe checks.
    pub fn sign_in_refused(&self, reply: Reply) -> Failure {
        sign_in_refused(&self.name, reply)
    }

    /// Sends `message` to exactly `recipients` (api_recipients). A recipient
    /// Graph refuses by name is refused alone and the others are sent a
    /// copy without it.
    pub async fn send(&self, recipients: &[String], message: &[u8]) -> Sent {
        let mut pending = recipients.to_vec();
        let mut refused = Vec::new();
        loop {
            let copy = for_api(message, &pending);
            if !copy.withheld.is_empty() {
                info!(
                    account = %self.name,
                    withheld = %copy.withheld.join(", "),
                    "graph: header recipients outside this attempt's envelope are left out of the copy sent"
                );
            }
            let outcome = self.deliver(&copy.mime).await;
            if let Some(reply) = outcome.reply() {
                metrics::upstream_reply(&self.name, reply.code);
            }
            match refused_recipient(&outcome, &pending) {
                Some(index) if pending.len() > 1 => {
                    refused.push((pending.remove(index), outcome));
                }
                _ => {
                    return Sent {
                        refused,
                        outcome: Some(outcome),
                    };
                }
            }
        }
    }

    /// One message: in one request when it fits, else as a draft.
    async fn deliver(&self, mime: &[u8]) -> Outcome {
        let encoded = BASE64.encode(mime).into_bytes();
        if encoded.len() <= MAX_REQUEST && self.save_to_sent_items {
            let url = format!("{}/sendMail", self.mailbox_url);
            match self.call(Method::POST, &url, "text/plain", encoded).await {
                Ok(answer) if answer.status == 413 => {}
                answered => return self.outcome(answered),
            }
        }
        self.deliver_as_draft(mime).await
    }

    /// Creates a draft from the MIME without its large attachments, attaches
    /// them, and sends it. A draft left by a failure is deleted.
    async fn deliver_as_draft(&self, mime: &[u8]) -> Outcome {
        let Some((draft_mime, attachments)) = split_attachments(mime, MAX_REQUEST) else {
            return self.outcome(Ok(too_large()));
        };
        let url = format!("{}/messages", self.mailbox_url);
        let created = self
            .call(
                Method::POST,
                &url,
                "text/plain",
                BASE64.encode(draft_mime).into_bytes(),
            )
            .await;
        let id = match created {
            Ok(answer) if answer.is_success() => match draft_id(&answer.body) {
                Some(id) => id,
                None => return Outcome::unavailable("Graph created a draft without an id", None),
            },
            answered => return self.outcome(answered),
        };
        let message_url = format!("{url}/{}", path_segment(&id));
        let outcome = self.complete_draft(&message_url, &attachments).await;
        if !matches!(outcome, Outcome::Delivered(_)) {
            // Best effort: a draft left behind is only clutter.
            let _ = self
                .call(Method::DELETE, &message_url, "", Vec::new())
                .await;
        }
        outcome
    }

    async fn complete_draft(&self, message_url: &str, attachments: &[Attachment]) -> Outcome {
        if !self.save_to_sent_items {
            // PidTagDeleteAfterSubmit: what sendMail's saveToSentItems =
            // false does, which the MIME form cannot say.
            let patch =
                br#"{"singleValueExtendedProperties":[{"id":"Boolean 0x0E01","value":"true"}]}"#;
            let answered = self
                .call(
                    Method::PATCH,
                    message_url,
                    "application/json",
                    patch.to_vec(),
                )
                .await;
            if !matches!(&answered, Ok(answer) if answer.is_success()) {
                return self.outcome(answered);
            }
        }
        for attachment in attachments {
            let answered = if attachment.content.len() < UPLOAD_SESSION_FROM {
                let url = format!("{message_url}/attachments");
                self.call(Method::POST, &url, "application/json", attachment.as_json())
                    .await
            } else {
                self.upload(message_url, attachment).await
            };
            if !matches!(&answered, Ok(answer) if answer.is_success()) {
                return self.outcome(answered);
            }
        }
        let url = format!("{message_url}/send");
        self.outcome(self.call(Method::POST, &url, "", Vec::new()).await)
    }

    /// An upload session, then the attachment in ranges. The upload URL
    /// carries its own authorization: the access token is not sent there.
    async fn upload(&self, message_url: &str, attachment: &Attachment) -> Answered {
        let url = format!("{message_url}/attachments/createUploadSession");
        let session = self
            .call(
                Method::POST,
                &url,
                "application/json",
                attachment.upload_session_json(),
            )
            .await?;
        if !session.is_success() {
            return Ok(session);
        }
        let Some(upload_url) = upload_url(&session.body) else {
            return Err(Outcome::unavailable(
                "Graph opened an upload session without an uploadUrl",
                None,
            ));
        };
        let total = attachment.content.len();
        let mut last = session;
        for (index, chunk) in attachment.content.chunks(UPLOAD_CHUNK).enumerate() {
            let start = index * UPLOAD_CHUNK;
            let end = start + chunk.len() - 1;
            let request = Request::new(Method::PUT, upload_url.clone())
                .header("Content-Range", format!("bytes {start}-{end}/{total}"))
                .body("application/octet-stream", chunk.to_vec());
            last = self.http.send(request).await.map_err(unanswered)?;
            if !last.is_success() {
                return Ok(last);
            }
        }
        Ok(last)
    }

    /// A Graph request with the current access token; when Graph refuses
    /// the token (401), once more with a fresh one.
    async fn call(&self, method: Method, url: &str, content_type: &str, body: Vec<u8>) -> Answered {
        let mut answer = None;
        for _ in 0..2 {
            let token = super::access_token(self.tokens.as_ref(), self.timeout).await?;
            let mut request = Request::new(method.clone(), url).bearer(&token);
            request = match content_type {
                "" => request,
                content_type => request.body(content_type, body.clone()),
            };
            let response = self.http.send(request).await.map_err(unanswered)?;
            if response.status != 401 {
                return Ok(response);
            }
            self.tokens.refused(&token);
            answer = Some(response);
        }
        Ok(answer.expect("two refusals"))
    }

    /// The outcome of a Graph answer, Retry-After included.
    fn outcome(&self, answered: Answered) -> Outcome {
        let response = match answered {
            Ok(response) => response,
            Err(outcome) => return outcome,
        };
        match Outcome::from_reply(&self.name, reply_of(&response)) {
            Outcome::Deferred(mut deferral) => {
                deferral.retry_after = response.retry_after;
                Outcome::Deferred(deferral)
            }
            other => other,
        }
    }
}

fn sign_in_refused(account: &str, reply: Reply) -> Failure {
    if reply.text.starts_with("Graph ") {
        let diagnosis = crate::provider_replies::diagnose(account, &reply);
        return Failure {
            reply,
            reason: diagnosis.reason,
            hint: diagnosis.hint,
        };
    }
    Failure {
        reply,
        reason: "upstream_auth",
        hint: Some(format!(
            "the next probe checks that Microsoft Graph lets the app send as accounts.{account}.username (token, Mail.Send, the mailbox)"
        )),
    }
}

/// What a token's permissions allow: `Mail.Send` for messages up to 3 MB
/// sent whole; `Mail.ReadWrite` too for larger ones (and for all without
/// Sent Items), which go as drafts.
fn access_report(permissions: Option<&[String]>, save_to_sent_items: bool) -> String {
    let Some(permissions) = permissions else {
        return "token issued; it does not say what it grants: Graph needs Mail.Send, and Mail.ReadWrite for messages over 3 MB".to_string();
    };
    let has = |name: &str| permissions.iter().any(|p| p == name);
    let drafts = match save_to_sent_items {
        true => "messages over 3 MB",
        false => "every message (save_to_sent_items = false sends drafts)",
    };
    match (has("Mail.Send"), has("Mail.ReadWrite")) {
        (true, true) => {
            "token grants Mail.Send and Mail.ReadWrite: every message can go".to_string()
        }
        (true, false) => format!("token grants Mail.Send; {drafts} also need Mail.ReadWrite"),
        (false, _) => "token does not name Mail.Send: Graph refuses to send unless RBAC for Applications grants it to the app".to_string(),
    }
}

/// A failed request without an answer (connecting, TLS, a timeout).
fn unanswered(what: String) -> Outcome {
    Outcome::unavailable(what, None)
}

/// A stand-in answer for a message that cannot be made small enough.
fn too_large() -> Response {
    Response {
        status: 413,
        retry_after: None,
        location: None,
        body: br#"{"error":{"code":"ErrorMessageSizeExceeded","message":"the message without its attachments is over Graph's 4 MB request limit"}}"#.to_vec(),
    }
}

/// Graph's answer as an SMTP-style reply: "Graph {status} {code}: {message}",
/// with the reply code and enhanced status that say the same.
pub fn reply_of(response: &Response) -> Reply {
    let status = response.status;
    let (code, message) = graph_error(&response.body);
    let (smtp, enhanced) = match status {
        200..=299 => (250, [2, 0, 0]),
        400 if code == "ErrorInvalidRecipients" => (550, [5, 1, 1]),
        400 => (554, [5, 6, 0]),
        401 => (535, [5, 7, 8]),
        403 => (550, [5, 7, 1]),
        // A draft gone between two calls, not the mailbox.
        404 if code == "ErrorItemNotFound" => (451, [4, 3, 0]),
        404 => (550, [5, 1, 8]),
        413 => (552, [5, 3, 4]),
        429 => (451, [4, 7, 0]),
        405..=412 | 414..=428 | 430..=499 => (554, [5, 0, 0]),
        _ => (451, [4, 3, 0]),
    };
    let text = match (code.is_empty(), message.is_empty()) {
        (true, _) => format!("Graph {status}"),
        (false, true) => format!("Graph {status} {code}"),
        (false, false) => format!("Graph {status} {code}: {message}"),
    };
    Reply::new(smtp, enhanced, text)
}

/// `{"error":{"code":…,"message":…}}`, on one line and bounded.
fn graph_error(body: &[u8]) -> (String, String) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| {
        let text = value["error"][name].as_str().unwrap_or_default();
        let line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        line.trim().to_string()
    };
    (field("code"), field("message"))
}

/// Which pending recipient a refused-recipient answer names, if exactly
/// one ("Recipient 'x@example.com' is not resolved.").
fn refused_recipient(outcome: &Outcome, pending: &[String]) -> Option<usize> {
    let Outcome::Rejected(failure) = outcome else {
        return None;
    };
    if failure.reason != "unknown_recipient" {
        return None;
    }
    let text = failure.reply.text.to_lowercase();
    let mut named = pending
        .iter()
        .enumerate()
        .filter(|(_, recipient)| text.contains(&recipient.to_lowercase()));
    match (named.next(), named.next()) {
        (Some((index, _)), None) => Some(index),
        _ => None,
    }
}

fn draft_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["id"].as_str().map(str::to_string)
}

fn upload_url(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["uploadUrl"].as_str().map(str::to_string)
}

/// A URL path segment: unreserved characters and `@` as they are, the rest
/// percent-encoded.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider_replies::{Class, diagnose};

    fn answer(status: u16, body: &str) -> Response {
        Response {
            status,
            retry_after: None,
            location: None,
            body: body.as_bytes().to_vec(),
        }
    }

    fn error(code: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message}}).to_string()
    }

    #[test]
    fn graph_answers_become_replies_in_the_outcome_classes() {
        // (status, error code, reply, class, reason)
        let table = [
            (202, "", "250 2.0.0 Graph 202", Class::Deferred, ""),
            (
                401,
                "InvalidAuthenticationToken",
                "535 5.7.8 Graph 401 InvalidAuthenticationToken: Access token has expired or is not yet valid.",
                Class::AuthFailed,
                "upstream_auth",
            ),
            (
                403,
                "ErrorAccessDenied",
                "550 5.7.1 Graph 403 ErrorAccessDenied: Access is denied. Check credentials and try again.",
                Class::AuthFailed,
                "upstream_auth",
            ),
            (
                404,
                "ErrorInvalidUser",
                "550 5.1.8 Graph 404 ErrorInvalidUser: The requested user 'x@contoso.com' is invalid.",
                Class::AuthFailed,
                "unknown_mailbox",
            ),
            (
                400,
                "ErrorInvalidRecipients",
                "550 5.1.1 Graph 400 ErrorInvalidRecipients: At least one recipient is not valid., Recipient 'nobody@contoso.com' is not resolved. All recipients must be resolved before a message can be submitted.",
                Class::Rejected,
                "unknown_recipient",
            ),
            (
                400,
                "ErrorMimeContentInvalidBase64String",
                "554 5.6.0 Graph 400 ErrorMimeContentInvalidBase64String: Invalid base64 string for MIME content.",
                Class::Rejected,
                "upstream_rejected",
            ),
            (
                404,
                "ErrorItemNotFound",
                "451 4.3.0 Graph 404 ErrorItemNotFound: The specified object was not found in the store.",
                Class::Deferred,
                "upstream_deferred",
            ),
            (
                413,
                "ErrorRequestEntityTooLarge",
                "552 5.3.4 Graph 413 ErrorRequestEntityTooLarge: The request is too large.",
                Class::Rejected,
                "too_large",
            ),
            (
                429,
                "ApplicationThrottled",
                "451 4.7.0 Graph 429 ApplicationThrottled: Application is over its MailboxConcurrency limit.",
                Class::Deferred,
                "throttled",
            ),
            (
                503,
                "ServiceUnavailable",
                "451 4.3.0 Graph 503 ServiceUnavailable: Service Unavailable",
                Class::Deferred,
                "upstream_deferred",
            ),
        ];
        for (status, code, expected, class, reason) in table {
            let message = expected.split_once(": ").map_or("", |(_, m)| m);
            let body = if code.is_empty() {
                String::new()
            } else {
                error(code, message)
            };
            let reply = reply_of(&answer(status, &body));
            assert_eq!(reply.to_string(), expected);
            if status >= 300 {
                let diagnosis = diagnose("m365", &reply);
                assert_eq!(
                    (diagnosis.class, diagnosis.reason),
                    (class, reason),
                    "{expected}"
                );
            }
        }
    }

    #[test]
    fn hints_name_what_to_change() {
        // (status, error code, words the hint must have)
        let table: [(u16, &str, &[&str]); 3] = [
            (
                403,
                "ErrorAccessDenied",
                &[
                    "Mail.Send",
                    "admin consent",
                    "New-ApplicationAccessPolicy",
                    "RBAC for Applications",
                ],
            ),
            (404, "ErrorInvalidUser", &["accounts.m365.username"]),
            (429, "ApplicationThrottled", &["Retry-After"]),
        ];
        for (status, code, words) in table {
            let reply = reply_of(&answer(status, &error(code, "x")));
            let hint = diagnose("m365", &reply).hint.unwrap();
            for word in words {
                assert!(hint.contains(word), "{code}: {hint}");
            }
        }
    }

    #[test]
    fn an_error_body_reaches_the_reply_on_one_bounded_line() {
        let long = format!("line one\r\nline two {}", "x".repeat(1000));
        let reply = reply_of(&answer(403, &error("ErrorAccessDenied", &long)));
        assert!(
            reply
                .text
                .starts_with("Graph 403 ErrorAccessDenied: line one  line two x")
        );
        assert!(reply.text.len() < 400);
        // Not JSON at all (a proxy's page): the status alone.
        assert_eq!(
            reply_of(&answer(502, "<html>")).to_string(),
            "451 4.3.0 Graph 502"
        );
    }

    #[test]
    fn only_a_recipient_named_alone_is_refused_alone() {
        let pending = [
            "a@contoso.com".to_string(),
            "nobody@contoso.com".to_string(),
        ];
        let refusal = |message: &str| {
            Outcome::from_reply(
                "m365",
                reply_of(&answer(400, &error("ErrorInvalidRecipients", message))),
            )
        };
        let named = refusal("Recipient 'Nobody@contoso.com' is not resolved.");
        assert_eq!(refused_recipient(&named, &pending), Some(1));
        let unnamed = refusal("At least one recipient is not valid.");
        assert_eq!(refused_recipient(&unnamed, &pending), None);
        let throttled = Outcome::from_reply("m365", reply_of(&answer(429, "")));
        assert_eq!(refused_recipient(&throttled, &pending), None);
    }

    #[test]
    fn check_says_what_the_tokens_permissions_allow() {
        let granted = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // (permissions, Sent Items kept, report contains)
        let table = [
            (
                Some(granted(&["Mail.Send"])),
                true,
                "messages over 3 MB also need Mail.ReadWrite",
            ),
            (
                Some(granted(&["Mail.Send"])),
                false,
                "every message (save_to_sent_items = false sends drafts) also need Mail.ReadWrite",
            ),
            (
                Some(granted(&["Mail.ReadWrite", "Mail.Send"])),
                true,
                "every message can go",
            ),
            (
                Some(granted(&["User.Read"])),
                true,
                "unless RBAC for Applications",
            ),
            (None, true, "does not say what it grants"),
        ];
        for (permissions, kept, expected) in table {
            let report = access_report(permissions.as_deref(), kept);
            assert!(report.contains(expected), "{permissions:?}: {report}");
        }
    }

    #[test]
    fn a_hold_carried_over_gets_a_graph_hint_not_gmails() {
        // (reply, hint contains)
        let table = [
            (
                reply_of(&answer(403, &error("ErrorAccessDenied", "x"))),
                "admin consent",
            ),
            (
                Reply::new(535, [5, 7, 8], "held at the previous run; checking sign-in"),
                "the next probe checks that Microsoft Graph",
            ),
        ];
        for (reply, expected) in table {
            let hint = sign_in_refused("m365", reply).hint.unwrap();
            assert!(
                hint.contains(expected) && !hint.contains("app password"),
                "{hint}"
            );
        }
    }

    #[test]
    fn the_mailbox_is_one_path_segment() {
        assert_eq!(path_segment("me@contoso.com"), "me@contoso.com");
        assert_eq!(path_segment("a b/c?d#e"), "a%20b%2Fc%3Fd%23e");
    }
}
