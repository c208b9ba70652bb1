//! Group commit: acceptances in flight at the same time share their
//! directory fsyncs, as a database's transactions share one log flush.
//!
//! Each acceptance writes and fsyncs its own file, then hands the link
//! that makes it visible to [`GroupCommit::commit`] and waits. Whoever
//! finds no commit running leads one for everything queued so far: one
//! fsync of `data/`, the links, one fsync of each state directory they
//! went to; then everyone in that batch hears its own result. Those who
//! queued meanwhile form the next batch. With one session each message
//! has its own two directory fsyncs; with ten, several messages share them.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A new message's file in `data/` and the name in its state directory
/// that is to lead to it too (a hard link: no second file to create).
pub struct Link {
    pub existing: PathBuf,
    pub new: PathBuf,
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
    pending: Vec<(u64, Link)>,
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

    /// Links `link.new` to `link.existing` and returns once that link and
    /// every file already created in the data directory survive a power
    /// cut. The file's contents must already be fsync'd.
    pub fn commit(&self, link: Link) -> io::Result<()> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push((ticket, link));
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

    fn run(&self, batch: Vec<(u64, Link)>) -> Vec<(u64, io::Result<()>)> {
        // First the files' names in `data/`: after a power cut no state
        // entry may lead to a message whose `data/` name is gone.
        if let Err(err) = sync_dir(&self.data_dir) {
            return batch
                .into_iter()
                .map(|(ticket, _)| (ticket, Err(copy(&err))))
                .collect();
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut dirs = BTreeSet::new();
        for (ticket, Link { existing, new }) in batch {
            let linked = fs::hard_link(&existing, &new);
            if linked.is_ok() {
                dirs.insert(parent(&new).to_path_buf());
            }
            results.push((ticket, linked, new));
        }
        // Then the links: only now may anyone in the batch answer `250`.
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
        for sub in ["data", "active", "deferred"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let commit = GroupCommit::new(dir.path().join("data"));
        (dir, commit)
    }

    fn link(root: &Path, name: &str, state: &str) -> Link {
        let existing = root.join("data").join(name);
        fs::write(&existing, name).unwrap();
        Link {
            existing,
            new: root.join(state).join(name),
        }
    }

    #[test]
    fn concurrent_commits_each_get_their_own_link_done() {
        let (dir, commit) = setup();
        std::thread::scope(|scope| {
            for n in 0..40 {
                let (root, commit) = (dir.path(), &commit);
                let state = ["active", "deferred"][n % 2];
                scope.spawn(move || commit.commit(link(root, &format!("{n}.json"), state)));
            }
        });
        for n in 0..40 {
            let state = ["active", "deferred"][n % 2];
            let linked = dir.path().join(state).join(format!("{n}.json"));
            assert_eq!(fs::read_to_string(linked).unwrap(), format!("{n}.json"));
        }
    }

    #[test]
    fn a_failed_link_fails_only_its_own_caller() {
        let (dir, commit) = setup();
        let missing = Link {
            existing: dir.path().join("data/never-written.json"),
            new: dir.path().join("active/never-written.json"),
        };

        let err = commit.commit(missing).unwrap_err();
        commit
            .commit(link(dir.path(), "fine.json", "active"))
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
