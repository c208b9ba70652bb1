//! The token store: an account's refresh token in
//! `<spool.dir>/oauth/<account>.json`, mode 0600, replaced atomically (temp
//! file, fsync, rename, fsync of the directory) so a crash leaves the old
//! file or the new one, never half of either. No access token is kept.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::private_files;
use crate::secret::Secret;

/// What the store holds for an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub refresh_token: Option<Secret>,
    /// The mailbox signed in as, and the scopes granted: for `oauth status`.
    pub username: String,
    pub scopes: Vec<String>,
    /// When the last access token expires (Unix milliseconds).
    pub access_expires_at: Option<u64>,
}

/// The file's layout; `Secret` has no `Serialize`, on purpose.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    refresh_token: Option<String>,
    #[serde(default)]
    username: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    access_expires_at: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The store of `account` under `spool_dir`. Account names become file
    /// names, so only plain names are accepted.
    pub fn new(spool_dir: &Path, account: &str) -> anyhow::Result<Store> {
        let plain = !account.is_empty()
            && !account.starts_with('.')
            && account
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        anyhow::ensure!(
            plain,
            "account name {account:?} cannot name a token file: use letters, digits, '-', '_' or '.'"
        );
        Ok(Store {
            path: spool_dir.join("oauth").join(format!("{account}.json")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` when nobody signed in yet.
    pub fn load(&self) -> io::Result<Option<Stored>> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        // Only the position: serde_json's messages can quote a value.
        let file: OnDisk = serde_json::from_slice(&bytes).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is damaged (line {}, column {})",
                    self.path.display(),
                    err.line(),
                    err.column()
                ),
            )
        })?;
        Ok(Some(Stored {
            refresh_token: file.refresh_token.map(Secret::new),
            username: file.username,
            scopes: file.scopes,
            access_expires_at: file.access_expires_at,
        }))
    }

    pub fn save(&self, stored: &Stored) -> io::Result<()> {
        let dir = self.path.parent().expect("the store is under oauth/");
        private_files::create_dir_all(dir)?;
        let file = OnDisk {
            refresh_token: stored
                .refresh_token
                .as_ref()
                .map(|token| token.expose().to_string()),
            username: stored.username.clone(),
            scopes: stored.scopes.clone(),
            access_expires_at: stored.access_expires_at,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        let temp = self.path.with_extension("json.tmp");
        // A leftover from a crash may have other permissions; start afresh.
        let _ = fs::remove_file(&temp);
        let mut out = private_files::options()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        fs::rename(&temp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn saves_privately_and_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "gmail").unwrap();
        assert_eq!(store.load().unwrap(), None);
        let stored = Stored {
            refresh_token: Some(Secret::new("rt-1")),
            username: "me@example.com".into(),
            scopes: vec!["https://mail.google.com/".into()],
            access_expires_at: Some(1_700_000_000_000),
        };
        store.save(&stored).unwrap();
        let second = Stored {
            refresh_token: Some(Secret::new("rt-2")),
            ..stored
        };
        store.save(&second).unwrap();
        assert_eq!(store.load().unwrap(), Some(second));
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path().join("oauth"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["gmail.json"], "no temp file left behind");
    }

    #[test]
    fn a_damaged_file_is_reported_without_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), "gmail").unwrap();
        fs::create_dir(dir.path().join("oauth")).unwrap();
        fs::write(store.path(), r#"{"access_expires_at": "token-SECRET"}"#).unwrap();
        let err = store.load().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn account_names_cannot_escape_the_directory() {
        let dir = Path::new("/spool");
        assert!(Store::new(dir, "../etc/passwd").is_err());
        assert!(Store::new(dir, ".hidden").is_err());
        assert!(Store::new(dir, "").is_err());
        assert!(Store::new(dir, "m365-billing_2").is_ok());
    }
}
