//! Booting an environment: its init as PID 1 of a pid namespace, in the background, with a
//! console and (where the host lets us) a cgroup of its own.
//!
//! A detached supervisor (own session, output to the boot log) enters the environment's
//! namespaces like any run — joining its shared mount when a run holds it — plus pid, UTS and IPC
//! namespaces, and forks init. It reports init's pid, records the run, then drains init's console
//! into the log until init ends, and removes init's cgroup.

use std::cell::Cell;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::mount::MountAttrFlags;

use super::identity::Inside;
use super::launch::{Held, Recording};
use super::{mounts, namespaces, Plan};
use crate::sys::mount::{self, Kind};
use crate::sys::{ns, process};

/// Init as the host sees it, and its supervisor.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Booted {
    pub init: i32,
    pub supervisor: i32,
}

/// Boots: see the module header. Returns once init has been started (as root inside, with
/// `hostname`), or with the error that kept it from starting.
pub(crate) fn boot(plan: &Plan, inside: &Inside, hostname: &str, log: fs::File, recording: Recording, held: Held) -> Result<Booted> {
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    let (rd, wr) = (Cell::new(Some(rd)), Cell::new(Some(wr)));
    let held = Cell::new(Some(held));
    let recording = Cell::new(Some(recording));
    let supervisor = process::spawn(|| {
        drop(rd.take());
        let report = wr.take().context("lost a pipe")?;
        let started = start(plan, inside, hostname, &log, recording.take(), held.take().unwrap_or_default());
        let drain = match started {
            Ok((init, master, slave_path, cgroup)) => {
                let sup = rustix::process::getpid().as_raw_nonzero().get();
                process::send_reply(report, Ok(Booted { init, supervisor: sup }));
                Some((init, master, slave_path, cgroup))
            }
            Err(e) => {
                process::send_reply::<Booted>(report, Err(e));
                None
            }
        };
        if let Some((init, master, slave_path, cgroup)) = drain {
            drain_console(init, master, &slave_path, &log);
            // init is our child: reap it, or it lingers as a zombie in its cgroup.
            let _ = process::waitpid(init);
            if let Some((cg, parent)) = cgroup {
                remove_cgroup(&cg, &parent);
            }
        }
        Ok(0)
    })?;
    drop((wr.take(), held.take()));
    match rd.take().map(process::read_reply::<Booted>) {
        Some(Ok(Some(b))) => Ok(b),
        Some(Err(e)) => Err(e.context("the environment did not boot")),
        _ => {
            let _ = process::waitpid(supervisor);
            anyhow::bail!("the environment did not boot: its supervisor ended without a word")
        }
    }
}

type Cgroup = Option<(PathBuf, OwnedFd)>;

/// The supervisor's part up to init's start: init's host pid, the console's master and slave,
/// and init's cgroup (with an fd for its parent).
fn start(plan: &Plan, inside: &Inside, hostname: &str, log: &fs::File, recording: Option<Recording>, held: Held) -> Result<(i32, OwnedFd, PathBuf, Cgroup)> {
    rustix::process::setsid().context("cannot start a session")?;
    let null = fs::File::open("/dev/null").context("cannot open /dev/null")?;
    rustix::stdio::dup2_stdin(&null).context("cannot redirect stdin")?;
    rustix::stdio::dup2_stdout(log).context("cannot redirect stdout to the boot log")?;
    rustix::stdio::dup2_stderr(log).context("cannot redirect stderr to the boot log")?;
    let (base, shared) = namespaces::enter(inside, plan.root.join.as_ref(), plan.store.as_deref(), true, true, |b| mounts::shared(&plan.root, b))?;
    // Now: once init pivots, our root is the environment's too, and its /proc another one.
    let mnt_ns = namespaces::mnt_ns()?;
    // A pty for init's console: systemd refuses a console that is not a tty. Its slave is bound
    // at /dev/console; the supervisor drains the master into the log.
    let (master, slave_path) = open_console_pty()?;
    let cgroup = env_cgroup(hostname);
    // Held from before init pivots: pivot_root moves the root of every process in the mount
    // namespace, ours too, so paths to the host's cgroups stop resolving.
    let cgroup_parent = cgroup.as_ref().and_then(|c| c.parent()).and_then(|p| rustix::fs::open(p, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok());
    // init closes `ready` (on exec) once its root is in place: then the run can be joined.
    let (ready_rd, ready_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    let (ready_rd, shared) = (Cell::new(Some(ready_rd)), Cell::new(shared));
    let init = process::spawn(|| {
        drop(ready_rd.take());
        if let Some(cg) = &cgroup {
            // Into the environment's own cgroup, then a cgroup namespace rooted there: init
            // manages that subtree as if it were the whole tree.
            fs::write(cg.join("cgroup.procs"), b"0").with_context(|| format!("cannot move init into {}", cg.display()))?;
            ns::unshare_cgroup()?;
        }
        let root = mounts::build(plan, shared.take())?;
        // An init writes to /dev/console (systemd does, and may die without one).
        let console = mount::resolve_in(root.as_fd(), Path::new("/dev/console"), Kind::File, true)?;
        let tty = mount::clone_tree(&slave_path, false)?;
        mount::attach(tty.as_fd(), console.as_fd(), Path::new("/dev/console"))?;
        if cgroup.is_some() {
            let target = mount::resolve_in(root.as_fd(), Path::new("/sys/fs/cgroup"), Kind::Dir, false)?;
            let cg = mount::pseudo("cgroup2", &[], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
            mount::attach(cg.as_fd(), target.as_fd(), Path::new("/sys/fs/cgroup"))?;
        }
        mounts::pivot(&root)?;
        ns::set_hostname(hostname)?;
        if matches!(inside.nested, Some(super::identity::Nested::Maps(..))) {
            // The init runs as root inside (the first subordinate id).
            ns::become_id(0, 0)?;
            ns::clear_groups()?;
        }
        process::chdir(Path::new("/"))?;
        let e = process::exec(&plan.exec.argv, None, &plan.exec.env);
        drop(ready_wr);
        anyhow::bail!("cannot start init {}: {e}", plan.exec.argv[0].to_string_lossy())
    })?;
    drop(shared.take());
    if let Some(rd) = ready_rd.take() {
        let _ = fs::File::from(rd).read(&mut [0u8; 1]);
    }
    if let Some(mut r) = recording {
        r.record.boot = true;
        r.record.supervisor = Some(rustix::process::getpid().as_raw_nonzero().get());
        if let Err(e) = r.write(init, &base, mnt_ns) {
            // An init nobody can find would run on unseen: end it with the boot.
            if let Ok(fd) = ns::pidfd(init) {
                let _ = process::pidfd_signal(&fd, libc::SIGKILL);
            }
            let _ = process::waitpid(init);
            return Err(e);
        }
    }
    drop(held);
    Ok((init, master, slave_path, cgroup.zip(cgroup_parent)))
}

/// Opens a pty pair from the current /dev/ptmx: the master fd and the slave's path.
fn open_console_pty() -> Result<(OwnedFd, PathBuf)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).context("cannot open a pty for the console")?;
    grantpt(&master).context("cannot set up the console pty")?;
    unlockpt(&master).context("cannot unlock the console pty")?;
    let name = ptsname(&master, Vec::new()).context("cannot name the console pty")?;
    Ok((master, PathBuf::from(name.to_string_lossy().into_owned())))
}

/// Copies init's console output into the log until init ends. Holding the slave open keeps the
/// master from hanging up while no process inside has the console open.
fn drain_console(init: i32, master: OwnedFd, slave: &Path, log: &fs::File) {
    let _slave = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(slave);
    let Ok(pidfd) = ns::pidfd(init) else { return };
    let mut out = log;
    let mut buf = [0u8; 8192];
    loop {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&master, PollFlags::IN), PollFd::new(&pidfd, PollFlags::IN)];
        if poll(&mut fds, None).is_err() {
            continue;
        }
        let (console, ended) = (fds[0].revents(), fds[1].revents());
        if console.contains(PollFlags::IN) {
            match rustix::io::read(&master, &mut buf) {
                Ok(k) if k > 0 => {
                    let _ = out.write_all(&buf[..k]);
                    continue;
                }
                _ => {}
            }
        }
        if !ended.is_empty() {
            return;
        }
    }
}

/// A child cgroup for a booted environment in the cgroup2 hierarchy we are in, when we may make
/// one (as root, or in a subtree delegated to the user). None otherwise: the init then runs in
/// ours, and an init that needs its own (systemd) says so in the boot log.
fn env_cgroup(name: &str) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount_point = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(sep + 1) == Some(&"cgroup2")).then(|| f[4].to_owned())
    })?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim_start_matches('/').to_owned();
    let dir = Path::new(&mount_point).join(path).join(format!("plyroot-{name}-{}", std::process::id()));
    match fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            crate::diag::debug!("no cgroup of its own for {name}: {}: {e}", dir.display());
            None
        }
    }
}

/// Removes init's cgroup once init and everything under it ended; leaves no trace on the host.
fn remove_cgroup(cg: &Path, parent: &OwnedFd) {
    let name = cg.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut last = None;
    for _ in 0..100 {
        match remove_cgroup_at(parent.as_fd(), &name) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(e) = last {
        eprintln!("plyroot: warning: cannot remove the environment's cgroup {}: {e}", cg.display());
    }
}

/// Removes cgroup `name` under `parent` and the cgroups an init made in it, deepest first (a
/// cgroup with children cannot be removed).
fn remove_cgroup_at(parent: std::os::fd::BorrowedFd<'_>, name: &std::ffi::OsStr) -> rustix::io::Result<()> {
    match rustix::fs::openat(parent, name, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(dir) => {
            let mut kids = Vec::new();
            for e in rustix::fs::Dir::read_from(&dir)?.flatten() {
                let n = e.file_name().to_bytes();
                if e.file_type() == rustix::fs::FileType::Directory && n != b"." && n != b".." {
                    kids.push(std::ffi::OsStr::from_bytes(n).to_os_string());
                }
            }
            for k in kids {
                remove_cgroup_at(dir.as_fd(), &k)?;
            }
        }
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    }
    match rustix::fs::unlinkat(parent, name, rustix::fs::AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}
