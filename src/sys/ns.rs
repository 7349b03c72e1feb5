//! Namespaces and id maps.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::thread::UnshareFlags;

use super::{err, Result};

/// One line of an id map: `inside outside count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

pub(crate) fn unshare(user: bool, pid: bool) -> Result<()> {
    unshare_more(user, pid, false)
}

/// As `unshare`, plus UTS and IPC namespaces when `machine` (a booted environment: its own
/// hostname and System V IPC, so nothing of the host's changes).
pub(crate) fn unshare_more(user: bool, pid: bool, machine: bool) -> Result<()> {
    let mut flags = UnshareFlags::NEWNS;
    if machine {
        flags |= UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    }
    if user {
        flags |= UnshareFlags::NEWUSER;
    }
    if pid {
        flags |= UnshareFlags::NEWPID;
    }
    // Fails with EINVAL in a multi-threaded process: plyroot never starts a thread before this.
    // SAFETY: the flags never include CLONE_FILES, the one that can strand fds between threads.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(|e| err("unshare namespaces", "/", e))
}

fn write_proc(path: &str, data: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(data.as_bytes()))
        .map_err(|e| err("write", path, e))
}

/// Maps exactly one uid and gid for ourselves. No helper is needed for that, but setgroups must
/// be denied first, or the kernel refuses an unprivileged gid_map.
pub(crate) fn map_single(inside_uid: u32, outside_uid: u32, inside_gid: u32, outside_gid: u32) -> Result<()> {
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("{inside_uid} {outside_uid} 1\n"))?;
    write_proc("/proc/self/gid_map", &format!("{inside_gid} {outside_gid} 1\n"))
}

/// Runs `newuidmap`/`newgidmap` (setuid helpers, so they must run outside the new namespace) on
/// process `pid`.
pub(crate) fn map_ranges(pid: i32, uids: &[IdRange], gids: &[IdRange]) -> Result<()> {
    for (tool, ranges) in [("newuidmap", uids), ("newgidmap", gids)] {
        let mut cmd = std::process::Command::new(tool);
        cmd.arg(pid.to_string());
        for r in ranges {
            cmd.args([r.inside.to_string(), r.outside.to_string(), r.count.to_string()]);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| err("run", tool, e))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(super::SysError {
                op: "map ids with",
                path: tool.into(),
                detail: Some(msg),
                source: std::io::Error::other(format!("{tool} exited with {}", out.status)),
            });
        }
    }
    Ok(())
}

/// Drops supplementary groups (possible once a gid range is mapped and setgroups is allowed).
pub(crate) fn clear_groups() -> Result<()> {
    // SAFETY: setgroups(0, NULL) reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(err("setgroups", "/", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Keeps `fd` open across `exec` (the store lock held for the life of a run).
pub(crate) fn inherit_fd(fd: &impl AsRawFd, shown: &Path) -> Result<()> {
    // SAFETY: F_SETFD on a valid fd owned by the caller only changes its close-on-exec flag.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(err("keep open", shown, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Joins the user (when `user`) and mount namespaces of process `pid`, through a pidfd so a
/// recycled pid cannot be joined by mistake once the caller has checked the process is the one
/// it wants. Afterwards our root and cwd are that namespace's root.
pub(crate) fn join(pidfd: &std::os::fd::OwnedFd, user: bool) -> Result<()> {
    join_with(pidfd, user, false)
}

/// As `join`, plus the pid, UTS and IPC namespaces of a booted environment (`machine`), all in
/// one setns. The pid namespace applies to children: the caller must fork to be inside it.
pub(crate) fn join_with(pidfd: &std::os::fd::OwnedFd, user: bool, machine: bool) -> Result<()> {
    let mut flags = libc::CLONE_NEWNS;
    if user {
        flags |= libc::CLONE_NEWUSER;
    }
    if machine {
        flags |= libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    // SAFETY: setns on a valid pidfd reads no memory.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(pidfd), flags) };
    if rc != 0 {
        return Err(err("join the namespaces of", "pidfd", std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(crate) fn pidfd(pid: i32) -> Result<std::os::fd::OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid).ok_or_else(|| err("open", format!("pid {pid}"), std::io::Error::from_raw_os_error(libc::ESRCH)))?;
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).map_err(|e| err("open", format!("pid {pid}"), e))
}

/// Becomes `uid`/`gid` inside the current user namespace (we hold CAP_SETUID/CAP_SETGID there).
pub(crate) fn become_id(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain id-changing syscalls; plyroot is single-threaded, so no other thread keeps the
    // old credentials.
    unsafe {
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(err("setresgid", format!("{gid}"), std::io::Error::last_os_error()));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(err("setresuid", format!("{uid}"), std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

pub(crate) fn set_hostname(name: &str) -> Result<()> {
    rustix::system::sethostname(name.as_bytes()).map_err(|e| err("set the hostname", name, e))
}

/// A new cgroup namespace, rooted at our current cgroup.
pub(crate) fn unshare_cgroup() -> Result<()> {
    // SAFETY: CLONE_NEWCGROUP does not touch the fd table (see `unshare`).
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWCGROUP) }.map_err(|e| err("unshare the cgroup namespace", "/", e))
}
