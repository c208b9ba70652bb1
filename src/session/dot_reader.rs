//! The message content after DATA: dot-unstuffing and end detection over
//! any split of the input.
//!
//! The end is CRLF "." CRLF. For a client whose DATA command itself ended in
//! a bare LF (an old device that writes LF everywhere), a "." line ended or
//! started by a bare LF ends the message too, as Postfix allows for its own
//! networks. A client that speaks CRLF never gets that leniency, so a bare
//! `\n.\n` inside what it relays (the SMTP smuggling pattern) stays content;
//! the rewrite turns it into CRLF, and the upstream sees the one message we
//! saw.

/// Where the reader stands in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line; `after_cr`: its last byte so far was CR.
    Text { after_cr: bool },
    /// At the start of a line; `bare`: the previous line ended in a bare LF.
    LineStart { bare: bool },
    /// After a "." that starts a line.
    Dot { bare: bool },
    /// After "." CR at the start of a line.
    DotCr { bare: bool },
    /// The terminator was read.
    Done { bare: bool },
}

/// Dot-unstuffing and end detection over any split of the input.
pub(super) struct DotReader {
    state: State,
    /// Bare LF line ends may end the message.
    lenient: bool,
}

impl DotReader {
    /// `command_end_bare`: the DATA command ended in a bare LF; its line end
    /// starts the first line, so a lone "." is an empty message.
    pub(super) fn new(command_end_bare: bool) -> Self {
        DotReader {
            state: State::LineStart {
                bare: command_end_bare,
            },
            lenient: command_end_bare,
        }
    }

    /// Appends the content in `input` to `out` (when given) and returns how
    /// many bytes of `input` it consumed: all of them, or up to and
    /// including the terminator.
    pub(super) fn read(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> usize {
        let mut emit = |bytes: &[u8]| {
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(bytes);
            }
        };
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            self.state = match self.state {
                State::Text { after_cr } => {
                    // The common case: only a line that starts with a dot
                    // needs a look, so everything up to the next such line
                    // (or the end of the input) is copied as one run.
                    // (An LF that ends the input may start one too.) Searching
                    // for LF "." as one needle skips the ordinary lines
                    // without stopping at each.
                    let rest = &input[at..];
                    let dot_line = memchr::memmem::find(rest, b"\n.")
                        .or_else(|| rest.ends_with(b"\n").then(|| rest.len() - 1));
                    let Some(lf) = dot_line else {
                        emit(rest);
                        self.state = State::Text {
                            after_cr: rest.last() == Some(&b'\r'),
                        };
                        return input.len();
                    };
                    emit(&rest[..=lf]);
                    let bare = match lf {
                        0 => !after_cr,
                        _ => rest[lf - 1] != b'\r',
                    };
                    at += lf;
                    State::LineStart { bare }
                }
                State::LineStart { bare } if byte == b'.' => State::Dot { bare },
                State::LineStart { .. } => {
                    self.state = State::Text { after_cr: false };
                    continue;
                }
                State::Dot { bare } if byte == b'\r' => State::DotCr { bare },
                State::Dot { .. } if byte == b'\n' && self.lenient => State::Done { bare: true },
                State::Dot { bare } => {
                    self.unstuff(bare, &mut emit);
                    self.state = State::Text { after_cr: false };
                    continue;
                }
                State::DotCr { bare } if byte == b'\n' && (!bare || self.lenient) => {
                    State::Done { bare }
                }
                State::DotCr { bare } => {
                    self.unstuff(bare, &mut emit);
                    emit(b"\r");
                    self.state = State::Text { after_cr: true };
                    continue;
                }
                State::Done { .. } => return at,
            };
            at += 1;
            if let State::Done { .. } = self.state {
                return at;
            }
        }
        at
    }

    /// A dot that starts a line and is not the terminator: after CRLF it
    /// was stuffed by the client and goes (RFC 5321 4.5.2). After a bare
    /// end it stays: the rewrite unstuffs those lines, counting them.
    fn unstuff(&self, bare: bool, emit: &mut impl FnMut(&[u8])) {
        if bare {
            emit(b".");
        }
    }

    /// `Some(bare)` once the terminator was read.
    pub(super) fn finished(&self) -> Option<bool> {
        match self.state {
            State::Done { bare } => Some(bare),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input, and the content, bare terminator and bytes used it should give.
    type Case = (&'static str, Option<(&'static str, bool, usize)>);

    /// The content and whether a bare terminator ended it, or None when the
    /// input did not end the message; fed one byte at a time too.
    fn read(input: &[u8], command_end_bare: bool) -> Option<(String, bool, usize)> {
        let whole = {
            let mut reader = DotReader::new(command_end_bare);
            let mut out = Vec::new();
            let used = reader.read(input, Some(&mut out));
            reader
                .finished()
                .map(|bare| (String::from_utf8(out).unwrap(), bare, used))
        };
        let mut reader = DotReader::new(command_end_bare);
        let mut out = Vec::new();
        let mut used = 0;
        for chunk in input.chunks(1) {
            used += reader.read(chunk, Some(&mut out));
            if reader.finished().is_some() {
                break;
            }
        }
        let bytewise = reader
            .finished()
            .map(|bare| (String::from_utf8(out).unwrap(), bare, used));
        assert_eq!(whole, bytewise, "split reads agree for {input:?}");
        whole
    }

    fn check(cases: &[Case], command_end_bare: bool) {
        for (input, expected) in cases {
            let expected = expected.map(|(text, bare, used)| (text.to_string(), bare, used));
            assert_eq!(
                read(input.as_bytes(), command_end_bare),
                expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn crlf_clients_end_only_at_crlf_dot_crlf() {
        let cases: &[Case] = &[
            ("a\r\n.\r\nQUIT\r\n", Some(("a\r\n", false, 6))),
            (".\r\n", Some(("", false, 3))),
            ("..x\r\n.x\r\n.\r\n", Some((".x\r\nx\r\n", false, 12))),
            // Smuggling patterns stay content.
            (
                "a\n.\nMAIL FROM:<x@y>\r\n.\r\n",
                Some(("a\n.\nMAIL FROM:<x@y>\r\n", false, 24)),
            ),
            ("a\r\n.\nb\r\n.\r\n", Some(("a\r\n\nb\r\n", false, 11))),
            ("a\n.\r\nb\r\n.\r\n", Some(("a\n.\r\nb\r\n", false, 11))),
            ("a\r.\r\nb\r\n.\r\n", Some(("a\r.\r\nb\r\n", false, 11))),
            ("a\r\n.", None),
            ("a\r\n.\r", None),
        ];
        check(cases, false);
    }

    #[test]
    fn bare_lf_clients_may_end_with_lf_dot_lf() {
        let cases: &[Case] = &[
            ("a\nb\n.\nQUIT\n", Some(("a\nb\n", true, 6))),
            (".\n", Some(("", true, 2))),
            ("a\r\n.\r\n", Some(("a\r\n", false, 6))),
            ("a\n.\r\n", Some(("a\n", true, 5))),
            ("a\r\n.\n", Some(("a\r\n", true, 5))),
            // Stuffed after a bare LF: kept for the rewrite to unstuff.
            ("a\n..\n.\n", Some(("a\n..\n", true, 7))),
            ("a\n", None),
        ];
        check(cases, true);
    }
}
