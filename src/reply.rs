//! SMTP replies as the relay sends them: a code, an enhanced status code and
//! text that may span several lines.

use std::fmt;

use smtp_proto::Response;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code (RFC 3463); `None` for greetings, EHLO and 334.
    pub status: Option<[u8; 3]>,
    /// Lines separated by `\n`.
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: [u8; 3], text: impl Into<String>) -> Self {
        Reply {
            code,
            status: Some(status),
            text: text.into(),
        }
    }

    /// A reply without an enhanced status code.
    pub fn bare(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            status: None,
            text: text.into(),
        }
    }

    /// The whole reply on one line: providers put the useful link on the
    /// last line.
    pub fn one_line(&self) -> String {
        let text = self.text.lines().map(str::trim).collect::<Vec<_>>();
        let whole = Reply {
            text: text.join(" "),
            ..self.clone()
        };
        whole.to_string()
    }

    /// Appends the wire form: `250-...` continuation lines, `250 ...` last.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let separator = if lines.peek().is_some() { '-' } else { ' ' };
            let line = line.trim_end_matches('\r');
            let text = match self.status {
                Some([a, b, c]) => format!("{}{separator}{a}.{b}.{c} {line}\r\n", self.code),
                None => format!("{}{separator}{line}\r\n", self.code),
            };
            out.extend_from_slice(text.as_bytes());
        }
    }
}

impl From<Response<String>> for Reply {
    fn from(response: Response<String>) -> Self {
        let status = (response.esc != [0, 0, 0]).then_some(response.esc);
        Reply {
            code: response.code,
            status,
            text: response.message,
        }
    }
}

/// `550 5.1.1 first line\nsecond line`: the whole reply, code and status
/// once, its lines kept (providers put the useful link on the last line).
/// The text log escapes the line breaks; [`Reply::one_line`] is for places
/// that must stay one line.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some([a, b, c]) => write!(f, "{} {a}.{b}.{c} ", self.code)?,
            None => write!(f, "{} ", self.code)?,
        }
        let mut lines = self
            .text
            .split('\n')
            .map(|line| line.trim_end_matches('\r'));
        f.write_str(lines.next().unwrap_or_default())?;
        lines.try_for_each(|line| write!(f, "\n{line}"))
    }
}

/// Why a client was refused: a stable reason code for logs and what the
/// operator can change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub hint: Option<String>,
}

impl Refusal {
    pub fn new(reason: &'static str, hint: impl Into<String>) -> Self {
        Refusal {
            reason,
            hint: Some(hint.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_replies_repeat_code_and_status() {
        let mut out = Vec::new();
        Reply::new(550, [5, 1, 1], "no such user\nsee the docs").write_to(&mut out);
        assert_eq!(out, b"550-5.1.1 no such user\r\n550 5.1.1 see the docs\r\n");
    }

    #[test]
    fn a_reply_is_quoted_whole_or_on_one_line() {
        // (reply, to_string, one_line)
        let table = [
            (
                Reply::new(
                    550,
                    [5, 1, 1],
                    "no such user\r\n https://help/?p=NoSuchUser",
                ),
                "550 5.1.1 no such user\n https://help/?p=NoSuchUser",
                "550 5.1.1 no such user https://help/?p=NoSuchUser",
            ),
            (
                Reply::new(421, [4, 7, 0], "Try again later"),
                "421 4.7.0 Try again later",
                "421 4.7.0 Try again later",
            ),
            (Reply::bare(220, "a\nb"), "220 a\nb", "220 a b"),
        ];
        for (reply, whole, one_line) in table {
            assert_eq!(reply.to_string(), whole, "{reply:?}");
            assert_eq!(reply.one_line(), one_line, "{reply:?}");
        }
    }
}
