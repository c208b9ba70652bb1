//! TEMPORARY stand-ins with the signatures of N1's composer (RFC 3464
//! reports, alert email, webhook bodies), so the engine builds and is
//! tested on its own; replaced whole when N1's branch is merged.

use super::notice::{Alert, SenderNotice};
use crate::config::{Language, WebhookFormat};

pub struct WebhookBody {
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Stand-in: a plain-text message listing the recipients and replies.
pub fn sender_notice(notice: &SenderNotice, from: &str, _language: Language) -> Vec<u8> {
    let mut text = format!(
        "From: {from}\r\nTo: <{}>\r\nSubject: {:?} {}\r\nAuto-Submitted: auto-replied\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n",
        notice.sender, notice.kind, notice.message_id
    );
    for recipient in &notice.recipients {
        let reply = recipient.reply.as_deref().unwrap_or_default();
        text += &format!("{}: {reply}\r\n", recipient.address);
    }
    text.into_bytes()
}

/// Stand-in: a plain-text alert naming the event and account.
pub fn alert_email(alert: &Alert, from: &str, to: &[String], _language: Language) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {}\r\nSubject: {} {}\r\nAuto-Submitted: auto-replied\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{alert:?}\r\n",
        to.join(", "),
        alert.event.name(),
        alert.account.as_deref().unwrap_or_default(),
    )
    .into_bytes()
}

/// Stand-in: the event name and account as plain text.
pub fn webhook_body(alert: &Alert, _format: WebhookFormat, _language: Language) -> WebhookBody {
    WebhookBody {
        content_type: "text/plain",
        headers: Vec::new(),
        body: format!(
            "{} {}",
            alert.event.name(),
            alert.account.as_deref().unwrap_or_default()
        )
        .into_bytes(),
    }
}
