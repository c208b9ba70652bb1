//! The acceptance journal: new messages for `active/` are appended to a
//! shared segment file, and concurrent acceptances share one `fdatasync`
//! (group commit), instead of each creating, syncing, renaming and later
//! unlinking a file of its own. Most messages are delivered at their first
//! attempt and never leave it; a message that needs a state of its own
//! (deferred, held, rejected) is copied out into the one-file-per-message
//! format first.
//!
//! ```text
//! journal/<segment>.log    records, appended; each is
//!                          "sbj1" | envelope length u32 | message length u64
//!                          | CRC-32 of envelope and message u32 (little-endian)
//!                          | envelope (compact JSON) | message bytes
//! journal/<segment>.done   ids of its records that left it, a line each
//! ```
//! A record is acknowledged only after the `fdatasync` that covers it, and
//! records are written in order, so the first frame that is short or not a
//! frame (a write a crash interrupted) ends a segment's valid part; a
//! record that fails its checksum was never acknowledged, or was damaged
//! on the disk, and is skipped.
//! Leaving is one small append to `.done`, not synced, as good as the
//! unsynced unlink it replaces: after a power cut a delivered message may be
//! sent again, never lost. A segment is deleted once every record in it
//! left and it is no longer written to. At start the relay copies every
//! record still in the journal to `deferred/` and empties it, so only the
//! running relay's own records are ever in it; other processes (`sendbridge
//! queue`) read it from disk.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use tokio::sync::oneshot;

use super::Envelope;
use super::group_commit::{copy, sync_dir};
use crate::private_files;

const MAGIC: &[u8; 4] = b"sbj1";
const FRAME: usize = 20;
/// A segment stops taking records past this size; it is deleted once its
/// last record left. Small, so that its pages are freed soon and reused
/// while still in the CPU's caches: with 64 MiB segments, copying 1 MiB
/// messages into fresh page-cache pages cost a third of the relay's CPU
/// (`cargo bench --bench relay_load`, 200 × 1 MiB: relay/ref 0.62 and 0.66
/// with 64 MiB, 0.69 and 0.72 with 4 MiB, 0.59 with a file per large
/// message).
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// A segment whose records all left is deleted, unless it is the one
/// written to and smaller than this: then it goes on taking records, so a
/// relay that delivers each message before the next arrives does not
/// create and delete a file per message, and an idle one keeps at most
/// this much.
const DRAINED_REUSE_BYTES: u64 = 1024 * 1024;

/// Where a record's parts are in its segment.
#[derive(Clone)]
pub struct Location {
    segment: Arc<Segment>,
    envelope_at: u64,
    envelope_len: usize,
    message_len: usize,
}

impl Location {
    fn message_at(&self) -> u64 {
        self.envelope_at + self.envelope_len as u64
    }

    /// Its size in the segment, frame included.
    pub fn len(&self) -> u64 {
        (FRAME + self.envelope_len + self.message_len) as u64
    }
}

struct Segment {
    name: String,
    file: File,
    /// Records in it that have not left.
    live: AtomicUsize,
    /// Its `.done` file, opened at the first record that leaves.
    done: Mutex<Option<File>>,
}

/// The segment being appended to.
struct Writer {
    segment: Arc<Segment>,
    end: u64,
}

/// A record waiting for the next group commit.
pub struct Pending {
    pub id: String,
    pub envelope: Vec<u8>,
    pub message: Arc<Vec<u8>>,
}

pub struct Journal {
    dir: PathBuf,
    writer: Mutex<Option<Writer>>,
    /// Records waiting to be written, and whether someone writes them.
    waiting: Mutex<Waiting>,
    /// The records this process appended that have not left.
    live: Mutex<HashMap<String, Location>>,
}

#[derive(Default)]
struct Waiting {
    records: Vec<Append>,
    writing: bool,
}

struct Append {
    pending: Pending,
    stored: oneshot::Sender<io::Result<()>>,
}

fn writer_stopped() -> io::Error {
    io::Error::other("the spool journal's writer stopped")
}

/// A record read back from a segment file.
pub struct Stored {
    pub envelope: Envelope,
    pub location: Location,
}

impl Journal {
    pub fn open(dir: PathBuf) -> io::Result<Journal> {
        private_files::create_dir_all(&dir)?;
        Ok(Journal {
            dir,
            writer: Mutex::default(),
            waiting: Mutex::default(),
            live: Mutex::default(),
        })
    }

    /// Appends a record; returns once it survives a power cut. Blocks, so
    /// not for the async runtime's threads: see [`Journal::append_async`].
    /// With no write running, this thread writes every record waiting.
    pub fn append(&self, pending: Pending) -> io::Result<()> {
        let (stored, writes) = self.enqueue(pending);
        if writes {
            self.write_waiting();
        }
        stored
            .blocking_recv()
            .unwrap_or_else(|_| Err(writer_stopped()))
    }

    /// Appends a record from the async runtime. The first record while no
    /// write runs starts a blocking task that writes batch after batch
    /// until no record waits: under load one task serves every session,
    /// with no blocking thread woken, and no handoff, per record.
    pub async fn append_async(self: &Arc<Self>, pending: Pending) -> io::Result<()> {
        let (stored, writes) = self.enqueue(pending);
        if writes {
            let journal = self.clone();
            tokio::task::spawn_blocking(move || journal.write_waiting());
        }
        stored.await.unwrap_or_else(|_| Err(writer_stopped()))
    }

    /// Queues a record; says whether the caller is to write.
    fn enqueue(&self, pending: Pending) -> (oneshot::Receiver<io::Result<()>>, bool) {
        let (stored, answer) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        waiting.records.push(Append { pending, stored });
        let writes = !std::mem::replace(&mut waiting.writing, true);
        (answer, writes)
    }

    /// Group commit: writes every record waiting in one batch, then those
    /// that came meanwhile, until none is left.
    fn write_waiting(&self) {
        loop {
            let batch = {
                let mut waiting = lock(&self.waiting);
                if waiting.records.is_empty() {
                    waiting.writing = false;
                    return;
                }
                std::mem::take(&mut waiting.records)
            };
            self.commit(batch);
        }
    }

    /// A record this process appended and that has not left.
    pub fn live(&self, id: &str) -> Option<Location> {
        lock(&self.live).get(id).cloned()
    }

    /// The records this process appended that have not left, by id.
    pub fn live_records(&self) -> Vec<(String, Location)> {
        let live = lock(&self.live);
        live.iter()
            .map(|(id, location)| (id.clone(), location.clone()))
            .collect()
    }

    /// Records that `id` left the journal (delivered, deleted or copied
    /// out); the segment goes once nothing in it is left, whether or not
    /// the mark could be written.
    pub fn leave(&self, id: &str, location: &Location) -> io::Result<()> {
        let segment = &location.segment;
        let marked = self.mark_done(segment, id);
        if lock(&self.live).remove(id).is_some() && segment.live.fetch_sub(1, Ordering::AcqRel) == 1
        {
            // Under the writer's lock, as a batch may be adding records to
            // it. A batch being written holds it: then the batch's leader
            // adds records to this segment or, starting another, deletes it.
            let Some(mut writer) = try_lock(&self.writer) else {
                return marked;
            };
            if segment.live.load(Ordering::Acquire) == 0 {
                match writer.as_ref() {
                    Some(current) if Arc::ptr_eq(&current.segment, segment) => {
                        if current.end >= DRAINED_REUSE_BYTES {
                            *writer = None;
                            self.delete(segment);
                        }
                    }
                    _ => self.delete(segment),
                }
            }
        }
        marked
    }

    /// One line appended to the segment's `.done` file; `O_APPEND` keeps
    /// lines whole when another process (`queue delete`) appends too.
    fn mark_done(&self, segment: &Segment, id: &str) -> io::Result<()> {
        let mut done = lock(&segment.done);
        if done.is_none() {
            let opened = private_files::options()
                .append(true)
                .create(true)
                .open(self.done_path(&segment.name))?;
            *done = Some(opened);
        }
        let line = [id.as_bytes(), b"\n"].concat();
        done.as_ref().expect("opened above").write_all(&line)
    }

    /// Reads a record's envelope.
    pub fn read_envelope(&self, location: &Location) -> io::Result<Envelope> {
        let mut envelope = vec![0; location.envelope_len];
        location
            .segment
            .file
            .read_exact_at(&mut envelope, location.envelope_at)?;
        serde_json::from_slice(&envelope)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
    }

    /// Reads a record's message bytes.
    pub fn read_message(&self, location: &Location) -> io::Result<Vec<u8>> {
        let mut message = vec![0; location.message_len];
        location
            .segment
            .file
            .read_exact_at(&mut message, location.message_at())?;
        Ok(message)
    }

    /// Whether `id` left its segment, as its `.done` file says (another
    /// process may have deleted it).
    pub fn has_left(&self, id: &str, location: &Location) -> io::Result<bool> {
        Ok(self.left(&location.segment.name)?.contains(id))
    }

    /// Every record in the segment files that has not left, oldest first:
    /// what another process sees. With `check_bytes` each record's checksum
    /// is verified (reading its bytes), else only its frame and envelope.
    pub fn scan(&self, check_bytes: bool) -> io::Result<Vec<Stored>> {
        let mut stored = Vec::new();
        for name in self.segment_names()? {
            let file = match File::open(self.log_path(&name)) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                opened => opened?,
            };
            let left = self.left(&name)?;
            let segment = Arc::new(Segment {
                name,
                file,
                live: AtomicUsize::new(0),
                done: Mutex::default(),
            });
            for record in read_records(&segment, check_bytes)? {
                if !left.contains(&record.envelope.id) {
                    stored.push(record);
                }
            }
        }
        Ok(stored)
    }

    /// Deletes every segment: after recovery copied out what was left.
    pub fn clear(&self) -> io::Result<()> {
        for name in self.segment_names()? {
            remove_if_present(&self.log_path(&name))?;
            remove_if_present(&self.done_path(&name))?;
        }
        for entry in fs::read_dir(&self.dir)? {
            // `.done` files whose segment is gone.
            fs::remove_file(entry?.path())?;
        }
        sync_dir(&self.dir)
    }

    /// A batch's records written in one go after the segment's end, then
    /// one `fdatasync`; each known as live before its sender hears.
    fn commit(&self, batch: Vec<Append>) {
        let (pending, answers): (Vec<Pending>, Vec<_>) = batch
            .into_iter()
            .map(|append| (append.pending, append.stored))
            .unzip();
        let written = self.write_batch(&mut lock(&self.writer), &pending);
        match written {
            Ok(locations) => {
                let mut live = lock(&self.live);
                for (record, location) in pending.iter().zip(locations) {
                    live.insert(record.id.clone(), location);
                }
                drop(live);
                for answer in answers {
                    let _ = answer.send(Ok(()));
                }
            }
            Err(err) => {
                for answer in answers {
                    let _ = answer.send(Err(copy(&err)));
                }
            }
        }
    }

    fn write_batch(
        &self,
        writer: &mut Option<Writer>,
        batch: &[Pending],
    ) -> io::Result<Vec<Location>> {
        let full = |writer: &Writer| {
            writer.end >= SEGMENT_BYTES
                || (writer.end >= DRAINED_REUSE_BYTES
                    && writer.segment.live.load(Ordering::Acquire) == 0)
        };
        // A segment deleted from outside (a broken mount, an operator)
        // would take writes that no name leads to.
        let unlinked = |writer: &Writer| {
            writer
                .segment
                .file
                .metadata()
                .map_or(true, |metadata| metadata.nlink() == 0)
        };
        if writer
            .as_ref()
            .is_none_or(|writer| full(writer) || unlinked(writer))
        {
            let next = self.new_segment(&batch[0].id)?;
            if let Some(full) = writer.replace(next)
                && full.segment.live.load(Ordering::Acquire) == 0
            {
                self.delete(&full.segment);
            }
        }
        let Writer { segment, end } = writer.as_mut().expect("a segment to write");
        let frames: Vec<[u8; FRAME]> = batch.iter().map(frame).collect();
        let mut parts = Vec::with_capacity(3 * batch.len());
        let mut locations = Vec::with_capacity(batch.len());
        let mut at = *end;
        for (record, frame) in batch.iter().zip(&frames) {
            parts.extend([
                IoSlice::new(frame),
                IoSlice::new(&record.envelope),
                IoSlice::new(&record.message),
            ]);
            locations.push(Location {
                segment: segment.clone(),
                envelope_at: at + FRAME as u64,
                envelope_len: record.envelope.len(),
                message_len: record.message.len(),
            });
            at += (FRAME + record.envelope.len() + record.message.len()) as u64;
        }
        // Only the leader writes, to the end: the file is append-only.
        let written = write_all(&segment.file, &mut parts).and_then(|()| segment.file.sync_data());
        if let Err(err) = written {
            // Nothing of this batch was acknowledged; cut it off so later
            // records follow valid ones (a torn record ends a segment), or
            // write to a new segment when even that fails.
            if segment
                .file
                .set_len(*end)
                .and_then(|()| segment.file.sync_data())
                .is_err()
            {
                let broken = writer.take().expect("the segment written to");
                if broken.segment.live.load(Ordering::Acquire) == 0 {
                    self.delete(&broken.segment);
                }
            }
            return Err(err);
        }
        *end = at;
        segment.live.fetch_add(batch.len(), Ordering::AcqRel);
        Ok(locations)
    }

    /// A new segment named after its first record, its name made durable.
    fn new_segment(&self, first_id: &str) -> io::Result<Writer> {
        let name = first_id.to_string();
        let file = private_files::options()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.log_path(&name))?;
        sync_dir(&self.dir)?;
        let segment = Arc::new(Segment {
            name,
            file,
            live: AtomicUsize::new(0),
            done: Mutex::default(),
        });
        Ok(Writer { segment, end: 0 })
    }

    /// Deletes a segment nothing is left in and nobody writes to. Not
    /// synced: a segment that comes back after a power cut holds only
    /// records that left, or that `.done` no longer lists and are then sent
    /// again (at-least-once, as an unsynced unlink).
    fn delete(&self, segment: &Segment) {
        let _ = fs::remove_file(self.log_path(&segment.name));
        let _ = fs::remove_file(self.done_path(&segment.name));
    }

    fn left(&self, name: &str) -> io::Result<HashSet<String>> {
        match fs::read_to_string(self.done_path(name)) {
            Ok(done) => Ok(done.lines().map(str::to_string).collect()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(err) => Err(err),
        }
    }

    fn segment_names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|extension| extension == "log")
                && let Some(name) = path.file_stem().and_then(|stem| stem.to_str())
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn done_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.done"))
    }
}

fn frame(record: &Pending) -> [u8; FRAME] {
    let mut checksum = crc32fast::Hasher::new();
    checksum.update(&record.envelope);
    checksum.update(&record.message);
    let mut frame = [0; FRAME];
    frame[..4].copy_from_slice(MAGIC);
    frame[4..8].copy_from_slice(&(record.envelope.len() as u32).to_le_bytes());
    frame[8..16].copy_from_slice(&(record.message.len() as u64).to_le_bytes());
    frame[16..].copy_from_slice(&checksum.finalize().to_le_bytes());
    frame
}

/// The valid records of a segment, up to the first frame that is not
/// (where a write a crash interrupted ends); a record whose frame is sound
/// but whose bytes fail the checksum is skipped.
fn read_records(segment: &Arc<Segment>, check_bytes: bool) -> io::Result<Vec<Stored>> {
    let file = &segment.file;
    let length = file.metadata()?.len();
    let mut records = Vec::new();
    let mut at = 0;
    while at + FRAME as u64 <= length {
        let mut frame = [0; FRAME];
        file.read_exact_at(&mut frame, at)?;
        let envelope_len = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes")) as usize;
        let message_len = u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"));
        let checksum = u32::from_le_bytes(frame[16..].try_into().expect("4 bytes"));
        let envelope_at = at + FRAME as u64;
        let end = envelope_at
            .checked_add(envelope_len as u64)
            .and_then(|end| end.checked_add(message_len));
        let Some(end) = end.filter(|end| &frame[..4] == MAGIC && *end <= length) else {
            break;
        };
        let mut envelope = vec![0; envelope_len];
        file.read_exact_at(&mut envelope, envelope_at)?;
        let location = Location {
            segment: segment.clone(),
            envelope_at,
            envelope_len,
            message_len: message_len as usize,
        };
        at = end;
        if check_bytes {
            let mut sum = crc32fast::Hasher::new();
            sum.update(&envelope);
            let mut message = vec![0; location.message_len];
            file.read_exact_at(&mut message, location.message_at())?;
            sum.update(&message);
            if sum.finalize() != checksum {
                // Its frame is sound, so the next one is where it says.
                continue;
            }
        }
        if let Ok(envelope) = serde_json::from_slice::<Envelope>(&envelope) {
            records.push(Stored { envelope, location });
        }
    }
    Ok(records)
}

/// Writes every part at the end of an append-only file (`writev` in a
/// loop: a write may be short).
fn write_all(mut file: &File, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !parts.is_empty() {
        match file.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut parts, written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        removed => removed,
    }
}

fn try_lock<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each statement leaves the state consistent; a panic elsewhere must
    // not stop acceptance.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
