//! The header section: read as fields up to the first line that is not
//! one, then edited by splicing at mail-parser's offsets (removals, the
//! From policy, our Received, a missing Date and Message-ID).

use std::net::IpAddr;
use std::ops::Range;

use mail_parser::{DateTime, Header, HeaderName, MessageParser};

use crate::config::FromPolicy;

use super::lines::{CRLF, InputLines, is_wsp};
use super::{RewritePolicy, Trace};

/// The header section as received, with CRLF line ends.
pub(super) struct HeaderSection {
    pub(super) bytes: Vec<u8>,
    /// Otherwise it ended with the input, or at a line that is not a header
    /// field, which then is the first line of the body.
    pub(super) closed_by_empty_line: bool,
}

/// Reads header fields and their continuation lines. mail-parser would skip
/// a line that is not a header field and read on; we end the section there
/// instead, as Postfix does, so the parser only ever sees fields.
pub(super) fn read_header_section(lines: &mut InputLines) -> HeaderSection {
    let mut bytes = Vec::new();
    while let Some(line) = lines.next_if(|line| {
        is_field_start(line.text) || (!bytes.is_empty() && is_continuation(line.text))
    }) {
        bytes.extend_from_slice(line.text);
        bytes.extend_from_slice(CRLF);
    }
    let closed_by_empty_line = lines.next_if(|line| line.text.is_empty()).is_some();
    HeaderSection {
        bytes,
        closed_by_empty_line,
    }
}

/// `name:` with a name of printable ASCII (RFC 5322 ftext), allowing the
/// obsolete whitespace before the colon that mail-parser accepts too.
pub(super) fn is_field_start(line: &[u8]) -> bool {
    let name_len = line
        .iter()
        .take_while(|&&byte| byte.is_ascii_graphic() && byte != b':')
        .count();
    name_len > 0 && line[name_len..].iter().find(|&&byte| !is_wsp(byte)) == Some(&b':')
}

pub(super) fn is_continuation(line: &[u8]) -> bool {
    line.first().copied().is_some_and(is_wsp)
}

/// The new header section: Received first, then the original fields with
/// removals and the From rewrite spliced in, then the fields added.
pub(super) fn edit_header_section(
    section: &[u8],
    policy: &RewritePolicy,
    trace: &Trace,
) -> (Vec<u8>, Vec<String>) {
    let parsed = header_parser().parse_headers(section);
    let fields = parsed.as_ref().map_or(&[][..], |message| message.headers());
    let mut edits = HeaderEdits::default();
    let kept = remove_fields(fields, policy, &mut edits);
    apply_from_policy(section, &kept, policy, &mut edits);
    add_date_and_message_id(&kept, policy, trace, &mut edits);

    let mut header = received_field(policy, trace).into_bytes();
    let notes = edits.apply(section, &mut header);
    (header, notes)
}

/// Only From's value is needed parsed; every other field is read raw, the
/// simplest value parser, which reliably ends at the field's last line end.
pub(super) fn header_parser() -> MessageParser {
    MessageParser::new().header_address(HeaderName::From)
}

/// The whole field: name, colon, value, continuation lines and final CRLF
/// (mail-parser's `offset_field..offset_end`).
pub(super) fn field_range(field: &Header) -> Range<usize> {
    field.offset_field as usize..field.offset_end as usize
}

/// Everything after the colon, continuation lines and final CRLF included
/// (mail-parser's `offset_start..offset_end`).
pub(super) fn value_range(field: &Header) -> Range<usize> {
    field.offset_start as usize..field.offset_end as usize
}

pub(super) fn has_field(fields: &[&Header], name: HeaderName) -> bool {
    fields.iter().any(|field| field.name == name)
}

/// Changes to the header section, collected first so the section is
/// written once, in order.
#[derive(Default)]
pub(super) struct HeaderEdits {
    /// Byte ranges of the section, not overlapping, and their replacements.
    splices: Vec<(Range<usize>, Vec<u8>)>,
    /// Whole fields, CRLF included, added after the last original field.
    appended: Vec<u8>,
    notes: Vec<String>,
}

impl HeaderEdits {
    fn replace(&mut self, range: Range<usize>, with: impl Into<Vec<u8>>) {
        self.splices.push((range, with.into()));
    }

    fn append(&mut self, field: impl AsRef<[u8]>) {
        self.appended.extend_from_slice(field.as_ref());
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Writes `section` with the edits made; returns the notes.
    fn apply(mut self, section: &[u8], out: &mut Vec<u8>) -> Vec<String> {
        self.splices.sort_by_key(|(range, _)| range.start);
        let mut copied = 0;
        for (range, with) in &self.splices {
            out.extend_from_slice(&section[copied..range.start]);
            out.extend_from_slice(with);
            copied = range.end;
        }
        out.extend_from_slice(&section[copied..]);
        out.extend_from_slice(&self.appended);
        self.notes
    }
}

/// Removes the fields the policy removes; returns the fields kept, which
/// the later rules look at (a removed Reply-To or Date no longer counts).
pub(super) fn remove_fields<'h, 'x>(
    fields: &'h [Header<'x>],
    policy: &RewritePolicy,
    edits: &mut HeaderEdits,
) -> Vec<&'h Header<'x>> {
    let (removed, kept): (Vec<_>, Vec<_>) =
        fields.iter().partition(|field| policy.removes(&field.name));
    for field in removed {
        edits.replace(field_range(field), []);
        edits.note(format!("removed {}", field.name.as_str()));
    }
    kept
}

/// Makes the first From one the provider accepts (`FromPolicy::Rewrite`);
/// a message with several From fields breaks RFC 5322 and is refused
/// upstream anyway. A message without From gets the sender under any
/// policy, since Gmail refuses mail without one.
pub(super) fn apply_from_policy(
    section: &[u8],
    kept: &[&Header],
    policy: &RewritePolicy,
    edits: &mut HeaderEdits,
) {
    let Some(from) = kept.iter().find(|field| field.name == HeaderName::From) else {
        edits.append(format!("From: {}\r\n", policy.sender));
        edits.note("added From".to_string());
        return;
    };
    let addresses: Vec<&str> = from
        .value
        .as_address()
        .map(|list| list.iter().filter_map(|addr| addr.address()).collect())
        .unwrap_or_default();
    let allowed = !addresses.is_empty() && addresses.iter().all(|a| policy.allows(a));
    if policy.from_policy == FromPolicy::Keep || allowed {
        return;
    }
    match single_address_range(section, from) {
        Some(address) => edits.replace(address, policy.sender.as_bytes()),
        None => edits.replace(field_range(from), format!("From: {}\r\n", policy.sender)),
    }
    // Replies should still reach whoever the program wrote as From.
    let reply_to = if has_field(kept, HeaderName::ReplyTo) {
        "existing Reply-To kept"
    } else if addresses.is_empty() {
        "no address for Reply-To"
    } else {
        edits.append([b"Reply-To:", &section[value_range(from)]].concat());
        "original in Reply-To"
    };
    let original = if addresses.is_empty() {
        "without an address".to_string()
    } else {
        addresses.join(", ")
    };
    edits.note(format!(
        "From {original} rewritten to {} ({reply_to})",
        policy.sender
    ));
}

/// Where the address of a From with exactly one mailbox sits in the
/// section, so it can be replaced keeping the display name as it was.
pub(super) fn single_address_range(section: &[u8], from: &Header) -> Option<Range<usize>> {
    let [mailbox] = from.value.as_address()?.as_list()? else {
        return None;
    };
    mailbox.address()?;
    let value = value_range(from);
    let address = address_range(&section[value.clone()])?;
    Some(value.start + address.start..value.start + address.end)
}

/// The address in a one-mailbox value: between the angle brackets of
/// `name <addr>`, else the bare `addr` (the value without comments and
/// surrounding whitespace). Quoted strings and comments are skipped, so a
/// display name that looks like an address is not taken for it.
pub(super) fn address_range(value: &[u8]) -> Option<Range<usize>> {
    let mut bare: Option<Range<usize>> = None;
    let mut angle_start = None;
    let mut quoted = false;
    let mut comment_depth = 0usize;
    let mut bytes = value.iter().enumerate();
    while let Some((at, &byte)) = bytes.next() {
        let in_comment = comment_depth > 0;
        match byte {
            b'\\' if quoted || in_comment => {
                bytes.next();
            }
            b'"' if !in_comment => quoted = !quoted,
            b'(' if !quoted => comment_depth += 1,
            b')' if in_comment => comment_depth -= 1,
            b'<' if !quoted && !in_comment => angle_start = Some(at + 1),
            b'>' if !quoted && !in_comment => return angle_start.map(|start| start..at),
            _ => {}
        }
        if !in_comment && comment_depth == 0 && !byte.is_ascii_whitespace() {
            let start = bare.map_or(at, |bare| bare.start);
            bare = Some(start..at + 1);
        }
    }
    // An unclosed `<` is not an address we can place.
    match angle_start {
        Some(_) => None,
        None => bare,
    }
}

/// RFC 5322 requires both; providers refuse or penalise mail without them.
pub(super) fn add_date_and_message_id(
    kept: &[&Header],
    policy: &RewritePolicy,
    trace: &Trace,
    edits: &mut HeaderEdits,
) {
    if !has_field(kept, HeaderName::Date) {
        edits.append(format!("Date: {}\r\n", rfc822_date(trace.now_unix)));
        edits.note("added Date".to_string());
    }
    if !has_field(kept, HeaderName::MessageId) {
        // 128 random bits: unique without coordination between relays.
        let id = rand::random::<u128>();
        edits.append(format!("Message-ID: <{id:032x}@{}>\r\n", policy.hostname));
        edits.note("added Message-ID".to_string());
    }
}

/// Our trace field (RFC 5321 section 4.4), folded as Postfix folds it.
/// There is no `for <recipient>`: every recipient sees the field, and it
/// would tell them who else got the message.
pub(super) fn received_field(policy: &RewritePolicy, trace: &Trace) -> String {
    format!(
        "Received: from {} ({})\r\n\tby {} (sendbridge) with {} id {};\r\n\t{}\r\n",
        printable(&trace.helo),
        address_literal(trace.client_ip),
        policy.hostname,
        trace.protocol,
        trace.session_id,
        rfc822_date(trace.now_unix),
    )
}

/// The client chose the HELO name: anything but printable ASCII becomes
/// `?`, so it cannot end the field or smuggle in another.
pub(super) fn printable(helo: &str) -> String {
    helo.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// RFC 5321 section 4.1.3 address literal.
pub(super) fn address_literal(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(ip) => format!("[{ip}]"),
        IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
    }
}

/// E.g. "Tue, 14 Nov 2023 22:13:20 +0000".
pub(super) fn rfc822_date(unix: i64) -> String {
    DateTime::from_timestamp(unix).to_rfc822()
}
