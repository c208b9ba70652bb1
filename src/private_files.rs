//! Files and folders only the relay's user may read: everything under the
//! spool (message data, envelopes, transcripts, daily-limit logs, tokens)
//! and a certificate the relay generates. The mode is given at creation, so
//! no umask widens it; folders left wider by an older version are closed
//! when the spool is opened (files in a 0700 folder are out of reach even
//! when their own mode is wider).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const FILE_MODE: u32 = 0o600;
const FOLDER_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents, each 0700.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(FOLDER_MODE)
        .create(dir)
}

/// Open options under which a file created is 0600.
pub fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// `fs::write`, creating the file 0600.
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .write_all(contents)
}

/// Makes `root` and the folders directly in it 0700 where they are not (a
/// spool tree is one level deep). Symbolic links are followed: a folder
/// linked to another disk is private too. A folder that cannot be changed,
/// e.g. one owned by another user, is named in a warning and left as it is.
pub fn restrict_folders(root: &Path) {
    let children = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    for folder in std::iter::once(root.to_path_buf()).chain(children) {
        let Ok(metadata) = fs::metadata(&folder) else {
            continue;
        };
        if !metadata.is_dir() || metadata.permissions().mode() & 0o777 == FOLDER_MODE {
            continue;
        }
        let restricted = fs::set_permissions(&folder, fs::Permissions::from_mode(FOLDER_MODE));
        if let Err(err) = restricted {
            tracing::warn!(folder = %folder.display(), error = %err, "cannot make a spool folder private (0700)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_files_and_folders_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        let file = nested.join("f");
        write(&file, b"x").unwrap();
        assert_eq!(
            [mode(&dir.path().join("a")), mode(&nested), mode(&file)],
            [0o700, 0o700, 0o600]
        );
    }

    #[test]
    fn restricting_closes_the_root_and_its_folders_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let deeper = root.join("data/deeper");
        fs::create_dir_all(&deeper).unwrap();
        let file = root.join("sendbridge.pid");
        fs::write(&file, "1\n").unwrap();
        for path in [&root, &root.join("data"), &deeper, &file] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        }

        restrict_folders(&root);

        let modes = [&root, &root.join("data"), &deeper, &file].map(|path| mode(path));
        assert_eq!(modes, [0o700, 0o700, 0o755, 0o755]);
    }
}
