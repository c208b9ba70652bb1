//! Cleaning up after a crash, at start: see the spool's module
//! documentation.

use std::fs;
use std::io;
use std::sync::atomic::Ordering;

use super::group_commit::sync_dir;
use super::{Spool, State, id_of};

/// What recovery found on start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Unacknowledged leftovers removed from `incoming/` and `data/`.
    pub removed: usize,
    /// Messages that were being delivered when the relay stopped.
    pub reactivated: usize,
}

impl Spool {
    /// Cleans up after a crash; see the module documentation.
    pub fn recover(&self) -> io::Result<Recovered> {
        let mut recovered = Recovered::default();
        for entry in fs::read_dir(self.root.join("incoming"))? {
            fs::remove_file(entry?.path())?;
            recovered.removed += 1;
        }
        for state in State::ALL {
            for entry in fs::read_dir(self.state_dir(state))? {
                let path = entry?.path();
                if id_of(&path, "json").is_none() {
                    // An acceptance or an update that did not finish.
                    fs::remove_file(&path)?;
                    recovered.removed += 1;
                }
            }
        }
        for id in self.file_ids(State::Active)? {
            fs::rename(
                self.envelope_path(State::Active, &id),
                self.envelope_path(State::Deferred, &id),
            )?;
            recovered.reactivated += 1;
        }
        // Every valid record that did not leave, unless a copy of it was
        // made before the crash; then the journal starts empty.
        for stored in self.journal.scan(true)? {
            let id = &stored.envelope.id;
            if self.find_file(id)?.is_none() {
                let message = self.journal.read_message(&stored.location)?;
                self.store_file(&stored.envelope, &message, State::Deferred)?;
                recovered.reactivated += 1;
            }
        }
        self.journal.clear()?;
        self.owns_journal.store(true, Ordering::Release);
        for entry in fs::read_dir(self.root.join("data"))? {
            let path = entry?.path();
            let Some(id) = id_of(&path, "msg").or_else(|| id_of(&path, "eml")) else {
                // A temporary file from an interrupted write.
                fs::remove_file(&path)?;
                recovered.removed += 1;
                continue;
            };
            if self.find(&id)?.is_none() {
                fs::remove_file(&path)?;
                recovered.removed += 1;
            }
        }
        sync_dir(&self.state_dir(State::Deferred))?;
        Ok(recovered)
    }
}
