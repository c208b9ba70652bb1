//! What notices say, as bytes: the RFC 3464 report to the sender, the
//! alert email to the admins and the webhook bodies. Pure functions: the
//! engine decides when and to whom, and sends what these return.
//!
//! Everything here is valid mail whatever the provider replied: headers
//! are ASCII (encoded-words), text parts are quoted-printable, and the
//! delivery-status fields fold a reply line by line.

use std::fmt::Write;

use mail_parser::MessageParser;
use serde_json::json;

use crate::config::{Language, WebhookFormat};

use super::mime::{
    address_field, boundary, http_header_text, message_id, quoted_printable, rfc3339_date,
    rfc5322_date, text_field,
};
use super::notice::{Alert, Event, NoticeRecipient, SenderNotice, SenderNoticeKind};
use super::texts::{Texts, texts};

/// RFC 5322 section 2.1.1 allows 998 octets per line; 900 leave room for
/// `Diagnostic-Code: smtp; `. A longer reply line (an HTTP API's error
/// body) is split to stay valid.
const MAX_FIELD_LINE: usize = 900;

/// A bounce or delay warning to `notice.sender`: a complete RFC 5322
/// message, `multipart/report; report-type=delivery-status` (RFC 3464)
/// with the text for people, the delivery-status fields and the original
/// header section. `from` is e.g. `Mail Delivery System <mailer-daemon@HOST>`.
pub fn sender_notice(notice: &SenderNotice, from: &str, language: Language) -> Vec<u8> {
    let t = texts(language);
    let original_subject = original_subject(&notice.original_headers);
    let about = original_subject.clone().unwrap_or_else(|| {
        let first = notice.recipients.first().map_or("", |r| r.address.as_str());
        (t.your_message_to)(first, notice.recipients.len().saturating_sub(1))
    });
    let subject = match notice.kind {
        SenderNoticeKind::Bounce => (t.bounce_subject)(&about),
        SenderNoticeKind::DelayWarning => (t.delay_subject)(&about),
    };
    let headers_are_8bit = !notice.original_headers.is_ascii();
    let boundary = boundary();

    // Everything but the original header section, which is kept as stored.
    let mut generated = String::new();
    generated += &address_field("From", &[from]);
    generated += &address_field("To", &[&notice.sender]);
    generated += &format!("Date: {}\r\n", rfc5322_date(notice.now));
    generated += &format!("Message-ID: {}\r\n", message_id(&printable(&notice.relay)));
    generated += &text_field("Subject", &subject);
    generated += "Auto-Submitted: auto-replied\r\n";
    generated += "MIME-Version: 1.0\r\n";
    generated += &format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    );
    // RFC 2045 section 6.4: a multipart holding an 8bit part is 8bit.
    if headers_are_8bit {
        generated += "Content-Transfer-Encoding: 8bit\r\n";
    }
    generated += "\r\nThis is a delivery status notification (RFC 3464).\r\n\r\n";

    generated += &format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    );
    generated += &quoted_printable(&wrapped(&sender_text(
        notice,
        original_subject.as_deref(),
        t,
    )));
    generated += &format!("--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n");
    generated += &delivery_status(notice);
    generated += &format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n");
    if headers_are_8bit {
        generated += "Content-Transfer-Encoding: 8bit\r\n";
    }
    generated += "\r\n";

    let mut message = generated.into_bytes();
    message.extend_from_slice(header_section(&notice.original_headers));
    message.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    message
}

/// The first part: what happened, per recipient the provider's whole
/// reply, and what to do.
fn sender_text(notice: &SenderNotice, original_subject: Option<&str>, t: &Texts) -> String {
    let waited = (t.span)(notice.now.saturating_sub(notice.received_at));
    let mut text = match notice.kind {
        SenderNoticeKind::Bounce => (t.bounce_lead)(&notice.relay),
        SenderNoticeKind::DelayWarning => (t.delay_lead)(&notice.relay, &waited),
    };
    text += "\n\n";
    let sent = (t.date)(notice.received_at);
    let mut about = Vec::new();
    if let Some(subject) = original_subject {
        about.push((t.subject_label, subject));
    }
    about.push((t.sent_label, sent.as_str()));
    text += &labelled(&about);

    for recipient in &notice.recipients {
        write!(text, "\n{} {}\n", t.recipient_label, recipient.address).expect("String");
        text += &recipient_outcome(notice.kind, recipient, &waited, t);
    }
    text += "\n";
    match notice.kind {
        SenderNoticeKind::Bounce => {
            let hint = notice.hint.as_deref().unwrap_or(t.bounce_default_hint);
            write!(text, "{} {hint}\n\n", t.bounce_hint_label).expect("String");
        }
        SenderNoticeKind::DelayWarning => {
            if let Some(give_up_at) = notice.give_up_at {
                text += &(t.delay_gives_up)(&(t.date)(give_up_at));
                text += "\n\n";
            }
            if let Some(hint) = &notice.hint {
                write!(text, "{} {hint}\n\n", t.delay_hint_label).expect("String");
            }
        }
    }
    text + t.headers_attached + "\n"
}

/// Why one recipient did not get the message, with the reply indented.
fn recipient_outcome(
    kind: SenderNoticeKind,
    recipient: &NoticeRecipient,
    waited: &str,
    t: &Texts,
) -> String {
    let permanent = recipient.status[0] == 5;
    let sentence = match (kind, &recipient.reply) {
        (SenderNoticeKind::DelayWarning, Some(_)) => t.waiting_replied.to_string(),
        (SenderNoticeKind::DelayWarning, None) => t.waiting_no_reply.to_string(),
        (SenderNoticeKind::Bounce, Some(_)) if permanent => t.refused_replied.to_string(),
        (SenderNoticeKind::Bounce, Some(_)) => (t.gave_up_replied)(waited),
        (SenderNoticeKind::Bounce, None) => (t.gave_up_no_reply)(waited),
    };
    let mut text = sentence + "\n";
    if let Some(reply) = &recipient.reply {
        text += &indented(reply);
    }
    text
}

/// The `message/delivery-status` part (RFC 3464 section 2): the
/// per-message fields, then a block per recipient.
fn delivery_status(notice: &SenderNotice) -> String {
    let mut fields = format!(
        "Reporting-MTA: dns; {}\r\nX-Sendbridge-Queue-ID: {}\r\nArrival-Date: {}\r\n",
        printable(&notice.relay),
        printable(&notice.message_id),
        rfc5322_date(notice.received_at),
    );
    let (action, retry_until) = match notice.kind {
        SenderNoticeKind::Bounce => ("failed", None),
        SenderNoticeKind::DelayWarning => ("delayed", notice.give_up_at),
    };
    for recipient in &notice.recipients {
        let [class, subject, detail] = recipient.status;
        write!(
            fields,
            "\r\nFinal-Recipient: {}\r\nAction: {action}\r\nStatus: {class}.{subject}.{detail}\r\n",
            final_recipient(&recipient.address)
        )
        .expect("String");
        if let Some(reply) = &recipient.reply {
            fields += &diagnostic_code(reply);
        }
        if let Some(until) = retry_until {
            write!(fields, "Will-Retry-Until: {}\r\n", rfc5322_date(until)).expect("String");
        }
    }
    fields
}

/// `rfc822; ADDR`, or for an internationalised address RFC 6533's
/// `utf-8` type, whose xtext form keeps the field ASCII.
fn final_recipient(address: &str) -> String {
    if address.is_ascii() && !address.chars().any(|c| c.is_ascii_control()) {
        return format!("rfc822; {address}");
    }
    let mut xtext = String::new();
    for c in address.chars() {
        match c {
            '!'..='~' if !matches!(c, '+' | '=' | '\\') => xtext.push(c),
            _ => write!(xtext, "\\x{{{:X}}}", u32::from(c)).expect("String"),
        }
    }
    format!("utf-8; {xtext}")
}

/// `Diagnostic-Code: smtp; …` with each reply line on a line of its own:
/// a multi-line reply folds (CRLF SP), so it unfolds to its lines joined
/// by spaces, as Postfix writes it.
fn diagnostic_code(reply: &str) -> String {
    let lines: Vec<String> = reply
        .lines()
        .map(|line| printable(line.trim()))
        .filter(|line| !line.is_empty())
        .flat_map(|line| {
            // Only an absurd line is split; the split adds a space.
            line.as_bytes()
                .chunks(MAX_FIELD_LINE)
                .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    format!("Diagnostic-Code: smtp; {}\r\n", lines.join("\r\n "))
}

/// The original header section with exactly one CRLF at its end (the
/// stored section may end with the empty line that closed it).
fn header_section(headers: &[u8]) -> &[u8] {
    let end = headers
        .iter()
        .rposition(|&b| b != b'\r' && b != b'\n')
        .map_or(0, |last| last + 1);
    match headers[end..].starts_with(b"\r\n") {
        true => &headers[..end + 2],
        false => &headers[..end],
    }
}

fn original_subject(headers: &[u8]) -> Option<String> {
    let parsed = MessageParser::new().parse_headers(headers)?;
    let subject = parsed.subject()?.trim();
    (!subject.is_empty()).then(|| subject.to_string())
}

/// An alert to the admins: plain text, naming the event and account in
/// the Subject.
pub fn alert_email(alert: &Alert, from: &str, to: &[String], language: Language) -> Vec<u8> {
    let t = texts(language);
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let title = (t.alert_title)(alert.event, alert.account.as_deref());
    let mut message = String::new();
    message += &address_field("From", &[from]);
    message += &address_field("To", &to);
    message += &format!("Date: {}\r\n", rfc5322_date(alert.at));
    message += &format!("Message-ID: {}\r\n", message_id(&printable(&alert.relay)));
    message += &text_field("Subject", &format!("[sendbridge] {title}"));
    message += "Auto-Submitted: auto-replied\r\n";
    message += &format!("X-Sendbridge-Event: {}\r\n", alert.event.name());
    message += "MIME-Version: 1.0\r\n";
    message += "Content-Type: text/plain; charset=utf-8\r\n";
    message += "Content-Transfer-Encoding: quoted-printable\r\n\r\n";
    message += &quoted_printable(&wrapped(&alert_text(alert, t, ReplyStyle::Indented)));
    message.into_bytes()
}

/// What an HTTP POST to `notify.webhook` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookBody {
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The webhook POST for `alert`. `json` carries the fields as data (`at`
/// as an RFC 3339 UTC string, `null` for an absent value, `recipients` a
/// list, possibly empty); `slack` and `ntfy` carry the alert's text in
/// `language`.
pub fn webhook_body(alert: &Alert, format: WebhookFormat, language: Language) -> WebhookBody {
    let t = texts(language);
    let title = (t.alert_title)(alert.event, alert.account.as_deref());
    match format {
        WebhookFormat::Json => WebhookBody {
            content_type: "application/json",
            headers: Vec::new(),
            body: json!({
                "event": alert.event.name(),
                "account": alert.account,
                "message_id": alert.message_id,
                "recipients": alert.recipients,
                "reply": alert.reply,
                "hint": alert.hint,
                "count": alert.count,
                "at": rfc3339_date(alert.at),
                "relay": alert.relay,
            })
            .to_string()
            .into_bytes(),
        },
        WebhookFormat::Slack => {
            let text = format!("*{title}*\n{}", alert_text(alert, t, ReplyStyle::CodeBlock));
            WebhookBody {
                content_type: "application/json",
                headers: Vec::new(),
                body: json!({ "text": slack_escaped(&text) })
                    .to_string()
                    .into_bytes(),
            }
        }
        WebhookFormat::Ntfy => {
            let (tag, priority) = ntfy_tag_and_priority(alert.event);
            WebhookBody {
                content_type: "text/plain; charset=utf-8",
                headers: vec![
                    ("Title".to_string(), http_header_text(&title)),
                    ("Tags".to_string(), format!("{tag},{}", alert.event.name())),
                    ("Priority".to_string(), priority.to_string()),
                ],
                body: alert_text(alert, t, ReplyStyle::Indented).into_bytes(),
            }
        }
    }
}

/// ntfy shows an emoji for the first tag; an alert that means mail is
/// not going out is `high` (a louder notification on phones).
fn ntfy_tag_and_priority(event: Event) -> (&'static str, &'static str) {
    match event {
        Event::AccountHeld => ("warning", "high"),
        Event::AccountReleased => ("white_check_mark", "default"),
        Event::MessageRejected => ("x", "high"),
        Event::MessageExpired => ("x", "high"),
        Event::MessageDelayed => ("hourglass", "default"),
        Event::SigninNeeded => ("key", "high"),
        Event::SpoolFull => ("floppy_disk", "high"),
        Event::Test => ("test_tube", "default"),
    }
}

/// Slack reads `<…>` as links and mentions (`<!channel>`): a reply must
/// not be able to ping a channel, so `&`, `<` and `>` are escaped as
/// Slack documents.
fn slack_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[derive(Clone, Copy)]
enum ReplyStyle {
    /// Four spaces, for email and ntfy.
    Indented,
    /// A fenced block, for Slack's markdown.
    CodeBlock,
}

/// The alert in sentences and labelled fields, shared by the email and
/// the text webhooks.
fn alert_text(alert: &Alert, t: &Texts, style: ReplyStyle) -> String {
    let mut text = (t.alert_lead)(alert.event, alert.account.as_deref());
    text += "\n\n";
    let count = alert.count.map(t.messages);
    let recipients = alert.recipients.join(", ");
    let at = (t.date)(alert.at);
    let fields: Vec<(&str, &str)> = [
        (t.account_label, alert.account.as_deref()),
        (t.message_label, alert.message_id.as_deref()),
        (
            t.recipients_label,
            (!recipients.is_empty()).then_some(recipients.as_str()),
        ),
        ((t.count_label)(alert.event), count.as_deref()),
        (t.time_label, Some(at.as_str())),
        (t.relay_label, Some(alert.relay.as_str())),
    ]
    .into_iter()
    .filter_map(|(label, value)| Some((label, value?)))
    .collect();
    text += &labelled(&fields);
    if let Some(reply) = &alert.reply {
        write!(text, "\n{}\n", t.reply_label).expect("String");
        text += &match style {
            ReplyStyle::Indented => indented(reply),
            ReplyStyle::CodeBlock => format!("```\n{}\n```\n", reply.trim_end()),
        };
    }
    if let Some(hint) = &alert.hint {
        write!(text, "\n{} {hint}\n", t.hint_label).expect("String");
    }
    text
}

/// Paragraphs wrapped at 72 columns for plain-text mail readers (chat
/// apps and phones wrap by themselves); indented lines, the fields and
/// the provider's reply, are kept whole.
fn wrapped(text: &str) -> String {
    const WIDTH: usize = 72;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            out += line;
        } else {
            let mut used = 0;
            for word in line.split(' ') {
                let width = word.chars().count();
                if used > 0 && used + 1 + width > WIDTH {
                    out.push('\n');
                    used = 0;
                } else if used > 0 {
                    out.push(' ');
                    used += 1;
                }
                out += word;
                used += width;
            }
        }
        out.push('\n');
    }
    out
}

/// `label value` lines, the values aligned.
fn labelled(fields: &[(&str, &str)]) -> String {
    let width = fields
        .iter()
        .map(|(label, _)| label.chars().count())
        .max()
        .unwrap_or(0);
    fields
        .iter()
        .map(|(label, value)| format!("  {label:<width$} {value}\n"))
        .collect()
}

/// Every line of a reply, kept whole, indented by four spaces.
fn indented(reply: &str) -> String {
    reply
        .lines()
        .map(|line| format!("    {}\n", line.trim_end()))
        .collect()
}

/// Printable ASCII for the structured fields: anything else becomes `?`,
/// so an outside value cannot end a field or smuggle in 8-bit octets.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{Message, MessagePart, MimeHeaders};
    use serde_json::Value;

    const FROM: &str = "Mail Delivery System <mailer-daemon@relay.example>";
    /// 2023-11-14 22:13:20 UTC.
    const NOW: u64 = 1_700_000_000_000;
    const HOUR: u64 = 3_600_000;
    /// Gmail's answer to an unknown recipient: three lines, the help link
    /// in the last, which a first-line cut would lose.
    const GMAIL_NO_SUCH_USER: &str = "550-5.1.1 The email account that you tried to reach does not exist. Please try\n\
        550-5.1.1 double-checking the recipient's email address for typos or\n\
        550-5.1.1 unnecessary spaces. For more information, go to\n\
        550 5.1.1  https://support.google.com/mail/?p=NoSuchUser";
    const ORIGINAL_HEADERS: &str = "From: buchhaltung@firma.example\r\n\
        To: anna@kunde.example, bob@kunde.example, carl@kunde.example\r\n\
        Subject: =?utf-8?q?Rechnung_M=C3=A4rz_2024?=\r\n\
        Message-ID: <invoice-4711@firma.example>\r\n\r\n";

    fn recipient(address: &str, status: [u8; 3], reply: Option<&str>) -> NoticeRecipient {
        NoticeRecipient {
            address: address.to_string(),
            status,
            reply: reply.map(str::to_string),
        }
    }

    /// Of three recipients, bob was delivered: only anna and carl are
    /// listed. carl's server never answered.
    fn bounce() -> SenderNotice {
        SenderNotice {
            kind: SenderNoticeKind::Bounce,
            relay: "relay.example".to_string(),
            sender: "buchhaltung@firma.example".to_string(),
            message_id: "01HF3Z8Q".to_string(),
            received_at: NOW - 2 * HOUR,
            now: NOW,
            recipients: vec![
                recipient("anna@kunde.example", [5, 1, 1], Some(GMAIL_NO_SUCH_USER)),
                recipient("carl@kunde.example", [4, 4, 7], None),
            ],
            hint: None,
            give_up_at: None,
            original_headers: ORIGINAL_HEADERS.as_bytes().to_vec(),
        }
    }

    fn delay_warning() -> SenderNotice {
        SenderNotice {
            kind: SenderNoticeKind::DelayWarning,
            recipients: vec![recipient(
                "anna@kunde.example",
                [4, 7, 0],
                Some("421-4.7.0 Try again later,\n421 4.7.0 closing connection."),
            )],
            received_at: NOW - 4 * HOUR,
            give_up_at: Some(NOW + 116 * HOUR),
            hint: Some("wait; the provider throttles this account".to_string()),
            ..bounce()
        }
    }

    /// The three parts of a report, checked for their types on the way.
    struct Report<'a> {
        message: &'a Message<'a>,
        text: String,
        status: String,
        headers: String,
    }

    fn report<'a>(message: &'a Message<'a>) -> Report<'a> {
        let root = message.root_part().content_type().unwrap();
        assert_eq!(
            (root.ctype(), root.subtype()),
            ("multipart", Some("report"))
        );
        assert_eq!(root.attribute("report-type"), Some("delivery-status"));
        let parts: Vec<&MessagePart> = message
            .root_part()
            .sub_parts()
            .unwrap()
            .iter()
            .map(|&id| &message.parts[id as usize])
            .collect();
        let types: Vec<(String, Option<String>)> = parts
            .iter()
            .map(|part| {
                let ct = part.content_type().unwrap();
                (ct.ctype().to_string(), ct.subtype().map(str::to_string))
            })
            .collect();
        let expected = [
            ("text", "plain"),
            ("message", "delivery-status"),
            ("text", "rfc822-headers"),
        ];
        assert_eq!(types.len(), 3, "{types:?}");
        for ((ctype, subtype), (want_type, want_subtype)) in types.iter().zip(expected) {
            assert_eq!(
                (ctype.as_str(), subtype.as_deref()),
                (want_type, Some(want_subtype))
            );
        }
        assert_eq!(
            parts[0].content_type().unwrap().attribute("charset"),
            Some("utf-8")
        );
        let utf8 = |part: &MessagePart| String::from_utf8(part.contents().to_vec()).unwrap();
        Report {
            message,
            text: parts[0].text_contents().unwrap().replace("\r\n", "\n"),
            status: utf8(parts[1]),
            headers: utf8(parts[2]),
        }
    }

    /// The delivery-status part as field groups (RFC 3464: per-message
    /// fields, then one group per recipient), folded lines unfolded.
    fn status_groups(status: &str) -> Vec<Vec<(String, String)>> {
        status
            .split("\r\n\r\n")
            .filter(|group| !group.trim().is_empty())
            .map(|group| {
                group
                    .replace("\r\n ", " ")
                    .replace("\r\n\t", " ")
                    .lines()
                    .map(|line| {
                        let (name, value) =
                            line.split_once(": ").unwrap_or_else(|| panic!("{line:?}"));
                        (name.to_string(), value.to_string())
                    })
                    .collect()
            })
            .collect()
    }

    /// The text with every run of whitespace one space: a sentence is
    /// found wherever the email wrapped it.
    fn flat(text: &str) -> String {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
        group
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every line ends in CRLF and holds at most 998 octets.
    fn assert_valid_lines(raw: &[u8]) {
        assert!(raw.ends_with(b"\r\n"));
        for line in raw.split(|&b| b == b'\n') {
            assert!(
                line.is_empty() || line.ends_with(b"\r"),
                "bare LF before {:?}",
                String::from_utf8_lossy(line)
            );
            assert!(line.len() <= 999, "a line of {} octets", line.len() - 1);
        }
    }

    #[test]
    fn a_bounce_is_an_rfc_3464_report_listing_only_the_refused_recipients() {
        let raw = sender_notice(&bounce(), FROM, Language::En);
        assert_valid_lines(&raw);
        let message = MessageParser::new().parse(&raw).unwrap();
        let report = report(&message);

        assert_eq!(
            report.message.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(
            report.message.from().unwrap().first().unwrap().address(),
            Some("mailer-daemon@relay.example")
        );
        assert_eq!(
            report.message.to().unwrap().first().unwrap().address(),
            Some("buchhaltung@firma.example")
        );
        assert_eq!(
            report.message.date().unwrap().to_timestamp() as u64 * 1000,
            NOW
        );
        assert!(
            report
                .message
                .message_id()
                .unwrap()
                .ends_with("@relay.example")
        );
        assert_eq!(
            report.message.subject(),
            Some("Not delivered: Rechnung März 2024")
        );

        let groups = status_groups(&report.status);
        assert_eq!(groups.len(), 3, "{}", report.status);
        assert_eq!(
            field(&groups[0], "Reporting-MTA"),
            Some("dns; relay.example")
        );
        assert_eq!(
            field(&groups[0], "Arrival-Date"),
            Some("Tue, 14 Nov 2023 20:13:20 +0000")
        );
        let recipients: Vec<_> = groups[1..]
            .iter()
            .map(|g| field(g, "Final-Recipient").unwrap())
            .collect();
        assert_eq!(
            recipients,
            ["rfc822; anna@kunde.example", "rfc822; carl@kunde.example"]
        );
        assert_eq!(field(&groups[1], "Action"), Some("failed"));
        assert_eq!(field(&groups[1], "Status"), Some("5.1.1"));
        let gmail_joined = GMAIL_NO_SUCH_USER.lines().collect::<Vec<_>>().join(" ");
        assert_eq!(
            field(&groups[1], "Diagnostic-Code"),
            Some(format!("smtp; {gmail_joined}").as_str())
        );
        assert_eq!(field(&groups[1], "Will-Retry-Until"), None);
        assert_eq!(field(&groups[2], "Status"), Some("4.4.7"));
        assert_eq!(
            field(&groups[2], "Diagnostic-Code"),
            None,
            "carl's server never answered"
        );
        assert!(!report.status.contains("bob@"));

        assert!(
            flat(&report.text).contains("Nothing was sent to the recipients below."),
            "{}",
            report.text
        );
        for line in GMAIL_NO_SUCH_USER.lines() {
            assert!(
                report.text.contains(&format!("    {line}\n")),
                "{line} in {}",
                report.text
            );
        }
        assert!(flat(&report.text).contains("The relay tried for 2 hours and gave up"));
        assert!(flat(&report.text).contains("What to do: check the recipient's address"));
        assert!(!report.text.contains("bob@"));

        assert_eq!(
            report.headers,
            ORIGINAL_HEADERS.trim_end().to_string() + "\r\n"
        );
    }

    #[test]
    fn a_delay_warning_says_nothing_is_needed_and_until_when_the_relay_tries() {
        let raw = sender_notice(&delay_warning(), FROM, Language::En);
        assert_valid_lines(&raw);
        let message = MessageParser::new().parse(&raw).unwrap();
        let report = report(&message);

        assert_eq!(
            message.subject(),
            Some("Not delivered yet: Rechnung März 2024")
        );
        let groups = status_groups(&report.status);
        assert_eq!(groups.len(), 2);
        assert_eq!(field(&groups[1], "Action"), Some("delayed"));
        assert_eq!(field(&groups[1], "Status"), Some("4.7.0"));
        assert_eq!(
            field(&groups[1], "Diagnostic-Code"),
            Some("smtp; 421-4.7.0 Try again later, 421 4.7.0 closing connection.")
        );
        assert_eq!(
            field(&groups[1], "Will-Retry-Until"),
            Some("Sun, 19 Nov 2023 18:13:20 +0000")
        );

        for expected in [
            "has not been delivered yet",
            "waiting for 4 hours",
            "There is nothing for you to do",
            "sends it as soon as the provider accepts it",
            "If it still cannot be delivered by 19 Nov 2023, 18:13 UTC, the relay gives up.",
            "For the administrator: wait; the provider throttles this account",
        ] {
            assert!(
                flat(&report.text).contains(expected),
                "{expected:?} in {}",
                report.text
            );
        }
        let why = "Why: the provider replied:\n    421-4.7.0 Try again later,\n    421 4.7.0 closing connection.\n";
        assert!(report.text.contains(why), "{}", report.text);
        assert!(!report.text.contains("Nothing was sent"));
    }

    #[test]
    fn a_delay_warning_without_a_give_up_time_names_none() {
        let notice = SenderNotice {
            give_up_at: None,
            ..delay_warning()
        };
        let raw = sender_notice(&notice, FROM, Language::En);
        let message = MessageParser::new().parse(&raw).unwrap();
        let report = report(&message);
        assert_eq!(
            field(&status_groups(&report.status)[1], "Will-Retry-Until"),
            None
        );
        assert!(!report.text.contains("gives up"));
    }

    #[test]
    fn german_notices_are_in_german_with_an_encoded_subject() {
        let cases = [
            (
                bounce(),
                "Nicht zugestellt: Rechnung März 2024",
                "An die unten genannten Empfänger wurde nichts gesendet.",
            ),
            (
                delay_warning(),
                "Noch nicht zugestellt: Rechnung März 2024",
                "Sie müssen nichts tun",
            ),
        ];
        for (notice, subject, sentence) in cases {
            let raw = sender_notice(&notice, FROM, Language::De);
            assert!(
                raw.is_ascii(),
                "an ASCII header section and quoted-printable text"
            );
            let message = MessageParser::new().parse(&raw).unwrap();
            let report = report(&message);
            assert_eq!(message.subject(), Some(subject));
            assert!(
                message
                    .header_raw("Subject")
                    .unwrap()
                    .contains("=?utf-8?q?")
            );
            assert!(
                flat(&report.text).contains(sentence),
                "{sentence} in {}",
                report.text
            );
            assert!(
                report.text.contains("Betreff:")
                    && report.text.contains("Empfänger: anna@kunde.example")
            );
        }
    }

    #[test]
    fn without_an_original_subject_the_subject_names_the_recipients() {
        let notice = SenderNotice {
            original_headers: b"From: a@firma.example\r\n".to_vec(),
            ..bounce()
        };
        let raw = sender_notice(&notice, FROM, Language::En);
        let message = MessageParser::new().parse(&raw).unwrap();
        assert_eq!(
            message.subject(),
            Some("Not delivered: your message to anna@kunde.example and 1 more")
        );
        assert_eq!(report(&message).headers, "From: a@firma.example\r\n");
    }

    /// An HTTP API's error body can be one very long line; 8-bit original
    /// headers make the report 8bit; an internationalised recipient gets
    /// RFC 6533's utf-8 address type.
    #[test]
    fn long_replies_8bit_headers_and_utf8_addresses_stay_valid() {
        let long_reply = format!("400 {}", "invalid recipient ".repeat(200));
        let notice = SenderNotice {
            recipients: vec![recipient(
                "jörg+rechnung@müller.example",
                [5, 1, 1],
                Some(&long_reply),
            )],
            original_headers: "Subject: Grüße\r\n\r\n".as_bytes().to_vec(),
            ..bounce()
        };
        let raw = sender_notice(&notice, FROM, Language::En);
        assert_valid_lines(&raw);
        let message = MessageParser::new().parse(&raw).unwrap();
        assert!(
            message
                .header_raw("Content-Transfer-Encoding")
                .unwrap()
                .contains("8bit")
        );
        let report = report(&message);
        assert_eq!(report.headers, "Subject: Grüße\r\n");
        let groups = status_groups(&report.status);
        assert_eq!(
            field(&groups[1], "Final-Recipient"),
            Some("utf-8; j\\x{F6}rg\\x{2B}rechnung@m\\x{FC}ller.example")
        );
        let code = field(&groups[1], "Diagnostic-Code").unwrap();
        assert_eq!(
            code.replace(' ', ""),
            format!("smtp;{}", long_reply.replace(' ', ""))
        );
        assert!(report.text.contains(long_reply.trim_end()));
    }

    fn alert(event: Event) -> Alert {
        Alert {
            event,
            account: Some("gmail".to_string()),
            message_id: Some("01HF3Z8Q".to_string()),
            recipients: vec![
                "anna@kunde.example".to_string(),
                "carl@kunde.example".to_string(),
            ],
            reply: Some(
                "535-5.7.8 Username and Password not accepted. For more information, go to\n\
                 535 5.7.8  https://support.google.com/mail/?p=BadCredentials"
                    .to_string(),
            ),
            hint: Some("set accounts.gmail.password to a 16-character app password".to_string()),
            count: Some(300),
            at: NOW,
            relay: "relay.example".to_string(),
        }
    }

    /// The alert for account_held with no message: what an operator gets
    /// when a wrong app password holds the account's mail.
    fn held() -> Alert {
        Alert {
            message_id: None,
            recipients: Vec::new(),
            ..alert(Event::AccountHeld)
        }
    }

    #[test]
    fn alert_emails_name_the_event_and_account_and_carry_reply_hint_and_count() {
        let admins = [
            "it@firma.example".to_string(),
            "chef@firma.example".to_string(),
        ];
        let cases = [
            (
                Language::En,
                "[sendbridge] Account gmail is on hold: sign-in refused",
                "Waiting: 300 messages",
                "What to do:",
            ),
            (
                Language::De,
                "[sendbridge] Konto gmail angehalten: Anmeldung abgelehnt",
                "Wartend: 300 Nachrichten",
                "Was zu tun ist:",
            ),
        ];
        for (language, subject, count, hint_label) in cases {
            let raw = alert_email(&held(), FROM, &admins, language);
            assert_valid_lines(&raw);
            let message = MessageParser::new().parse(&raw).unwrap();
            assert_eq!(message.subject(), Some(subject));
            assert_eq!(
                message.header_raw("Auto-Submitted").map(str::trim),
                Some("auto-replied")
            );
            let to: Vec<_> = message
                .to()
                .unwrap()
                .iter()
                .map(|a| a.address().unwrap())
                .collect();
            assert_eq!(to, ["it@firma.example", "chef@firma.example"]);
            let text = message.body_text(0).unwrap().replace("\r\n", "\n");
            for expected in [
                count,
                "    535-5.7.8 Username and Password not accepted. For more information, go to\n",
                "    535 5.7.8  https://support.google.com/mail/?p=BadCredentials\n",
                "relay.example",
            ] {
                assert!(text.contains(expected), "{expected:?} in {text}");
            }
            let hint =
                format!("{hint_label} set accounts.gmail.password to a 16-character app password");
            assert!(flat(&text).contains(&hint), "{hint} in {text}");
        }
    }

    #[test]
    fn every_alert_renders_in_every_language_with_its_message_and_recipients() {
        for language in [Language::En, Language::De] {
            for event in Event::ALL {
                let raw = alert_email(
                    &alert(event),
                    FROM,
                    &["it@firma.example".to_string()],
                    language,
                );
                assert_valid_lines(&raw);
                let message = MessageParser::new().parse(&raw).unwrap();
                let text = message.body_text(0).unwrap();
                for expected in [
                    "01HF3Z8Q",
                    "anna@kunde.example, carl@kunde.example",
                    "BadCredentials",
                ] {
                    assert!(
                        text.contains(expected),
                        "{event:?} {language:?}: {expected} in {text}"
                    );
                }
                assert_eq!(
                    message.header_raw("X-Sendbridge-Event").map(str::trim),
                    Some(event.name())
                );
            }
        }
    }

    #[test]
    fn json_webhooks_have_exactly_the_documented_fields() {
        let body = webhook_body(&held(), WebhookFormat::Json, Language::De);
        assert_eq!(body.content_type, "application/json");
        assert!(body.headers.is_empty());
        let value: Value = serde_json::from_slice(&body.body).unwrap();
        assert_eq!(
            value,
            json!({
                "event": "account_held",
                "account": "gmail",
                "message_id": null,
                "recipients": [],
                "reply": "535-5.7.8 Username and Password not accepted. For more information, go to\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials",
                "hint": "set accounts.gmail.password to a 16-character app password",
                "count": 300,
                "at": "2023-11-14T22:13:20Z",
                "relay": "relay.example",
            })
        );
        for event in Event::ALL {
            let body = webhook_body(&alert(event), WebhookFormat::Json, Language::En);
            let value: Value = serde_json::from_slice(&body.body).unwrap();
            assert_eq!(value["event"], event.name());
            assert_eq!(value.as_object().unwrap().len(), 9);
        }
    }

    #[test]
    fn slack_webhooks_are_one_text_that_cannot_mention_a_channel() {
        let mut alert = alert(Event::MessageRejected);
        alert.reply =
            Some("550 5.1.1 <anna@kunde.example>: no such user <!channel> & more".to_string());
        let body = webhook_body(&alert, WebhookFormat::Slack, Language::En);
        assert_eq!(body.content_type, "application/json");
        let value: Value = serde_json::from_slice(&body.body).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.keys().collect::<Vec<_>>(), ["text"]);
        let text = object["text"].as_str().unwrap();
        assert!(
            text.starts_with("*Message refused by the provider (gmail)*\n"),
            "{text}"
        );
        assert!(text.contains(
            "```\n550 5.1.1 &lt;anna@kunde.example&gt;: no such user &lt;!channel&gt; &amp; more\n```"
        ), "{text}");
        assert!(!text.contains('<'));
    }

    #[test]
    fn ntfy_webhooks_are_plain_text_with_title_tags_and_priority() {
        let cases = [
            (Language::En, "Account gmail is on hold: sign-in refused"),
            (Language::De, "Konto gmail angehalten: Anmeldung abgelehnt"),
        ];
        for (language, title) in cases {
            let body = webhook_body(&held(), WebhookFormat::Ntfy, language);
            assert_eq!(body.content_type, "text/plain; charset=utf-8");
            let header = |name: &str| {
                body.headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(header("Title"), Some(title), "ASCII titles stay readable");
            assert_eq!(header("Tags"), Some("warning,account_held"));
            assert_eq!(header("Priority"), Some("high"));
            let text = String::from_utf8(body.body).unwrap();
            assert!(
                text.contains("https://support.google.com/mail/?p=BadCredentials"),
                "{text}"
            );
        }

        let body = webhook_body(&alert(Event::SpoolFull), WebhookFormat::Ntfy, Language::De);
        let title = &body.headers[0];
        assert_eq!(title.0, "Title");
        assert!(
            title.1.is_ascii() && title.1.starts_with("=?utf-8?q?"),
            "{title:?}"
        );
        let raw = format!("Subject: {}\r\n\r\n", title.1);
        let decoded = MessageParser::new().parse(raw.as_bytes()).unwrap();
        assert_eq!(
            decoded.subject(),
            Some("Spool-Datenträger voll: neue Mails werden abgewiesen")
        );
    }
}
