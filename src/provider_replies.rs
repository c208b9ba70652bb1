//! What known provider replies mean: the outcome class, a stable reason code
//! for logs, and a hint naming what to change. Replies not in the table are
//! classed by their codes alone (DESIGN.md, "Outcome classes").

use crate::reply::Reply;

/// How a reply is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Sign-in refused: the account's credentials or settings need fixing.
    AuthFailed,
    /// A permanent verdict on this message or recipient.
    Rejected,
    /// The provider's sending limit: wait for its rolling window.
    OverLimit,
    /// Temporary: retry with backoff.
    Deferred,
}

/// One known reply. `text` is a lower-case fragment the reply text must
/// contain (empty: any text); entries are tried in order.
pub struct KnownReply {
    pub provider: &'static str,
    pub code: u16,
    pub status: [u8; 3],
    pub text: &'static str,
    pub class: Class,
    pub reason: &'static str,
    /// `{account}` stands for the account's name.
    hint: &'static str,
}

pub static KNOWN_REPLIES: &[KnownReply] = &[
    // Microsoft Graph answers as the Graph transport words them: "Graph
    // {HTTP status} {error code}: {message}" (transport/graph.rs).
    KnownReply {
        provider: "Microsoft Graph",
        code: 535,
        status: [5, 7, 8],
        text: "graph 401",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Microsoft Graph refused a freshly issued access token: check [accounts.{account}.oauth2] tenant and client_id, and that accounts.{account}.api_url is the Graph of the cloud the token is for",
    },
    KnownReply {
        provider: "Microsoft Graph",
        code: 550,
        status: [5, 7, 1],
        text: "graph 403",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "the app may not send as accounts.{account}.username: in its Entra app registration grant the Microsoft Graph permission Mail.Send (application permission for flow = \"client_credentials\", delegated otherwise) and grant admin consent; if an application access policy (New-ApplicationAccessPolicy) or RBAC for Applications scopes the app, include this mailbox; messages over 3 MB also need Mail.ReadWrite",
    },
    KnownReply {
        provider: "Microsoft Graph",
        code: 550,
        status: [5, 1, 8],
        text: "graph 404",
        class: Class::AuthFailed,
        reason: "unknown_mailbox",
        hint: "Microsoft Graph knows no such mailbox in this tenant: set accounts.{account}.username to the mailbox's user principal name or primary address (an Exchange Online mailbox with a licence), and check [accounts.{account}.oauth2] tenant",
    },
    KnownReply {
        provider: "Microsoft Graph",
        code: 550,
        status: [5, 1, 1],
        text: "graph 400 errorinvalidrecipients",
        class: Class::Rejected,
        reason: "unknown_recipient",
        hint: "Microsoft 365 refused the recipient address; correct it in the sending program (the message went to the other recipients of accounts.{account})",
    },
    KnownReply {
        provider: "Microsoft Graph",
        code: 552,
        status: [5, 3, 4],
        text: "graph 413",
        class: Class::Rejected,
        reason: "too_large",
        hint: "the message is over what Microsoft Graph takes (150 MB per attachment, and the mailbox's message size limit); lower server.max_message_size so the program is told at once",
    },
    KnownReply {
        provider: "Microsoft Graph",
        code: 451,
        status: [4, 7, 0],
        text: "graph 429",
        class: Class::Deferred,
        reason: "throttled",
        hint: "Microsoft Graph is throttling this mailbox or app; sendbridge waits as long as its Retry-After asks. If it persists, lower accounts.{account}.max_connections",
    },
    KnownReply {
        provider: "Gmail",
        code: 535,
        status: [5, 7, 8],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "the provider rejected accounts.{account}.username or accounts.{account}.password; for Gmail use a 16-character app password, not the account password",
    },
    KnownReply {
        provider: "Gmail",
        code: 534,
        status: [5, 7, 9],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Google requires an app password for this account: create one under Google Account → Security → App passwords (2-step verification must be on) and set accounts.{account}.password",
    },
    KnownReply {
        provider: "Gmail",
        code: 534,
        status: [5, 7, 14],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Google wants an interactive sign-in first: sign in to the account in a browser (accept any security prompt), then use an app password in accounts.{account}.password",
    },
    KnownReply {
        provider: "Gmail",
        code: 530,
        status: [5, 7, 0],
        text: "starttls",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "the provider requires TLS before sign-in: set accounts.{account}.tls = \"starttls\" (port 587) or \"implicit\" (port 465)",
    },
    KnownReply {
        provider: "Gmail",
        code: 530,
        status: [5, 7, 0],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "the provider wants a sign-in before mail: check accounts.{account}.username and accounts.{account}.password",
    },
    KnownReply {
        provider: "Gmail",
        code: 454,
        status: [4, 7, 0],
        text: "too many login attempts",
        class: Class::Deferred,
        reason: "upstream_auth",
        hint: "Google is throttling sign-ins to this account; sendbridge retries later. If it persists, check accounts.{account}.password",
    },
    KnownReply {
        provider: "Gmail",
        code: 550,
        status: [5, 4, 5],
        text: "",
        class: Class::OverLimit,
        reason: "daily_limit",
        hint: "the account reached Google's daily sending limit; mail waits in the queue until the 24-hour window frees up. Set accounts.{account}.daily_message_limit / daily_recipient_limit below Google's limits to avoid the lock",
    },
    KnownReply {
        provider: "Gmail",
        code: 552,
        status: [5, 2, 3],
        text: "",
        class: Class::Rejected,
        reason: "too_large",
        hint: "the message exceeds the provider's size limit (Gmail: 25 MB including attachment encoding); send smaller attachments, or lower server.max_message_size so the program is told at once",
    },
    KnownReply {
        provider: "Gmail",
        code: 550,
        status: [5, 7, 26],
        text: "",
        class: Class::Rejected,
        reason: "policy",
        hint: "the From domain's SPF/DKIM/DMARC does not allow this account to send for it: send from an address of accounts.{account} (from_policy = \"rewrite\") or fix the domain's DNS records",
    },
    KnownReply {
        provider: "Gmail",
        code: 550,
        status: [5, 7, 1],
        text: "",
        class: Class::Rejected,
        reason: "policy",
        hint: "the provider refused the message by policy (content, From header, or sender reputation); see the reply text; for From problems set accounts.{account}.from_policy = \"rewrite\"",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 535,
        status: [5, 7, 139],
        text: "smtpclientauthentication is disabled",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "SMTP AUTH is switched off for the Microsoft 365 tenant: an admin must enable \"Authenticated SMTP\" for the mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled $false), or use OAuth 2.0 for accounts.{account}",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 535,
        status: [5, 7, 139],
        text: "basic authentication is disabled",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Microsoft 365 has basic authentication switched off for this mailbox: use OAuth 2.0 for accounts.{account}, or have an admin allow SMTP AUTH",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 535,
        status: [5, 7, 139],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Microsoft 365 rejected the sign-in: check accounts.{account}.username and accounts.{account}.password; with MFA use an app password, or use OAuth 2.0",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 550,
        status: [5, 7, 30],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Microsoft 365 does not accept basic authentication for client submission: use OAuth 2.0 for accounts.{account}",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 530,
        status: [5, 7, 57],
        text: "",
        class: Class::AuthFailed,
        reason: "upstream_auth",
        hint: "Microsoft 365 saw no successful sign-in before MAIL FROM: check accounts.{account}.username and accounts.{account}.password",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 554,
        status: [5, 2, 252],
        text: "",
        class: Class::Rejected,
        reason: "policy",
        hint: "the mailbox may not send as this address (SendAsDenied): grant it Send As permission, or set accounts.{account}.from_policy = \"rewrite\" so the From becomes accounts.{account}.sender",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 550,
        status: [5, 7, 60],
        text: "",
        class: Class::Rejected,
        reason: "policy",
        hint: "the mailbox has no permission to send as this sender: grant Send As, or set accounts.{account}.from_policy = \"rewrite\"",
    },
    KnownReply {
        provider: "Microsoft 365",
        code: 554,
        status: [5, 2, 0],
        text: "quotaexceeded",
        class: Class::OverLimit,
        reason: "daily_limit",
        hint: "the mailbox reached Microsoft 365's sending limit (10,000 recipients a day); mail waits in the queue until the 24-hour window frees up. Set accounts.{account}.daily_recipient_limit below it",
    },
];

/// What a reply means for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub class: Class,
    pub reason: &'static str,
    /// What to change; `None` when the reply speaks for itself.
    pub hint: Option<String>,
}

/// The table entry matching a reply, if any.
pub fn lookup(reply: &Reply) -> Option<&'static KnownReply> {
    let text = reply.text.to_lowercase();
    KNOWN_REPLIES.iter().find(|known| {
        known.code == reply.code && Some(known.status) == reply.status && text.contains(known.text)
    })
}

pub fn diagnose(account: &str, reply: &Reply) -> Diagnosis {
    if let Some(known) = lookup(reply) {
        return Diagnosis {
            class: known.class,
            reason: known.reason,
            hint: Some(known.hint.replace("{account}", account)),
        };
    }
    let (class, reason) = match reply.code {
        200..=399 => (Class::Deferred, "upstream_unexpected"),
        500..=599 if is_auth_failure(reply) => (Class::AuthFailed, "upstream_auth"),
        500..=599 => (Class::Rejected, "upstream_rejected"),
        _ => (Class::Deferred, "upstream_deferred"),
    };
    let hint = (class == Class::AuthFailed)
        .then(|| format!("check accounts.{account}.username and accounts.{account}.password"));
    Diagnosis {
        class,
        reason,
        hint,
    }
}

/// Sign-in failures by code, for providers not in the table.
fn is_auth_failure(reply: &Reply) -> bool {
    match reply.status {
        Some([5, 7, _]) => matches!(reply.code, 530 | 534 | 535),
        _ => matches!(reply.code, 534 | 535),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_specific_entries_come_first() {
        // An entry with an empty text fragment hides every later entry with
        // the same code and status.
        for (i, general) in KNOWN_REPLIES.iter().enumerate() {
            if general.text.is_empty() {
                let hidden = KNOWN_REPLIES[i + 1..]
                    .iter()
                    .find(|later| later.code == general.code && later.status == general.status);
                assert!(hidden.is_none(), "{} {:?}", general.code, general.status);
            }
        }
    }

    #[test]
    fn every_hint_names_a_config_key() {
        for known in KNOWN_REPLIES {
            let names_key =
                known.hint.contains("accounts.{account}") || known.hint.contains("server.");
            assert!(names_key, "{}", known.hint);
            assert!(known.text == known.text.to_lowercase());
        }
    }

    #[test]
    fn unknown_replies_are_classed_by_code() {
        let class = |code, status| diagnose("a", &Reply::new(code, status, "x")).class;
        assert_eq!(class(535, [5, 7, 3]), Class::AuthFailed);
        assert_eq!(class(550, [5, 1, 1]), Class::Rejected);
        assert_eq!(class(451, [4, 3, 0]), Class::Deferred);
    }
}
