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

use std::ops::Range;

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

/// A piece of the content, in order: a run of the input, or bytes the
/// reader took earlier and gives back now (a line-start dot it held while
/// deciding, a CR it held after that dot).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Input(Range<usize>),
    Held(&'static [u8]),
}

/// Dot-unstuffing and end detection over any split of the input.
pub(super) struct DotReader {
    state: State,
    /// Bare LF line ends may end the message.
    lenient: bool,
    /// Kept between in-place reads, so they allocate nothing.
    pieces: Vec<Piece>,
}

/// Pieces scanned before they are written when unstuffing in place: bounds
/// what a read full of dot-stuffed lines makes the reader hold.
const IN_PLACE_PIECES: usize = 64;

impl DotReader {
    /// `command_end_bare`: the DATA command ended in a bare LF; its line end
    /// starts the first line, so a lone "." is an empty message.
    pub(super) fn new(command_end_bare: bool) -> Self {
        DotReader {
            state: State::LineStart {
                bare: command_end_bare,
            },
            lenient: command_end_bare,
            pieces: Vec::new(),
        }
    }

    /// Appends the content in `input` to `out` (when given) and returns how
    /// many bytes of `input` it consumed: all of them, or up to and
    /// including the terminator.
    pub(super) fn read(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> usize {
        self.scan(input, usize::MAX, |piece| {
            if let Some(out) = out.as_deref_mut() {
                match piece {
                    Piece::Input(run) => out.extend_from_slice(&input[run]),
                    Piece::Held(bytes) => out.extend_from_slice(bytes),
                }
            }
        })
    }

    /// The same for input read straight into the content's own buffer,
    /// which saves copying it there: `buffer[..*written]` is the content so
    /// far, `buffer[from..]` was just read, and the bytes between are ones
    /// this reader holds (see [`DotReader::held`]). The content is
    /// unstuffed in place: it never gets ahead of the input it comes from.
    /// Bytes after the terminator move to `after_end`. `buffer` is left as
    /// the content plus the held bytes, ready for the next read at its end.
    pub(super) fn read_in_place(
        &mut self,
        buffer: &mut Vec<u8>,
        written: &mut usize,
        from: usize,
        after_end: &mut Vec<u8>,
    ) {
        debug_assert_eq!(from, *written + self.held(), "held bytes precede the input");
        let mut pieces = std::mem::take(&mut self.pieces);
        let mut at = from;
        while at < buffer.len() && self.finished().is_none() {
            let scanned = at;
            at += self.scan(&buffer[at..], IN_PLACE_PIECES, |piece| pieces.push(piece));
            for piece in pieces.drain(..) {
                match piece {
                    Piece::Input(run) => {
                        let (start, len) = (scanned + run.start, run.len());
                        if start != *written {
                            buffer.copy_within(start..start + len, *written);
                        }
                        *written += len;
                    }
                    Piece::Held(bytes) => {
                        buffer[*written..*written + bytes.len()].copy_from_slice(bytes);
                        *written += bytes.len();
                    }
                }
            }
        }
        self.pieces = pieces;
        after_end.extend_from_slice(&buffer[at..]);
        buffer.truncate(*written + self.held());
    }

    /// How many of the bytes it took it holds back, undecided: a dot that
    /// starts a line, and a CR after it.
    pub(super) fn held(&self) -> usize {
        match self.state {
            State::Dot { .. } => 1,
            State::DotCr { .. } => 2,
            _ => 0,
        }
    }

    /// The content in `input` as pieces to `emit`; returns how many bytes
    /// of `input` it consumed: all of them, up to and including the
    /// terminator, or, once about `budget` pieces were emitted, up to where
    /// it stopped (any split of the input is fine to go on from).
    fn scan(&mut self, input: &[u8], budget: usize, emit: impl FnMut(Piece)) -> usize {
        let emitted = std::cell::Cell::new(0usize);
        let mut emit = {
            let (mut emit, emitted) = (emit, &emitted);
            move |piece| {
                emitted.set(emitted.get() + 1);
                emit(piece)
            }
        };
        let mut at = 0;
        while at < input.len() {
            if emitted.get() >= budget {
                return at;
            }
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
                        emit(Piece::Input(at..input.len()));
                        self.state = State::Text {
                            after_cr: rest.last() == Some(&b'\r'),
                        };
                        return input.len();
                    };
                    emit(Piece::Input(at..at + lf + 1));
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
                    emit(Piece::Held(b"\r"));
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
    fn unstuff(&self, bare: bool, emit: &mut impl FnMut(Piece)) {
        if bare {
            emit(Piece::Held(b"."));
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
        for chunk in [1, 2, 3, 7, input.len().max(1)] {
            let in_place = read_in_place(input, command_end_bare, chunk);
            assert_eq!(in_place, whole, "in place, {chunk} at a time: {input:?}");
        }
        whole
    }

    /// `read` for input read into the content's buffer, `chunk` bytes at a
    /// time.
    fn read_in_place(
        input: &[u8],
        command_end_bare: bool,
        chunk: usize,
    ) -> Option<(String, bool, usize)> {
        let mut reader = DotReader::new(command_end_bare);
        let (mut buffer, mut written, mut after_end) = (Vec::new(), 0, Vec::new());
        let mut read = 0;
        for piece in input.chunks(chunk) {
            let from = buffer.len();
            buffer.extend_from_slice(piece);
            reader.read_in_place(&mut buffer, &mut written, from, &mut after_end);
            read += piece.len();
            if reader.finished().is_some() {
                break;
            }
            assert!(after_end.is_empty());
        }
        let bare = reader.finished()?;
        let used = read - after_end.len();
        assert_eq!(after_end, &input[used..read], "the bytes after the end");
        assert_eq!(buffer.len(), written);
        Some((String::from_utf8(buffer).unwrap(), bare, used))
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
    fn a_read_full_of_stuffed_lines_is_unstuffed_in_place_in_bounded_steps() {
        for ending in ["\r\n", "\n"] {
            let line = format!("..{ending}.x{ending}");
            let input = format!("{}.{ending}QUIT{ending}", line.repeat(5000));
            let lenient = ending == "\n";
            let expected = read(input.as_bytes(), lenient);
            assert!(expected.is_some(), "ends");
            let mut reader = DotReader::new(lenient);
            let (mut buffer, mut written, mut after_end) =
                (input.clone().into_bytes(), 0, Vec::new());
            reader.read_in_place(&mut buffer, &mut written, 0, &mut after_end);
            assert_eq!(after_end, format!("QUIT{ending}").as_bytes());
            let content = String::from_utf8(buffer).unwrap();
            assert_eq!(Some(content), expected.map(|(content, _, _)| content));
            assert!(reader.pieces.capacity() <= 2 * (IN_PLACE_PIECES + 2));
        }
    }

    #[test]
    fn crlf_clients_end_only_at_crlf_dot_crlf() {
        let cases: &[Case] = &[
            ("a\r\n.\r\nQUIT\r\n", Some(("a\r\n", false, 6))),
            (".\r\n", Some(("", false, 3))),
            ("..x\r\n.x\r\n.\r\n", Some((".x\r\nx\r\n", false, 12))),
            ("..\r\n...\r\n.\r\n", Some((".\r\n..\r\n", false, 12))),
            (".\rx\r\n.\r\n", Some(("\rx\r\n", false, 8))),
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
