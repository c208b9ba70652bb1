//! The maildrop: where `sendbridge sendmail` leaves messages for the relay
//! to pick up (Postfix's maildrop and pickup), so a script's mail is safe
//! whether or not the relay runs.
//!
//! A drop is one file, `<spool>/maildrop/<id>.drop`: a JSON line (what the
//! command line said about the envelope) and the message with CRLF line
//! ends. It is written under a dot name, fsync'd, renamed to its name and
//! the folder fsync'd: a drop that has its name is whole and on disk.
//!
//! Who may drop mail: the folder is 0700 like the rest of the spool, so only
//! the relay's user and root can; no other local user can send as
//! `sendmail.user`. A drop written by root is handed to the folder's owner.
//!
//! A datagram socket beside the drops wakes the running relay; when nothing
//! listens on it, the relay is not running.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::private_files;

pub const DIR: &str = "maildrop";
/// Drops the relay could not take, kept for the operator.
const REFUSED: &str = "refused";
const SOCKET: &str = "pickup.sock";
const EXTENSION: &str = "drop";
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);
/// The JSON line before the message; far more than any envelope needs.
const MAX_ENVELOPE: usize = 1024 * 1024;

/// What `sendmail`'s command line said about the envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEnvelope {
    /// `-f`: the envelope sender; `None`: the account's sender.
    pub mail_from: Option<String>,
    pub recipients: Vec<String>,
    /// `-F`: the display name of a From field the message lacks.
    pub full_name: Option<String>,
    /// Who ran the command.
    pub uid: u32,
}

/// The maildrop folder of a spool.
#[derive(Debug, Clone)]
pub struct Maildrop {
    dir: PathBuf,
}

impl Maildrop {
    pub fn new(spool_dir: &Path) -> Self {
        Maildrop {
            dir: spool_dir.join(DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{EXTENSION}"))
    }

    /// Creates the folder (0700) where it is missing, owned like the spool
    /// folder it is in, so a first drop by root stays readable by the relay.
    pub fn create(&self) -> io::Result<()> {
        if self.dir.is_dir() {
            return Ok(());
        }
        private_files::create_dir_all(&self.dir.join(REFUSED))?;
        let spool = fs::metadata(self.dir.parent().unwrap_or(Path::new(".")))?;
        for dir in [self.dir.join(REFUSED), self.dir.clone()] {
            hand_over(&dir, &spool)?;
        }
        Ok(())
    }

    /// Stores a message durably; returns only once it is on disk under its
    /// name. `message` ends in CRLF.
    pub fn put(&self, envelope: &DropEnvelope, message: &[u8]) -> io::Result<String> {
        let id = new_id();
        let temporary = self.dir.join(format!(".{id}.tmp"));
        let written = (|| {
            let mut file = private_files::options()
                .write(true)
                .create_new(true)
                .open(&temporary)?;
            let mut line = serde_json::to_vec(envelope)?;
            line.push(b'\n');
            file.write_all(&line)?;
            file.write_all(message)?;
            file.sync_all()?;
            hand_over(&temporary, &fs::metadata(&self.dir)?)?;
            fs::rename(&temporary, self.path(&id))?;
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written.map(|()| id)
    }

    /// Removes what a `sendmail` that died while writing left behind. A
    /// drop is written only once the message is read, in moments, so an
    /// hour-old temporary file is abandoned.
    pub fn remove_abandoned(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let temporary = name
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"));
            let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
            if temporary && age > ABANDONED_AFTER && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The ids of whole drops, oldest first.
    pub fn ids(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|name| name.strip_suffix(&format!(".{EXTENSION}")))
            else {
                continue;
            };
            if is_valid_id(id) {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    pub fn read(&self, id: &str) -> io::Result<(DropEnvelope, Vec<u8>)> {
        let mut stored = fs::read(self.path(id))?;
        let invalid = |why: &str| io::Error::new(ErrorKind::InvalidData, why.to_string());
        let line_end = memchr::memchr(b'\n', &stored[..stored.len().min(MAX_ENVELOPE)])
            .ok_or_else(|| invalid("no envelope line"))?;
        let envelope = serde_json::from_slice(&stored[..line_end])
            .map_err(|_| invalid("the envelope line is not valid JSON"))?;
        stored.drain(..=line_end);
        Ok((envelope, stored))
    }

    pub fn remove(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.path(id))
    }

    /// Moves a drop the relay cannot take to `refused/`; its new path.
    pub fn set_aside(&self, id: &str) -> io::Result<PathBuf> {
        let aside = self.dir.join(REFUSED).join(format!("{id}.{EXTENSION}"));
        private_files::create_dir_all(&self.dir.join(REFUSED))?;
        fs::rename(self.path(id), &aside)?;
        Ok(aside)
    }

    /// Wakes the running relay to pick up at once; false when no relay
    /// listens (it picks the drop up when it starts).
    pub fn wake_relay(&self) -> bool {
        let Ok(socket) = UnixDatagram::unbound() else {
            return false;
        };
        match socket.send_to(b"!", self.socket_path()) {
            Ok(_) => true,
            // A full socket buffer: the relay has wake-ups waiting already.
            Err(err) => err.kind() == ErrorKind::WouldBlock,
        }
    }
}

/// As root, gives `path` to the owner of `like` (a drop or a folder root
/// made inside a spool that belongs to the relay's user).
fn hand_over(path: &Path, like: &fs::Metadata) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || like.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid()))
}

/// Sorts by time; the pid and a random part keep the ids of `sendmail`
/// processes dropping at the same moment apart.
fn new_id() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64);
    let random: u32 = rand::random();
    format!("{micros:016x}{:08x}{random:08x}", std::process::id())
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_reads_back_as_written_and_half_written_ones_are_not_listed() {
        let spool = tempfile::tempdir().unwrap();
        let maildrop = Maildrop::new(spool.path());
        maildrop.create().unwrap();
        let envelope = DropEnvelope {
            mail_from: Some("cron@example.com".into()),
            recipients: vec!["a@example.com".into(), "b@example.com".into()],
            full_name: Some("Cron Daemon".into()),
            uid: 1000,
        };
        let message = b"Subject: x\r\n\r\nline {\"not\": json}\r\n";
        let id = maildrop.put(&envelope, message).unwrap();
        let half = maildrop.dir().join(".123.tmp");
        fs::write(&half, b"half").unwrap();
        assert_eq!(maildrop.ids().unwrap(), std::slice::from_ref(&id));
        // Being written: kept; abandoned an hour ago: removed.
        assert_eq!(maildrop.remove_abandoned().unwrap(), 0);
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&half)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        assert_eq!(maildrop.remove_abandoned().unwrap(), 1);
        assert!(!half.exists() && maildrop.path(&id).is_file());
        let (read, body) = maildrop.read(&id).unwrap();
        assert_eq!((read, body.as_slice()), (envelope, &message[..]));
        let mode = fs::metadata(maildrop.path(&id)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let aside = maildrop.set_aside(&id).unwrap();
        assert!(aside.is_file() && maildrop.ids().unwrap().is_empty());
    }

    #[test]
    fn no_listener_means_the_relay_is_not_running() {
        let spool = tempfile::tempdir().unwrap();
        let maildrop = Maildrop::new(spool.path());
        maildrop.create().unwrap();
        assert!(!maildrop.wake_relay());
        let listener = UnixDatagram::bind(maildrop.socket_path()).unwrap();
        assert!(maildrop.wake_relay());
        drop(listener);
        // A socket file left behind by a relay that died.
        assert!(!maildrop.wake_relay());
    }
}
