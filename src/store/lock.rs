//! File locks: every `flock` the store takes goes through here.
//!
//! - lock files (`lock`, `envs/<name>/lock`): opened, created when missing, and locked shared or
//!   exclusive, at once when no one holds them in a conflicting way, else after saying what the
//!   command waits for ([`open_locked`]);
//! - objects being written (staging directories, temp files): locked exclusively by their writer
//!   from creation until they are published or dropped ([`lock_new`]), so that a cleaner can tell
//!   a leftover (lockable: its writer is gone, in whatever pid namespace it ran) from a write in
//!   progress ([`try_exclusive`]).
//!
//! The lock is released when the file is closed: holders keep the `File`.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// A lock that could not be taken, naming the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot lock {}", .0.display())]
    Lock(PathBuf, #[source] io::Error),
    #[error("cannot stat {}", .0.display())]
    Stat(PathBuf, #[source] io::Error),
}

/// Shared (many holders: commands using the store) or exclusive (one: gc, a change of an
/// environment, a writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Shared,
    Exclusive,
}

/// Opens the lock file `path` (created, mode 0644, when missing) and locks it. `read_only`: where
/// the file cannot be opened for writing because the filesystem is read-only (the store inside an
/// environment), it is opened read-only: a lock needs no write access. `waiting` runs once, before
/// the call blocks, when someone else holds the lock.
pub(crate) fn open_locked(path: &Path, kind: Kind, read_only: bool, waiting: impl FnOnce()) -> Result<File, LockError> {
    let opened = match fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).custom_flags(libc::O_CLOEXEC).open(path) {
        Err(e) if read_only && e.raw_os_error() == Some(libc::EROFS) => File::open(path),
        r => r,
    };
    let file = opened.map_err(|e| LockError::Open(path.to_owned(), e))?;
    let (now, wait) = match kind {
        Kind::Shared => (FlockOperation::NonBlockingLockShared, FlockOperation::LockShared),
        Kind::Exclusive => (FlockOperation::NonBlockingLockExclusive, FlockOperation::LockExclusive),
    };
    if flock(&file, now).is_err() {
        waiting();
        flock(&file, wait).map_err(|e| LockError::Lock(path.to_owned(), e.into()))?;
    }
    Ok(file)
}

/// Locks an object its caller has just created at `path` (a staging directory, a temp file),
/// exclusively, waiting if a cleaner holds it. Returns false when a cleaner locked it first and
/// removed it (it has no name any more): the caller takes another name.
pub(crate) fn lock_new(file: &File, path: &Path) -> Result<bool, LockError> {
    flock(file, FlockOperation::LockExclusive).map_err(|e| LockError::Lock(path.to_owned(), e.into()))?;
    let meta = file.metadata().map_err(|e| LockError::Stat(path.to_owned(), e))?;
    Ok(meta.nlink() > 0)
}

/// Takes an exclusive lock if no one holds any: true when taken (the object's writer is gone).
pub(crate) fn try_exclusive(file: &impl AsFd) -> bool {
    flock(file, FlockOperation::NonBlockingLockExclusive).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_and_seen_held() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let a = open_locked(&p, Kind::Shared, false, || panic!("nobody holds it yet")).unwrap();
        let _b = open_locked(&p, Kind::Shared, false, || panic!("shared locks do not conflict")).unwrap();
        assert!(!try_exclusive(&File::open(&p).unwrap()), "held shared");
        drop((a, _b));
        assert!(try_exclusive(&File::open(&p).unwrap()));
        let missing = open_locked(&d.path().join("no/lock"), Kind::Exclusive, false, || {}).unwrap_err();
        assert!(matches!(&missing, LockError::Open(_, e) if e.kind() == io::ErrorKind::NotFound), "{missing}");
    }

    #[test]
    fn an_object_removed_before_its_lock_is_reported_gone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let f = File::create(&p).unwrap();
        assert!(lock_new(&f, &p).unwrap());
        let g = File::create(d.path().join("u")).unwrap();
        fs::remove_file(d.path().join("u")).unwrap();
        assert!(!lock_new(&g, &d.path().join("u")).unwrap());
    }
}
