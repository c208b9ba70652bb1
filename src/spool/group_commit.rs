//! Group commit: files placed in a state directory at the same time share
//! its fsync, as a database's transactions share one log flush (the
//! journal batches its appends the same way, see `journal`).
//!
//! Each writer writes and fsyncs its own file, renames it to its name
//! in its state directory, then asks [`GroupCommit::commit`] to make that
//! name durable and waits. Whoever finds no commit running leads one for
//! everything queued so far: one fsync of each directory named; then
//! everyone in that batch hears its own result. Those who queued meanwhile
//! form the next batch (their names may have been made after the running
//! fsync began). With one session each message has its own directory
//! fsync; with ten, several messages share one.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

#[derive(Default)]
pub struct GroupCommit {
    queue: Mutex<Queue>,
    committed: Condvar,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    /// The directory each waiting caller needs synced.
    pending: Vec<(u64, PathBuf)>,
    done: HashMap<u64, io::Result<()>>,
    committing: bool,
}

impl GroupCommit {
    /// Returns once every name made in `dir` before the call survives a
    /// power cut.
    pub fn commit(&self, dir: &Path) -> io::Result<()> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push((ticket, dir.to_path_buf()));
        loop {
            if let Some(result) = queue.done.remove(&ticket) {
                return result;
            }
            if queue.committing {
                queue = self
                    .committed
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            queue.committing = true;
            let batch = mem::take(&mut queue.pending);
            drop(queue);
            let results = run(batch);
            queue = self.lock();
            queue.done.extend(results);
            queue.committing = false;
            self.committed.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent between statements; a panic elsewhere
        // must not stop acceptance.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One fsync per directory in the batch; each caller gets its directory's
/// result.
fn run(batch: Vec<(u64, PathBuf)>) -> Vec<(u64, io::Result<()>)> {
    let mut synced: BTreeMap<PathBuf, io::Result<()>> = BTreeMap::new();
    batch
        .into_iter()
        .map(|(ticket, dir)| {
            let result = synced.entry(dir).or_insert_with_key(|dir| sync_dir(dir));
            (ticket, result.as_ref().map(|_| ()).map_err(copy))
        })
        .collect()
}

/// One failed fsync fails everyone who shared it; `io::Error` is not
/// `Clone`, so each gets an equal copy (the OS code, so `ENOSPC` is still
/// recognised as a full disk).
pub fn copy(err: &io::Error) -> io::Error {
    match err.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(err.kind(), err.to_string()),
    }
}

/// Makes renames and new files in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_commits_all_return_once_their_directory_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let commit = GroupCommit::default();
        std::thread::scope(|scope| {
            for n in 0..40 {
                let (root, commit) = (dir.path(), &commit);
                scope.spawn(move || {
                    std::fs::write(root.join(format!("{n}.json")), "x").unwrap();
                    commit.commit(root).unwrap();
                });
            }
        });
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 40);
    }

    #[test]
    fn a_batch_syncs_each_directory_once_and_a_failure_reaches_only_its_callers() {
        let dir = tempfile::tempdir().unwrap();
        let (fine, missing) = (dir.path().join("active"), dir.path().join("gone"));
        std::fs::create_dir(&fine).unwrap();
        let batch = vec![
            (1, fine.clone()),
            (2, missing.clone()),
            (3, fine),
            (4, missing),
        ];

        let results: Vec<(u64, Option<io::ErrorKind>)> = run(batch)
            .into_iter()
            .map(|(ticket, result)| (ticket, result.err().map(|err| err.kind())))
            .collect();

        let missing = Some(io::ErrorKind::NotFound);
        assert_eq!(results, [(1, None), (2, missing), (3, None), (4, missing)]);
    }

    #[test]
    fn a_shared_error_keeps_its_os_code() {
        let full = io::Error::from_raw_os_error(28); // ENOSPC
        assert!(crate::spool_space::is_full(&copy(&full)));
        let other = io::Error::other("odd");
        assert_eq!(copy(&other).to_string(), "odd");
    }
}
