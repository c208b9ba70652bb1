//! What a message needs before it goes upstream: a provider such as Gmail
//! wants CRLF line ends, lines within 998 octets, a From the account may
//! send as, a Date and a Message-ID, and must not see Bcc or the fields an
//! account asks to drop. We add our Received field for the trail.
//!
//! A pure function on raw bytes. Header fields are spliced at the offsets
//! mail-parser reports and never re-serialised, and the body is copied line
//! by line, so 8-bit header bytes and every untouched byte survive as the
//! client sent them. Reading and writing lines is in `lines`, the header
//! fields' edits in `header`.

mod header;
mod lines;

use std::net::IpAddr;

use mail_parser::HeaderName;

use crate::config::{AccountConfig, FromPolicy, LongLines};
use header::{edit_header_section, read_header_section};
use lines::{CRLF, InputLines, MAX_LINE, is_clean_body, write_body, write_header_section};

/// The settings of one upstream account that `rewrite` applies, prepared
/// once so each message only compares.
#[derive(Debug, Clone)]
pub struct RewritePolicy {
    /// Replaces a From address the account may not send as, and is the
    /// From of a message that has none.
    pub sender: String,
    pub from_policy: FromPolicy,
    /// Lower-case addresses and `@domain`s the provider lets the account
    /// send as; `new` adds the sender and the username.
    pub allowed_from: Vec<String>,
    /// Lower-case names of fields removed besides Bcc and Resent-Bcc.
    pub remove_headers: Vec<String>,
    /// What happens to body lines over 998 octets.
    pub long_lines: LongLines,
    /// Our name in the Received field and in generated Message-IDs.
    pub hostname: String,
}

impl RewritePolicy {
    /// Lower-cases what is compared, since addresses and field names are
    /// matched case-insensitively. The sender and the username are always
    /// allowed: the provider lets an account send as itself.
    pub fn new(account: &AccountConfig, hostname: &str) -> Self {
        let lower = |entries: &[String]| -> Vec<String> {
            entries
                .iter()
                .map(|entry| entry.trim().to_lowercase())
                .collect()
        };
        let mut allowed_from = lower(&account.allowed_from);
        allowed_from.push(account.sender().to_lowercase());
        allowed_from.push(account.username.to_lowercase());
        RewritePolicy {
            sender: account.sender().to_string(),
            from_policy: account.from_policy,
            allowed_from,
            remove_headers: lower(&account.remove_headers),
            long_lines: account.long_lines,
            hostname: hostname.to_string(),
        }
    }

    /// Whether the provider lets the account send as `address`: listed
    /// exactly, or its domain is listed as `@domain`.
    fn allows(&self, address: &str) -> bool {
        let address = address.to_lowercase();
        let domain = address.rsplit_once('@').map(|(_, domain)| domain);
        self.allowed_from
            .iter()
            .any(|entry| match entry.strip_prefix('@') {
                Some(allowed_domain) => domain == Some(allowed_domain),
                None => *entry == address,
            })
    }

    /// Bcc and Resent-Bcc always go (they would tell every recipient who
    /// else got the message), and the configured fields.
    fn removes(&self, name: &HeaderName) -> bool {
        matches!(name, HeaderName::Bcc | HeaderName::ResentBcc)
            || self
                .remove_headers
                .iter()
                .any(|removed| removed.eq_ignore_ascii_case(name.as_str()))
    }
}

/// Where and how the message reached us, for the Received field.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The name the client gave in HELO or EHLO.
    pub helo: String,
    pub client_ip: IpAddr,
    /// The RFC 3848 `with` keyword: "SMTP", "ESMTP", "ESMTPA", "ESMTPS" or
    /// "ESMTPSA".
    pub protocol: &'static str,
    /// Ties the Received field to our log lines.
    pub session_id: String,
    /// When the message arrived: the Received date and a missing Date.
    pub now_unix: i64,
}

/// The message to send upstream and what was done to it.
#[derive(Debug)]
pub struct Rewritten {
    pub message: Vec<u8>,
    /// Short notes for the log, e.g. "removed Bcc"; header names and
    /// addresses at most, never body text.
    pub changes: Vec<String>,
}

/// Why a message cannot be sent as it is.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// Only with `LongLines::Reject`; header lines are always folded.
    #[error("line {line} is {length} octets long; at most {MAX_LINE} are allowed")]
    LineTooLong {
        /// 1-based, counting every line of the message as received.
        line: usize,
        /// Without the line end.
        length: usize,
    },
}

/// Rewrites a message received over SMTP DATA (already dot-unstuffed after
/// CRLF) for the upstream:
///
/// - bare LF and bare CR end lines as CRLF does;
/// - header lines over 998 octets are folded, body lines wrapped or, with
///   `LongLines::Reject`, refused;
/// - Bcc, Resent-Bcc and `remove_headers` fields are removed;
/// - From is rewritten per `from_policy`, or added when missing;
/// - Received is added first, Date and Message-ID last when missing.
///
/// A line that is not a header field ends the header section, and an empty
/// line is inserted before it. The result ends in CRLF; an empty message
/// becomes our header fields alone.
pub fn rewrite(
    message: Vec<u8>,
    policy: &RewritePolicy,
    trace: &Trace,
) -> Result<Rewritten, RewriteError> {
    let mut lines = InputLines::new(&message);
    let section = read_header_section(&mut lines);
    let (header, mut changes) = edit_header_section(&section.bytes, policy, trace);

    let mut new_header = Vec::with_capacity(header.len() + CRLF.len());
    let folded = write_header_section(&header, &mut new_header);
    // The empty line before a body stays, and is inserted where the header
    // section ended at a line that is not a header field: without it, that
    // line would join our fields.
    if section.closed_by_empty_line || !lines.rest.is_empty() {
        new_header.extend_from_slice(CRLF);
    }
    if folded > 0 {
        changes.push(format!(
            "folded {} over {MAX_LINE} octets",
            plural(folded, "header line")
        ));
    }
    if lines.fixes.is_none() && is_clean_body(lines.rest) {
        // The usual case: only the header changes. Splicing it in place
        // keeps a 25 MiB message from existing twice in memory.
        let body_start = message.len() - lines.rest.len();
        let mut message = message;
        message.splice(..body_start, new_header);
        return Ok(Rewritten { message, changes });
    }

    let mut out = new_header;
    out.reserve(lines.rest.len() + 64);
    let wrapped = write_body(&mut lines, policy.long_lines, &mut out)?;
    if wrapped > 0 {
        changes.push(format!(
            "wrapped {} over {MAX_LINE} octets",
            plural(wrapped, "body line")
        ));
    }
    changes.extend(lines.fixes.notes());
    Ok(Rewritten {
        message: out,
        changes,
    })
}

/// The first address of the message's first From field, for routes that
/// match on it.
pub fn from_address(message: &[u8]) -> Option<String> {
    let section = read_header_section(&mut InputLines::new(message));
    let parsed = header::header_parser().parse_headers(&section.bytes)?;
    let from = parsed
        .headers()
        .iter()
        .find(|field| field.name == HeaderName::From)?;
    let address = from
        .value
        .as_address()?
        .iter()
        .find_map(|mailbox| mailbox.address())?;
    Some(address.to_string())
}

/// "1 line", "3 lines".
fn plural(count: usize, noun: &str) -> String {
    match count {
        1 => format!("1 {noun}"),
        _ => format!("{count} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    use mail_parser::DateTime;

    use super::header::{field_range, header_parser, received_field, value_range};
    use super::*;

    /// What `trace()` makes `rewrite` put first.
    const RECEIVED: &str = "Received: from pc.example ([192.0.2.7])\r\n\
        \tby relay.test (sendbridge) with ESMTPSA id s7;\r\n\
        \tTue, 14 Nov 2023 22:13:20 +0000\r\n";
    /// Fields that keep `rewrite` from adding Date and a random Message-ID,
    /// so the output can be compared exactly.
    const DATED: &str = "Date: Mon, 13 Nov 2023 09:00:00 +0100\r\nMessage-ID: <42@pc.example>\r\n";

    fn account() -> AccountConfig {
        AccountConfig {
            username: "me@gmail.com".to_string(),
            from_policy: FromPolicy::Rewrite,
            allowed_from: vec!["Alias@Gmail.com".to_string(), "@Example.ORG".to_string()],
            remove_headers: vec!["x-mailer".to_string()],
            ..AccountConfig::default()
        }
    }

    fn policy() -> RewritePolicy {
        RewritePolicy::new(&account(), "relay.test")
    }

    fn trace() -> Trace {
        Trace {
            helo: "pc.example".to_string(),
            client_ip: IpAddr::from([192, 0, 2, 7]),
            protocol: "ESMTPSA",
            session_id: "s7".to_string(),
            now_unix: 1_700_000_000,
        }
    }

    #[test]
    fn a_clean_body_has_crlf_line_ends_only_and_lines_within_the_limit() {
        let longest = format!("{}\r\n", "a".repeat(MAX_LINE));
        let too_long = format!("{}\r\n", "a".repeat(MAX_LINE + 1));
        let short_lines = "short\r\n".repeat(400);
        let longest_after = format!("{short_lines}{longest}{short_lines}");
        let too_long_after = format!("{short_lines}{too_long}{short_lines}");
        let table: [(&[u8], bool); 15] = [
            (b"", true),
            (b"\r\n", true),
            (b"one\r\ntwo\r\n", true),
            (longest.as_bytes(), true),
            (too_long.as_bytes(), false),
            (longest_after.as_bytes(), true),
            (too_long_after.as_bytes(), false),
            (b"\n", false),
            (b"\nlf first\r\n", false),
            (b"cr last\r", false),
            (b"no line end", false),
            (b"bare\nlf\r\n", false),
            (b"bare\rcr\r\n", false),
            (b"cr cr lf\r\r\n", false),
            (b"lf cr\n\r\r\n", false),
        ];
        for (body, clean) in table {
            assert_eq!(
                is_clean_body(body),
                clean,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn run(message: &[u8]) -> Rewritten {
        rewrite(message.to_vec(), &policy(), &trace()).unwrap()
    }

    /// Asserts the output is our Received field and then `expected`;
    /// returns the change notes.
    fn assert_rewritten(input: &str, expected: &str) -> Vec<String> {
        let rewritten = run(input.as_bytes());
        assert_eq!(
            String::from_utf8(rewritten.message).unwrap(),
            format!("{RECEIVED}{expected}")
        );
        rewritten.changes
    }

    /// Removes the generated Message-ID field from `output`, checking its
    /// form: 128 random bits in hex at our hostname.
    fn take_message_id(output: &mut String) -> String {
        let start = output.find("Message-ID: <").expect("a Message-ID field");
        let end = start + output[start..].find("\r\n").unwrap() + 2;
        let field: String = output.drain(start..end).collect();
        let id = field
            .strip_prefix("Message-ID: <")
            .and_then(|rest| rest.strip_suffix("@relay.test>\r\n"))
            .unwrap_or_else(|| panic!("unexpected {field:?}"));
        assert_eq!(id.len(), 32, "{field:?}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{field:?}");
        id.to_string()
    }

    /// Undoes folding: CRLF before whitespace is not part of a field.
    fn unfold(text: &str) -> String {
        text.replace("\r\n ", " ").replace("\r\n\t", "\t")
    }

    fn longest_line(message: &[u8]) -> usize {
        message
            .split(|&byte| byte == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn from_address_is_the_first_mailbox_of_the_first_from_field() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (b"From: a@b.example\r\n\r\nbody\r\n", Some("a@b.example")),
            (
                b"Subject: x\r\nFrom: \"B, C\" <b@c.example>, d@e.example\r\n\r\n",
                Some("b@c.example"),
            ),
            (
                b"From: (a@x.example) Name\r\n <n@y.example>\r\nFrom: z@z.example\r\n\r\n",
                Some("n@y.example"),
            ),
            (b"Subject: no from\r\n\r\nFrom: body@x.example\r\n", None),
            (b"From: undisclosed\r\n\r\n", None),
            (b"", None),
        ];
        for (message, expected) in cases {
            let from = from_address(message);
            assert_eq!(
                from.as_deref(),
                expected,
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn mail_parser_offsets_span_name_value_and_final_crlf() {
        let section: &[u8] = b"X-First: a\r\n b\r\nFrom: \"B\"\r\n\t<b@old.example>\r\n\
            Subject : R\xc3\xa4\xe4\r\nX-Last: z\r\n\tzz\r\n";
        let parsed = header_parser().parse_headers(section).unwrap();
        let split: Vec<[&[u8]; 2]> = parsed
            .headers()
            .iter()
            .map(|field| {
                let (name, value) = (field_range(field), value_range(field));
                [&section[name.start..value.start], &section[value]]
            })
            .collect();
        let expected: [[&[u8]; 2]; 4] = [
            [b"X-First:", b" a\r\n b\r\n"],
            [b"From:", b" \"B\"\r\n\t<b@old.example>\r\n"],
            [b"Subject :", b" R\xc3\xa4\xe4\r\n"],
            [b"X-Last:", b" z\r\n\tzz\r\n"],
        ];
        assert_eq!(split, expected);
        // The fields tile the section: each ends where the next begins.
        assert_eq!(split.concat().concat(), section);
    }

    #[test]
    fn removes_bcc_single_line_and_folded_first_and_last() {
        let changes = assert_rewritten(
            &format!(
                "Bcc: boss@example.com\r\nFrom: me@gmail.com\r\n{DATED}\
                 Resent-Bcc: a@example.com,\r\n b@example.com\r\nSubject: hi\r\n\
                 BCC: c@example.com,\r\n\td@example.com\r\n\r\nbody\r\n"
            ),
            &format!("From: me@gmail.com\r\n{DATED}Subject: hi\r\n\r\nbody\r\n"),
        );
        assert_eq!(
            changes,
            ["removed Bcc", "removed Resent-Bcc", "removed Bcc"]
        );
    }

    #[test]
    fn removes_configured_fields_whatever_their_case() {
        let changes = assert_rewritten(
            &format!(
                "X-Mailer: Invoicer 2.1\r\n\tbuild 7\r\nFrom: me@gmail.com\r\n{DATED}\
                 X-Mailer-Version: 2\r\nx-MAILER: again\r\n\r\nbody\r\n"
            ),
            &format!("From: me@gmail.com\r\n{DATED}X-Mailer-Version: 2\r\n\r\nbody\r\n"),
        );
        assert_eq!(changes, ["removed X-Mailer", "removed x-MAILER"]);
    }

    /// The output for a From of `from` that is rewritten to `rewritten`,
    /// with the original value in Reply-To.
    fn assert_from_rewritten(from: &str, rewritten: &str) {
        let changes = assert_rewritten(
            &format!("{from}\r\n{DATED}Subject: hi\r\n\r\nbody\r\n"),
            &format!(
                "{rewritten}\r\n{DATED}Subject: hi\r\nReply-To:{}\r\n\r\nbody\r\n",
                from.strip_prefix("From:").unwrap()
            ),
        );
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            changes[0].ends_with(" rewritten to me@gmail.com (original in Reply-To)"),
            "{changes:?}"
        );
    }

    #[test]
    fn from_rewrite_keeps_a_quoted_name() {
        assert_from_rewritten(
            "From: \"Billing Dept\" <billing@old.example>",
            "From: \"Billing Dept\" <me@gmail.com>",
        );
    }

    #[test]
    fn from_rewrite_keeps_an_encoded_word_name() {
        assert_from_rewritten(
            "From: =?UTF-8?Q?M=C3=BCller_GmbH?= <billing@old.example>",
            "From: =?UTF-8?Q?M=C3=BCller_GmbH?= <me@gmail.com>",
        );
    }

    #[test]
    fn from_rewrite_replaces_a_bare_address() {
        assert_from_rewritten(
            "From: billing@old.example (Billing)",
            "From: me@gmail.com (Billing)",
        );
    }

    #[test]
    fn from_rewrite_replaces_an_angle_address() {
        assert_from_rewritten("From:<billing@old.example>", "From:<me@gmail.com>");
    }

    #[test]
    fn from_rewrite_leaves_a_name_that_looks_like_the_address() {
        assert_from_rewritten(
            "From: \"billing@old.example (Billing <x>)\" <billing@old.example>",
            "From: \"billing@old.example (Billing <x>)\" <me@gmail.com>",
        );
    }

    #[test]
    fn from_rewrite_in_a_folded_field() {
        assert_from_rewritten(
            "From: \"Billing Dept\"\r\n <billing@old.example>",
            "From: \"Billing Dept\"\r\n <me@gmail.com>",
        );
    }

    #[test]
    fn from_rewrite_notes_the_original_address() {
        let changes = run(b"From: Billing <billing@old.example>\r\n\r\n").changes;
        assert_eq!(
            changes[0],
            "From billing@old.example rewritten to me@gmail.com (original in Reply-To)"
        );
    }

    #[test]
    fn allowed_from_is_left_alone() {
        for from in [
            "From: Alias <ALIAS@gmail.com>",
            "From: Me@Gmail.com",
            "From: \"Shop\" <orders@EXAMPLE.org>",
            "From: alias@gmail.com, shop@example.org",
        ] {
            let input = format!("{from}\r\n{DATED}\r\nbody\r\n");
            let changes = assert_rewritten(&input, &input);
            assert!(changes.is_empty(), "{from}: {changes:?}");
        }
    }

    #[test]
    fn a_subdomain_is_not_the_allowed_domain() {
        let changes = run(format!("From: x@shop.example.org\r\n{DATED}\r\n").as_bytes()).changes;
        assert_eq!(
            changes,
            ["From x@shop.example.org rewritten to me@gmail.com (original in Reply-To)"]
        );
    }

    #[test]
    fn from_rewrite_keeps_an_existing_reply_to() {
        let changes = assert_rewritten(
            &format!(
                "From: Billing <billing@old.example>\r\nReply-To: desk@old.example\r\n{DATED}\r\nbody\r\n"
            ),
            &format!(
                "From: Billing <me@gmail.com>\r\nReply-To: desk@old.example\r\n{DATED}\r\nbody\r\n"
            ),
        );
        assert_eq!(
            changes,
            ["From billing@old.example rewritten to me@gmail.com (existing Reply-To kept)"]
        );
    }

    #[test]
    fn a_removed_reply_to_does_not_count_as_existing() {
        let mut policy = policy();
        policy.remove_headers.push("reply-to".to_string());
        let input =
            format!("From: billing@old.example\r\nReply-To: desk@old.example\r\n{DATED}\r\n");
        let output = rewrite(input.as_bytes().to_vec(), &policy, &trace())
            .unwrap()
            .message;
        assert_eq!(
            String::from_utf8(output).unwrap(),
            format!("{RECEIVED}From: me@gmail.com\r\n{DATED}Reply-To: billing@old.example\r\n\r\n")
        );
    }

    #[test]
    fn several_from_addresses_become_the_sender() {
        let changes = assert_rewritten(
            &format!(
                "To: x@example.net\r\nFrom: shop@example.org,\r\n Billing <billing@old.example>\r\n{DATED}\r\nbody\r\n"
            ),
            &format!(
                "To: x@example.net\r\nFrom: me@gmail.com\r\n{DATED}\
                 Reply-To: shop@example.org,\r\n Billing <billing@old.example>\r\n\r\nbody\r\n"
            ),
        );
        assert_eq!(
            changes,
            [
                "From shop@example.org, billing@old.example rewritten to me@gmail.com (original in Reply-To)"
            ]
        );
    }

    #[test]
    fn a_from_without_an_address_becomes_the_sender() {
        let changes = assert_rewritten(
            &format!("From: Billing Dept\r\n{DATED}\r\n"),
            &format!("From: me@gmail.com\r\n{DATED}\r\n"),
        );
        assert_eq!(
            changes,
            ["From without an address rewritten to me@gmail.com (no address for Reply-To)"]
        );
    }

    #[test]
    fn a_missing_from_is_added_under_any_policy() {
        for from_policy in [FromPolicy::Keep, FromPolicy::Rewrite] {
            let policy = RewritePolicy {
                from_policy,
                ..policy()
            };
            let input = format!("Subject: hi\r\n{DATED}\r\nbody\r\n");
            let rewritten = rewrite(input.as_bytes().to_vec(), &policy, &trace()).unwrap();
            assert_eq!(
                String::from_utf8(rewritten.message).unwrap(),
                format!("{RECEIVED}Subject: hi\r\n{DATED}From: me@gmail.com\r\n\r\nbody\r\n")
            );
            assert_eq!(rewritten.changes, ["added From"]);
        }
    }

    #[test]
    fn keep_policy_leaves_any_from() {
        let policy = RewritePolicy {
            from_policy: FromPolicy::Keep,
            ..policy()
        };
        let input = format!("From: Billing <billing@old.example>\r\n{DATED}\r\nbody\r\n");
        let rewritten = rewrite(input.as_bytes().to_vec(), &policy, &trace()).unwrap();
        assert_eq!(
            String::from_utf8(rewritten.message).unwrap(),
            format!("{RECEIVED}{input}")
        );
        assert!(rewritten.changes.is_empty(), "{:?}", rewritten.changes);
    }

    #[test]
    fn eight_bit_header_bytes_survive_splicing() {
        let input: Vec<u8> = [
            &b"Subject: Rechnung f\xc3\xbcr M\xc3\xa4rz\r\n"[..],
            b"From: \"M\xfcller\" <billing@old.example>\r\n",
            b"Bcc: x@example.com\r\n",
            b"X-Note: caf\xe9\r\n",
            DATED.as_bytes(),
            b"\r\nbody\r\n",
        ]
        .concat();
        let expected: Vec<u8> = [
            RECEIVED.as_bytes(),
            b"Subject: Rechnung f\xc3\xbcr M\xc3\xa4rz\r\n",
            b"From: \"M\xfcller\" <me@gmail.com>\r\n",
            b"X-Note: caf\xe9\r\n",
            DATED.as_bytes(),
            b"Reply-To: \"M\xfcller\" <billing@old.example>\r\n",
            b"\r\nbody\r\n",
        ]
        .concat();
        assert_eq!(run(&input).message, expected);
    }

    #[test]
    fn body_bytes_are_copied_unchanged() {
        let body: Vec<u8> = [
            &b"Subject: looks like a header\r\n"[..],
            b"..stuffed twice, unstuffed once already\r\n",
            b"\xff\xfe 8-bit \x00 NUL \t tab\r\n",
            b"From the mbox separator\r\n",
            &[b'x'; MAX_LINE],
            b"\r\n\r\n",
        ]
        .concat();
        let input = [
            format!("Bcc: x@example.com\r\nFrom: billing@old.example\r\n{DATED}\r\n").as_bytes(),
            &body,
        ]
        .concat();
        let rewritten = run(&input);
        let (header, copied) = rewritten
            .message
            .split_at(rewritten.message.len() - body.len());
        assert_eq!(copied, body);
        assert!(header.ends_with(b"\r\n\r\n"));
        assert_eq!(
            rewritten.changes,
            [
                "removed Bcc",
                "From billing@old.example rewritten to me@gmail.com (original in Reply-To)"
            ]
        );
    }

    #[test]
    fn bare_line_ends_become_crlf_and_lose_client_dot_stuffing() {
        let changes = assert_rewritten(
            &format!("Subject: hi\nFrom: me@gmail.com\r\n{DATED}\n..a\n..b\r\n..c\r..d\r\n.e\nend"),
            &format!(
                "Subject: hi\r\nFrom: me@gmail.com\r\n{DATED}\r\n.a\r\n.b\r\n..c\r\n.d\r\n.e\r\nend\r\n"
            ),
        );
        assert_eq!(
            changes,
            [
                "converted 4 bare line feeds to CRLF",
                "converted 1 bare carriage return to CRLF",
                "removed dot-stuffing from 3 lines after bare line ends",
                "added CRLF after the last line",
            ]
        );
    }

    #[test]
    fn a_bare_cr_before_crlf_is_a_line_end_of_its_own() {
        assert_rewritten(
            &format!("From: me@gmail.com\r\n{DATED}\r\na\r\r\nb\r\n"),
            &format!("From: me@gmail.com\r\n{DATED}\r\na\r\n\r\nb\r\n"),
        );
    }

    #[test]
    fn a_long_subject_is_folded_before_whitespace() {
        let subject = format!("Subject:{}", " word".repeat(400));
        let rewritten =
            run(format!("{subject}\r\nFrom: me@gmail.com\r\n{DATED}\r\nbody\r\n").as_bytes());
        // Spaces sit at 8 + 5k: the last within 998 octets is at 998, then
        // 995 octets further.
        let folded = format!(
            "{}\r\n{}\r\n{}",
            &subject[..998],
            &subject[998..1993],
            &subject[1993..]
        );
        assert_eq!(
            String::from_utf8(rewritten.message).unwrap(),
            format!("{RECEIVED}{folded}\r\nFrom: me@gmail.com\r\n{DATED}\r\nbody\r\n")
        );
        assert_eq!(rewritten.changes, ["folded 1 header line over 998 octets"]);
    }

    #[test]
    fn a_long_header_without_whitespace_gets_crlf_space_at_the_limit() {
        let value = "a".repeat(1500);
        assert_rewritten(
            &format!("X-Long: {value}\r\nFrom: me@gmail.com\r\n{DATED}\r\n"),
            &format!(
                "X-Long:\r\n {}\r\n {}\r\nFrom: me@gmail.com\r\n{DATED}\r\n",
                &value[..997],
                &value[997..]
            ),
        );
    }

    #[test]
    fn a_fold_never_leaves_a_line_of_only_whitespace() {
        let value = "a".repeat(1500);
        assert_rewritten(
            &format!("X-Long: a\r\n  {value}\r\nFrom: me@gmail.com\r\n{DATED}\r\n"),
            &format!(
                "X-Long: a\r\n  {}\r\n {}\r\nFrom: me@gmail.com\r\n{DATED}\r\n",
                &value[..996],
                &value[996..]
            ),
        );
    }

    #[test]
    fn header_lines_lengthened_by_the_from_rewrite_are_folded() {
        // A From line of exactly 998 octets, one octet short of the sender.
        let from = |name: &str| format!("From: \"{name}\" <b@o.example>");
        let name = &"word ".repeat(200)[..MAX_LINE - from("").len()];
        let input = format!("{}\r\n{DATED}\r\n", from(name));
        let rewritten = run(input.as_bytes());
        assert!(longest_line(&rewritten.message) <= MAX_LINE);
        assert_eq!(
            unfold(&String::from_utf8(rewritten.message).unwrap()),
            unfold(&format!(
                "{RECEIVED}From: \"{name}\" <me@gmail.com>\r\n{DATED}Reply-To: \"{name}\" <b@o.example>\r\n\r\n"
            ))
        );
        assert_eq!(
            rewritten.changes[1..],
            ["folded 2 header lines over 998 octets"]
        );
    }

    #[test]
    fn long_body_lines_are_wrapped_with_crlf_space() {
        let (long, longer) = ("x".repeat(999), "y".repeat(2500));
        let exact = "z".repeat(MAX_LINE);
        let changes = assert_rewritten(
            &format!("From: me@gmail.com\r\n{DATED}\r\n{long}\r\n{exact}\r\n{longer}\r\n"),
            &format!(
                "From: me@gmail.com\r\n{DATED}\r\n{}\r\n x\r\n{exact}\r\n{}\r\n {}\r\n {}\r\n",
                &long[..998],
                &longer[..998],
                &longer[998..1995],
                &longer[1995..]
            ),
        );
        assert_eq!(changes, ["wrapped 2 body lines over 998 octets"]);
    }

    #[test]
    fn reject_refuses_a_long_body_line_naming_it() {
        let policy = RewritePolicy {
            long_lines: LongLines::Reject,
            ..policy()
        };
        // Line 7, counting the bare line ends.
        let input = format!(
            "Subject: hi\nFrom: me@gmail.com\r\n{DATED}\r\nok\r{}\r\n",
            "x".repeat(1200)
        );
        let err = rewrite(input.as_bytes().to_vec(), &policy, &trace()).unwrap_err();
        assert!(matches!(
            err,
            RewriteError::LineTooLong {
                line: 7,
                length: 1200
            }
        ));
        assert_eq!(
            err.to_string(),
            "line 7 is 1200 octets long; at most 998 are allowed"
        );
    }

    #[test]
    fn reject_still_folds_long_header_lines() {
        let policy = RewritePolicy {
            long_lines: LongLines::Reject,
            ..policy()
        };
        let input = format!(
            "Subject:{}\r\nFrom: me@gmail.com\r\n{DATED}\r\nbody\r\n",
            " word".repeat(400)
        );
        let rewritten = rewrite(input.as_bytes().to_vec(), &policy, &trace()).unwrap();
        assert!(longest_line(&rewritten.message) <= MAX_LINE);
        assert_eq!(rewritten.changes, ["folded 1 header line over 998 octets"]);
    }

    #[test]
    fn an_empty_message_gets_our_fields_only() {
        let rewritten = run(b"");
        let mut output = String::from_utf8(rewritten.message).unwrap();
        take_message_id(&mut output);
        assert_eq!(
            output,
            format!("{RECEIVED}From: me@gmail.com\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n")
        );
        assert_eq!(
            rewritten.changes,
            ["added From", "added Date", "added Message-ID"]
        );
    }

    #[test]
    fn a_header_only_message_gets_no_empty_line() {
        assert_rewritten(
            &format!("From: me@gmail.com\r\n{DATED}Subject: hi"),
            &format!("From: me@gmail.com\r\n{DATED}Subject: hi\r\n"),
        );
    }

    #[test]
    fn a_message_without_header_section_gets_an_empty_line_after_our_fields() {
        for body in [
            "Hello,\r\nSubject: not a header here\r\n",
            "From sender@example.com Mon Nov 13 09:00:00 2023\r\nHello\r\n",
            " indented\r\n",
            "\r\nafter an empty line\r\n",
        ] {
            let mut output = String::from_utf8(run(body.as_bytes()).message).unwrap();
            take_message_id(&mut output);
            let body = body.strip_prefix("\r\n").unwrap_or(body);
            assert_eq!(
                output,
                format!(
                    "{RECEIVED}From: me@gmail.com\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n{body}"
                )
            );
        }
    }

    #[test]
    fn a_line_that_is_no_field_ends_the_header_section() {
        assert_rewritten(
            &format!("From: me@gmail.com\r\n{DATED}no colon here\r\nX-Later: body\r\n"),
            &format!("From: me@gmail.com\r\n{DATED}\r\nno colon here\r\nX-Later: body\r\n"),
        );
    }

    #[test]
    fn date_and_message_id_are_kept_whatever_their_case() {
        let input = "DATE: Mon, 13 Nov 2023 09:00:00 +0100\r\nmessage-id: <1@pc.example>\r\nFrom: me@gmail.com\r\n\r\nbody\r\n";
        let changes = assert_rewritten(input, input);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn added_date_is_now_and_message_ids_differ() {
        let message = b"From: me@gmail.com\r\n\r\nbody\r\n";
        let mut first = String::from_utf8(run(message).message).unwrap();
        let mut second = String::from_utf8(run(message).message).unwrap();
        assert_ne!(take_message_id(&mut first), take_message_id(&mut second));
        assert_eq!(
            first,
            format!(
                "{RECEIVED}From: me@gmail.com\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nbody\r\n"
            )
        );
        let date = DateTime::parse_rfc822("Tue, 14 Nov 2023 22:13:20 +0000").unwrap();
        assert_eq!(date.to_timestamp(), 1_700_000_000);
    }

    #[test]
    fn received_names_ipv6_clients_and_tames_the_helo() {
        let policy = policy();
        let v6 = Trace {
            helo: "evil\r\nBcc: x@y ü".to_string(),
            client_ip: "2001:db8::7".parse().unwrap(),
            protocol: "ESMTPS",
            ..trace()
        };
        assert_eq!(
            received_field(&policy, &v6),
            "Received: from evil??Bcc:?x@y?? ([IPv6:2001:db8::7])\r\n\
             \tby relay.test (sendbridge) with ESMTPS id s7;\r\n\
             \tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        );
        let mapped = Trace {
            client_ip: "::ffff:192.0.2.7".parse().unwrap(),
            ..trace()
        };
        assert_eq!(received_field(&policy, &mapped), RECEIVED);
    }

    #[test]
    fn policy_lower_cases_and_always_allows_sender_and_username() {
        let account = AccountConfig {
            sender: Some("Relay@Gmail.com".to_string()),
            ..account()
        };
        let policy = RewritePolicy::new(&account, "relay.test");
        assert_eq!(policy.sender, "Relay@Gmail.com");
        assert_eq!(
            policy.allowed_from,
            [
                "alias@gmail.com",
                "@example.org",
                "relay@gmail.com",
                "me@gmail.com"
            ]
        );
        assert_eq!(policy.remove_headers, ["x-mailer"]);
        assert!(policy.allows("RELAY@gmail.com"));
        assert!(policy.allows("ME@GMAIL.COM"));
        assert!(policy.allows("anyone@example.ORG"));
        assert!(!policy.allows("anyone@example.org.evil"));
        assert!(!policy.allows("example.org"));
    }

    #[test]
    fn a_large_body_is_copied_in_one_pass() {
        let line = format!("{}abcdef\r\n", "0123456789".repeat(7));
        let body = line.repeat(5 * 1024 * 1024 / line.len());
        let header = format!("From: me@gmail.com\r\n{DATED}");
        let rewritten = run(format!("{header}Bcc: x@example.com\r\n\r\n{body}").as_bytes());
        assert!(rewritten.message == format!("{RECEIVED}{header}\r\n{body}").as_bytes());
    }

    #[test]
    fn a_large_body_with_bare_line_feeds_is_converted_in_one_pass() {
        let line = format!("{}abcdef", "0123456789".repeat(7));
        let count = 5 * 1024 * 1024 / (line.len() + 1);
        let header = format!("From: me@gmail.com\r\n{DATED}\r\n");
        let rewritten = run(format!("{header}{}", format!("{line}\n").repeat(count)).as_bytes());
        assert!(
            rewritten.message
                == format!("{RECEIVED}{header}{}", format!("{line}\r\n").repeat(count)).as_bytes()
        );
        assert_eq!(
            rewritten.changes,
            [format!("converted {count} bare line feeds to CRLF")]
        );
    }

    #[test]
    fn a_clean_body_stays_in_the_buffer_it_came_in() {
        let body = "line\r\n".repeat(100_000);
        let mut input = Vec::with_capacity(body.len() + 4096);
        input.extend_from_slice(b"Subject: big\r\n\r\n");
        input.extend_from_slice(body.as_bytes());
        let buffer = input.as_ptr();

        let output = rewrite(input, &policy(), &trace()).unwrap().message;

        assert_eq!(output.as_ptr(), buffer, "no second copy of the message");
        assert!(output.ends_with(body.as_bytes()));
    }
}
