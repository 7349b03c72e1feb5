//! Namespaces and id maps.

use std::io::Write;
use std::os::fd::AsRawFd;

use rustix::thread::UnshareFlags;

use super::{err, Result};

/// One line of an id map: `inside outside count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    unshare_flags(flags)
}

/// `unshare(2)` of namespaces (never `CLONE_FILES`).
pub(crate) fn unshare_flags(flags: UnshareFlags) -> Result<()> {
    debug_assert!(!flags.contains(UnshareFlags::FILES), "unshare of the fd table");
    // Fails with EINVAL in a multi-threaded process: plyroot never starts a thread before this.
    // SAFETY: the flags never include CLONE_FILES (every caller names namespaces only), the one
    // that can strand fds between threads.
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

/// Runs `newuidmap` and `newgidmap` (setuid helpers, so they must run outside the new namespace)
/// on process `pid`, both at once: each is a short exec of its own.
pub(crate) fn map_ranges(pid: i32, uids: &[IdRange], gids: &[IdRange]) -> Result<()> {
    let mut running = Vec::new();
    for (tool, ranges) in [("newuidmap", uids), ("newgidmap", gids)] {
        let mut cmd = std::process::Command::new(tool);
        cmd.arg(pid.to_string());
        for r in ranges {
            cmd.args([r.inside.to_string(), r.outside.to_string(), r.count.to_string()]);
        }
        let child = cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().map_err(|e| err("run", tool, e))?;
        running.push((tool, child));
    }
    let mut first_error = None;
    for (tool, child) in running {
        let out = child.wait_with_output().map_err(|e| err("run", tool, e))?;
        if !out.status.success() && first_error.is_none() {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            first_error = Some(super::SysError {
                op: "map ids with",
                path: tool.into(),
                detail: Some(msg),
                source: std::io::Error::other(format!("{tool} exited with {}", out.status)),
            });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Drops supplementary groups (possible once a gid range is mapped and setgroups is allowed).
pub(crate) fn clear_groups() -> Result<()> {
    // SAFETY: setgroups(0, NULL) reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(err("setgroups", "/", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Joins the user (when `user`) and mount namespaces of the process a pidfd refers to, plus its
/// pid, UTS and IPC namespaces (`machine`: a booted environment), all in one setns. The pid namespace applies to children: the caller must fork to be inside it.
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

/// A namespace of a process, held by an fd: `/proc/PID/ns/KIND` opened, so the namespace stays
/// what it was when checked, whatever happens to the pid afterwards.
pub(crate) fn open_ns(pid: i32, kind: &str) -> Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let path = format!("/proc/{pid}/ns/{kind}");
    // openat2 (the namespace link is a magic link: no resolve flags): a scan of /proc opens as
    // many as there are processes, which must not count among a command's openat calls, whose
    // order the fault-injection tests rely on.
    rustix::fs::openat2(rustix::fs::CWD, &path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::empty()).map_err(|e| err("open", path, e))
}

/// The inode number that names a namespace (what `/proc/PID/ns/KIND` links read as `kind:[N]`).
pub(crate) fn ns_ino(fd: &impl std::os::fd::AsFd) -> Result<u64> {
    rustix::fs::fstat(fd).map(|s| s.st_ino).map_err(|e| err("stat", "a namespace fd", e))
}

/// The user namespace that owns the namespace `fd` refers to (`NS_GET_USERNS`).
pub(crate) fn owner_userns(fd: &impl AsRawFd) -> Result<std::os::fd::OwnedFd> {
    ns_ioctl(fd, libc::NS_GET_USERNS, "find the owner of")
}

/// The parent of user namespace `fd` (`NS_GET_PARENT`).
pub(crate) fn parent_userns(fd: &impl AsRawFd) -> Result<std::os::fd::OwnedFd> {
    ns_ioctl(fd, libc::NS_GET_PARENT, "find the parent of")
}

fn ns_ioctl(fd: &impl AsRawFd, request: libc::Ioctl, op: &'static str) -> Result<std::os::fd::OwnedFd> {
    // SAFETY: NS_GET_USERNS/NS_GET_PARENT take no argument and return a new fd (or -1); the fd
    // is owned by nobody else, so wrapping it in an OwnedFd is sound.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request) };
    if rc < 0 {
        return Err(err(op, "a namespace fd", std::io::Error::last_os_error()));
    }
    // SAFETY: `rc` is a fresh fd the kernel just returned to us.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rc) })
}

/// Opens what fd `fd` of process `pid` refers to (through /proc/PID/fd, so the caller needs to be
/// allowed to trace it: the same user).
pub(crate) fn open_fd_of(pid: i32, fd: i32) -> Result<std::os::fd::OwnedFd> {
    let p = format!("/proc/{pid}/fd/{fd}");
    rustix::fs::open(p.as_str(), rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).map_err(|e| err("open", &p, e))
}

/// Joins the namespace `fd` refers to (`setns`). Joining a user namespace needs a
/// single-threaded process; plyroot starts no thread.
pub(crate) fn enter(fd: &impl std::os::fd::AsFd, kind: rustix::thread::LinkNameSpaceType) -> Result<()> {
    rustix::thread::move_into_link_name_space(fd.as_fd(), Some(kind)).map_err(|e| err("join", format!("{kind:?} namespace"), e))
}

/// Writes the uid and gid maps of process `pid` (a process in a user namespace nested in ours,
/// written from ours, where we hold CAP_SETUID/CAP_SETGID). setgroups stays allowed, so the
/// process can drop the host's supplementary groups afterwards.
pub(crate) fn write_maps(pid: i32, uids: &[IdRange], gids: &[IdRange]) -> Result<()> {
    let text = |r: &[IdRange]| r.iter().map(|x| format!("{} {} {}\n", x.inside, x.outside, x.count)).collect::<String>();
    write_proc(&format!("/proc/{pid}/uid_map"), &text(uids))?;
    write_proc(&format!("/proc/{pid}/gid_map"), &text(gids))
}

/// The 64-bit id of the mount namespace `fd` refers to (`NS_GET_MNTNS_ID`, Linux 6.8). Unlike
/// the inode number, an id is never given to another namespace.
pub(crate) fn mnt_ns_id(fd: &impl AsRawFd) -> Result<u64> {
    let mut id: u64 = 0;
    // SAFETY: NS_GET_MNTNS_ID writes one u64 through the pointer, which is valid and aligned.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_MNTNS_ID, &mut id as *mut u64) };
    if rc < 0 {
        return Err(err("read the id of", "a mount namespace", std::io::Error::last_os_error()));
    }
    Ok(id)
}

/// The 64-bit id of any namespace (`NS_GET_ID`, Linux 6.18): like a mount namespace's id, never
/// given to another namespace. None on kernels without it.
pub(crate) fn ns_id(fd: &impl AsRawFd) -> Option<u64> {
    // NS_GET_ID = _IOR(0xb7, 0xd, __u64); libc does not name it yet.
    const NS_GET_ID: libc::Ioctl = 0x8008_b70d;
    let mut id: u64 = 0;
    // SAFETY: NS_GET_ID writes one u64 through the pointer, which is valid and aligned.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_ID, &mut id as *mut u64) };
    (rc == 0).then_some(id)
}

/// A new network namespace with nothing but the loopback interface, brought up: a build step
/// without the network reaches only itself (not the host's loopback, whose servers stay outside).
pub(crate) fn unshare_net_loopback_only() -> Result<()> {
    // SAFETY: CLONE_NEWNET does not touch the fd table (see `unshare`).
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }.map_err(|e| err("unshare the network namespace", "/", e))?;
    // A fresh namespace's `lo` is down; SIOCSIFFLAGS on any socket of the namespace raises it.
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("open a socket to bring up lo", "lo", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd, owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain data, zeroed; the name fits with its NUL.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one `ifreq`, which lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err("bring up the loopback interface", "lo", std::io::Error::last_os_error()));
    }
    Ok(())
}
