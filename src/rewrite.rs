//! What a message needs before it goes upstream: a provider such as Gmail
//! wants CRLF line ends, lines within 998 octets, a From the account may
//! send as, a Date and a Message-ID, and must not see Bcc or the fields an
//! account asks to drop. We add our Received field for the trail.
//!
//! A pure function on raw bytes. Header fields are spliced at the offsets
//! mail-parser reports and never re-serialised, and the body is copied line
//! by line, so 8-bit header bytes and every untouched byte survive as the
//! client sent them.

use std::net::IpAddr;
use std::ops::Range;

use mail_parser::{DateTime, Header, HeaderName, MessageParser};

use crate::config::{AccountConfig, FromPolicy, LongLines};

/// RFC 5322 section 2.1.1: at most 998 octets per line, CRLF excluded.
const MAX_LINE: usize = 998;
const CRLF: &[u8] = b"\r\n";
/// A break inserted where no whitespace was: the space makes the next line
/// a continuation, as Postfix's smtp_line_length_limit does.
const CRLF_SP: &[u8] = b"\r\n ";

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

/// A body that goes out as it is: CRLF line ends only, lines within the
/// limit, ending in CRLF (or empty).
fn is_clean_body(body: &[u8]) -> bool {
    if !(body.is_empty() || body.ends_with(CRLF)) {
        return false;
    }
    let mut line_start = 0;
    for (at, &byte) in body.iter().enumerate() {
        match byte {
            b'\r' if body.get(at + 1) != Some(&b'\n') => return false,
            b'\n' => {
                let ends_crlf = at > 0 && body[at - 1] == b'\r';
                if !ends_crlf || at - 1 - line_start > MAX_LINE {
                    return false;
                }
                line_start = at + 1;
            }
            _ => {}
        }
    }
    true
}

/// One line of the input, without its line end.
struct Line<'a> {
    /// 1-based, counting bare LF and bare CR as line ends too.
    number: usize,
    text: &'a [u8],
}

/// The input split at CRLF, bare LF and bare CR, which all end a line
/// (Postfix's `smtpd_forbid_bare_newline = normalize`).
#[derive(Clone)]
struct InputLines<'a> {
    rest: &'a [u8],
    number: usize,
    /// The previous line ended in a bare LF or CR.
    after_bare_end: bool,
    fixes: LineEndFixes,
}

/// What had to be done to the line ends, for the change notes.
#[derive(Clone, Default)]
struct LineEndFixes {
    bare_lf: usize,
    bare_cr: usize,
    unstuffed: usize,
    unterminated: bool,
}

impl<'a> InputLines<'a> {
    fn new(message: &'a [u8]) -> Self {
        InputLines {
            rest: message,
            number: 0,
            after_bare_end: false,
            fixes: LineEndFixes::default(),
        }
    }

    /// The next line if `accept` takes it; otherwise it stays unread.
    fn next_if(&mut self, accept: impl FnOnce(&Line) -> bool) -> Option<Line<'a>> {
        let mut ahead = self.clone();
        let line = ahead.next().filter(accept)?;
        *self = ahead;
        Some(line)
    }
}

impl<'a> Iterator for InputLines<'a> {
    type Item = Line<'a>;

    fn next(&mut self) -> Option<Line<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let end = self
            .rest
            .iter()
            .position(|&byte| byte == b'\n' || byte == b'\r')
            .unwrap_or(self.rest.len());
        let (mut text, rest) = self.rest.split_at(end);
        let end_len = match rest {
            [b'\r', b'\n', ..] => 2,
            [b'\r', ..] => {
                self.fixes.bare_cr += 1;
                1
            }
            [b'\n', ..] => {
                self.fixes.bare_lf += 1;
                1
            }
            _ => {
                self.fixes.unterminated = true;
                0
            }
        };
        // The client dot-stuffed this line too, but the server only
        // unstuffed lines after CRLF.
        if self.after_bare_end && text.starts_with(b"..") {
            text = &text[1..];
            self.fixes.unstuffed += 1;
        }
        self.after_bare_end = end_len == 1;
        self.rest = &rest[end_len..];
        self.number += 1;
        Some(Line {
            number: self.number,
            text,
        })
    }
}

impl LineEndFixes {
    fn is_none(&self) -> bool {
        self.bare_lf == 0 && self.bare_cr == 0 && self.unstuffed == 0 && !self.unterminated
    }

    fn notes(&self) -> impl Iterator<Item = String> {
        [
            (self.bare_lf > 0).then(|| {
                format!(
                    "converted {} to CRLF",
                    plural(self.bare_lf, "bare line feed")
                )
            }),
            (self.bare_cr > 0).then(|| {
                format!(
                    "converted {} to CRLF",
                    plural(self.bare_cr, "bare carriage return")
                )
            }),
            (self.unstuffed > 0).then(|| {
                format!(
                    "removed dot-stuffing from {} after bare line ends",
                    plural(self.unstuffed, "line")
                )
            }),
            self.unterminated
                .then(|| "added CRLF after the last line".to_string()),
        ]
        .into_iter()
        .flatten()
    }
}

/// The header section as received, with CRLF line ends.
struct HeaderSection {
    bytes: Vec<u8>,
    /// Otherwise it ended with the input, or at a line that is not a header
    /// field, which then is the first line of the body.
    closed_by_empty_line: bool,
}

/// Reads header fields and their continuation lines. mail-parser would skip
/// a line that is not a header field and read on; we end the section there
/// instead, as Postfix does, so the parser only ever sees fields.
fn read_header_section(lines: &mut InputLines) -> HeaderSection {
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
fn is_field_start(line: &[u8]) -> bool {
    let name_len = line
        .iter()
        .take_while(|&&byte| byte.is_ascii_graphic() && byte != b':')
        .count();
    name_len > 0 && line[name_len..].iter().find(|&&byte| !is_wsp(byte)) == Some(&b':')
}

fn is_continuation(line: &[u8]) -> bool {
    line.first().copied().is_some_and(is_wsp)
}

fn is_wsp(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// The new header section: Received first, then the original fields with
/// removals and the From rewrite spliced in, then the fields added.
fn edit_header_section(
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
fn header_parser() -> MessageParser {
    MessageParser::new().header_address(HeaderName::From)
}

/// The whole field: name, colon, value, continuation lines and final CRLF
/// (mail-parser's `offset_field..offset_end`).
fn field_range(field: &Header) -> Range<usize> {
    field.offset_field as usize..field.offset_end as usize
}

/// Everything after the colon, continuation lines and final CRLF included
/// (mail-parser's `offset_start..offset_end`).
fn value_range(field: &Header) -> Range<usize> {
    field.offset_start as usize..field.offset_end as usize
}

fn has_field(fields: &[&Header], name: HeaderName) -> bool {
    fields.iter().any(|field| field.name == name)
}

/// Changes to the header section, collected first so the section is
/// written once, in order.
#[derive(Default)]
struct HeaderEdits {
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
fn remove_fields<'h, 'x>(
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
fn apply_from_policy(
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
fn single_address_range(section: &[u8], from: &Header) -> Option<Range<usize>> {
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
fn address_range(value: &[u8]) -> Option<Range<usize>> {
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
fn add_date_and_message_id(
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
fn received_field(policy: &RewritePolicy, trace: &Trace) -> String {
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
fn printable(helo: &str) -> String {
    helo.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// RFC 5321 section 4.1.3 address literal.
fn address_literal(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(ip) => format!("[{ip}]"),
        IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
    }
}

/// E.g. "Tue, 14 Nov 2023 22:13:20 +0000".
fn rfc822_date(unix: i64) -> String {
    DateTime::from_timestamp(unix).to_rfc822()
}

/// Writes the header section, folding lines over the limit; returns how
/// many had to be folded. Folding last also catches lines our edits made
/// longer (a longer sender, "Reply-To:" in place of "From:").
fn write_header_section(section: &[u8], out: &mut Vec<u8>) -> usize {
    let mut folded = 0;
    for line in section.split_inclusive(|&byte| byte == b'\n') {
        let text = line.strip_suffix(CRLF).unwrap_or(line);
        if write_line(text, Break::Fold, out) {
            folded += 1;
        }
    }
    folded
}

/// Copies the body lines with CRLF ends, wrapping or refusing long ones;
/// returns how many were wrapped.
fn write_body(
    lines: &mut InputLines,
    long_lines: LongLines,
    out: &mut Vec<u8>,
) -> Result<usize, RewriteError> {
    let mut wrapped = 0;
    for line in lines {
        if line.text.len() > MAX_LINE && long_lines == LongLines::Reject {
            return Err(RewriteError::LineTooLong {
                line: line.number,
                length: line.text.len(),
            });
        }
        if write_line(line.text, Break::Wrap, out) {
            wrapped += 1;
        }
    }
    Ok(wrapped)
}

/// How a line over the limit is broken.
#[derive(Clone, Copy)]
enum Break {
    /// Header fields: before whitespace where there is some, which folding
    /// whitespace allows without changing the field.
    Fold,
    /// Body: with CRLF SP at the limit, as Postfix does.
    Wrap,
}

/// Writes `line` and CRLF, broken into lines of at most `MAX_LINE` octets;
/// returns whether it had to be broken.
fn write_line(mut rest: &[u8], how: Break, out: &mut Vec<u8>) -> bool {
    let too_long = rest.len() > MAX_LINE;
    // Octets of `rest` the current output line takes: one less after an
    // inserted space.
    let mut room = MAX_LINE;
    while rest.len() > room {
        let whitespace = match how {
            Break::Fold => fold_point(rest, room),
            Break::Wrap => None,
        };
        match whitespace {
            Some(at) => {
                out.extend_from_slice(&rest[..at]);
                out.extend_from_slice(CRLF);
                rest = &rest[at..];
                room = MAX_LINE;
            }
            None => {
                out.extend_from_slice(&rest[..room]);
                out.extend_from_slice(CRLF_SP);
                rest = &rest[room..];
                room = MAX_LINE - 1;
            }
        }
    }
    out.extend_from_slice(rest);
    out.extend_from_slice(CRLF);
    too_long
}

/// The last whitespace in `line` with at most `room` octets before it and
/// some text before it: RFC 5322 forbids a folded line of only whitespace.
fn fold_point(line: &[u8], room: usize) -> Option<usize> {
    // Only the part that fits is searched: a whitespace-only line must not
    // be scanned to its end once per fold.
    let first_text = line[..room].iter().position(|&byte| !is_wsp(byte))?;
    (first_text + 1..=room).rev().find(|&at| is_wsp(line[at]))
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
