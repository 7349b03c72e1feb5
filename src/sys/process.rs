//! Processes: fork, exec, wait, and passing signals and exit statuses through.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;

use super::{err, Result};

/// What a child became when it ended, as a shell would report it.
pub(crate) fn status_code(raw: libc::c_int) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        125
    }
}

pub(crate) enum Fork {
    Child,
    Parent(libc::pid_t),
}

/// Forks a child that runs `f` and ends with the status it returns, through `_exit`: a forked
/// child never returns into its parent's code path (no unwinding through `main`, no second writer
/// on a report pipe, no atexit handlers or stdio buffers of the parent run twice). An error is
/// printed as plyroot's own (`plyroot: error: …`, status 125). Returns the child's pid.
pub(crate) fn spawn(f: impl FnOnce() -> anyhow::Result<i32>) -> Result<libc::pid_t> {
    match fork()? {
        Fork::Parent(pid) => Ok(pid),
        Fork::Child => {
            let code = match f() {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("plyroot: error: {}", crate::text::escape(&crate::text::chain(&e)));
                    125
                }
            };
            exit_child(code)
        }
    }
}

/// Closes every fd of this process but those in `keep` (a process that outlives the command that
/// forked it must not hold its locks and files).
pub(crate) fn close_fds_except(keep: &[libc::c_int]) -> Result<()> {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut from: libc::c_uint = 0;
    for &k in keep.iter().chain([&libc::c_int::MAX]) {
        let k = k as libc::c_uint;
        if k > from {
            // SAFETY: close_range only closes fds; the caller keeps the fds it still uses (and
            // owns no other OwnedFd that it will use or close again).
            if unsafe { libc::close_range(from, k - 1, 0) } != 0 {
                return Err(err("close the fds of", "a keeper", std::io::Error::last_os_error()));
            }
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

/// Ends a forked child at once with `code`.
pub(crate) fn exit_child(code: i32) -> ! {
    // SAFETY: _exit ends the process without running the parent's atexit handlers or flushing
    // stdio buffers it inherited; that is what a forked child must do.
    unsafe { libc::_exit(code) }
}

/// Runs `f` in a forked child and returns its result, passed back as JSON over a pipe (the one
/// child→parent protocol). For work that must not change this process: entering namespaces, or
/// probing what the kernel allows.
pub(crate) fn in_child<T: serde::Serialize + serde::de::DeserializeOwned>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| err("create a pipe", "/", e))?;
    // Each process keeps its own end: the child's copy of the parent's end is dropped in the
    // child, and the other way round (a Cell, since both run the same captured values).
    let (rd, wr) = (std::cell::Cell::new(Some(rd)), std::cell::Cell::new(Some(wr)));
    let child = spawn(|| {
        drop(rd.take());
        let sent = wr.take().is_some_and(|w| send_reply(w, f()));
        Ok(i32::from(!sent))
    })?;
    drop(wr.take());
    let reply = rd.take().map(read_reply::<T>);
    let status = waitpid(child)?;
    match reply {
        Some(Ok(Some(v))) => Ok(v),
        Some(Err(e)) => Err(e),
        _ => anyhow::bail!("a helper process of plyroot ended without an answer (status {})", status_code(status)),
    }
}

/// Sends a child's result to its parent over the pipe `w` (closed afterwards): the one
/// child→parent protocol, JSON of `Ok(value)` or `Err(message)`.
pub(crate) fn send_reply<T: serde::Serialize>(w: impl Into<std::os::fd::OwnedFd>, r: anyhow::Result<T>) -> bool {
    use std::io::Write;
    let reply = match r {
        Ok(v) => Reply::Ok(v),
        // Each cause once: `{:#}` repeats a source that its error's message already shows.
        Err(e) => Reply::Err(crate::text::chain(&e)),
    };
    let mut w = std::fs::File::from(w.into());
    serde_json::to_vec(&reply).is_ok_and(|m| w.write_all(&m).is_ok())
}

/// Reads what [`send_reply`] sent: Ok(None) when the child ended without an answer.
pub(crate) fn read_reply<T: serde::de::DeserializeOwned>(rd: impl Into<std::os::fd::OwnedFd>) -> anyhow::Result<Option<T>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::from(rd.into()).read_to_end(&mut buf).map_err(|e| err("read the reply of", "a helper process", e))?;
    match serde_json::from_slice::<Reply<T>>(&buf) {
        Ok(Reply::Ok(v)) => Ok(Some(v)),
        Ok(Reply::Err(e)) => Err(anyhow::anyhow!(e)),
        Err(_) => Ok(None),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
enum Reply<T> {
    Ok(T),
    Err(String),
}

/// fork(2). plyroot is single-threaded whenever it forks, so the child may do anything.
pub(crate) fn fork() -> Result<Fork> {
    // SAFETY: the process has one thread (plyroot starts none), so the child inherits no lock
    // held by another thread.
    match unsafe { libc::fork() } {
        -1 => Err(err("fork", "/", std::io::Error::last_os_error())),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

pub(crate) fn waitpid(pid: libc::pid_t) -> Result<libc::c_int> {
    let mut st = 0;
    loop {
        // SAFETY: `st` is a valid out-pointer for the duration of the call.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            return Ok(st);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(err("wait for", format!("pid {pid}"), e));
        }
    }
}

/// Signals a supervising process passes on to the process it supervises.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2,
    libc::SIGWINCH, libc::SIGCONT, libc::SIGTSTP, libc::SIGALRM,
];

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the forwarded signals and SIGCHLD, so that a supervisor can take them one at a time
/// with `sigwaitinfo`. Call before fork; the child calls `unblock_signals` before exec.
pub(crate) fn block_signals() {
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    // SAFETY: `set` is initialised; the old mask is not needed.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

pub(crate) fn unblock_signals() {
    // SAFETY: an empty, initialised set replaces the mask.
    unsafe {
        let set = sigset(&[]);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Supervises `child` until it ends and returns its status as a shell would report it. Signals
/// sent to us by other processes are passed to `child`; those the terminal generates already
/// reached the whole foreground process group, so they are not sent twice. As PID 1 of a pid
/// namespace (`reap_all`), every orphan is reaped too, and the first child's status is ours.
pub(crate) fn supervise(child: libc::pid_t, reap_all: bool) -> i32 {
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    loop {
        // Reap whatever has ended before waiting for the next signal.
        loop {
            let mut st = 0;
            let who = if reap_all { -1 } else { child };
            // SAFETY: `st` is a valid out-pointer.
            let r = unsafe { libc::waitpid(who, &mut st, libc::WNOHANG) };
            if r == child {
                return status_code(st);
            }
            if r <= 0 {
                break;
            }
        }
        // SAFETY: `info` is a valid out-pointer; `set` is initialised.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig <= 0 || sig == libc::SIGCHLD {
            continue;
        }
        if info.si_code == libc::SI_USER || info.si_code == libc::SI_QUEUE || info.si_code == libc::SI_TKILL {
            // SAFETY: kill(2) with a pid we created.
            unsafe { libc::kill(child, sig) };
        }
    }
}

/// A signalfd for the signals `block_signals` blocks (they must be blocked already), so that a
/// supervisor that also waits on other fds can poll for them.
pub(crate) fn signal_fd() -> Result<std::os::fd::OwnedFd> {
    let mut all = FORWARDED.to_vec();
    all.push(libc::SIGCHLD);
    let set = sigset(&all);
    // SAFETY: `set` is initialised; -1 asks for a new fd, which we own from here on.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(err("signalfd", "/", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The next signal queued on a `signal_fd`: its number, and whether another process sent it
/// (kill, sigqueue), as opposed to the kernel (a terminal, a child's end).
pub(crate) fn read_signal(fd: &impl std::os::fd::AsFd) -> Option<(libc::c_int, bool)> {
    // SAFETY: signalfd_siginfo is plain data; zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: the buffer is `info`, `size` bytes long, and lives for the call.
    let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    if n != size as isize {
        return None;
    }
    let code = info.ssi_code;
    Some((info.ssi_signo as libc::c_int, code == libc::SI_USER || code == libc::SI_QUEUE || code == libc::SI_TKILL))
}

/// The status of `child` when it has ended (reaped now), without waiting.
pub(crate) fn try_wait(child: libc::pid_t) -> Option<i32> {
    let mut st = 0;
    // SAFETY: `st` is a valid out-pointer.
    let r = unsafe { libc::waitpid(child, &mut st, libc::WNOHANG) };
    (r == child).then(|| status_code(st))
}

/// Sends `sig` to `pid` (a process this one started).
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we created; no memory involved.
    unsafe { libc::kill(pid, sig) };
}

/// Ends this process the way a child ended: with its exit code, or by re-raising the signal
/// that killed it, so our own parent sees the same thing.
pub(crate) fn exit_like(code: i32) -> ! {
    if code > 128 && code < 128 + 65 {
        let sig = code - 128;
        // SAFETY: resetting a signal to its default action and raising it; no memory involved.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            unblock_signals();
            libc::raise(sig);
        }
    }
    std::process::exit(code)
}

/// Replaces this process with `argv`: `program` when given (argv[0] then is only its name),
/// else argv[0] looked up in `env`'s PATH. Only returns on failure.
pub(crate) fn exec(argv: &[OsString], program: Option<&Path>, env: &[(OsString, OsString)]) -> std::io::Error {
    let mut cmd = std::process::Command::new(program.map(Path::as_os_str).unwrap_or(&argv[0]));
    cmd.arg0(&argv[0]).args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    cmd.exec()
}

pub(crate) fn chdir(dir: &Path) -> Result<()> {
    rustix::process::chdir(dir).map_err(|e| err("chdir", dir, e))
}


/// Sends signal `sig` to the process a pidfd refers to; a process already gone is not an error.
pub(crate) fn pidfd_signal(pidfd: &impl std::os::fd::AsFd, sig: libc::c_int) -> Result<()> {
    // SAFETY: `sig` is a signal number the caller took from libc (real-time ones from
    // libc::SIGRTMIN(), past those glibc reserves); it is only sent to another process.
    let s = unsafe { rustix::process::Signal::from_raw_unchecked(sig) };
    match rustix::process::pidfd_send_signal(pidfd, s) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(err("signal", "a process", e)),
    }
}

/// Waits until the process a pidfd refers to has ended (the pidfd turns readable, zombie or
/// not), for at most `within`; true when it has.
pub(crate) fn pidfd_wait(pidfd: &impl std::os::fd::AsFd, within: std::time::Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let t = Timespec { tv_sec: within.as_secs() as i64, tv_nsec: i64::from(within.subsec_nanos()) };
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    poll(&mut fds, Some(&t)).is_ok_and(|n| n > 0)
}

/// Gives this process a new, empty, anonymous session keyring, in place of the one it inherited
/// (a login's, which links the user's keyring): children started after it cannot reach the keys
/// of the caller's session.
pub(crate) fn new_session_keyring() -> Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name reads no memory of ours; it only
    // replaces this thread group's session keyring.
    let rc = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, std::ptr::null::<libc::c_char>()) };
    if rc < 0 {
        return Err(err("join a new session keyring", "keyctl", std::io::Error::last_os_error()));
    }
    Ok(())
}
