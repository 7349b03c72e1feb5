//! The store: every piece of on-disk state, and nothing about namespaces.
//!
//! ```text
//! $PLYROOT_HOME/                       default $XDG_DATA_HOME/plyroot; 0700, like envs/, each
//! │                                    environment's directory and saved/
//! ├── lock                             flock: shared by every command, exclusive by gc (lock.rs)
//! ├── layers/<sha256 hex>/             one immutable layer, published by rename (layer.rs; source/import.rs)
//! │   ├── root/                        the tree (whiteouts are char 0:0, opaque dirs user.overlay.opaque=y)
//! │   ├── layer.json                   LayerInfo: id, size, entries, source, created
//! │   └── overrides.json               what the disk could not hold (owners, devices, xattrs; meta.rs)
//! ├── envs/<name>/                     one environment, created by rename (env.rs)
//! │   ├── generations/<n>.json         immutable generation records
//! │   ├── current -> generations/<n>.json   switched by an atomic symlink replace
//! │   │                                (via a temp link .current.plyroot-PID-N.tmp)
//! │   ├── lock                         flock: held by a command changing the environment, and
//! │   │                                by a launch until its root is mounted and recorded
//! │   ├── journal.json                 the change of the upper or of `current` in progress (journal.rs)
//! │   ├── commit/                      a commit's upper (root/) and layer.json while it becomes a layer
//! │   ├── nixdb/                       a rebase's merged Nix database until it is renamed into the upper (nixdb.rs)
//! │   ├── saved/<label>-<secs>[-<k>]/  uppers that `reset` (or a recovery) set aside
//! │   ├── skel/<n>-<hash>/             generated top lower of generation n, one per skeleton (its
//! │   │                                content's hash): passwd/group entries, mount points
//! │   ├── upper/                       the persistent writable overlay layer (0755: its mode is `/`'s)
//! │   ├── upper.json                   the layer stack the upper was written on
//! │   ├── work/<n>/                    the workdir of the shared overlay mounted by run slot n
//! │   ├── runs/<n>.json                run slot n: a launch's pid, mount and user namespaces,
//! │   │                                generation, skeleton, and which shared mount it uses (a
//! │   │                                booted init's too); alive while its mount namespace is (runs.rs)
//! │   ├── mnt/                         the root's mount point during a launch (private mount ns)
//! │   ├── boot.log                     the console output of the booted init (`plyroot boot`)
//! │   └── commit.json, upper.old/,     what plyroot versions before the journal left mid-change;
//! │       upper.new/, upper.new.json   recovery turns them back into the states above
//! ├── blobs/<hex>                      registry blob (or diff_id) → the layer it unpacks to (blobs.rs)
//! ├── blobs/gzip/<layer hex>           the gzip blob `push` made of a layer: "digest size"
//! ├── blobs/inputs/<hex>               a build step input's file digests, by name, with the
//! │                                    (device, inode, size, mtime, ctime) each was read at
//! ├── blobs/files/<hex>                a local file (by device, inode, size, mtime, ctime) → the
//! │                                    layers it was imported as, so it is not read again
//! ├── launchers/<env>/<program>.json   receipts of exported launchers: the link and the files
//! │                                    installed with it (launcher.rs)
//! ├── bin/plyroot                      the copy of plyroot that launchers run (written via
//! │                                    bin/.plyroot.tmp-PID)
//! ├── steps/<key hex>                  the layer a build step with this key made (steps.rs)
//! ├── builds/<env>/, builds/<env>.lock the environment a step of <env> runs in, kept after a
//! │                                    failure until the next build; the build's lock (steps.rs)
//! ├── lockfiles.json                   the manifests' lock files whose pins gc keeps (steps.rs)
//! ├── tmp/<pid>-<n>/                   staging, flock'd (the directory itself) for as long as
//! │                                    it is used; one whose lock can be taken is a leftover
//! └── notes/<key>                      one-time notices already shown (empty marker files)
//! ```
//!
//! Publishing is always "write under tmp/, then rename into place", so a crash at any point leaves
//! either nothing or a complete object visible. Files are replaced by [`write_atomic`]: a locked
//! temp file `.NAME.plyroot-PID-N.tmp` beside them, fsync'd, renamed over, and the directory
//! fsync'd. Whoever finds such a temp file unlocked (its writer is gone) removes it, and those of
//! plyroot versions before it (`NAME.tmp-PID`).

pub(crate) mod blobs;
pub(crate) mod canonical;
pub(crate) mod env;
pub(crate) mod gc;
pub(crate) mod journal;
pub(crate) mod layer;
pub(crate) mod limits;
pub(crate) mod lock;
pub(crate) mod meta;
pub(crate) mod nixdb;
pub(crate) mod owners;
pub(crate) mod runs;
pub(crate) mod steps;
pub(crate) mod tree;
pub(crate) mod upper;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use crate::userns;

/// An open store, holding the store lock (shared unless asked otherwise) for as long as it lives.
pub(crate) struct Store {
    pub root: PathBuf,
    /// Held for the life of the value; never read.
    _lock: File,
    /// The lock is exclusive (gc): no other plyroot command is in the store, so every temp file
    /// in it is a leftover.
    exclusive: bool,
}

impl Store {
    /// Opens (creating on first use) the store at `root` with a shared lock. Cheap: one open and
    /// one flock on the hot path.
    pub(crate) fn open(root: &Path) -> Result<Store> {
        Self::open_with(root, false)
    }

    /// Opens the store exclusively (garbage collection).
    pub(crate) fn open_exclusive(root: &Path) -> Result<Store> {
        Self::open_with(root, true)
    }

    fn open_with(root: &Path, exclusive: bool) -> Result<Store> {
        // One store per user: another user's (root's included) would leave files its owner cannot
        // read or delete, and would read its owners through the wrong ids.
        if let Ok(m) = fs::metadata(root) {
            let me = rustix::process::geteuid().as_raw();
            if m.uid() != me && crate::userns::in_initial_userns() {
                anyhow::bail!(
                    "the store at {} belongs to uid {}, not to you (uid {me}): plyroot keeps one store per user; run plyroot as its owner, or use a store of your own (--store or PLYROOT_HOME)",
                    root.display(),
                    m.uid()
                );
            }
        }
        let lock_path = root.join("lock");
        let kind = if exclusive { lock::Kind::Exclusive } else { lock::Kind::Shared };
        let waiting = || {
            crate::diag::info!(
                "waiting for the store lock on {} (another plyroot {} is running)",
                lock_path.display(),
                if exclusive { "command" } else { "gc, or its one-time migration of the store," }
            )
        };
        let lock = match lock::open_locked(&lock_path, kind, true, waiting) {
            Ok(f) => f,
            Err(lock::LockError::Open(_, e)) if e.kind() == io::ErrorKind::NotFound => {
                // The store holds every upper: private to its owner. Its parents (~/.local/share)
                // are the user's business and keep the usual modes.
                if let Some(parent) = root.parent() {
                    fs::create_dir_all(parent).with_context(|| format!("cannot create the store at {}", root.display()))?;
                }
                match private_dir(root) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e).with_context(|| format!("cannot create the store at {}", root.display())),
                }
                lock::open_locked(&lock_path, kind, true, waiting)?
            }
            Err(e) => return Err(e.into()),
        };
        if owners::migration_due(root) {
            // Once, after an upgrade, with no other command in the store: drop the lock, take it
            // exclusively, migrate (if nobody did meanwhile), and take the asked-for one again.
            drop(lock);
            let excl = lock::open_locked(&lock_path, lock::Kind::Exclusive, true, waiting)?;
            if owners::migration_due(root) {
                owners::migrate(root)?;
            }
            drop(excl);
            let lock = lock::open_locked(&lock_path, kind, true, || {})?;
            return Ok(Store { root: root.to_owned(), _lock: lock, exclusive });
        }
        Ok(Store { root: root.to_owned(), _lock: lock, exclusive })
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

    /// A fresh staging directory under tmp/, locked (flock on the directory) until dropped, and
    /// removed when dropped unless it was moved into place.
    pub(crate) fn staging(&self) -> Result<Staging> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tmp = self.tmp_dir();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            // The pid only makes the name unique in this pid namespace and tells a human whose
            // it was; liveness is the lock.
            let path = tmp.join(format!("{}-{n}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
            let dir = match File::open(&path) {
                Ok(d) => d,
                // A cleaner took it between mkdir and open: it was never ours to use.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            // A cleaner that locked it first removed it: take another name.
            if !lock::lock_new(&dir, &path)? {
                continue;
            }
            return Ok(Staging { path, keep: false, _lock: dir });
        }
    }

    /// Removes what crashed commands left: staging directories nobody holds locked (their
    /// command is gone, in whatever pid namespace it ran), unlocked temp files of atomic writes in
    /// the store's own directories, and under the exclusive lock (gc) `switch`'s temp links.
    /// Returns the number of staging directories removed.
    pub(crate) fn clean_leftovers(&self) -> Result<usize> {
        let mut n = 0;
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for entry in rd.flatten() {
                let path = entry.path();
                let Ok(dir) = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY).open(&path) else { continue };
                if !lock::try_exclusive(&dir) {
                    continue;
                }
                // Best effort: a leftover that cannot be removed now (files of another id) must not
                // fail the command that happened to find it.
                if remove_tree_mapped(&path).is_ok() {
                    n += 1;
                }
            }
        }
        let mut dirs = vec![self.root.clone(), self.root.join("blobs"), self.root.join("blobs/gzip"), self.root.join("notes"), self.root.join("steps"), self.root.join("blobs/inputs")];
        for parent in [self.envs_dir(), self.root.join("launchers")] {
            if let Ok(rd) = fs::read_dir(&parent) {
                for e in rd.flatten() {
                    dirs.push(e.path());
                    dirs.push(e.path().join("generations"));
                }
            }
        }
        for d in dirs {
            clean_temps(&d, None);
        }
        if self.exclusive {
            // `switch`'s temp links, and the copy of plyroot that exporting launchers makes
            // (bin/.plyroot.tmp-PID), are not locked; only commands holding the store lock write
            // them, so with the lock exclusive they are all leftovers.
            for env in self.envs().unwrap_or_default() {
                env.remove_switch_temps();
            }
            clean_temps(&self.root.join("bin"), None);
        }
        Ok(n)
    }
}

impl Store {
    /// Deletes `path` (a tree in the store, whose files may be owned by subordinate ids) so that it
    /// disappears at once: renamed into a staging directory, then deleted there. An interrupted
    /// deletion is a leftover the next cleaning removes, never a half-deleted object in place.
    /// `what` names it in errors.
    pub(crate) fn discard(&self, path: &Path, what: &str) -> Result<()> {
        let st = self.staging()?;
        let grave = st.path.join("discarded");
        fs::rename(path, &grave).with_context(|| format!("cannot delete {what}"))?;
        remove_tree_mapped(&grave).with_context(|| format!("{what} was moved away, but deleting it in {} failed", grave.display()))
    }
}

/// Creates one directory that only its owner may enter (`mkdir` with mode 0700, whatever the
/// umask).
pub(crate) fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// Creates an upper: mode 0755 whatever the umask, because an overlay's root directory takes the
/// mode of its upper's, and services that drop root must be able to enter `/`. The environment's
/// directory around it (0700) keeps other users out.
pub(crate) fn upper_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

/// A directory under tmp/ that is removed when dropped unless it was moved into place.
pub(crate) struct Staging {
    pub path: PathBuf,
    keep: bool,
    /// The directory itself, flock'd: [`Store::clean_leftovers`] leaves it alone while held.
    _lock: File,
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
            // Its files may be owned by subordinate ids already (`owners`).
            let _ = remove_tree_mapped(&self.path);
        }
    }
}

/// Removes a tree that may hold read-only directories (a rootfs has 0555 dirs, an archive may
/// have 0000 ones), or a single file, symlink or device; a path that is not there is no error.
/// Any depth: the walk goes by `*at` calls with a bounded number of open directories (a run can
/// make a tree deeper than a path can name), lending its owner write access on the way down.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if !m.is_dir() => {
            return match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
            };
        }
        _ => {}
    }
    tree::remove_dir_tree(path).map_err(|(rel, e)| {
        let at = if rel.is_empty() { path.display().to_string() } else { format!("{}/{}", path.display(), tree::shown(&rel)) };
        anyhow::Error::new(e).context(format!("cannot remove {at}"))
    })
}

/// Removes a tree, also one holding files that runs wrote as subordinate ids (owned by host ids
/// the user cannot touch directly): those are removed from inside a user namespace that maps
/// every id the user has, where the user is root over them. The store removes every tree runs
/// may have written to (uppers, skeletons, layers, staging leftovers) this way.
pub(crate) fn remove_tree_mapped(path: &Path) -> Result<()> {
    let first = match remove_tree(path) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if rustix::process::geteuid().is_root() {
        return Err(first);
    }
    let user = userns::HostUser::current();
    let all = userns::all_ids(&user, userns::host_subids(&user));
    let path = path.to_owned();
    crate::sys::process::in_child(move || {
        userns::enter_one_level(&all)?;
        remove_tree(&path)
    })
    .map_err(|e| first.context(format!("removing it inside a user namespace failed too: {e:#}")))
}

/// Writes `data` to `path` atomically and durably: a locked temp file beside it, fsync'd,
/// renamed over `path`, then the directory fsync'd. Not for launch hot paths (two fsyncs).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut t = TempFile::beside(path)?;
    t.file.write_all(data).with_context(|| format!("cannot write {}", t.path.display()))?;
    t.commit()
}

/// A temp file `.NAME.plyroot-PID-N.tmp` beside its destination, flock'd for as long as it is
/// being written (so that a later command can tell a leftover from a write in progress, in any pid
/// namespace), removed when dropped unless committed.
pub(crate) struct TempFile {
    pub path: PathBuf,
    pub file: File,
    dest: PathBuf,
    done: bool,
}

/// The `.NAME.plyroot-` prefix and `.tmp` suffix of the temp files of `NAME`.
fn temp_affixes(name: &std::ffi::OsStr) -> (String, &'static str) {
    (format!(".{}.plyroot-", name.to_string_lossy()), ".tmp")
}

impl TempFile {
    /// Creates the temp file of `dest`, removing leftovers of earlier writes of `dest` first.
    pub(crate) fn beside(dest: &Path) -> Result<TempFile> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = dest.file_name().with_context(|| format!("cannot write {}: it names no file", dest.display()))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        clean_temps(dir, Some(name));
        let (prefix, suffix) = temp_affixes(name);
        loop {
            let path = dir.join(format!("{prefix}{}-{}{suffix}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            let file = match fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_CLOEXEC).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot write {} (creating {} failed)", dest.display(), path.display())),
            };
            // Unlinked by a cleaner between create and lock: take another name.
            if !lock::lock_new(&file, &path)? {
                continue;
            }
            return Ok(TempFile { path, file, dest: dest.to_owned(), done: false });
        }
    }

    /// Makes the content durable, puts it in place, and makes the new name durable.
    pub(crate) fn commit(mut self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("cannot write {} (fsync failed)", self.path.display()))?;
        fs::rename(&self.path, &self.dest).with_context(|| format!("cannot write {}", self.dest.display()))?;
        self.done = true;
        // Past the rename the new content is what everyone reads: failing now would report a
        // change as not made. Only its durability across a power cut is in doubt; say so.
        if let Err(e) = sync_dir(self.dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))) {
            crate::diag::warn!("{} is written, but may not survive a power cut: {e:#}", self.dest.display());
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    d.sync_all().with_context(|| format!("cannot sync {}", dir.display()))
}

/// Removes temp files of [`TempFile`] (and of plyroot versions before it, `STEM.tmp-PID`) in
/// `dir` whose writer is gone: only regular files whose lock can be taken, and only the same file
/// that was locked. `only`: just the temp files of that destination name. Best effort.
pub(crate) fn clean_temps(dir: &Path, only: Option<&std::ffi::OsStr>) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let wanted = only.map(temp_affixes);
    let legacy_stem = only.map(|n| Path::new(n).file_stem().unwrap_or(n).to_string_lossy().into_owned());
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = match &wanted {
            Some((prefix, suffix)) => name.starts_with(prefix.as_str()) && name.ends_with(suffix),
            None => name.starts_with('.') && name.contains(".plyroot-") && name.ends_with(".tmp"),
        };
        let legacy = match name.rsplit_once(".tmp-") {
            Some((stem, pid)) => !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && legacy_stem.as_ref().is_none_or(|s| s == stem),
            None => false,
        };
        if (ours || legacy) && remove_if_unlocked(&e.path()) {
            n += 1;
        }
    }
    n
}

/// Unlinks `path` if it is a regular file nobody holds an flock on (its writer is gone), and
/// it is still the file that was locked.
fn remove_if_unlocked(path: &Path) -> bool {
    let Ok(f) = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path) else { return false };
    let Ok(m) = f.metadata() else { return false };
    if !m.is_file() || !lock::try_exclusive(&f) {
        return false;
    }
    let same = fs::symlink_metadata(path).is_ok_and(|now| now.dev() == m.dev() && now.ino() == m.ino());
    same && fs::remove_file(path).is_ok()
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
