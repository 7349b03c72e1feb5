//! The keeper: a process that keeps an environment's shared overlay mounted between runs.
//!
//! Making the overlay (a new superblock: overlayfs checks and empties its workdir) and, with
//! subordinate ids, mapping a fresh base user namespace through the setuid newuidmap/newgidmap
//! are the costliest steps of a launch. So the launch that mounts the shared overlay leaves a
//! keeper behind: a process in the environment's base user namespace whose mount namespace has
//! the overlay as its root, and nothing else to do. Later launches join it as they join any live
//! run (see `mounts`): no helper to exec, no superblock to make.
//!
//! The keeper is a cache, never a reason to refuse. It ends `PLYROOT_LINGER` seconds (default 60;
//! 0: no keeper) after the last launch of the environment — it watches the run slots, which every
//! launch writes — or when its environment is removed. Commands that need the upper unmounted
//! (commit, reset, rebase, rm, a run of another generation) end it first when nothing else is in
//! its user namespace ([`crate::store::env::Env::dismiss_keeper`]). podman keeps its rootless user
//! namespace alive the same way, in a pause process.

use std::cell::Cell;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::fs::inotify;

use super::mounts::Shared;
use super::RootSpec;
use crate::store::runs::{write_record, NestedNs, RunRecord};
use crate::sys::{mount, process};

/// How long a keeper waits for the next launch (None: no keeper); read (and a bad value said)
/// once per process.
pub(crate) fn linger() -> Option<Duration> {
    static LINGER: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *LINGER.get_or_init(read_linger)
}

fn read_linger() -> Option<Duration> {
    let secs = match std::env::var("PLYROOT_LINGER") {
        Ok(s) if s.trim().is_empty() => DEFAULT_LINGER,
        Ok(s) => s.trim().parse::<u64>().map(|n| n.min(MAX_LINGER)).unwrap_or_else(|_| {
            crate::diag::warn!("PLYROOT_LINGER={s:?} is not a number of seconds: the keeper waits {DEFAULT_LINGER} s");
            DEFAULT_LINGER
        }),
        Err(_) => DEFAULT_LINGER,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

const DEFAULT_LINGER: u64 = 60;
/// A year: longer is forever, as far as a keeper is concerned (and fits poll's timeout).
const MAX_LINGER: u64 = 365 * 24 * 3600;

/// The keeper's run slot, and its record as far as the launch knows it.
pub(crate) struct Slot {
    pub file: fs::File,
    pub path: PathBuf,
    pub record: RunRecord,
}

/// Starts a keeper of `shared` (just mounted for `root`, in the base user namespace `base`: inode
/// and id), watching the run slots. Runs in the base namespaces. The keeper writes its own record
/// before it says it is ready: a keeper exists only recorded, whatever happens to this launch. It
/// is a grandchild: nobody's child here, so the program this process becomes never meets it in
/// `wait`.
pub(crate) fn start(shared: &Shared, root: &RootSpec, linger: Duration, slot: Slot, base: (u64, u64)) -> Result<()> {
    let runs = slot.path.parent().context("a run slot has no directory")?.to_owned();
    let runs = runs.as_path();
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).map_err(|e| crate::sys::err("create an inotify instance for", runs, e))?;
    let events = inotify::WatchFlags::MODIFY | inotify::WatchFlags::CLOSE_WRITE | inotify::WatchFlags::DELETE_SELF | inotify::WatchFlags::MOVE_SELF;
    inotify::add_watch(&watch, runs, events).map_err(|e| crate::sys::err("watch", runs, e))?;
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    let (rd, wr) = (Cell::new(Some(rd)), Cell::new(Some(wr)));
    let middle = process::spawn(|| {
        drop(rd.take());
        let wr = wr.take().context("lost a pipe")?;
        process::spawn(|| {
            let mut held = Vec::new();
            let r = settle(shared, root, &watch, &wr, &mut held, slot, base);
            let ready = r.is_ok();
            if !process::send_reply(wr, r) || !ready {
                return Ok(1);
            }
            wait_idle(&watch, linger);
            drop(held);
            Ok(0)
        })?;
        Ok(0)
    })?;
    drop(wr.take());
    let reply = rd.take().map(process::read_reply::<()>);
    process::waitpid(middle)?;
    match reply {
        Some(Ok(Some(()))) => Ok(()),
        Some(Err(e)) => Err(e),
        _ => anyhow::bail!("the keeper ended before it was ready"),
    }
}

/// In the keeper: leaves the caller's session and files, and makes a mount namespace whose root
/// is the shared overlay (with its `base = "host"` overlays), as a run's is.
fn settle(shared: &Shared, root: &RootSpec, watch: &OwnedFd, report: &OwnedFd, held: &mut Vec<OwnedFd>, mut slot: Slot, base: (u64, u64)) -> Result<()> {
    rustix::process::setsid().context("cannot start a session for the keeper")?;
    // What `ps`, `top` and the tests see: not the command of the launch it was forked from (which
    // ended, and may hold a secret), nor its environment.
    let _ = rustix::thread::set_name(c"plyroot-keeper");
    let _ = crate::sys::procs::retitle("plyroot-keeper");
    let null = rustix::fs::open("/dev/null", rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).context("cannot open /dev/null")?;
    for dup in [rustix::stdio::dup2_stdin, rustix::stdio::dup2_stdout, rustix::stdio::dup2_stderr] {
        dup(&null).context("cannot point the keeper's stdio at /dev/null")?;
    }
    drop(null);
    // Whatever else the launch holds (the store's and the environment's locks, the caller's
    // files) must not live on in the keeper.
    let mut keep: Vec<i32> = vec![0, 1, 2, watch.as_raw_fd(), report.as_raw_fd(), slot.file.as_raw_fd()];
    keep.extend(shared.fds().map(|f| f.as_raw_fd()));
    process::close_fds_except(&keep)?;
    // The identities' namespaces first: making them needs /proc, which the root lacks.
    let mut nested = Vec::new();
    for (uids, gids) in &root.keeper_ids {
        let fd = super::namespaces::nested_user_ns(uids, gids)?;
        nested.push(NestedNs { fd: fd.as_raw_fd(), uids: uids.clone(), gids: gids.clone() });
        held.push(fd);
    }
    super::namespaces::unshare_mount_ns()?;
    let (mnt_ns, mnt_ns_id) = super::namespaces::mnt_ns()?;
    let fs_root = super::mounts::attach_shared(&shared.clone_detached(root)?, root)?;
    mount::pivot_into(fs_root.as_fd(), Path::new("/"))?;
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let record = RunRecord { pid, mnt_ns, mnt_ns_id, user_ns: base.0, user_ns_id: base.1, keeper: true, nested, ..slot.record };
    write_record(&mut slot.file, &record, &slot.path)
}

/// Waits until no launch has written a run slot for `linger`, or the slots are gone.
fn wait_idle(watch: &OwnedFd, linger: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let t = Timespec { tv_sec: linger.as_secs() as i64, tv_nsec: i64::from(linger.subsec_nanos()) };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    loop {
        let mut fds = [PollFd::new(watch, PollFlags::IN)];
        match poll(&mut fds, Some(&t)) {
            Ok(0) => return,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
        let mut events = inotify::Reader::new(watch, &mut buf);
        while let Ok(e) = events.next() {
            if e.events().intersects(inotify::ReadFlags::DELETE_SELF | inotify::ReadFlags::MOVE_SELF | inotify::ReadFlags::IGNORED) {
                return;
            }
        }
    }
}
