//! The durable queue on disk.
//!
//! ```text
//! spool/journal/<segment>.{log,done}           new messages on their way out
//!                                          (`active`), appended; see `journal`
//! spool/{active,deferred,held,rejected}/<id>.json   a message with a file of
//!                                          its own: the envelope; until its
//!                                          first update followed by the bytes
//! spool/data/<id>.msg                      the envelope as first stored, then
//!                                          the message bytes, once the
//!                                          envelope was updated; never moved
//! spool/data/<id>.eml                      message bytes alone (spools of earlier versions)
//! spool/incoming/                          the readiness probe; envelopes of earlier versions
//! spool/limits/<account>.log               recent sends, for daily limits
//! spool/transcripts/<session>.log          SMTP dialogues kept for operators
//! ```
//! Accepting a message for `active` is one record appended to the journal,
//! acknowledged once the `fdatasync` it shares with the acceptances in
//! flight at the same time returns; a message delivered at its first
//! attempt then leaves it with one line in `.done`. A message that needs
//! a state of its own is first copied out into a file: written and fsync'd
//! under a temporary name in the state's directory, renamed to
//! `<id>.json`, that directory fsync'd (shared, see `group_commit`). From
//! then on a state is the directory holding the envelope, so every state
//! change is one atomic rename. An envelope file is read up to the end of
//! its first JSON value. The first update of such an envelope first gives
//! the bytes a name of their own, `data/<id>.msg` (a hard link, made
//! durable), then replaces the state entry with an envelope alone.
//!
//! On start, what is left in the journal goes to `deferred/` and the
//! journal is emptied; temporary files, whatever is in `incoming/` and
//! bytes in `data/` without an envelope were never acknowledged and are
//! removed; `active/` returns to `deferred/`. Everything in it is private
//! to the relay's user (see `private_files`).

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

mod envelope;
mod group_commit;
mod journal;
pub mod operations;
mod recovery;

use crate::private_files;
use group_commit::{GroupCommit, sync_dir};
use journal::{Journal, Location};

pub use envelope::{Envelope, Event, FileVersion, Notices, RefusedRecipient, State};
pub use recovery::Recovered;

pub struct Spool {
    root: PathBuf,
    dir_syncs: GroupCommit,
    journal: Arc<Journal>,
    /// Set by [`Spool::recover`], which the relay alone runs: then every
    /// record in the journal is one this process appended and knows of;
    /// anyone else reads the journal from disk.
    owns_journal: AtomicBool,
}

impl Spool {
    /// Opens (creating when needed) a spool, private to this user, and
    /// checks it is writable.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Spool> {
        let root = root.into();
        let spool = Spool {
            dir_syncs: GroupCommit::default(),
            journal: Arc::new(Journal::open(root.join("journal"))?),
            owns_journal: AtomicBool::new(false),
            root,
        };
        for dir in ["data", "incoming", "limits", "transcripts"]
            .into_iter()
            .chain(State::ALL.iter().map(|state| state.dir_name()))
        {
            private_files::create_dir_all(&spool.root.join(dir))?;
        }
        private_files::restrict_folders(&spool.root);
        Ok(spool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The log of an account's recent sends, for its daily limits.
    pub fn limits_path(&self, account: &str) -> PathBuf {
        self.root.join("limits").join(format!("{account}.log"))
    }

    /// Where session transcripts are kept.
    pub fn transcripts_dir(&self) -> PathBuf {
        self.root.join("transcripts")
    }

    /// Stores a new message durably in `state` and assigns its id. Returns
    /// only after the bytes and the envelope are on disk: in the journal
    /// for `active/`, else in a file of its own. Blocks: not for the async
    /// runtime's threads (see [`Spool::accept_active`]).
    pub fn accept(
        &self,
        envelope: &mut Envelope,
        message: &Arc<Vec<u8>>,
        state: State,
    ) -> io::Result<()> {
        if state == State::Active {
            return self
                .journal
                .append(self.journal_record_of(envelope, message)?);
        }
        envelope.id = new_id();
        envelope.size = message.len() as u64;
        self.store_file(envelope, message, state)
    }

    /// [`Spool::accept`] for `active/`, from the async runtime: the
    /// blocking part runs on a blocking thread that serves every
    /// acceptance in flight.
    pub async fn accept_active(
        &self,
        envelope: &mut Envelope,
        message: &Arc<Vec<u8>>,
    ) -> io::Result<()> {
        let record = self.journal_record_of(envelope, message)?;
        self.journal.append_async(record).await
    }

    /// A new message's record for the journal, its id assigned.
    fn journal_record_of(
        &self,
        envelope: &mut Envelope,
        message: &Arc<Vec<u8>>,
    ) -> io::Result<journal::Pending> {
        envelope.id = new_id();
        envelope.size = message.len() as u64;
        Ok(journal::Pending {
            id: envelope.id.clone(),
            envelope: serde_json::to_vec(envelope)?,
            message: message.clone(),
        })
    }

    /// Writes a message with its envelope as one new file in `state`,
    /// durably.
    fn store_file(&self, envelope: &Envelope, message: &[u8], state: State) -> io::Result<()> {
        let temp = self.temp_path(state, &envelope.id);
        let placed = self.envelope_path(state, &envelope.id);
        let result = (|| {
            let mut header = serde_json::to_vec(envelope)?;
            header.push(b'\n');
            // The file's contents on disk before its name can lead to it
            // after a power cut.
            write_synced(&temp, &[&header, message])?;
            fs::rename(&temp, &placed)?;
            // The directory fsync, shared with concurrent writers.
            self.dir_syncs.commit(&self.state_dir(state))
        })();
        if result.is_err() {
            // Nothing was acknowledged: leave no half-written message behind
            // (also when it was renamed but not made durable).
            for path in [&temp, &placed] {
                let _ = fs::remove_file(path);
            }
        }
        result
    }

    /// The messages in the journal, by id: known to this process when it
    /// owns the journal, else read from disk (the queue commands, beside a
    /// running relay).
    fn journal_records(&self) -> io::Result<Vec<(String, Location)>> {
        if self.owns_journal.load(Ordering::Acquire) {
            return Ok(self.journal.live_records());
        }
        let stored = self.journal.scan(false)?;
        Ok(stored
            .into_iter()
            .map(|stored| (stored.envelope.id, stored.location))
            .collect())
    }

    /// Where a message in the journal is.
    fn journal_record(&self, id: &str) -> io::Result<Option<Location>> {
        if let Some(location) = self.journal.live(id) {
            return Ok(Some(location));
        }
        if self.owns_journal.load(Ordering::Acquire) {
            return Ok(None);
        }
        let records = self.journal_records()?;
        Ok(records
            .into_iter()
            .find(|(stored, _)| stored == id)
            .map(|(_, location)| location))
    }

    /// The envelopes of the messages in the journal, all `active`. Read
    /// from disk, the scan has them already.
    fn journal_envelopes(&self) -> io::Result<Vec<Envelope>> {
        if !self.owns_journal.load(Ordering::Acquire) {
            let stored = self.journal.scan(false)?;
            return Ok(stored.into_iter().map(|stored| stored.envelope).collect());
        }
        let records = self.journal.live_records();
        records
            .iter()
            .map(|(_, location)| self.journal.read_envelope(location))
            .collect()
    }

    /// Copies a message out of the journal into a file of its own in `to`
    /// with `envelope`; it leaves the journal once that copy is durable.
    fn copy_out(&self, envelope: &Envelope, location: &Location, to: State) -> io::Result<()> {
        if self.journal.has_left(&envelope.id, location)? {
            // Deleted by `sendbridge queue delete`: this process lets go too.
            let _ = self.journal.leave(&envelope.id, location);
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} was deleted", envelope.id),
            ));
        }
        let message = self.journal.read_message(location)?;
        self.store_file(envelope, &message, to)?;
        // The copy is what counts now; should the journal still list the
        // message after a restart, recovery finds the copy and skips it.
        let _ = self.journal.leave(&envelope.id, location);
        Ok(())
    }

    /// A message's bytes, without the envelope stored before them: in
    /// `data/` once its envelope was updated, else still in its state entry.
    pub fn read_message(&self, id: &str) -> io::Result<Vec<u8>> {
        if let Some(location) = self.journal.live(id) {
            return self.journal.read_message(&location);
        }
        let mut stored = match fs::read(self.data_path(id)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => match self.find(id)? {
                Some(State::Active) if !self.envelope_path(State::Active, id).exists() => {
                    match self.journal_record(id)? {
                        Some(location) => return self.journal.read_message(&location),
                        None => return Err(io::ErrorKind::NotFound.into()),
                    }
                }
                Some(state) if !self.legacy_data_path(id).exists() => {
                    fs::read(self.envelope_path(state, id))?
                }
                _ => return fs::read(self.legacy_data_path(id)),
            },
            read => read?,
        };
        // In place: a large message is never held twice.
        stored.drain(..message_start(&stored)?);
        Ok(stored)
    }

    /// Reads only the envelope, also from a file that goes on with the
    /// message's bytes.
    pub fn read_envelope(&self, state: State, id: &str) -> io::Result<Envelope> {
        let path = self.envelope_path(state, id);
        if state == State::Active && !path.exists() {
            return match self.journal_record(id)? {
                Some(location) => self.journal.read_envelope(&location),
                None => Err(io::ErrorKind::NotFound.into()),
            };
        }
        let file = BufReader::new(File::open(path)?);
        match serde_json::Deserializer::from_reader(file)
            .into_iter()
            .next()
        {
            Some(parsed) => parsed.map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty envelope file",
            )),
        }
    }

    /// Rewrites a message's envelope and moves it from `from` to `to`.
    pub fn update(&self, envelope: &Envelope, from: State, to: State) -> io::Result<()> {
        let current = self.envelope_path(from, &envelope.id);
        if from == State::Active
            && !current.exists()
            && let Some(location) = self.journal_record(&envelope.id)?
        {
            return self.copy_out(envelope, &location, to);
        }
        if !current.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not {from}", envelope.id),
            ));
        }
        self.keep_bytes_apart(&envelope.id, &current)?;
        // Replace in place first, so a crash leaves either the old or the new
        // envelope in `from`, never none.
        let temp = self.temp_path(from, &envelope.id);
        if let Err(err) = write_synced(&temp, &[&serde_json::to_vec(envelope)?]) {
            // A partial write on a full disk holds space that others need.
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        fs::rename(&temp, &current)?;
        if from != to {
            self.move_to(&envelope.id, from, to)?;
        }
        Ok(())
    }

    /// Before the state entry that still holds a message's bytes is replaced
    /// by an envelope alone, gives the bytes their name in `data/`, durably.
    fn keep_bytes_apart(&self, id: &str, current: &Path) -> io::Result<()> {
        if self.legacy_data_path(id).exists() {
            // Stored by an earlier version: the bytes have their own file.
            return Ok(());
        }
        match fs::hard_link(current, self.data_path(id)) {
            Ok(()) => sync_dir(&self.root.join("data")),
            // Done by an earlier update (or one a crash interrupted).
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Moves a message's envelope to another state as it is: one rename,
    /// which works on a full disk too.
    /// Out of the journal it is a copy instead.
    pub fn move_to(&self, id: &str, from: State, to: State) -> io::Result<()> {
        let current = self.envelope_path(from, id);
        if from == State::Active
            && !current.exists()
            && let Some(location) = self.journal_record(id)?
        {
            let envelope = self.journal.read_envelope(&location)?;
            return self.copy_out(&envelope, &location, to);
        }
        fs::rename(current, self.envelope_path(to, id))
    }

    /// Deletes a delivered (or operator-deleted) message: one unlink for a
    /// message delivered before any update.
    pub fn remove(&self, state: State, id: &str) -> io::Result<()> {
        let path = self.envelope_path(state, id);
        if state == State::Active {
            // Delivered at its first attempt, the common case: known to be in
            // the journal, no file looked for.
            let in_journal = match self.journal.live(id) {
                None if !path.exists() => self.journal_record(id)?,
                known => known,
            };
            if let Some(location) = in_journal {
                return self.journal.leave(id, &location);
            }
        }
        fs::remove_file(path)?;
        let removed = match fs::remove_file(self.data_path(id)) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                fs::remove_file(self.legacy_data_path(id))
            }
            removed => removed,
        };
        match removed {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// The ids in a state, oldest first.
    pub fn ids(&self, state: State) -> io::Result<Vec<String>> {
        let mut ids = self.file_ids(state)?;
        if state == State::Active {
            ids.extend(self.journal_records()?.into_iter().map(|(id, _)| id));
            ids.sort();
        }
        Ok(ids)
    }

    /// The ids with a file of their own in a state, oldest first.
    fn file_ids(&self, state: State) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(self.root.join(state.dir_name()))? {
            if let Some(id) = id_of(&entry?.path(), "json") {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The ids in a state with their envelope files' versions, so a caller
    /// can tell which changed since it last looked.
    pub fn versions(&self, state: State) -> io::Result<Vec<(String, FileVersion)>> {
        use std::os::unix::fs::MetadataExt;
        let mut entries = Vec::new();
        for entry in fs::read_dir(self.root.join(state.dir_name()))? {
            let entry = entry?;
            let Some(id) = id_of(&entry.path(), "json") else {
                continue;
            };
            let version = entry.metadata().and_then(|metadata| {
                Ok(FileVersion {
                    inode: metadata.ino(),
                    modified: metadata.modified()?,
                })
            });
            match version {
                Ok(version) => entries.push((id, version)),
                // Moved on meanwhile.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        Ok(entries)
    }

    /// The envelopes in a state, oldest first. Envelopes that vanish while
    /// listing (delivered meanwhile) are skipped.
    pub fn list(&self, state: State) -> io::Result<Vec<Envelope>> {
        let mut envelopes = Vec::new();
        for id in self.file_ids(state)? {
            match self.read_envelope(state, &id) {
                Ok(envelope) => envelopes.push(envelope),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        if state == State::Active {
            envelopes.extend(self.journal_envelopes()?);
            envelopes.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(envelopes)
    }

    /// Where a message is, if anywhere.
    pub fn find(&self, id: &str) -> io::Result<Option<State>> {
        match self.find_file(id)? {
            Some(state) => Ok(Some(state)),
            None if is_valid_id(id) && self.journal_record(id)?.is_some() => {
                Ok(Some(State::Active))
            }
            None => Ok(None),
        }
    }

    /// The state of a message with a file of its own.
    fn find_file(&self, id: &str) -> io::Result<Option<State>> {
        if !is_valid_id(id) {
            return Ok(None);
        }
        Ok(State::ALL
            .into_iter()
            .find(|state| self.envelope_path(*state, id).exists()))
    }

    /// Checks that a message could be stored now: writes, syncs, links (as
    /// acceptance does) and removes a small file in `incoming/` (which
    /// recovery empties, should the relay stop in between).
    pub fn check_writable(&self) -> io::Result<()> {
        let incoming = self.root.join("incoming");
        let probe = incoming.join(format!(".probe-{}", new_id()));
        let link = incoming.join(format!(".probe-link-{}", new_id()));
        let linked = write_synced(&probe, &[b"sendbridge readiness probe\n"])
            .and_then(|()| fs::hard_link(&probe, &link));
        // Absent when linking failed; a leftover goes at the next start.
        let _ = fs::remove_file(&link);
        let removed = fs::remove_file(&probe);
        linked.and(removed)
    }

    /// The size of the stored messages with their envelopes: the files in
    /// `data/` and in the state directories, each file counted once (a
    /// message's bytes may have two names for a moment).
    pub fn data_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut linked = std::collections::HashSet::new();
        let mut total = 0;
        let dirs = std::iter::once(self.root.join("data"))
            .chain(State::ALL.into_iter().map(|state| self.state_dir(state)));
        for dir in dirs {
            for entry in fs::read_dir(dir)? {
                match entry?.metadata() {
                    Ok(metadata) if metadata.nlink() > 1 && !linked.insert(metadata.ino()) => {}
                    Ok(metadata) => total += metadata.len(),
                    // Delivered and removed meanwhile.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err),
                }
            }
        }
        let records = self.journal_records()?;
        let journal: u64 = records.iter().map(|(_, location)| location.len()).sum();
        Ok(total + journal)
    }

    /// Where a message's bytes are kept, after its envelope as accepted,
    /// once the envelope was updated.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.root.join("data").join(format!("{id}.msg"))
    }

    /// Where earlier versions stored a message's bytes alone.
    fn legacy_data_path(&self, id: &str) -> PathBuf {
        self.root.join("data").join(format!("{id}.eml"))
    }

    fn envelope_path(&self, state: State, id: &str) -> PathBuf {
        self.state_dir(state).join(format!("{id}.json"))
    }

    /// Where a new envelope file is written before it is renamed into
    /// place; recovery removes one left behind.
    fn temp_path(&self, state: State, id: &str) -> PathBuf {
        self.state_dir(state).join(format!(".{id}.tmp"))
    }

    fn state_dir(&self, state: State) -> PathBuf {
        self.root.join(state.dir_name())
    }
}

/// Unix milliseconds of the wall clock.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// 16 hex digits of microseconds, then a per-process sequence: sorts by
/// arrival, unique within a process and across restarts.
fn new_id() -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed) & 0xffff;
    format!("{micros:016x}{sequence:04x}")
}

/// Ids come from outside (the CLI); they must never name another path.
fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn id_of(path: &Path, extension: &str) -> Option<String> {
    if path.extension()? != extension {
        return None;
    }
    let id = path.file_stem()?.to_str()?;
    is_valid_id(id).then(|| id.to_string())
}

/// Where the message starts in a `data/<id>.msg` file: after the first
/// JSON value (the envelope) and its newline.
fn message_start(stored: &[u8]) -> io::Result<usize> {
    let mut values =
        serde_json::Deserializer::from_slice(stored).into_iter::<serde::de::IgnoredAny>();
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    match values.next() {
        Some(Ok(_)) => {}
        Some(Err(err)) => return Err(invalid(format!("stored envelope: {err}"))),
        None => return Err(invalid("empty message file".into())),
    }
    let end = values.byte_offset();
    match stored.get(end) {
        Some(b'\n') => Ok(end + 1),
        _ => Err(invalid(format!(
            "no newline after the stored envelope (byte {end})"
        ))),
    }
}

/// Writes `parts` one after the other into a new file and fsyncs it.
fn write_synced(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut file = private_files::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            account: "gmail".into(),
            mail_from: "billing@legacy.example".into(),
            recipients: vec!["customer@example.com".into()],
            ..Envelope::default()
        }
    }

    /// A message stored in `state`, as [`Spool::accept`] leaves it.
    fn accepted(spool: &Spool, message: &[u8], state: State) -> Envelope {
        let mut accepted = envelope();
        spool
            .accept(&mut accepted, &Arc::new(message.to_vec()), state)
            .unwrap();
        accepted
    }

    #[test]
    fn accept_stores_bytes_and_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let envelope = accepted(&spool, b"Subject: hi\r\n\r\nbody\r\n", State::Active);

        assert_eq!(spool.find(&envelope.id).unwrap(), Some(State::Active));
        assert_eq!(
            spool.read_message(&envelope.id).unwrap(),
            b"Subject: hi\r\n\r\nbody\r\n"
        );
        let stored = spool.read_envelope(State::Active, &envelope.id).unwrap();
        assert_eq!(
            stored,
            Envelope {
                size: 21,
                ..envelope
            }
        );
        assert!(
            fs::read_dir(dir.path().join("incoming"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn ids_are_unique_and_ordered() {
        let ids: Vec<String> = (0..2000).map(|_| new_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "already in order and without duplicates");
    }

    #[test]
    fn state_moves_are_renames_and_keep_updates() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut envelope = accepted(&spool, b"x\r\n", State::Active);

        envelope.attempts = 1;
        envelope.last_reply = Some("421 4.7.0 Try again later".into());
        spool
            .update(&envelope, State::Active, State::Deferred)
            .unwrap();

        assert_eq!(spool.find(&envelope.id).unwrap(), Some(State::Deferred));
        assert_eq!(
            spool
                .read_envelope(State::Deferred, &envelope.id)
                .unwrap()
                .attempts,
            1
        );
        assert_eq!(spool.list(State::Deferred).unwrap().len(), 1);
        assert!(
            spool.update(&envelope, State::Active, State::Held).is_err(),
            "not active any more"
        );

        spool.remove(State::Deferred, &envelope.id).unwrap();
        assert_eq!(spool.find(&envelope.id).unwrap(), None);
        assert!(!spool.data_path(&envelope.id).exists());
    }

    #[test]
    fn recovery_cleans_torn_writes_and_reactivates() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let acknowledged = accepted(&spool, b"kept\r\n", State::Active);
        let deferred = accepted(&spool, b"also kept\r\n", State::Deferred);
        // A crash mid-accept: a file written but never renamed into its
        // state; and from earlier versions, truncated bytes, a truncated
        // envelope in incoming/, and bytes whose envelope never got written.
        fs::write(spool.data_path("00000000000000010000"), b"Subject: tr").unwrap();
        fs::write(
            dir.path().join("incoming/00000000000000010000.json"),
            b"{\"id\": \"0000",
        )
        .unwrap();
        fs::write(spool.data_path("00000000000000020000"), b"Subject: half").unwrap();
        let torn = spool.temp_path(State::Active, "00000000000000030000");
        fs::write(&torn, b"{\"id\":\"00000000000000030000\"}\nSubject: to").unwrap();

        let recovered = Spool::open(dir.path()).unwrap().recover().unwrap();

        assert_eq!(
            recovered,
            Recovered {
                removed: 4,
                reactivated: 1
            }
        );
        assert!(!spool.data_path("00000000000000010000").exists());
        assert!(!spool.data_path("00000000000000020000").exists());
        assert!(!torn.exists());
        assert_eq!(spool.find(&acknowledged.id).unwrap(), Some(State::Deferred));
        assert_eq!(spool.read_message(&acknowledged.id).unwrap(), b"kept\r\n");
        assert_eq!(spool.find(&deferred.id).unwrap(), Some(State::Deferred));
    }

    #[test]
    fn writability_check_leaves_nothing_behind_and_data_bytes_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let journaled = accepted(&spool, b"12345\r\n", State::Active);
        let filed = accepted(&spool, b"123\r\n", State::Deferred);

        spool.check_writable().unwrap();

        assert!(
            fs::read_dir(dir.path().join("incoming"))
                .unwrap()
                .next()
                .is_none()
        );
        // Each message and, before it, its envelope as accepted: in the
        // journal after a frame, in a file of its own followed by a newline.
        let envelope = |envelope| serde_json::to_vec(envelope).unwrap().len() as u64;
        assert_eq!(
            spool.data_bytes().unwrap(),
            (20 + envelope(&journaled) + 7) + (envelope(&filed) + 1 + 5)
        );
    }

    #[test]
    fn a_new_message_is_one_name_until_its_first_update_gives_the_bytes_their_own() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut envelope = accepted(&spool, b"{not json}\r\n", State::Held);
        let data = spool.data_path(&envelope.id);
        let state_entry = spool.envelope_path(State::Held, &envelope.id);
        assert!(!data.exists());
        assert_eq!(fs::metadata(&state_entry).unwrap().nlink(), 1);
        assert_eq!(spool.read_message(&envelope.id).unwrap(), b"{not json}\r\n");
        let accepted_inode = fs::metadata(&state_entry).unwrap().ino();

        envelope.attempts = 1;
        spool
            .update(&envelope, State::Held, State::Deferred)
            .unwrap();

        // The bytes keep the inode they were fsync'd in, now under data/.
        assert_eq!(fs::metadata(&data).unwrap().ino(), accepted_inode);
        assert_eq!(fs::metadata(&data).unwrap().nlink(), 1);
        assert_eq!(
            spool.read_envelope(State::Deferred, &envelope.id).unwrap(),
            envelope
        );
        assert_eq!(spool.read_message(&envelope.id).unwrap(), b"{not json}\r\n");

        envelope.attempts = 2;
        spool
            .update(&envelope, State::Deferred, State::Active)
            .unwrap();
        assert_eq!(fs::metadata(&data).unwrap().ino(), accepted_inode);
        assert_eq!(spool.read_message(&envelope.id).unwrap(), b"{not json}\r\n");
    }

    /// What is left in the spool's folders, temporary files included.
    fn files(dir: &Path) -> Vec<String> {
        let mut found: Vec<String> = ["data", "active", "deferred", "held", "rejected", "incoming"]
            .into_iter()
            .flat_map(|sub| {
                fs::read_dir(dir.join(sub))
                    .unwrap()
                    .map(move |entry| format!("{sub}/{}", entry.unwrap().file_name().display()))
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn removing_leaves_nothing_whether_or_not_the_envelope_was_updated() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let first_attempt = accepted(&spool, b"delivered at once\r\n", State::Active);
        let mut retried = accepted(&spool, b"delivered later\r\n", State::Held);
        retried.attempts = 1;
        spool
            .update(&retried, State::Held, State::Deferred)
            .unwrap();
        assert_eq!(files(dir.path()).len(), 2);

        spool.remove(State::Active, &first_attempt.id).unwrap();
        spool.remove(State::Deferred, &retried.id).unwrap();

        assert_eq!(files(dir.path()), Vec::<String>::new());
        assert_eq!(spool.ids(State::Active).unwrap(), Vec::<String>::new());
    }

    fn journal_files(dir: &Path) -> Vec<String> {
        let mut found: Vec<String> = fs::read_dir(dir.join("journal"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().display().to_string())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn the_journal_keeps_what_was_acknowledged_across_processes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let delivered = accepted(&spool, b"delivered\r\n", State::Active);
        let mut deferred = accepted(&spool, b"deferred\r\n", State::Active);
        let waiting = accepted(&spool, b"still being sent\r\n", State::Active);
        assert_eq!(
            journal_files(dir.path()).len(),
            1,
            "one segment, no .done yet"
        );
        spool.remove(State::Active, &delivered.id).unwrap();
        deferred.attempts = 1;
        spool
            .update(&deferred, State::Active, State::Deferred)
            .unwrap();
        assert_eq!(spool.read_message(&deferred.id).unwrap(), b"deferred\r\n");
        // A crash in the middle of the next write: half a frame.
        let segment = dir
            .path()
            .join("journal")
            .join(&journal_files(dir.path())[0]);
        let mut log = fs::OpenOptions::new().append(true).open(&segment).unwrap();
        log.write_all(b"sbj1\x05\x00").unwrap();

        // What another process (`sendbridge queue`) sees.
        let other = Spool::open(dir.path()).unwrap();
        assert_eq!(
            other.ids(State::Active).unwrap(),
            std::slice::from_ref(&waiting.id)
        );
        assert_eq!(
            other.list(State::Active).unwrap(),
            std::slice::from_ref(&waiting)
        );
        assert_eq!(other.find(&waiting.id).unwrap(), Some(State::Active));
        assert_eq!(other.find(&delivered.id).unwrap(), None);
        assert_eq!(other.find(&deferred.id).unwrap(), Some(State::Deferred));
        assert_eq!(
            other.read_message(&waiting.id).unwrap(),
            b"still being sent\r\n"
        );
        assert_eq!(
            other.read_envelope(State::Active, &waiting.id).unwrap(),
            waiting
        );

        // A restart: what is left goes to deferred/, the journal is emptied.
        let restarted = Spool::open(dir.path()).unwrap();
        let recovered = restarted.recover().unwrap();
        assert_eq!(recovered.reactivated, 1);
        assert_eq!(journal_files(dir.path()), Vec::<String>::new());
        assert_eq!(restarted.find(&waiting.id).unwrap(), Some(State::Deferred));
        assert_eq!(
            restarted.read_message(&waiting.id).unwrap(),
            b"still being sent\r\n"
        );
        assert_eq!(
            restarted
                .read_envelope(State::Deferred, &deferred.id)
                .unwrap(),
            deferred,
            "copied out once, as updated"
        );
        assert_eq!(restarted.ids(State::Deferred).unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_ones_after_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids: Vec<String> = ["first\r\n", "second\r\n", "third\r\n"]
            .into_iter()
            .map(|body| accepted(&spool, body.as_bytes(), State::Active).id)
            .collect();
        let segment = dir
            .path()
            .join("journal")
            .join(&journal_files(dir.path())[0]);
        let mut bytes = fs::read(&segment).unwrap();
        let at = bytes.windows(8).position(|w| w == b"second\r\n").unwrap();
        bytes[at] = b'S';
        fs::write(&segment, bytes).unwrap();

        let restarted = Spool::open(dir.path()).unwrap();
        restarted.recover().unwrap();

        assert_eq!(
            restarted.ids(State::Deferred).unwrap(),
            [ids[0].clone(), ids[2].clone()]
        );
        assert_eq!(restarted.read_message(&ids[2]).unwrap(), b"third\r\n");
    }

    #[test]
    fn a_message_deleted_by_another_process_is_not_copied_out() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Spool::open(dir.path()).unwrap();
        relay.recover().unwrap();
        let mut envelope = accepted(&relay, b"x\r\n", State::Active);

        let cli = Spool::open(dir.path()).unwrap();
        operations::delete(&cli, &envelope.id).unwrap();
        assert_eq!(cli.find(&envelope.id).unwrap(), None);

        envelope.attempts = 1;
        let updated = relay.update(&envelope, State::Active, State::Deferred);
        assert_eq!(updated.unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(relay.find(&envelope.id).unwrap(), None);
    }

    #[test]
    fn a_drained_segment_goes_once_it_holds_a_megabyte_and_concurrent_acceptances_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let small = accepted(&spool, b"x\r\n", State::Active);
        spool.remove(State::Active, &small.id).unwrap();
        // Drained but small: kept, and written to next.
        assert_eq!(
            journal_files(dir.path()).len(),
            2,
            "{:?}",
            journal_files(dir.path())
        );
        let large = vec![b'x'; 600 * 1024];
        let ids: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| accepted(&spool, &large, State::Active).id))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        });
        assert_eq!(journal_files(dir.path()).len(), 2, "the same segment");
        for id in &ids {
            assert_eq!(spool.read_message(id).unwrap().len(), large.len());
            spool.remove(State::Active, id).unwrap();
        }
        assert_eq!(journal_files(dir.path()), Vec::<String>::new());
        assert_eq!(spool.data_bytes().unwrap(), 0);
    }

    #[test]
    fn a_crash_mid_update_or_mid_remove_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // Mid-update: the bytes got their data/ name, the new envelope was
        // written but not renamed into place.
        let mut updating = accepted(&spool, b"being updated\r\n", State::Deferred);
        // Due again: back in active/ by a rename.
        spool
            .move_to(&updating.id, State::Deferred, State::Active)
            .unwrap();
        let current = spool.envelope_path(State::Active, &updating.id);
        fs::hard_link(&current, spool.data_path(&updating.id)).unwrap();
        fs::write(spool.temp_path(State::Active, &updating.id), b"{\"id\":").unwrap();
        // Mid-remove: the envelope of an updated message is gone, its bytes
        // are not.
        let mut removing = accepted(&spool, b"being removed\r\n", State::Held);
        removing.attempts = 1;
        spool
            .update(&removing, State::Held, State::Deferred)
            .unwrap();
        fs::remove_file(spool.envelope_path(State::Deferred, &removing.id)).unwrap();
        // Mid-acceptance: written, never renamed, never acknowledged.
        fs::write(
            spool.temp_path(State::Held, "00000000000000050000"),
            b"{}\n",
        )
        .unwrap();

        let recovered = Spool::open(dir.path()).unwrap().recover().unwrap();

        assert_eq!(
            recovered,
            Recovered {
                removed: 3,
                reactivated: 1
            }
        );
        let (id, data) = (&updating.id, spool.data_path(&updating.id));
        assert_eq!(
            files(dir.path()),
            [format!("data/{id}.msg"), format!("deferred/{id}.json")]
        );
        assert_eq!(spool.read_message(id).unwrap(), b"being updated\r\n");
        // The interrupted update is made again; the bytes stay where they are.
        updating.attempts = 1;
        spool
            .update(&updating, State::Deferred, State::Deferred)
            .unwrap();
        assert_eq!(spool.read_message(id).unwrap(), b"being updated\r\n");
        assert_eq!(spool.read_envelope(State::Deferred, id).unwrap(), updating);
        spool.remove(State::Deferred, id).unwrap();
        assert!(!data.exists());
        assert_eq!(files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn messages_queued_by_earlier_versions_are_read_delivered_and_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        // Then: a pretty envelope alone, the bytes alone in `<id>.eml`.
        let legacy = Envelope {
            id: "00000000000000030000".into(),
            ..envelope()
        };
        fs::write(
            spool.envelope_path(State::Active, &legacy.id),
            serde_json::to_vec_pretty(&legacy).unwrap(),
        )
        .unwrap();
        fs::write(spool.legacy_data_path(&legacy.id), b"Subject: old\r\n").unwrap();
        let orphan = spool.legacy_data_path("00000000000000040000");
        fs::write(&orphan, b"Subject: never acknowledged\r\n").unwrap();

        let recovered = spool.recover().unwrap();

        assert_eq!(
            recovered,
            Recovered {
                removed: 1,
                reactivated: 1
            }
        );
        assert!(!orphan.exists());
        assert_eq!(
            spool.read_envelope(State::Deferred, &legacy.id).unwrap(),
            legacy
        );
        assert_eq!(spool.read_message(&legacy.id).unwrap(), b"Subject: old\r\n");
        spool.remove(State::Deferred, &legacy.id).unwrap();
        assert!(!spool.legacy_data_path(&legacy.id).exists());
    }

    #[test]
    fn the_message_starts_after_the_stored_envelope_and_its_newline() {
        let cases: [(&[u8], Option<usize>); 6] = [
            (b"{\"id\":\"a\"}\nSubject: x\r\n", Some(11)),
            (b"{\"id\":\"a\"}\n{\"looks\":\"like json\"}\n", Some(11)),
            (b"{\"id\":\"a\"}\n", Some(11)),
            (b"{\"id\":\"a\"}Subject: x\r\n", None),
            (b"{\"id\":\"a", None),
            (b"", None),
        ];
        for (stored, expected) in cases {
            assert_eq!(
                message_start(stored).ok(),
                expected,
                "{}",
                String::from_utf8_lossy(stored)
            );
        }
    }

    /// `cargo test --lib spool::tests::accept_throughput -- --ignored --nocapture`:
    /// 10 threads storing 4 KiB messages, as 10 SMTP sessions would, then
    /// removing each, as its delivery at the first attempt does; the
    /// figures in README's queue section come from here (and
    /// `strace -f -c -e trace=fsync,fdatasync` around it for the fsyncs).
    #[test]
    #[ignore = "a measurement on the real disk, not a check"]
    fn accept_throughput() {
        const SESSIONS: usize = 10;
        const EACH: usize = 100;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let spool = std::sync::Arc::new(Spool::open(dir.path()).unwrap());
        let message = Arc::new(vec![b'x'; 4096]);
        let cpu = || {
            // SAFETY: getrusage only writes the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
            let micros = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
            (micros(usage.ru_utime), micros(usage.ru_stime))
        };
        let (user_before, system_before) = cpu();
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..SESSIONS {
                scope.spawn(|| {
                    for _ in 0..EACH {
                        let mut envelope = envelope();
                        spool
                            .accept(&mut envelope, &message, State::Active)
                            .unwrap();
                        spool.remove(State::Active, &envelope.id).unwrap();
                    }
                });
            }
        });
        let elapsed = started.elapsed();
        let (user_after, system_after) = cpu();
        let total = SESSIONS * EACH;
        println!(
            "{total} x 4 KiB over {SESSIONS} threads, stored and removed: {:.0} msgs/s, CPU per message {:.0} us user, {:.0} us kernel",
            total as f64 / elapsed.as_secs_f64(),
            (user_after - user_before) / total as f64,
            (system_after - system_before) / total as f64,
        );
        assert!(spool.ids(State::Active).unwrap().is_empty());
    }

    #[test]
    fn foreign_ids_never_name_other_paths() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.find("../../etc/passwd").unwrap(), None);
        assert_eq!(spool.find("").unwrap(), None);
    }
}
