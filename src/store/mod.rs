//! The store: every piece of on-disk state, and nothing about namespaces.
//!
//! ```text
//! $PLYROOT_HOME/                       default $XDG_DATA_HOME/plyroot
//! ├── lock                             flock: shared by every command, exclusive by gc
//! ├── layers/<sha256 hex>/             one immutable layer, published by rename
//! │   ├── root/                        the tree (whiteouts are char 0:0, opaque dirs user.overlay.opaque=y)
//! │   ├── layer.json                   LayerInfo: id, size, entries, source, created
//! │   └── overrides.json               what the disk could not hold (owners, devices, xattrs)
//! ├── envs/<name>/                     one environment, created by rename
//! │   ├── generations/<n>.json         immutable generation records
//! │   ├── current -> generations/<n>.json   switched by an atomic symlink replace
//! │   ├── skel/<n>-<uid>/              generated top lower: passwd/group entries, mount points
//! │   ├── upper/                       the persistent writable overlay layer
//! │   ├── work/<n>/                    the workdir of the shared overlay mounted by run slot n
//! │   ├── runs/<n>.json                run slot n: a launch's pid, mount and user namespaces,
//! │   │                                generation, skeleton, and which shared mount it uses;
//! │   │                                alive while a process is in that mount namespace (runs.rs)
//! │   ├── lock                         flock: changes of the upper and records, and launches
//! │   │                                until their root is mounted
//! │   └── mnt/                         the root's mount point during a launch (private mount ns)
//! ├── blobs/<hex>                      registry blob (or diff_id) → the layer it unpacks to (blobs.rs)
//! ├── blobs/gzip/<layer hex>           the gzip blob `push` made of a layer
//! ├── tmp/<pid>-<n>/                   staging; a directory whose pid is gone is a crash
//! │                                    leftover and is removed
//! └── notes/                           one-time notices already shown
//! ```
//!
//! Publishing is always "write under tmp/, then rename into place", so a crash at any point leaves
//! either nothing or a complete object visible.

pub(crate) mod blobs;
pub(crate) mod canonical;
pub(crate) mod env;
pub(crate) mod layer;
pub(crate) mod meta;
pub(crate) mod runs;
pub(crate) mod upper;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use rustix::fs::{flock, FlockOperation};

/// An open store, holding the store lock (shared unless asked otherwise) for as long as it lives.
pub(crate) struct Store {
    pub root: PathBuf,
    /// Held for the life of the value; never read.
    _lock: File,
    /// Deletes trees that may hold files runs wrote as other ids. The store knows nothing of
    /// namespaces: the caller supplies one that does (default: plain [`remove_tree`]).
    pub remover: fn(&Path) -> Result<()>,
}

impl Store {
    /// Opens (creating on first use) the store at `root` with a shared lock. Cheap: one open and
    /// one flock on the hot path.
    pub(crate) fn open(root: &Path) -> Result<Store> {
        Self::open_with(root, false)
    }

    /// Opens the store exclusively (garbage collection).
    #[allow(dead_code)]
    pub(crate) fn open_exclusive(root: &Path) -> Result<Store> {
        Self::open_with(root, true)
    }

    fn open_with(root: &Path, exclusive: bool) -> Result<Store> {
        let lock_path = root.join("lock");
        let lock = match open_lock(&lock_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(root)
                    .with_context(|| format!("cannot create the store at {}", root.display()))?;
                open_lock(&lock_path).with_context(|| format!("cannot open {}", lock_path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", lock_path.display())),
        };
        let (op, nb) = if exclusive {
            (FlockOperation::LockExclusive, FlockOperation::NonBlockingLockExclusive)
        } else {
            (FlockOperation::LockShared, FlockOperation::NonBlockingLockShared)
        };
        if flock(&lock, nb).is_err() {
            crate::diag::info(&format!(
                "waiting for the store lock on {} (another plyroot {} is running)",
                lock_path.display(),
                if exclusive { "command" } else { "gc" }
            ));
            flock(&lock, op).with_context(|| format!("cannot lock {}", lock_path.display()))?;
        }
        Ok(Store { root: root.to_owned(), _lock: lock, remover: remove_tree })
    }

    /// Another fd on the store lock (the same lock): a launch keeps it until its root is mounted,
    /// so gc, which takes the lock exclusively, never collects what a launch is about to mount.
    pub(crate) fn lock_file(&self) -> Result<File> {
        self._lock.try_clone().context("cannot hold the store lock")
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub(crate) fn envs_dir(&self) -> PathBuf {
        self.root.join("envs")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh staging directory under tmp/, named after this process, removed when dropped.
    pub(crate) fn staging(&self) -> Result<Staging> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tmp = self.tmp_dir();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = tmp.join(format!("{}-{n}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Staging { path, keep: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        }
    }

    /// Removes staging directories whose process is gone (killed, crashed). The name carries the
    /// pid, and a directory exists only after its process does, so no live one is taken.
    pub(crate) fn clean_leftovers(&self) -> Result<usize> {
        let mut n = 0;
        let Ok(rd) = fs::read_dir(self.tmp_dir()) else { return Ok(0) };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|s| s.split('-').next()).and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|pid| {
                // SAFETY: kill with signal 0 only checks for the process.
                unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
            });
            // Best effort: a leftover that cannot be removed now (files of another id) must not
            // fail the command that happened to find it.
            if !alive && (self.remover)(&entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn open_lock(path: &Path) -> io::Result<File> {
    match fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).custom_flags(libc::O_CLOEXEC).open(path) {
        // Inside an environment the store is bound read-only; a lock needs no write access.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => fs::File::open(path),
        r => r,
    }
}

/// A directory under tmp/ that is removed when dropped unless it was moved into place.
pub(crate) struct Staging {
    pub path: PathBuf,
    keep: bool,
}

impl Staging {
    /// Publishes the staging directory at `dest` by rename. Returns false when `dest` already
    /// exists (someone published the same content first); the staging dir is then discarded.
    pub(crate) fn publish(mut self, dest: &Path) -> Result<bool> {
        match fs::rename(&self.path, dest) {
            Ok(()) => {
                self.keep = true;
                Ok(true)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot move {} to {}", self.path.display(), dest.display())),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_tree(&self.path);
        }
    }
}

/// Removes a tree that may hold read-only directories (a rootfs has 0555 dirs).
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    make_writable(path);
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

fn make_writable(path: &Path) {
    let Ok(md) = fs::symlink_metadata(path) else { return };
    if !md.is_dir() {
        return;
    }
    let mode = md.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                make_writable(&e.path());
            }
        }
    }
}

/// Writes `data` to `path` atomically (temp file + rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The default store location: $XDG_DATA_HOME/plyroot, else ~/.local/share/plyroot.
pub(crate) fn default_root() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("plyroot"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context("neither $XDG_DATA_HOME nor $HOME is set: pass --store DIR or set PLYROOT_HOME")?;
    Ok(PathBuf::from(home).join(".local/share/plyroot"))
}

#[cfg(test)]
mod tests;
