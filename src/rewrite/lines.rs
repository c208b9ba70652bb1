//! Lines as SMTP delivers them and as providers want them: the input split
//! at CRLF, bare LF and bare CR (with the fixes noted), and lines written
//! back with CRLF within 998 octets, header lines folded and body lines
//! wrapped.

use crate::config::LongLines;

use super::{RewriteError, plural};

/// RFC 5322 section 2.1.1: at most 998 octets per line, CRLF excluded.
pub(super) const MAX_LINE: usize = 998;
pub(super) const CRLF: &[u8] = b"\r\n";
/// A break inserted where no whitespace was: the space makes the next line
/// a continuation, as Postfix's smtp_line_length_limit does.
pub(super) const CRLF_SP: &[u8] = b"\r\n ";

/// A body that goes out as it is: CRLF line ends only, lines within the
/// limit, ending in CRLF (or empty).
pub(super) fn is_clean_body(body: &[u8]) -> bool {
    (body.is_empty() || body.ends_with(CRLF)) && !has_bare_line_ends(body) && lines_fit(body)
}

/// A CR not followed by LF, or an LF not after a CR. One branch-free pass
/// the compiler vectorizes: finding each line end with memchr cost a call
/// per line, about a twentieth of the relay's CPU time for 1 MiB messages
/// of 78-character lines.
fn has_bare_line_ends(body: &[u8]) -> bool {
    let pairs = body.iter().zip(body.iter().skip(1));
    body.first() == Some(&b'\n')
        || pairs.fold(false, |bare, (&a, &b)| {
            bare | ((a == b'\r') != (b == b'\n'))
        })
}

/// Every line of a body with CRLF line ends only is at most `MAX_LINE`
/// octets long: from each line start, the last LF within reach of the
/// longest allowed line is found with one memrchr per ~1000 bytes, not one
/// search per line.
fn lines_fit(body: &[u8]) -> bool {
    let reach = MAX_LINE + CRLF.len();
    let mut line_start = 0;
    while line_start < body.len() {
        let window = &body[line_start..body.len().min(line_start + reach)];
        match memchr::memrchr(b'\n', window) {
            Some(lf) => line_start += lf + 1,
            None => return false,
        }
    }
    true
}

/// One line of the input, without its line end.
pub(super) struct Line<'a> {
    /// 1-based, counting bare LF and bare CR as line ends too.
    pub(super) number: usize,
    pub(super) text: &'a [u8],
}

/// The input split at CRLF, bare LF and bare CR, which all end a line
/// (Postfix's `smtpd_forbid_bare_newline = normalize`).
#[derive(Clone)]
pub(super) struct InputLines<'a> {
    pub(super) rest: &'a [u8],
    number: usize,
    /// The previous line ended in a bare LF or CR.
    after_bare_end: bool,
    pub(super) fixes: LineEndFixes,
}

/// What had to be done to the line ends, for the change notes.
#[derive(Clone, Default)]
pub(super) struct LineEndFixes {
    bare_lf: usize,
    bare_cr: usize,
    unstuffed: usize,
    unterminated: bool,
}

impl<'a> InputLines<'a> {
    pub(super) fn new(message: &'a [u8]) -> Self {
        InputLines {
            rest: message,
            number: 0,
            after_bare_end: false,
            fixes: LineEndFixes::default(),
        }
    }

    /// The next line if `accept` takes it; otherwise it stays unread.
    pub(super) fn next_if(&mut self, accept: impl FnOnce(&Line) -> bool) -> Option<Line<'a>> {
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
    pub(super) fn is_none(&self) -> bool {
        self.bare_lf == 0 && self.bare_cr == 0 && self.unstuffed == 0 && !self.unterminated
    }

    pub(super) fn notes(&self) -> impl Iterator<Item = String> {
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

pub(super) fn is_wsp(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// Writes the header section, folding lines over the limit; returns how
/// many had to be folded. Folding last also catches lines our edits made
/// longer (a longer sender, "Reply-To:" in place of "From:").
pub(super) fn write_header_section(section: &[u8], out: &mut Vec<u8>) -> usize {
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
pub(super) fn write_body(
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
pub(super) enum Break {
    /// Header fields: before whitespace where there is some, which folding
    /// whitespace allows without changing the field.
    Fold,
    /// Body: with CRLF SP at the limit, as Postfix does.
    Wrap,
}

/// Writes `line` and CRLF, broken into lines of at most `MAX_LINE` octets;
/// returns whether it had to be broken.
pub(super) fn write_line(mut rest: &[u8], how: Break, out: &mut Vec<u8>) -> bool {
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
pub(super) fn fold_point(line: &[u8], room: usize) -> Option<usize> {
    // Only the part that fits is searched: a whitespace-only line must not
    // be scanned to its end once per fold.
    let first_text = line[..room].iter().position(|&byte| !is_wsp(byte))?;
    (first_text + 1..=room).rev().find(|&at| is_wsp(line[at]))
}
