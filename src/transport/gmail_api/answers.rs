//! What the Gmail API's answers mean, as the outcome classes of DESIGN.md:
//! a pure table from the HTTP status and Google's error body
//! (`{"error":{"code","message","errors":[{"reason"}],"status"}}`, see
//! developers.google.com/gmail/api/guides/handle-errors) to an outcome with
//! an SMTP-shaped reply, a reason code and a hint naming the key.

use serde::Deserialize;

use crate::reply::Reply;
use crate::transport::{Deferral, Failure, Outcome};

/// The scope `messages.send` needs.
pub const SEND_SCOPE: &str = "https://www.googleapis.com/auth/gmail.send";
/// Every scope that lets `messages.send` send (Gmail API reference).
const SENDING_SCOPES: [&str; 4] = [
    SEND_SCOPE,
    "https://www.googleapis.com/auth/gmail.compose",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://mail.google.com/",
];

/// Longest stretch of Google's message kept in a reply.
const MESSAGE_LIMIT: usize = 200;

/// Who signs in, for the hints.
pub struct Signer<'a> {
    pub account: &'a str,
    /// The service account's client ID, when one signs in.
    pub service_account: Option<&'a str>,
}

/// What to do with an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: sent; the reply carries Google's message id.
    Sent(Reply),
    /// 401: the access token was refused. Get a new one and try once more;
    /// if that is refused too, this is the outcome.
    TokenRefused(Outcome),
    /// 413: too large for this kind of request; the media upload takes up
    /// to 35 MB. If the upload is refused too, this is the outcome.
    TooLarge(Outcome),
    Done(Outcome),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Body {
    id: Option<String>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorBody {
    message: String,
    status: String,
    errors: Vec<ErrorItem>,
    /// `google.rpc.ErrorInfo` and the like; `ACCESS_TOKEN_SCOPE_INSUFFICIENT`.
    details: Vec<ErrorItem>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorItem {
    reason: String,
}

/// The answer `status` with `body` to a `messages.send` request.
pub fn judge(signer: &Signer<'_>, status: u16, body: &str) -> Verdict {
    let parsed: Body = serde_json::from_str(body).unwrap_or_default();
    if (200..300).contains(&status) {
        let id = parsed.id.as_deref().map(printable).unwrap_or_default();
        return Verdict::Sent(Reply::new(
            250,
            [2, 0, 0],
            format!("Gmail API accepted the message, id {id}"),
        ));
    }
    let error = parsed.error.unwrap_or_default();
    let reason = error
        .errors
        .first()
        .map_or(String::new(), |item| item.reason.clone());
    let message = printable(&error.message);
    let said = |code: u16, status_code: [u8; 3]| {
        let detail = [reason.as_str(), error.status.as_str()]
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Reply::new(
            code,
            status_code,
            format!("Gmail API answered HTTP {status} {detail}: {message}"),
        )
    };
    let account = signer.account;
    let sign_in_again = sign_in_again(signer);
    let lower = message.to_ascii_lowercase();
    let scope_missing = reason == "insufficientPermissions"
        || error
            .details
            .iter()
            .any(|detail| detail.reason == "ACCESS_TOKEN_SCOPE_INSUFFICIENT");
    let no_gmail = reason == "failedPrecondition" || lower.contains("mail service not enabled");
    let failure = |reply: Reply, reason: &'static str, hint: Option<String>| Failure {
        reply,
        reason,
        hint,
    };
    let hold = |reason: &'static str, hint: String| {
        Verdict::Done(Outcome::AuthFailed(failure(
            said(535, [5, 7, 8]),
            reason,
            Some(hint),
        )))
    };
    match (status, reason.as_str()) {
        (401, _) => Verdict::TokenRefused(Outcome::AuthFailed(failure(
            said(535, [5, 7, 8]),
            "api_auth",
            Some(format!("Google refused a fresh access token too: {sign_in_again}")),
        ))),
        (403, _) if scope_missing => hold(
            "api_permission",
            format!("the access token lacks the scope {SEND_SCOPE}: {sign_in_again}"),
        ),
        (403, "domainPolicy") => hold(
            "api_permission",
            format!(
                "the Workspace administrator has not allowed this app for the domain of accounts.{account}.username (Admin console, Security, API controls)"
            ),
        ),
        (403, "dailyLimitExceeded") => Verdict::Done(Outcome::OverLimit(failure(
            said(550, [5, 4, 5]),
            "daily_limit",
            Some(format!(
                "Google's daily limit for this mailbox or project is reached; mail waits in the queue. Set accounts.{account}.daily_message_limit below it"
            )),
        ))),
        (400, _) if no_gmail => hold(
            "mail_service_not_enabled",
            format!(
                "the mailbox accounts.{account}.username has no Gmail: in the Google Admin console give the user a licence with Gmail, or turn Gmail on for the user's organisational unit (Apps, Google Workspace, Gmail)"
            ),
        ),
        (400, _) if is_recipient_problem(&lower) => Verdict::Done(Outcome::Rejected(failure(
            said(550, [5, 1, 3]),
            "invalid_recipient",
            None,
        ))),
        (404, _) => hold(
            "unknown_mailbox",
            format!(
                "Google knows no mailbox for the signed-in user: check accounts.{account}.username"
            ),
        ),
        (413, _) => Verdict::TooLarge(Outcome::Rejected(failure(
            said(552, [5, 3, 4]),
            "too_large",
            Some("the Gmail API takes messages up to 35 MB; lower server.max_message_size so the program is told at once".to_string()),
        ))),
        (429, _) | (403, "rateLimitExceeded" | "userRateLimitExceeded") => {
            Verdict::Done(deferred(said(451, [4, 7, 0]), "rate_limited"))
        }
        (500..=599, _) => Verdict::Done(deferred(said(451, [4, 3, 0]), "provider_unavailable")),
        (400..=499, _) => Verdict::Done(Outcome::Rejected(failure(
            said(554, [5, 6, 0]),
            "api_refused",
            None,
        ))),
        _ => Verdict::Done(deferred(said(451, [4, 3, 0]), "provider_unavailable")),
    }
}

/// What gets a token with the scope `messages.send` needs.
fn sign_in_again(signer: &Signer<'_>) -> String {
    let account = signer.account;
    match signer.service_account {
        Some(client_id) => format!(
            "in the Google Admin console (Security, Access and data control, API controls, Manage Domain Wide Delegation) the service account's client ID {client_id} must be listed with the scope {SEND_SCOPE}"
        ),
        None => format!(
            "run `sendbridge oauth login {account}` and allow sending mail, so the token carries the scope {SEND_SCOPE} (accounts.{account}.oauth2.scopes, if set, must include it)"
        ),
    }
}

/// A token whose `granted` scopes (as the token endpoint listed them)
/// cannot send: refused before any message is tried.
pub fn cannot_send(signer: &Signer<'_>, granted: &str) -> Option<Outcome> {
    if granted
        .split(' ')
        .any(|scope| SENDING_SCOPES.contains(&scope))
    {
        return None;
    }
    Some(Outcome::AuthFailed(Failure {
        reply: Reply::new(
            535,
            [5, 7, 8],
            format!(
                "Gmail API: the access token grants only {}",
                printable(granted)
            ),
        ),
        reason: "api_permission",
        hint: Some(format!(
            "the access token lacks the scope {SEND_SCOPE}: {}",
            sign_in_again(signer)
        )),
    }))
}

fn deferred(reply: Reply, reason: &'static str) -> Outcome {
    Outcome::Deferred(Deferral {
        what: reply.to_string(),
        reply: Some(reply),
        reason,
        hint: None,
        // The transport adds the answer's Retry-After.
        retry_after: None,
    })
}

/// Google's words for an address it cannot send to.
fn is_recipient_problem(message: &str) -> bool {
    [
        "invalid to header",
        "invalid cc header",
        "invalid bcc header",
        "recipient address required",
        "invalid recipient",
    ]
    .iter()
    .any(|words| message.contains(words))
}

/// Text from outside, safe in a reply line: no control characters, bounded.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MESSAGE_LIMIT)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn google(code: u16, reason: &str, status: &str, message: &str) -> String {
        serde_json::json!({ "error": {
            "code": code,
            "message": message,
            "errors": [{ "message": message, "domain": "global", "reason": reason }],
            "status": status,
        }})
        .to_string()
    }

    /// (kind, class, reason code, reply code and status)
    fn summary(verdict: &Verdict) -> (&'static str, &'static str, &'static str, String) {
        let (kind, outcome) = match verdict {
            Verdict::Sent(reply) => return ("sent", "delivered", "", reply.one_line()),
            Verdict::TokenRefused(outcome) => ("token_refused", outcome),
            Verdict::TooLarge(outcome) => ("too_large", outcome),
            Verdict::Done(outcome) => ("done", outcome),
        };
        let (class, reason) = match outcome {
            Outcome::Delivered(_) => ("delivered", ""),
            Outcome::Rejected(failure) => ("rejected", failure.reason),
            Outcome::AuthFailed(failure) => ("auth_failed", failure.reason),
            Outcome::OverLimit(failure) => ("over_limit", failure.reason),
            Outcome::Deferred(deferral) => ("deferred", deferral.reason),
        };
        let reply = outcome.reply().unwrap();
        let status = reply.status.unwrap();
        let code = format!("{} {}.{}.{}", reply.code, status[0], status[1], status[2]);
        (kind, class, reason, code)
    }

    #[test]
    fn each_documented_answer_gets_its_class() {
        let user = Signer {
            account: "gmail",
            service_account: None,
        };
        // (status, body, kind, class, reason, reply)
        let table = [
            (200, r#"{"id":"18c1f","threadId":"18c1f","labelIds":["SENT"]}"#.to_string(), "sent", "delivered", "", "250 2.0.0 Gmail API accepted the message, id 18c1f".to_string()),
            (401, google(401, "authError", "UNAUTHENTICATED", "Invalid Credentials"), "token_refused", "auth_failed", "api_auth", "535 5.7.8".into()),
            (403, google(403, "insufficientPermissions", "PERMISSION_DENIED", "Request had insufficient authentication scopes."), "done", "auth_failed", "api_permission", "535 5.7.8".into()),
            (403, serde_json::json!({"error":{"code":403,"message":"Request had insufficient authentication scopes.","status":"PERMISSION_DENIED","details":[{"reason":"ACCESS_TOKEN_SCOPE_INSUFFICIENT"}]}}).to_string(), "done", "auth_failed", "api_permission", "535 5.7.8".into()),
            (403, google(403, "domainPolicy", "PERMISSION_DENIED", "The domain administrators have disabled Gmail apps."), "done", "auth_failed", "api_permission", "535 5.7.8".into()),
            (403, google(403, "dailyLimitExceeded", "", "Daily Limit Exceeded"), "done", "over_limit", "daily_limit", "550 5.4.5".into()),
            (403, google(403, "userRateLimitExceeded", "", "User Rate Limit Exceeded"), "done", "deferred", "rate_limited", "451 4.7.0".into()),
            (429, google(429, "rateLimitExceeded", "RESOURCE_EXHAUSTED", "Too many concurrent requests for user"), "done", "deferred", "rate_limited", "451 4.7.0".into()),
            (400, google(400, "failedPrecondition", "FAILED_PRECONDITION", "Precondition check failed."), "done", "auth_failed", "mail_service_not_enabled", "535 5.7.8".into()),
            (400, google(400, "invalidArgument", "INVALID_ARGUMENT", "Mail service not enabled"), "done", "auth_failed", "mail_service_not_enabled", "535 5.7.8".into()),
            (400, google(400, "invalidArgument", "INVALID_ARGUMENT", "Invalid To header"), "done", "rejected", "invalid_recipient", "550 5.1.3".into()),
            (400, google(400, "invalidArgument", "INVALID_ARGUMENT", "Recipient address required"), "done", "rejected", "invalid_recipient", "550 5.1.3".into()),
            (400, google(400, "badRequest", "INVALID_ARGUMENT", "Invalid value for ByteString"), "done", "rejected", "api_refused", "554 5.6.0".into()),
            (404, google(404, "notFound", "NOT_FOUND", "Requested entity was not found."), "done", "auth_failed", "unknown_mailbox", "535 5.7.8".into()),
            (413, "Request Entity Too Large".to_string(), "too_large", "rejected", "too_large", "552 5.3.4".into()),
            (500, google(500, "backendError", "INTERNAL", "Backend Error"), "done", "deferred", "provider_unavailable", "451 4.3.0".into()),
            (503, google(503, "backendError", "UNAVAILABLE", "The service is currently unavailable."), "done", "deferred", "provider_unavailable", "451 4.3.0".into()),
        ];
        for (status, body, kind, class, reason, reply) in table {
            let verdict = judge(&user, status, &body);
            let (got_kind, got_class, got_reason, got_reply) = summary(&verdict);
            assert_eq!(
                (got_kind, got_class, got_reason),
                (kind, class, reason),
                "{status} {body}"
            );
            assert!(
                got_reply.starts_with(&reply),
                "{status} {body}: {got_reply}"
            );
        }
    }

    fn hint(verdict: Verdict) -> String {
        let (Verdict::TokenRefused(outcome) | Verdict::Done(outcome)) = verdict else {
            panic!("{verdict:?}");
        };
        let (Outcome::AuthFailed(failure) | Outcome::Rejected(failure)) = outcome else {
            panic!("{outcome:?}");
        };
        failure.hint.unwrap()
    }

    #[test]
    fn a_missing_scope_is_fixed_by_a_sign_in_or_by_domain_wide_delegation() {
        let body = google(
            403,
            "insufficientPermissions",
            "PERMISSION_DENIED",
            "Request had insufficient authentication scopes.",
        );
        let user = hint(judge(
            &Signer {
                account: "gmail",
                service_account: None,
            },
            403,
            &body,
        ));
        assert!(user.contains("sendbridge oauth login gmail"), "{user}");
        assert!(user.contains(SEND_SCOPE), "{user}");
        let service = hint(judge(
            &Signer {
                account: "ws",
                service_account: Some("1098765"),
            },
            403,
            &body,
        ));
        assert!(
            service.contains("Domain Wide Delegation") && service.contains("client ID 1098765"),
            "{service}"
        );
        assert!(service.contains(SEND_SCOPE), "{service}");
        let precondition = google(
            400,
            "failedPrecondition",
            "FAILED_PRECONDITION",
            "Precondition check failed.",
        );
        let no_gmail = hint(judge(
            &Signer {
                account: "ws",
                service_account: None,
            },
            400,
            &precondition,
        ));
        assert!(
            no_gmail.contains("accounts.ws.username") && no_gmail.contains("licence"),
            "{no_gmail}"
        );
    }

    #[test]
    fn a_token_without_a_sending_scope_is_refused_before_sending() {
        let user = Signer {
            account: "gmail",
            service_account: None,
        };
        assert_eq!(cannot_send(&user, SEND_SCOPE), None);
        assert_eq!(cannot_send(&user, "openid https://mail.google.com/"), None);
        let Some(Outcome::AuthFailed(failure)) =
            cannot_send(&user, "https://www.googleapis.com/auth/gmail.readonly")
        else {
            panic!("a read-only token cannot send");
        };
        assert_eq!(failure.reason, "api_permission");
        assert!(
            failure
                .hint
                .unwrap()
                .contains("sendbridge oauth login gmail")
        );
    }

    #[test]
    fn google_s_words_reach_the_reply_on_one_bounded_line() {
        let body = google(
            400,
            "invalidArgument",
            "INVALID_ARGUMENT",
            &format!("Invalid To header\r\n{}", "x".repeat(500)),
        );
        let Verdict::Done(outcome) = judge(
            &Signer {
                account: "gmail",
                service_account: None,
            },
            400,
            &body,
        ) else {
            panic!("rejected");
        };
        let text = &outcome.reply().unwrap().text;
        assert!(
            text.starts_with(
                "Gmail API answered HTTP 400 invalidArgument INVALID_ARGUMENT: Invalid To header"
            ),
            "{text}"
        );
        assert!(!text.contains(['\r', '\n']) && text.len() < 300, "{text}");
    }
}
