//! Files at rest that only their daemon's user may read: state directories
//! created 0700, state and credential files created 0600, whatever the
//! umask; and the check every credential file passes before it is read
//! (refused, as ssh refuses a private key, when group or others may read
//! or write it, with the command that fixes it).
//!
//! Every daemon and the CLI create their private files through here, so
//! there is one rule and one place to audit it. It does file I/O only,
//! blocking; it knows nothing of what the files hold.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every private directory.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every private file.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents, each 0700) and sets `dir` itself to
/// 0700, whatever the umask and whatever mode it had: a state directory
/// others can list leaks job names and lets them watch the store grow.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates `dir`, which must not exist yet (its parent must), as 0700
/// whatever the umask: for a directory whose absence is the proof that
/// nobody else prepared it, such as a job's fresh checkout.
pub fn create_new_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates (or truncates) `path` as a 0600 file for writing. The mode is
/// set on the open descriptor too, since the umask could only have removed
/// bits from it and an existing file keeps its old mode on open.
pub fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Makes an existing file 0600 (one another program created, such as a
/// database file or its journal).
pub fn restrict_file(path: &Path) -> io::Result<()> {
    fs::set_permissions(path, Permissions::from_mode(FILE_MODE))
}

/// Writes `bytes` to `path` atomically and durably: a 0600 temporary file
/// beside it, fsync, rename over `path`, fsync of the directory. A reader
/// sees the old contents or the new, never a mix; a crash leaves at most
/// the temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = temp_path(path);
    let written = (|| {
        let mut file = create_file(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(err) = written {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    fs::rename(&temp, path)?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// `.<name>.tmp` beside `path`: hidden, and in the same directory so the
/// rename is atomic.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Why a credential file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialFileError {
    /// It cannot be read (missing, a directory, no permission).
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Group or others may read or write it.
    #[error(
        "permissions {mode:04o} for {} are too open: a credential must be readable by its owner only; run `chmod 600 {}` (and check who could have read it)",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Reads a credential file (a token, a tokens file) after checking that
/// only its owner may read or write it. A file inside `trusted_dir` (the
/// systemd `$CREDENTIALS_DIRECTORY`, private to the service, where access
/// may be granted through an ACL that shows as group bits) is not checked.
pub fn read_credential(
    path: &Path,
    trusted_dir: Option<&Path>,
) -> Result<String, CredentialFileError> {
    let unreadable = |source| CredentialFileError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(unreadable)?;
    let trusted = trusted_dir.is_some_and(|dir| path.starts_with(dir));
    let mode = meta.mode() & 0o7777;
    if !trusted && mode & 0o077 != 0 {
        return Err(CredentialFileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(unreadable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn directories_and_files_are_private_even_when_they_existed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "an existing directory is tightened");

        let file = dir.join("f");
        fs::write(&file, "old").unwrap();
        fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        write_atomic(&file, b"new").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "new");
        assert_eq!(mode(&file), 0o600);
        assert!(!dir.join(".f.tmp").exists(), "no temporary file left");
    }

    #[test]
    fn a_new_directory_is_private_and_an_existing_one_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("fresh");
        create_new_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let again = create_new_dir(&dir).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn an_open_credential_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        fs::write(&file, "s3cret\n").unwrap();
        for open in [0o640, 0o604, 0o620, 0o666] {
            fs::set_permissions(&file, Permissions::from_mode(open)).unwrap();
            let err = read_credential(&file, None).unwrap_err().to_string();
            assert!(err.contains(&format!("permissions {open:04o}")), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", file.display())),
                "{err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
            // Inside the service's private credentials directory it is fine.
            assert!(read_credential(&file, Some(dir.path())).is_ok());
        }
        for private in [0o600, 0o400] {
            fs::set_permissions(&file, Permissions::from_mode(private)).unwrap();
            assert_eq!(read_credential(&file, None).unwrap(), "s3cret\n");
        }
        let err = read_credential(&dir.path().join("nope"), None).unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
    }
}
