//! The encodings a generated message needs to be valid anywhere: header
//! fields folded and RFC 2047-encoded, quoted-printable bodies (no line
//! over 76 octets whatever the provider replied), dates and fresh ids.

use std::fmt::Write;

use mail_parser::DateTime;

/// RFC 5322 section 2.1.1: lines SHOULD stay within 78 octets.
const FOLD_AT: usize = 78;
/// RFC 2045 section 6.7: encoded lines at most 76 octets.
const QP_LINE: usize = 76;
/// RFC 2047 section 2 allows 75 octets per encoded-word (`=?utf-8?q?`
/// and `?=` take 12); 66 leave room for `Subject: ` on the first line.
const ENCODED_WORD_TEXT: usize = 66 - 12;

/// An unstructured header field (Subject, a display text): folded between
/// words, encoded-words when the text is not plain ASCII. Control
/// characters become spaces, so an outside value cannot end the field.
pub(super) fn text_field(name: &str, value: &str) -> String {
    let value = without_controls(value);
    let body = if value.is_ascii() {
        fold(name.len() + 2, value.split(' ').map(str::to_string))
    } else {
        fold(name.len() + 2, encoded_words(&value))
    };
    format!("{name}: {body}\r\n")
}

/// An address field (`From`, `To`): each `Display Name <addr>` keeps its
/// address as it is and gets its display name encoded when it is not ASCII.
pub(super) fn address_field(name: &str, mailboxes: &[&str]) -> String {
    let mailboxes = mailboxes.iter().map(|mailbox| {
        let mailbox = without_controls(mailbox);
        match mailbox.rfind('<') {
            Some(at) if !mailbox[..at].is_ascii() => {
                let display = mailbox[..at].trim_end();
                format!("{} {}", encoded_words(display).join(" "), &mailbox[at..])
            }
            _ => mailbox,
        }
    });
    let mut words: Vec<String> = mailboxes.collect();
    let last = words.len().saturating_sub(1);
    for word in &mut words[..last] {
        word.push(',');
    }
    format!("{name}: {}\r\n", fold(name.len() + 2, words))
}

/// Text for an HTTP header (ntfy's `Title`): one line, encoded-words when
/// it is not ASCII.
pub(super) fn http_header_text(value: &str) -> String {
    let value = without_controls(value);
    if value.is_ascii() {
        value
    } else {
        encoded_words(&value).join(" ")
    }
}

fn without_controls(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Joins `words` with spaces, starting a continuation line (CRLF SP)
/// where the next word would pass [`FOLD_AT`]. `used` is what the line
/// already holds (the field name). A single word longer than a line stays
/// whole: words here are addresses, encoded-words or short text.
fn fold(mut used: usize, words: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for (index, word) in words.into_iter().enumerate() {
        if index > 0 {
            if used + 1 + word.len() > FOLD_AT {
                out.push_str("\r\n ");
                used = 1;
            } else {
                out.push(' ');
                used += 1;
            }
        }
        used += word.len();
        out.push_str(&word);
    }
    out
}

/// RFC 2047 "Q" encoded-words, split between characters so that none
/// passes 75 octets. Spaces are inside the words (as `_`): whitespace
/// between encoded-words is dropped when decoding.
fn encoded_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        let mut encoded = String::new();
        let mut buffer = [0; 4];
        for byte in c.encode_utf8(&mut buffer).bytes() {
            match byte {
                b' ' => encoded.push('_'),
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'!' | b'*' | b'+' | b'-' | b'/' => {
                    encoded.push(byte as char)
                }
                _ => write!(encoded, "={byte:02X}").expect("writing to a String"),
            }
        }
        if word.len() + encoded.len() > ENCODED_WORD_TEXT {
            words.push(format!("=?utf-8?q?{word}?="));
            word.clear();
        }
        word.push_str(&encoded);
    }
    words.push(format!("=?utf-8?q?{word}?="));
    words
}

/// Quoted-printable (RFC 2045 section 6.7) of `text`, whose lines end in
/// `\n`; the result has CRLF line ends and no line over 76 octets.
pub(super) fn quoted_printable(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut used = 0;
        let bytes = line.as_bytes();
        for (index, &byte) in bytes.iter().enumerate() {
            let last = index + 1 == bytes.len();
            let literal = matches!(byte, b'!'..=b'<' | b'>'..=b'~')
                // Whitespace at a line's end would be lost in transport.
                || (matches!(byte, b' ' | b'\t') && !last);
            let width = if literal { 1 } else { 3 };
            // Room for the soft break `=` unless this is the line's end.
            let room = if last { QP_LINE } else { QP_LINE - 1 };
            if used + width > room {
                out.push_str("=\r\n");
                used = 0;
            }
            if literal {
                out.push(byte as char);
            } else {
                write!(out, "={byte:02X}").expect("writing to a String");
            }
            used += width;
        }
        out.push_str("\r\n");
    }
    out
}

/// E.g. "Tue, 14 Nov 2023 22:13:20 +0000".
pub(super) fn rfc5322_date(unix_millis: u64) -> String {
    date_time(unix_millis).to_rfc822()
}

/// E.g. "2023-11-14T22:13:20Z".
pub(super) fn rfc3339_date(unix_millis: u64) -> String {
    date_time(unix_millis).to_rfc3339()
}

fn date_time(unix_millis: u64) -> DateTime {
    DateTime::from_timestamp((unix_millis / 1000) as i64)
}

/// 128 random bits: unique without coordination between relays.
pub(super) fn message_id(host: &str) -> String {
    format!("<{:032x}@{host}>", rand::random::<u128>())
}

/// `=_` cannot occur in quoted-printable text, and 128 random bits make
/// a collision with the other parts' text practically impossible.
pub(super) fn boundary() -> String {
    format!("=_sendbridge_{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    /// Parses `fields` followed by an empty body with mail-parser.
    fn subject_of(field: &str) -> String {
        let raw = format!("{field}\r\n");
        let message = MessageParser::new().parse(raw.as_bytes()).unwrap();
        message.subject().unwrap().to_string()
    }

    #[test]
    fn text_fields_decode_to_their_text_and_stay_within_78_octets() {
        let cases = [
            "Not delivered: Invoice 2024-117".to_string(),
            "Nicht zugestellt: Rechnung für Müller & Söhne GmbH, März 2024 (Kundennummer 4711-0815)"
                .to_string(),
            "äöüß€ 日本語 ".repeat(12).trim_end().to_string(),
            "long-ascii-words ".repeat(20).trim_end().to_string(),
        ];
        for text in &cases {
            let field = text_field("Subject", text);
            assert!(field.is_ascii(), "{field}");
            for line in field.split("\r\n") {
                assert!(line.len() <= FOLD_AT, "{line:?} is {} octets", line.len());
            }
            assert_eq!(&subject_of(&field), text, "{field}");
        }
    }

    #[test]
    fn control_characters_cannot_end_a_field() {
        let field = text_field("Subject", "Invoice\r\nBcc: everyone@example.com");
        assert_eq!(field, "Subject: Invoice  Bcc: everyone@example.com\r\n");
    }

    #[test]
    fn address_fields_encode_only_a_non_ascii_display_name() {
        let field = address_field(
            "From",
            &["Mail-Zustellsystem Müller <mailer-daemon@relay.example>"],
        );
        let raw = format!("{field}\r\n");
        let message = MessageParser::new().parse(raw.as_bytes()).unwrap();
        let from = message.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Mail-Zustellsystem Müller"));
        assert_eq!(from.address(), Some("mailer-daemon@relay.example"));

        let field = address_field("To", &["a@example.com", "b@example.com"]);
        assert_eq!(field, "To: a@example.com, b@example.com\r\n");
    }

    #[test]
    fn quoted_printable_round_trips_and_keeps_lines_short() {
        let text = format!(
            "Grüße, Ihr Relay = sendbridge\n{}\ntrailing space \n\n{}\n",
            "x".repeat(300),
            "550-5.1.1 ä ".repeat(40)
        );
        let encoded = quoted_printable(&text);
        for line in encoded.split("\r\n") {
            assert!(line.len() <= QP_LINE, "{line:?}");
            assert!(!line.ends_with(' '), "{line:?}");
        }
        let raw = format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{encoded}"
        );
        let message = MessageParser::new().parse(raw.as_bytes()).unwrap();
        let decoded = message.body_text(0).unwrap().replace("\r\n", "\n");
        assert_eq!(decoded, text);
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(
            rfc5322_date(1_700_000_000_123),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc3339_date(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
