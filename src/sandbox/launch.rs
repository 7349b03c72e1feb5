//! Carries out a [`Plan`]: namespaces, id maps, mounts, pivot_root, exec.
//!
//! On the fast path (no pid namespace) this process becomes the program: it unshares, maps,
//! mounts, pivots and execs, with no waiting parent, so signals and the exit status need no
//! forwarding. With subordinate ranges a short-lived child runs newuidmap/newgidmap for us and
//! exits. With `--pid` the program runs under a reaping PID 1, and this process supervises it.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::mount::MountAttrFlags;

use super::identity::{Inside, Mapping};
use super::{Op, Plan, Upper};
use crate::sys::mount::{self, Kind};
use crate::sys::{ns, process};

/// How a failed exec ends the run (as shells do: 127 not found, 126 not executable).
pub(crate) struct ExecFailed {
    pub code: i32,
    pub message: String,
}

/// Sets up the namespaces and id maps for `inside`. Must run while single-threaded.
pub(crate) fn enter_namespaces(inside: &Inside, pid: bool) -> Result<()> {
    enter_namespaces_with(inside, pid, false)
}

/// As `enter_namespaces`, plus UTS and IPC namespaces when `machine` (a booted environment).
pub(crate) fn enter_namespaces_with(inside: &Inside, pid: bool, machine: bool) -> Result<()> {
    enter_namespaces_inner(inside, pid, machine).map_err(|e| {
        let denied = e.chain().any(|c| c.downcast_ref::<crate::sys::SysError>().is_some_and(|s| s.op == "unshare namespaces" && matches!(s.source.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSPC) | Some(libc::EACCES))));
        if denied {
            e.context("this system does not let you create user namespaces (disabled by sysctl, limited by max_user_namespaces, or restricted by AppArmor); `plyroot doctor` says which and how to allow it")
        } else {
            e
        }
    })
}

fn enter_namespaces_inner(inside: &Inside, pid: bool, machine: bool) -> Result<()> {
    match &inside.mapping {
        Mapping::Host => ns::unshare_more(false, pid, machine)?,
        Mapping::Single { inside_uid, inside_gid, uid, gid } => {
            ns::unshare_more(true, pid, machine)?;
            ns::map_single(*inside_uid, *uid, *inside_gid, *gid)?;
        }
        Mapping::Ranges { uids, gids } => {
            // newuidmap is setuid and must write our maps from outside the namespace: a child
            // forked now stays outside, waits until we have unshared, maps us, and exits.
            let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
            let parent = rustix::process::getpid().as_raw_nonzero().get();
            match process::fork()? {
                process::Fork::Child => {
                    drop(wr);
                    let mut b = [0u8; 1];
                    let go = fs::File::from(rd).read(&mut b).map(|n| n == 1).unwrap_or(false);
                    if !go {
                        // SAFETY: _exit in a forked child skips the parent's atexit handlers.
                        unsafe { libc::_exit(1) };
                    }
                    let code = match ns::map_ranges(parent, uids, gids) {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("plyroot: error: {e}");
                            1
                        }
                    };
                    // SAFETY: as above.
                    unsafe { libc::_exit(code) };
                }
                process::Fork::Parent(child) => {
                    drop(rd);
                    let unshared = ns::unshare_more(true, pid, machine);
                    let mut w = fs::File::from(wr);
                    if unshared.is_ok() {
                        let _ = w.write_all(b"1");
                    }
                    drop(w);
                    let st = process::waitpid(child)?;
                    unshared?;
                    if process::status_code(st) != 0 {
                        bail!("newuidmap/newgidmap could not map the subordinate ids from /etc/subuid and /etc/subgid (see the message above; `plyroot doctor` checks this)");
                    }
                    // Host supplementary groups are unmapped inside: drop them.
                    ns::clear_groups()?;
                }
            }
        }
    }
    Ok(())
}

/// Builds the root per the plan and returns an fd for it.
fn build_root(plan: &Plan) -> Result<(OwnedFd, PathBuf)> {
    let Some(Op::Root { lowers, upper, mount_point }) = plan.ops.first() else { bail!("a plan starts with its root") };
    let root_path = match upper {
        Upper::Persistent { upper, work } => {
            let m = mount::overlay(lowers, Some((upper, work)))?;
            mount::attach_at(m.as_fd(), mount_point)?;
            mount_point.clone()
        }
        Upper::None => {
            let m = mount::overlay(lowers, None)?;
            mount::attach_at(m.as_fd(), mount_point)?;
            mount_point.clone()
        }
        Upper::Ephemeral => {
            // A tmpfs on the mount point holds the throwaway upper, its workdir and the root.
            let t = mount::pseudo("tmpfs", &[("mode", "0755")], MountAttrFlags::empty())?;
            mount::attach_at(t.as_fd(), mount_point)?;
            for d in ["upper", "work", "root"] {
                rustix::fs::mkdirat(t.as_fd(), d, Mode::from_raw_mode(0o755)).with_context(|| format!("cannot create {}/{d}", mount_point.display()))?;
            }
            let m = mount::overlay(lowers, Some((&mount_point.join("upper"), &mount_point.join("work"))))?;
            let r = mount_point.join("root");
            mount::attach_at(m.as_fd(), &r)?;
            r
        }
    };
    let fd = rustix::fs::open(&root_path, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open {}", root_path.display()))?;
    Ok((fd, root_path))
}

fn bind(root: &OwnedFd, src: &Path, dst: &Path, kind: Kind, ro: bool, recursive: bool) -> Result<()> {
    let tree = mount::clone_tree(src, recursive)?;
    if ro {
        mount::set_readonly(tree.as_fd(), src)?;
    }
    let target = mount::resolve_in(root.as_fd(), dst, kind, true)?;
    mount::attach(tree.as_fd(), target.as_fd(), dst)?;
    Ok(())
}

fn dev(root: &OwnedFd, gpu: &[PathBuf]) -> Result<()> {
    let target = mount::resolve_in(root.as_fd(), Path::new("/dev"), Kind::Dir, true)?;
    let t = mount::pseudo("tmpfs", &[("mode", "0755")], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
    mount::attach(t.as_fd(), target.as_fd(), Path::new("/dev"))?;
    let d = t.as_fd();
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = Path::new("/dev").join(node);
        // Device nodes cannot be made in a user namespace: bind the host's over empty files.
        drop(rustix::fs::openat(d, node, OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC, Mode::from_raw_mode(0o666)).with_context(|| format!("cannot create /dev/{node}"))?);
        let tree = mount::clone_tree(&host, false)?;
        let tgt = rustix::fs::openat(d, node, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open /dev/{node}"))?;
        mount::attach(tree.as_fd(), tgt.as_fd(), &host)?;
    }
    for (name, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore")] {
        rustix::fs::symlinkat(target, d, name).with_context(|| format!("cannot create /dev/{name}"))?;
    }
    for (dir, fstype, opts) in [("pts", "devpts", &[("ptmxmode", "0666"), ("mode", "0620")][..]), ("shm", "tmpfs", &[("mode", "1777")][..])] {
        rustix::fs::mkdirat(d, dir, Mode::from_raw_mode(0o755)).with_context(|| format!("cannot create /dev/{dir}"))?;
        let m = mount::pseudo(fstype, opts, MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
        let tgt = rustix::fs::openat(d, dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot open /dev/{dir}"))?;
        mount::attach(m.as_fd(), tgt.as_fd(), Path::new(dir))?;
    }
    for g in gpu {
        let kind = if g.is_dir() { Kind::Dir } else { Kind::File };
        bind(root, g, g, kind, false, true)?;
    }
    Ok(())
}

/// One directory of the host under the layers: an overlay of the layers' `name` dirs over the
/// host's `/name`, whose upper and workdir sit beside the root's (same filesystem, never nested
/// in each other), so writes there land in the environment's upper like any other.
fn host_dir(plan: &Plan, root: &OwnedFd, root_path: &Path, name: &str, lowers: &[PathBuf]) -> Result<()> {
    let Some(Op::Root { upper, mount_point, .. }) = plan.ops.first() else { bail!("a plan starts with its root") };
    let upper_work = match upper {
        Upper::Persistent { upper, work } => Some((upper.join(name), work.join(format!("host-{name}")))),
        // The throwaway upper's tmpfs is mounted at the mount point (build_root).
        Upper::Ephemeral => Some((mount_point.join("upper").join(name), mount_point.join(format!("work-host-{name}")))),
        Upper::None => None,
    };
    if let Some((u, w)) = &upper_work {
        fs::create_dir_all(u).with_context(|| format!("cannot create {}", u.display()))?;
        fs::create_dir_all(w).with_context(|| format!("cannot create {}", w.display()))?;
    }
    let m = mount::overlay(lowers, upper_work.as_ref().map(|(u, w)| (u.as_path(), w.as_path())))?;
    let _ = root_path;
    let target = mount::resolve_in(root.as_fd(), &Path::new("/").join(name), Kind::Dir, upper_work.is_some())?;
    mount::attach(m.as_fd(), target.as_fd(), &Path::new("/").join(name))?;
    Ok(())
}

fn proc_fresh(root: &OwnedFd) -> Result<()> {
    let target = mount::resolve_in(root.as_fd(), Path::new("/proc"), Kind::Dir, true)?;
    let m = mount::pseudo("proc", &[], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
    mount::attach(m.as_fd(), target.as_fd(), Path::new("/proc"))?;
    Ok(())
}

fn mount_all(plan: &Plan) -> Result<OwnedFd> {
    let (root, root_path) = build_root(plan).context("cannot mount the environment's root (overlayfs); `plyroot doctor` checks what this kernel allows")?;
    for op in &plan.ops[1..] {
        match op {
            Op::Root { .. } => bail!("a plan has one root"),
            Op::Bind { src, dst, kind, ro, recursive } => {
                bind(&root, src, dst, *kind, *ro, *recursive).with_context(|| format!("cannot bind {} at {}", src.display(), dst.display()))?
            }
            Op::Proc => proc_fresh(&root).context("cannot mount a fresh /proc for the pid namespace")?,
            Op::Dev { gpu } => dev(&root, gpu).context("cannot set up /dev")?,
            Op::HostDir { name, lowers } => host_dir(plan, &root, &root_path, name, lowers).with_context(|| format!("cannot union the host's /{name} under the layers (base = \"host\")"))?,
        }
    }
    crate::diag::debug(&format!("root ready at {}", root_path.display()));
    Ok(root)
}

fn enter_cwd(plan: &Plan) -> Result<()> {
    for dir in &plan.exec.cwd {
        if process::chdir(dir).is_ok() {
            return Ok(());
        }
    }
    if plan.exec.cwd_required {
        bail!("--cwd {}: no such directory inside the environment", plan.exec.cwd[0].display());
    }
    Ok(())
}

fn exec_failed(plan: &Plan, env_name: &str, e: std::io::Error) -> ExecFailed {
    let prog = plan.exec.argv[0].to_string_lossy();
    match e.raw_os_error() {
        Some(libc::ENOENT) => ExecFailed { code: 127, message: format!("'{prog}' was not found in environment '{env_name}' (PATH={})", super::PATH) },
        _ => ExecFailed { code: 126, message: format!("cannot execute '{prog}' in environment '{env_name}': {e}") },
    }
}

/// Carries out the plan and starts the program. Returns only on failure, or, when this process
/// must supervise (pid namespace), with the program's status.
pub(crate) fn launch(plan: &Plan, inside: &Inside, env_name: &str) -> Result<std::result::Result<i32, ExecFailed>> {
    if plan.pid {
        process::block_signals();
    }
    enter_namespaces(inside, plan.pid)?;
    mount::make_private_recursive()?;
    if plan.pid {
        // unshare(CLONE_NEWPID) applies to children: the first one is PID 1 inside.
        match process::fork()? {
            process::Fork::Parent(child) => return Ok(Ok(process::supervise(child, false))),
            process::Fork::Child => {
                let code = match pid1(plan, env_name) {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("plyroot: error: {e:#}");
                        125
                    }
                };
                std::process::exit(code);
            }
        }
    }
    let root = mount_all(plan)?;
    mount::pivot_into(root.as_fd(), Path::new("/"))?;
    enter_cwd(plan)?;
    let e = process::exec(&plan.exec.argv, &plan.exec.env);
    Ok(Err(exec_failed(plan, env_name, e)))
}

/// Starts the program after joining the namespaces of a live run of the same environment (same
/// generation, upper, binds and identity) instead of mounting a second overlay over the same
/// upper: two overlay mounts sharing an upper race when both copy up the same directory.
pub(crate) fn start_joined(plan: &Plan, inside: &Inside, env_name: &str) -> Result<std::result::Result<i32, ExecFailed>> {
    if matches!(inside.mapping, Mapping::Ranges { .. }) {
        ns::clear_groups()?;
    }
    enter_cwd(plan)?;
    let e = process::exec(&plan.exec.argv, &plan.exec.env);
    Ok(Err(exec_failed(plan, env_name, e)))
}

/// PID 1 of the environment's pid namespace: builds the root, starts the program as PID 2, reaps
/// every orphan until the program ends, and exits with its status.
fn pid1(plan: &Plan, env_name: &str) -> Result<i32> {
    let root = mount_all(plan)?;
    mount::pivot_into(root.as_fd(), Path::new("/"))?;
    enter_cwd(plan)?;
    match process::fork()? {
        process::Fork::Child => {
            process::unblock_signals();
            let e = process::exec(&plan.exec.argv, &plan.exec.env);
            let f = exec_failed(plan, env_name, e);
            eprintln!("plyroot: error: {}", f.message);
            std::process::exit(f.code);
        }
        process::Fork::Parent(program) => Ok(process::supervise(program, true)),
    }
}

/// Boots an environment: a detached supervisor (own session, output to `log`) creates the
/// namespaces, including UTS and IPC, and starts the plan's program (the init) as PID 1 of the new
/// pid namespace, as root inside, with `hostname`. Returns init's pid as the host sees it, once
/// init has been started; the supervisor has exited by then.
pub(crate) fn boot(plan: &Plan, inside: &Inside, hostname: &str, log: std::fs::File, log_path: &Path) -> Result<i32> {
    use std::os::fd::AsRawFd;
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
    match process::fork()? {
        process::Fork::Parent(_sup) => {
            drop(wr);
            // The supervisor stays as the console's drain; it closes the pipe once init runs.
            let mut buf = Vec::new();
            let _ = fs::File::from(rd).read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf);
            match text.strip_prefix("pid ").and_then(|p| p.trim().parse::<i32>().ok()) {
                Some(pid) => Ok(pid),
                None => bail!("the environment did not boot: {}", text.trim_start_matches("error ").trim()),
            }
        }
        process::Fork::Child => {
            drop(rd);
            let mut report = fs::File::from(wr);
            let r = (|| -> Result<(i32, OwnedFd, std::path::PathBuf, Option<(std::path::PathBuf, OwnedFd)>)> {
                rustix::process::setsid().context("cannot start a session")?;
                let null = fs::File::open("/dev/null").context("cannot open /dev/null")?;
                // SAFETY: dup2 onto the standard fds of this (single-threaded) child.
                unsafe {
                    libc::dup2(null.as_raw_fd(), 0);
                    libc::dup2(log.as_raw_fd(), 1);
                    libc::dup2(log.as_raw_fd(), 2);
                }
                enter_namespaces_with(inside, true, true)?;
                mount::make_private_recursive()?;
                // A pty for init's console: systemd refuses a console that is not a tty. Its
                // slave is bound at /dev/console; this supervisor drains the master into the log.
                let (master, slave_path) = open_console_pty()?;
                let cgroup = env_cgroup(hostname);
                // Held from before init pivots: pivot_root moves the root of every process in
                // the mount namespace, ours too, so paths to the host's cgroups stop resolving.
                let cgroup_parent = cgroup.as_ref().and_then(|c| c.parent()).and_then(|p| rustix::fs::open(p, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok());
                match process::fork()? {
                    process::Fork::Parent(init) => Ok((init, master, slave_path, cgroup.zip(cgroup_parent))),
                    process::Fork::Child => {
                        drop(master);
                        if let Some(cg) = &cgroup {
                            // Into the environment's own cgroup, then a cgroup namespace rooted
                            // there: init manages that subtree as if it were the whole tree.
                            fs::write(cg.join("cgroup.procs"), b"0").with_context(|| format!("cannot move init into {}", cg.display()))?;
                            ns::unshare_cgroup()?;
                        }
                        let e = (|| -> Result<std::io::Error> {
                            let root = mount_all(plan)?;
                            // An init writes to /dev/console (systemd does, and may die without
                            // one): make it the boot log.
                            let console = mount::resolve_in(root.as_fd(), Path::new("/dev/console"), Kind::File, true)?;
                            // By path: the fd's mount belongs to the namespace we left.
                            let _ = log_path;
                            let log_tree = mount::clone_tree(&slave_path, false)?;
                            mount::attach(log_tree.as_fd(), console.as_fd(), Path::new("/dev/console"))?;
                            if cgroup.is_some() {
                                let target = mount::resolve_in(root.as_fd(), Path::new("/sys/fs/cgroup"), Kind::Dir, false)?;
                                let cg = mount::pseudo("cgroup2", &[], MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC)?;
                                mount::attach(cg.as_fd(), target.as_fd(), Path::new("/sys/fs/cgroup"))?;
                            }
                            mount::pivot_into(root.as_fd(), Path::new("/"))?;
                            ns::set_hostname(hostname)?;
                            if matches!(inside.mapping, Mapping::Ranges { .. }) {
                                // The init runs as root inside (the first subordinate id).
                                ns::become_id(0, 0)?;
                                ns::clear_groups()?;
                            }
                            process::chdir(Path::new("/"))?;
                            Ok(process::exec(&plan.exec.argv, &plan.exec.env))
                        })();
                        let msg = match e {
                            Ok(e) => format!("cannot start init {}: {e}", plan.exec.argv[0].to_string_lossy()),
                            Err(e) => format!("{e:#}"),
                        };
                        eprintln!("plyroot: error: {msg}");
                        std::process::exit(125);
                    }
                }
            })();
            let (msg, drain) = match r {
                Ok((pid, master, slave_path, cg)) => (format!("pid {pid}"), Some((pid, master, slave_path, cg))),
                Err(e) => (format!("error {e:#}"), None),
            };
            let _ = report.write_all(msg.as_bytes());
            drop(report);
            if let Some((pid, master, slave_path, cg)) = drain {
                drain_console(pid, master, &slave_path, &log);
                // init is our child: reap it, or it lingers as a zombie in its cgroup.
                let _ = process::waitpid(pid);
                if let Some((cg, parent)) = cg {
                    // Empty once init and everything under it ended; leave no trace on the host.
                    let name = cg.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                    let mut last = None;
                    for _ in 0..100 {
                        match remove_cgroup_at(parent.as_fd(), &name) {
                            Ok(()) => {
                                last = None;
                                break;
                            }
                            Err(e) => last = Some(e),
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    if let Some(e) = last {
                        eprintln!("plyroot: warning: cannot remove the environment's cgroup {}: {e}", cg.display());
                    }
                }
            }
            // SAFETY: _exit in a forked child skips the parent's atexit handlers and buffers.
            unsafe { libc::_exit(0) };
        }
    }
}

/// Starts the program inside a booted environment: joins all its namespaces through init's
/// pidfd, forks into its pid namespace, and supervises the program (signals pass through, its
/// status is ours).
pub(crate) fn start_in_booted(pidfd: &OwnedFd, plan: &Plan, inside: &Inside, become_root: bool, env_name: &str) -> Result<std::result::Result<i32, ExecFailed>> {
    process::block_signals();
    ns::join_with(pidfd, inside.mapping != Mapping::Host, true)?;
    if matches!(inside.mapping, Mapping::Ranges { .. }) {
        if become_root {
            ns::become_id(0, 0)?;
        }
        ns::clear_groups()?;
    }
    match process::fork()? {
        process::Fork::Parent(child) => Ok(Ok(process::supervise(child, false))),
        process::Fork::Child => {
            process::unblock_signals();
            enter_cwd(plan)?;
            let e = process::exec(&plan.exec.argv, &plan.exec.env);
            let f = exec_failed(plan, env_name, e);
            eprintln!("plyroot: error: {}", f.message);
            std::process::exit(f.code);
        }
    }
}

/// Opens a pty pair from the current /dev/ptmx: the master fd and the slave's path.
fn open_console_pty() -> Result<(OwnedFd, std::path::PathBuf)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).context("cannot open a pty for the console")?;
    grantpt(&master).context("cannot set up the console pty")?;
    unlockpt(&master).context("cannot unlock the console pty")?;
    let name = ptsname(&master, Vec::new()).context("cannot name the console pty")?;
    Ok((master, std::path::PathBuf::from(name.to_string_lossy().into_owned())))
}

/// Copies init's console output into the log until init ends. Holding the slave open keeps the
/// master from hanging up while no process inside has the console open.
fn drain_console(init: i32, master: OwnedFd, slave: &Path, log: &fs::File) {
    let _slave = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(slave);
    let Ok(pidfd) = ns::pidfd(init) else { return };
    let mut out = log;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = [
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&master), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on two valid, initialised pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            match rustix::io::read(&master, &mut buf) {
                Ok(k) if k > 0 => {
                    let _ = out.write_all(&buf[..k]);
                    continue;
                }
                _ => {}
            }
        }
        if fds[1].revents != 0 {
            return;
        }
    }
}

/// A child cgroup for a booted environment in the cgroup2 hierarchy we are in, when we may make
/// one (as root, or in a subtree delegated to the user). None otherwise: the init then runs in
/// ours, and an init that needs its own (systemd) says so in the boot log.
fn env_cgroup(name: &str) -> Option<std::path::PathBuf> {
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
            crate::diag::debug(&format!("no cgroup of its own for {name}: {}: {e}", dir.display()));
            None
        }
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
