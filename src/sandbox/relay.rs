//! A terminal for a program started in a booted environment, relayed to the caller's.
//!
//! A fresh run binds the caller's terminal at its name inside (see `mounts`). A run that joins a
//! booted environment cannot: its mounts are init's, and the caller's devpts is not reachable from
//! there. So, as ssh does, it gives the program a pty of the environment's own devpts, set up
//! like the caller's terminal, and copies bytes both ways while the program runs; the caller's
//! terminal is raw meanwhile, so ^C and ^Z reach the program through its own terminal, and a
//! resize of the caller's terminal is passed on. Only when stdin and stdout are both a terminal.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{isatty, tcgetattr, tcgetwinsize, tcsetattr, tcsetwinsize, OptionalActions, Termios};

use crate::sys::process;

pub(crate) struct Pty {
    master: OwnedFd,
    /// The caller's terminal settings: given to the pty, and put back at the end.
    caller: Termios,
}

/// A pty of the root this process is in (the booted environment's), when stdin and stdout are a
/// terminal.
pub(crate) fn open() -> Result<Option<Pty>> {
    let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
    if !isatty(stdin.as_fd()) || !isatty(stdout.as_fd()) {
        return Ok(None);
    }
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).context("cannot open /dev/ptmx in the booted environment")?;
    rustix::pty::grantpt(&master).context("cannot set up a pty")?;
    rustix::pty::unlockpt(&master).context("cannot set up a pty")?;
    let caller = tcgetattr(stdin.as_fd()).context("cannot read the terminal's settings")?;
    Ok(Some(Pty { master, caller }))
}

impl Pty {
    /// In the program's process, before exec: a session of its own whose controlling terminal is
    /// the pty, on each of stdin, stdout and stderr that was the caller's terminal.
    pub(crate) fn attach(&self) -> Result<()> {
        let tty = [isatty(std::io::stdin().as_fd()), isatty(std::io::stdout().as_fd()), isatty(std::io::stderr().as_fd())];
        rustix::process::setsid().context("cannot start a session")?;
        let slave = rustix::pty::ioctl_tiocgptpeer(&self.master, OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).context("cannot open the pty")?;
        tcsetattr(&slave, OptionalActions::Now, &self.caller).context("cannot set up the pty")?;
        if let Ok(size) = tcgetwinsize(std::io::stdin().as_fd()) {
            let _ = tcsetwinsize(&slave, size);
        }
        rustix::process::ioctl_tiocsctty(&slave).context("cannot make the pty the controlling terminal")?;
        if tty[0] {
            rustix::stdio::dup2_stdin(&slave).context("cannot use the pty")?;
        }
        if tty[1] {
            rustix::stdio::dup2_stdout(&slave).context("cannot use the pty")?;
        }
        if tty[2] {
            rustix::stdio::dup2_stderr(&slave).context("cannot use the pty")?;
        }
        Ok(())
    }

    /// In the supervisor: copies between the caller's terminal and the pty until `child` ends,
    /// passes signals on as `process::supervise` does, and returns the child's status. The
    /// caller's terminal is raw meanwhile and gets its settings back at the end.
    pub(crate) fn relay(self, child: libc::pid_t) -> Result<i32> {
        let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
        let signals = process::signal_fd()?;
        let mut raw = self.caller.clone();
        raw.make_raw();
        let _ = tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw);
        let restore = Restore(&self.caller);
        let mut out = stdout.lock();
        let mut buf = [0u8; 16384];
        let mut input = true;
        let status = loop {
            let mut fds = vec![PollFd::new(&self.master, PollFlags::IN), PollFd::new(&signals, PollFlags::IN)];
            if input {
                fds.push(PollFd::from_borrowed_fd(stdin.as_fd(), PollFlags::IN));
            }
            if poll(&mut fds, None).is_err() {
                continue;
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            if ready[0] {
                match rustix::io::read(&self.master, &mut buf) {
                    Ok(n) if n > 0 => {
                        let _ = out.write_all(&buf[..n]).and_then(|_| out.flush());
                    }
                    // EIO: no process holds the pty any more; the child's end follows.
                    _ => {}
                }
            }
            if ready.get(2) == Some(&true) {
                match rustix::io::read(stdin.as_fd(), &mut buf) {
                    Ok(n) if n > 0 => {
                        let _ = write_all(&self.master, &buf[..n]);
                    }
                    _ => input = false,
                }
            }
            if ready[1] {
                let mut ended = None;
                while let Some((sig, sent)) = process::read_signal(&signals) {
                    match sig {
                        libc::SIGCHLD => ended = ended.or_else(|| process::try_wait(child)),
                        libc::SIGWINCH => {
                            if let Ok(size) = tcgetwinsize(stdin.as_fd()) {
                                let _ = tcsetwinsize(&self.master, size);
                            }
                        }
                        s if sent => process::kill(child, s),
                        _ => {}
                    }
                }
                if let Some(st) = ended {
                    break st;
                }
            }
        };
        // What the program wrote last, as far as it is there now (a background job may hold
        // the pty longer: no waiting for it).
        let _ = rustix::fs::fcntl_setfl(&self.master, rustix::fs::OFlags::NONBLOCK);
        while let Ok(n) = rustix::io::read(&self.master, &mut buf) {
            if n == 0 {
                break;
            }
            let _ = out.write_all(&buf[..n]);
        }
        let _ = out.flush();
        drop(restore);
        Ok(status)
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> rustix::io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Puts the caller's terminal settings back, also when the relay fails.
struct Restore<'a>(&'a Termios);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, self.0);
    }
}
