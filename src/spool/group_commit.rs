//! Group commit: acceptances in flight at the same time share their
//! directory fsyncs, as a database's transactions share one log flush.
//!
//! Each acceptance writes and fsyncs its own files, then hands the rename
//! that makes it visible to [`GroupCommit::commit`] and waits. Whoever
//! finds no commit running leads one for everything queued so far: one
//! fsync of `data/`, the renames, one fsync of each state directory they
//! went to; then everyone in that batch hears its own result. Those who
//! queued meanwhile form the next batch. With one session it is today's
//! sequence; with ten, ten messages share two directory fsyncs.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A new envelope's move from `incoming/` into its state directory.
pub struct Rename {
    pub from: PathBuf,
    pub to: PathBuf,
}

pub struct GroupCommit {
    /// Where the bytes' files are created; their names must be durable
    /// before any envelope naming them is.
    data_dir: PathBuf,
    queue: Mutex<Queue>,
    committed: Condvar,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Rename)>,
    done: HashMap<u64, io::Result<()>>,
    committing: bool,
}

impl GroupCommit {
    pub fn new(data_dir: PathBuf) -> GroupCommit {
        GroupCommit {
            data_dir,
            queue: Mutex::default(),
            committed: Condvar::new(),
        }
    }

    /// Renames `rename.from` to `rename.to` and returns once that rename
    /// and every file already created in the data directory survive a
    /// power cut. The files' contents must already be fsync'd.
    pub fn commit(&self, rename: Rename) -> io::Result<()> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push((ticket, rename));
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
            let results = self.run(batch);
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

    fn run(&self, batch: Vec<(u64, Rename)>) -> Vec<(u64, io::Result<()>)> {
        // First the bytes' names: after a power cut no envelope may point
        // at bytes that are not there.
        if let Err(err) = sync_dir(&self.data_dir) {
            return batch
                .into_iter()
                .map(|(ticket, _)| (ticket, Err(copy(&err))))
                .collect();
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut dirs = BTreeSet::new();
        for (ticket, Rename { from, to }) in batch {
            let renamed = fs::rename(&from, &to);
            if renamed.is_ok() {
                dirs.insert(parent(&to).to_path_buf());
            }
            results.push((ticket, renamed, to));
        }
        // Then the renames: only now may anyone in the batch answer `250`.
        for dir in dirs {
            if let Err(err) = sync_dir(&dir) {
                for (_, result, to) in &mut results {
                    if result.is_ok() && parent(to) == dir {
                        *result = Err(copy(&err));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|(ticket, result, _)| (ticket, result))
            .collect()
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// One failed fsync fails everyone who shared it; `io::Error` is not
/// `Clone`, so each gets an equal copy (the OS code, so `ENOSPC` is still
/// recognised as a full disk).
fn copy(err: &io::Error) -> io::Error {
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

    fn setup() -> (tempfile::TempDir, GroupCommit) {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["data", "incoming", "active", "deferred"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let commit = GroupCommit::new(dir.path().join("data"));
        (dir, commit)
    }

    fn rename(root: &Path, name: &str, state: &str) -> Rename {
        let from = root.join("incoming").join(name);
        fs::write(&from, name).unwrap();
        Rename {
            from,
            to: root.join(state).join(name),
        }
    }

    #[test]
    fn concurrent_commits_each_get_their_own_rename_done() {
        let (dir, commit) = setup();
        std::thread::scope(|scope| {
            for n in 0..40 {
                let (root, commit) = (dir.path(), &commit);
                let state = ["active", "deferred"][n % 2];
                scope.spawn(move || commit.commit(rename(root, &format!("{n}.json"), state)));
            }
        });
        for n in 0..40 {
            let state = ["active", "deferred"][n % 2];
            let moved = dir.path().join(state).join(format!("{n}.json"));
            assert_eq!(fs::read_to_string(moved).unwrap(), format!("{n}.json"));
        }
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_failed_rename_fails_only_its_own_caller() {
        let (dir, commit) = setup();
        let missing = Rename {
            from: dir.path().join("incoming/never-written.json"),
            to: dir.path().join("active/never-written.json"),
        };

        let err = commit.commit(missing).unwrap_err();
        commit
            .commit(rename(dir.path(), "fine.json", "active"))
            .unwrap();

        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(dir.path().join("active/fine.json").exists());
    }

    #[test]
    fn a_shared_error_keeps_its_os_code() {
        let full = io::Error::from_raw_os_error(28); // ENOSPC
        assert!(crate::spool_space::is_full(&copy(&full)));
        let other = io::Error::other("odd");
        assert_eq!(copy(&other).to_string(), "odd");
    }
}
