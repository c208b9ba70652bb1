//! Envelope recipients are the truth, also for the HTTP APIs (Microsoft
//! Graph `sendMail`, Gmail `messages.send`), which take the recipients of a
//! MIME message from its To, Cc and Bcc fields instead of an envelope.
//!
//! For each attempt the copy handed to the API is made to name exactly the
//! attempt's recipients:
//! - envelope recipients in neither To nor Cc go into a Bcc field, which
//!   both APIs deliver to and strip from what every recipient sees (the
//!   spool never holds a Bcc field: the session removed it);
//! - when To or Cc name an address that is not a recipient of this attempt
//!   (it was never in the envelope, was delivered or refused earlier, or
//!   belongs to another part of a message split by
//!   `max_recipients_per_message`), that field is rewritten to the
//!   addresses of this attempt only, or dropped when none is left. The API
//!   cannot be told to skip an address its headers name, so this is the only
//!   way it never receives the message from us. The log names how many were
//!   withheld.
//!
//! A message whose To and Cc name only this attempt's recipients goes out
//! byte for byte as spooled, plus the Bcc field when needed.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_parser::{Addr, HeaderName, HeaderValue, MessageParser};

/// The copy of a message for one API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiMessage {
    pub mime: Vec<u8>,
    /// Header recipients this copy no longer names: they do not receive it.
    pub withheld: Vec<String>,
}

/// The copy of `message` (as spooled, CRLF line ends) that reaches exactly
/// `recipients`, this attempt's envelope recipients.
pub fn for_api(message: &[u8], recipients: &[String]) -> ApiMessage {
    let attempt: HashSet<String> = recipients.iter().map(|r| key(r)).collect();
    let parsed = MessageParser::new().parse_headers(message);
    let fields = parsed.as_ref().map_or(&[][..], |parsed| parsed.headers());
    let mut named = HashSet::new();
    let mut withheld = Vec::new();
    // (range of a whole To/Cc field, its replacement)
    let mut splices = Vec::new();
    for field in fields {
        let name = match field.name {
            HeaderName::To => "To",
            HeaderName::Cc => "Cc",
            _ => continue,
        };
        let HeaderValue::Address(addresses) = &field.value else {
            continue;
        };
        let mut kept = Vec::new();
        let mut cut = false;
        for mailbox in addresses.iter().filter_map(Mailbox::of) {
            named.insert(key(&mailbox.address));
            if attempt.contains(&key(&mailbox.address)) {
                kept.push(mailbox);
            } else {
                cut = true;
                withheld.push(mailbox.address);
            }
        }
        if cut {
            let range = field.offset_field as usize..field.offset_end as usize;
            let replacement = match kept.is_empty() {
                true => Vec::new(),
                false => address_field(name, kept.iter().map(Mailbox::written)),
            };
            splices.push((range, replacement));
        }
    }
    let hidden = recipients.iter().filter(|r| !named.contains(&key(r)));
    let mut mime = address_field("Bcc", hidden.cloned());
    let mut copied = 0;
    for (range, replacement) in splices {
        mime.extend_from_slice(&message[copied..range.start]);
        mime.extend_from_slice(&replacement);
        copied = range.end;
    }
    mime.extend_from_slice(&message[copied..]);
    ApiMessage { mime, withheld }
}

/// How addresses are compared: case-insensitive (as providers treat them),
/// and the envelope's RFC 5321 quoting of a local part ignored.
fn key(address: &str) -> String {
    address.replace('"', "").to_lowercase()
}

/// `Name: a,\r\n\tb\r\n`, one address per line so no line grows long; empty
/// without addresses.
fn address_field(name: &str, addresses: impl Iterator<Item = String>) -> Vec<u8> {
    let addresses: Vec<String> = addresses.collect();
    if addresses.is_empty() {
        return Vec::new();
    }
    format!("{name}: {}\r\n", addresses.join(",\r\n\t")).into_bytes()
}

/// One mailbox of an address field.
struct Mailbox {
    name: String,
    address: String,
}

impl Mailbox {
    fn of(addr: &Addr) -> Option<Mailbox> {
        let address = addr.address()?;
        let name = addr.name().unwrap_or_default();
        // mail-parser reads a bare quoted local part (`"x y"@example.com`)
        // as a name and `@example.com`.
        if address.starts_with('@') && !name.is_empty() {
            return Some(Mailbox {
                name: String::new(),
                address: format!("\"{name}\"{address}"),
            });
        }
        Some(Mailbox {
            name: name.chars().filter(|c| !c.is_control()).collect(),
            address: address.to_string(),
        })
    }

    /// As written again: the display name quoted, or encoded (RFC 2047)
    /// when it is not ASCII.
    fn written(&self) -> String {
        let Mailbox { name, address } = self;
        if name.is_empty() {
            address.clone()
        } else if name.is_ascii() {
            let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
            format!("\"{quoted}\" <{address}>")
        } else {
            format!("=?utf-8?b?{}?= <{address}>", BASE64.encode(name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "Subject: Invoice\r\n\r\nPlease pay.\r\n";

    #[test]
    fn the_copy_names_exactly_the_attempts_recipients() {
        // (header fields, this attempt's recipients, header fields sent, withheld)
        let table: [(&str, &[&str], &str, &[&str]); 8] = [
            (
                "From: me@contoso.com\r\nTo: a@example.com\r\nCc: b@example.com\r\n",
                &["a@example.com", "b@example.com"],
                "From: me@contoso.com\r\nTo: a@example.com\r\nCc: b@example.com\r\n",
                &[],
            ),
            // Envelope-only recipients go in as Bcc.
            (
                "To: a@example.com\r\n",
                &["a@example.com", "boss@example.com", "audit@example.com"],
                "Bcc: boss@example.com,\r\n\taudit@example.com\r\nTo: a@example.com\r\n",
                &[],
            ),
            // Providers compare addresses without regard to case; the
            // envelope's quoting of a local part is RFC 5321's.
            (
                "To: \"A\" <A@Example.COM>, \"x y\"@example.com\r\n",
                &["a@example.com", "\"x y\"@example.com"],
                "To: \"A\" <A@Example.COM>, \"x y\"@example.com\r\n",
                &[],
            ),
            // A retry to the one recipient still pending: To is cut down.
            (
                "To: \"Ann\" <a@example.com>,\r\n \"B, Bob\" <b@example.com>\r\nSubject: x\r\n",
                &["b@example.com"],
                "To: \"B, Bob\" <b@example.com>\r\nSubject: x\r\n",
                &["a@example.com"],
            ),
            // An address the client never gave as a recipient: its field
            // goes when no recipient of this attempt is left in it.
            (
                "To: list@example.com\r\nCc: c@example.com\r\n",
                &["c@example.com", "d@example.com"],
                "Bcc: d@example.com\r\nCc: c@example.com\r\n",
                &["list@example.com"],
            ),
            // Names are written again quoted, or encoded when not ASCII.
            (
                "To: =?utf-8?q?J=C3=BCrgen?= <j@example.com>, \"Say \\\"hi\\\"\" <s@example.com>,\r\n x@example.com\r\n",
                &["j@example.com", "s@example.com"],
                "To: =?utf-8?b?SsO8cmdlbg==?= <j@example.com>,\r\n\t\"Say \\\"hi\\\"\" <s@example.com>\r\n",
                &["x@example.com"],
            ),
            // Groups: an empty one stays, its members are addresses.
            (
                "To: undisclosed-recipients:;\r\n",
                &["a@example.com"],
                "Bcc: a@example.com\r\nTo: undisclosed-recipients:;\r\n",
                &[],
            ),
            (
                "To: Team: a@example.com, b@example.com;\r\n",
                &["a@example.com"],
                "To: a@example.com\r\n",
                &["b@example.com"],
            ),
        ];
        for (header, recipients, sent, withheld) in table {
            let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
            let copy = for_api(format!("{header}{BODY}").as_bytes(), &recipients);
            assert_eq!(
                String::from_utf8(copy.mime).unwrap(),
                format!("{sent}{BODY}"),
                "{header}"
            );
            assert_eq!(copy.withheld, withheld, "{header}");
        }
    }

    #[test]
    fn a_message_without_recipient_fields_gets_only_bcc() {
        let copy = for_api(BODY.as_bytes(), &["a@example.com".to_string()]);
        assert_eq!(
            copy.mime,
            format!("Bcc: a@example.com\r\n{BODY}").as_bytes()
        );
        assert!(copy.withheld.is_empty());
    }
}
