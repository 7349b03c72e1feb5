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

/// Replaces this process with `argv[0]` (searched in `PATH` of `env`). Only returns on failure.
pub(crate) fn exec(argv: &[OsString], env: &[(OsString, OsString)]) -> std::io::Error {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    cmd.exec()
}

pub(crate) fn chdir(dir: &Path) -> Result<()> {
    rustix::process::chdir(dir).map_err(|e| err("chdir", dir, e))
}

