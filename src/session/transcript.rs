//! The SMTP dialogue of a session, kept for the operator when it ended in a
//! rejection (or always, per `[log] transcripts`), so they can see exactly
//! what an old program sent. AUTH payloads are replaced by `***`, and of a
//! message only the header section is kept. Control characters are escaped
//! (`\x1b`, `\0`, `\r` …), so a transcript is printable text, one line per
//! line of the dialogue.

use std::borrow::Cow;
use std::fmt::Write;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::observe::EscapeControls;
use crate::private_files;

/// A transcript stops growing here; a marker says so.
const MAX_BYTES: usize = 64 * 1024;
/// Of a message, at most this much of the header section is kept.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// A client line longer than this is cut (the session refuses it anyway).
const MAX_LINE: usize = 1024;

pub struct Transcript {
    text: String,
    /// Client bytes not yet ended by a line feed.
    partial: Vec<u8>,
    full: bool,
}

impl Transcript {
    pub fn new(session_id: &str, peer: std::net::SocketAddr) -> Self {
        let started = humantime::format_rfc3339_seconds(SystemTime::now());
        let mut transcript = Transcript {
            text: String::new(),
            partial: Vec::new(),
            full: false,
        };
        transcript.note(&format!("session {session_id} from {peer} at {started}"));
        transcript
    }

    /// Bytes of SMTP commands as read; complete lines are recorded, with
    /// the credentials of an AUTH command hidden.
    pub fn client(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                // Taken and given back, so one buffer serves every line.
                let mut partial = std::mem::take(&mut self.partial);
                let line = partial.strip_suffix(b"\r").unwrap_or(&partial);
                self.push("C: ", &redact_auth(line));
                partial.clear();
                self.partial = partial;
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(byte);
            }
        }
    }

    /// A line of a SASL exchange: never recorded.
    pub fn client_secret(&mut self) {
        self.push("C: ", b"***");
    }

    /// Our replies, as written to the client.
    pub fn server(&mut self, output: &[u8]) {
        for line in output
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
        {
            self.push("S: ", line.strip_suffix(b"\r").unwrap_or(line));
        }
    }

    /// A message's content: its header section, then only the body's size.
    pub fn message(&mut self, message: &[u8]) {
        let header_end = find(message, b"\r\n\r\n").map_or(message.len(), |at| at + 2);
        let kept = header_end.min(MAX_HEADER_BYTES);
        for line in message[..kept].split(|&b| b == b'\n') {
            if !line.is_empty() {
                self.push("C: ", line.strip_suffix(b"\r").unwrap_or(line));
            }
        }
        self.note(&format!(
            "{} more bytes of the message not kept",
            message.len() - kept
        ));
    }

    /// A line of our own, e.g. where TLS starts.
    pub fn note(&mut self, text: &str) {
        self.push("# ", text.as_bytes());
    }

    fn push(&mut self, prefix: &str, line: &[u8]) {
        if self.full {
            return;
        }
        let start = self.text.len();
        self.text.push_str(prefix);
        let escaped = EscapeControls(&mut self.text).write_str(&String::from_utf8_lossy(line));
        escaped.expect("writing to a String cannot fail");
        self.text.push('\n');
        // Escaping makes a line longer: measured once written.
        if self.text.len() > MAX_BYTES {
            self.text.truncate(start);
            self.text.push_str("# transcript cut off here\n");
            self.full = true;
        }
    }

    /// Writes the transcript as `<dir>/<session id>.log`.
    pub fn save(&self, dir: &Path, session_id: &str) -> io::Result<PathBuf> {
        let path = dir.join(format!("{session_id}.log"));
        private_files::write(&path, self.text.as_bytes())?;
        Ok(path)
    }
}

/// `AUTH PLAIN <payload>` becomes `AUTH PLAIN ***`.
fn redact_auth(line: &[u8]) -> Cow<'_, [u8]> {
    let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
    if !is_auth {
        return Cow::Borrowed(line);
    }
    let mut words = line.split(|&b| b == b' ').filter(|word| !word.is_empty());
    let (Some(command), Some(mechanism)) = (words.next(), words.next()) else {
        return Cow::Borrowed(line);
    };
    let mut redacted = [command, b" ", mechanism].concat();
    if words.next().is_some() {
        redacted.extend_from_slice(b" ***");
    }
    Cow::Owned(redacted)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Deletes transcripts older than `max_age`, then the oldest until the rest
/// fit in `max_bytes`. Returns how many were deleted.
pub fn clean(dir: &Path, max_age: Duration, max_bytes: u64) -> io::Result<usize> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if metadata.is_file() {
            files.push((metadata.modified()?, metadata.len(), entry.path()));
        }
    }
    // Newest first: what is kept is a prefix.
    files.sort_by_key(|file| std::cmp::Reverse(file.0));
    let now = SystemTime::now();
    let mut total = 0;
    let mut deleted = 0;
    for (modified, size, path) in files {
        let age = now.duration_since(modified).unwrap_or_default();
        total += size;
        if age > max_age || total > max_bytes {
            fs::remove_file(path)?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(transcript: &Transcript) -> String {
        transcript.text.clone()
    }

    fn transcript() -> Transcript {
        Transcript::new("s1", "192.0.2.1:4000".parse().unwrap())
    }

    #[test]
    fn auth_payloads_are_hidden() {
        let mut transcript = transcript();
        transcript.client(b"EHLO printer\r\nAUTH PLAIN AGludm9pY2VzAG9sZC1wYXNzd29yZA==\r\n");
        transcript.client(b"AUTH LOGIN\r\n");
        transcript.client_secret();

        let text = text(&transcript);
        assert!(text.contains("C: EHLO printer\nC: AUTH PLAIN ***\nC: AUTH LOGIN\nC: ***\n"));
        assert!(!text.contains("AGludm9p"));
    }

    #[test]
    fn commands_split_across_reads_are_one_line() {
        let mut transcript = transcript();
        transcript.client(b"MAIL FROM:<a@");
        transcript.client(b"b.example>\r\n");
        assert!(text(&transcript).ends_with("C: MAIL FROM:<a@b.example>\n"));
    }

    #[test]
    fn only_the_header_section_of_a_message_is_kept() {
        let mut transcript = transcript();
        transcript.message(b"Subject: invoice\r\nTo: a@b.example\r\n\r\nsecret body\r\n");
        let text = text(&transcript);
        assert!(text.contains("C: Subject: invoice\nC: To: a@b.example\n# 15 more bytes"));
        assert!(!text.contains("secret body"));
    }

    #[test]
    fn control_bytes_are_escaped_and_lines_stay_lines() {
        let mut transcript = transcript();
        transcript.client(b"EHLO \x1b[2Jprinter\0\r\n");
        transcript.client(b"NOOP a\rb\x7f\xc2\x9b\r\n");
        transcript.message(b"Subject: \x1b]0;title\x07\r\n\tfolded\r\n\r\nbody\r\n");
        transcript.server(b"500 5.5.2 Syntax error\r\n");

        let text = text(&transcript);
        assert!(
            text.ends_with(concat!(
                "C: EHLO \\x1b[2Jprinter\\0\n",
                "C: NOOP a\\rb\\x7f\\x9b\n",
                "C: Subject: \\x1b]0;title\\x07\n",
                "C: \\tfolded\n",
                "# 8 more bytes of the message not kept\n",
                "S: 500 5.5.2 Syntax error\n",
            )),
            "{text}"
        );
        let controls = text.chars().filter(|&c| c.is_control() && c != '\n');
        assert_eq!(controls.count(), 0, "{text:?}");
    }

    #[test]
    fn a_transcript_is_bounded() {
        let mut transcript = transcript();
        for _ in 0..10_000 {
            transcript.client(b"NOOP\r\n");
            transcript.server(b"250 2.0.0 OK\r\n");
        }
        assert!(transcript.text.len() <= MAX_BYTES + 64);
        assert!(text(&transcript).ends_with("# transcript cut off here\n"));
    }

    #[test]
    fn cleaning_removes_old_transcripts_then_the_oldest_beyond_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, age_s: u64| {
            let path = dir.path().join(name);
            fs::write(&path, [0u8; 100]).unwrap();
            let file = fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(age_s))
                .unwrap();
        };
        let names = || {
            let mut names: Vec<String> = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        for (name, age_s) in [("old", 300), ("middle", 200), ("new", 100)] {
            write(name, age_s);
        }

        assert_eq!(
            clean(dir.path(), Duration::from_secs(250), 1000).unwrap(),
            1
        );
        assert_eq!(names(), ["middle", "new"]);
        assert_eq!(
            clean(dir.path(), Duration::from_secs(1000), 150).unwrap(),
            1
        );
        assert_eq!(names(), ["new"]);
    }
}
