//! No loops, no storms: which messages may get a notice to their sender,
//! and how many notices one address gets per hour.

use std::collections::{HashMap, VecDeque};

use crate::spool::Envelope;

/// At most this many notice emails per recipient address per hour.
pub const PER_ADDRESS_PER_HOUR: usize = 10;
const HOUR_MS: u64 = 3600 * 1000;

/// Why a message gets no notice to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoNotice {
    /// It is itself a notice: never a notice about a notice.
    IsNotice,
    /// `MAIL FROM:<>`: nobody to tell.
    NullSender,
    /// A report (`Content-Type: multipart/report`): a bounce of a bounce.
    Report,
    /// `Auto-Submitted:` other than `no` (RFC 3834).
    AutoSubmitted,
}

impl NoNotice {
    pub fn reason(self) -> &'static str {
        match self {
            NoNotice::IsNotice => "the message is itself a notice",
            NoNotice::NullSender => "null sender <>",
            NoNotice::Report => "the message is a delivery report",
            NoNotice::AutoSubmitted => "the message was auto-submitted",
        }
    }
}

/// Whether the sender of the message with `envelope` and header section
/// `headers` may get a notice about it.
pub fn sender_notice_allowed(envelope: &Envelope, headers: &[u8]) -> Result<(), NoNotice> {
    if envelope.is_notice {
        return Err(NoNotice::IsNotice);
    }
    let sender = envelope.mail_from.trim();
    if sender.is_empty() || sender == "<>" {
        return Err(NoNotice::NullSender);
    }
    for (name, value) in header_fields(headers) {
        let value = value.trim().to_ascii_lowercase();
        if name.eq_ignore_ascii_case("content-type") && value.starts_with("multipart/report") {
            return Err(NoNotice::Report);
        }
        if name.eq_ignore_ascii_case("auto-submitted") && !value.starts_with("no") {
            return Err(NoNotice::AutoSubmitted);
        }
    }
    Ok(())
}

/// The header section of a message: everything before the first empty line.
pub fn header_section(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(message.len(), |at| at + 2);
    &message[..end]
}

/// Header fields as (name, unfolded value).
fn header_fields(headers: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(headers);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n").flat_map(|line| line.split('\n')) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.to_string()));
        }
    }
    fields
}

/// Notices sent per address in the last hour.
#[derive(Debug, Default)]
pub struct RateLimit {
    sent: HashMap<String, VecDeque<u64>>,
}

impl RateLimit {
    /// Counts a notice to `address` at `now` unless it would exceed
    /// [`PER_ADDRESS_PER_HOUR`]; returns whether it may go.
    pub fn admit(&mut self, address: &str, now: u64) -> bool {
        self.sent
            .retain(|_, times| times.back().is_some_and(|&at| now < at + HOUR_MS));
        let times = self.sent.entry(address.to_ascii_lowercase()).or_default();
        while times.front().is_some_and(|&at| now >= at + HOUR_MS) {
            times.pop_front();
        }
        if times.len() >= PER_ADDRESS_PER_HOUR {
            return false;
        }
        times.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_senders_reports_auto_submitted_mail_and_notices_get_no_notice() {
        let envelope = |from: &str, is_notice| Envelope {
            mail_from: from.into(),
            is_notice,
            ..Envelope::default()
        };
        // (MAIL FROM, is a notice, header section, verdict)
        let table: [(&str, bool, &str, Result<(), NoNotice>); 9] = [
            ("a@b", false, "Subject: x\r\n", Ok(())),
            ("a@b", true, "Subject: x\r\n", Err(NoNotice::IsNotice)),
            ("", false, "Subject: x\r\n", Err(NoNotice::NullSender)),
            ("<>", false, "Subject: x\r\n", Err(NoNotice::NullSender)),
            (
                "a@b",
                false,
                "Content-Type: Multipart/Report;\r\n report-type=delivery-status\r\n",
                Err(NoNotice::Report),
            ),
            (
                "a@b",
                false,
                "Content-Type: multipart/mixed; boundary=x\r\n",
                Ok(()),
            ),
            (
                "a@b",
                false,
                "auto-submitted: auto-replied\r\n",
                Err(NoNotice::AutoSubmitted),
            ),
            (
                "a@b",
                false,
                "Auto-Submitted: auto-generated\r\n",
                Err(NoNotice::AutoSubmitted),
            ),
            ("a@b", false, "Auto-Submitted: no\r\n", Ok(())),
        ];
        for (from, is_notice, headers, expected) in table {
            assert_eq!(
                sender_notice_allowed(&envelope(from, is_notice), headers.as_bytes()),
                expected,
                "{from:?} {headers:?}"
            );
        }
    }

    #[test]
    fn the_header_section_ends_at_the_first_empty_line() {
        let message = b"Subject: a\r\nAuto-Submitted: no\r\n\r\nAuto-Submitted: yes\r\n";
        assert_eq!(
            header_section(message),
            b"Subject: a\r\nAuto-Submitted: no\r\n"
        );
        assert_eq!(header_section(b"Subject: a\r\n"), b"Subject: a\r\n");
    }

    #[test]
    fn each_address_gets_at_most_its_hourly_share() {
        let mut limit = RateLimit::default();
        for n in 0..PER_ADDRESS_PER_HOUR as u64 {
            assert!(limit.admit("a@b", n), "notice {n}");
        }
        assert!(!limit.admit("A@B", 100), "the same address, any case");
        assert!(limit.admit("c@d", 100), "another address");
        assert!(!limit.admit("a@b", HOUR_MS - 1));
        assert!(limit.admit("a@b", HOUR_MS), "the first one is an hour old");
    }
}
