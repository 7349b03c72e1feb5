//! boot, status, stop, login: an environment's own init as PID 1, in the background.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::run::{run_or_boot, BootRequest};
use super::{out, out_json};
use crate::cli::RunOpts;
use crate::store::env::Env;
use crate::store::Store;

/// Whether `init` (inside the environment) is systemd: the path, or what it links to, says so.
fn is_systemd(store: &Store, env: &Env, init: &str) -> bool {
    if init.contains("systemd") {
        return true;
    }
    let Ok(g) = env.current() else { return false };
    let mut stack = vec![env.upper()];
    stack.extend(g.layers.iter().rev().map(|l| store.layer_root(l)));
    let mut rel = init.trim_start_matches('/').to_owned();
    for _ in 0..8 {
        // Follow the link through the stack, as the root would (merged /usr included).
        let found = crate::store::upper::lookup(&stack, &rel).or_else(|| rel.strip_prefix("sbin/").and_then(|r| crate::store::upper::lookup(&stack, &format!("usr/sbin/{r}"))));
        let Some((abs, meta)) = found else { return false };
        if !meta.file_type().is_symlink() {
            return false;
        }
        let Ok(t) = std::fs::read_link(&abs) else { return false };
        if t.to_string_lossy().contains("systemd") {
            return true;
        }
        let base = Path::new(&rel).parent().unwrap_or(Path::new("")).to_owned();
        rel = if t.is_absolute() { t.to_string_lossy().trim_start_matches('/').to_owned() } else { base.join(t).to_string_lossy().into_owned() };
    }
    false
}

/// `plyroot --store S run NAME -- ARGS…` as a child, for readiness checks inside the booted env.
fn inside(store: &Store, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("plyroot")));
    c.arg("--store").arg(&store.root).args(["-q", "run", name, "--"]).args(args).stdin(Stdio::null());
    c
}

/// Runs `c` until it succeeds or the deadline passes; returns its last output.
fn until_ok(mut c: Command, deadline: Instant) -> Result<(bool, String)> {
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("cannot start the readiness check")?;
    loop {
        if let Some(st) = child.try_wait()? {
            let o = child.wait_with_output()?;
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            return Ok((st.success(), text));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((false, "timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn boot(store: Store, name: &str, timeout: u64, ready: Option<&str>) -> Result<i32> {
    let env = store.env(name)?;
    let init = env.current()?.settings.init.unwrap_or_else(|| "/sbin/init".to_owned());
    let systemd = is_systemd(&store, &env, &init);
    let ready = ready.map(str::to_owned);
    let wait = move |store: &Store, _env: &Env, pid: i32| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        if systemd {
            // `is-system-running --wait` returns once boot has finished (running or degraded);
            // before systemd's bus is up it fails at once, so ask again until the deadline.
            let mut state = String::new();
            while Instant::now() < deadline {
                let (_, text) = until_ok(inside(store, name, &["systemctl", "is-system-running", "--wait"]), deadline)?;
                state = text.trim().to_owned();
                if state == "running" || state == "degraded" {
                    crate::diag::info(&format!("{name}: systemd is {state}"));
                    return Ok(());
                }
                if crate::sys::ns::pidfd(pid).map(|fd| wait_exit(&fd, Duration::ZERO)).unwrap_or(true) {
                    let log = _env.dir.join("boot.log");
                    let cgroups = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("control group"));
                    let hint = if cgroups {
                        " (it needs a cgroup of its own, which plyroot makes in the cgroup it runs in when that is writable: as root, or from a delegated one, e.g. `systemd-run --user --scope -p Delegate=yes plyroot boot NAME` on a host with systemd and cgroup v2)"
                    } else {
                        ""
                    };
                    bail!("{name}: systemd exited while booting{hint}; see {}", log.display());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let jobs = inside(store, name, &["systemctl", "list-jobs", "--no-pager"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            bail!("{name}: systemd did not finish booting within {timeout}s (state: {state}); still starting:\n{jobs}(the environment stays booted: `plyroot stop {name}`)");
        }
        if let Some(cmd) = &ready {
            loop {
                let (ok, text) = until_ok(inside(store, name, &["sh", "-c", cmd]), deadline)?;
                if ok {
                    return Ok(());
                }
                let ended = crate::sys::ns::pidfd(pid).map(|fd| wait_exit(&fd, Duration::ZERO)).unwrap_or(true);
                if Instant::now() >= deadline || ended {
                    bail!("{name}: the readiness check `{cmd}` did not succeed within {timeout}s: {}", text.trim());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // Any other init: ready once it is running (a failed exec ends it at once). A pidfd
        // turns readable when the process ends, zombie or not; kill(pid, 0) would not tell.
        let ended = crate::sys::ns::pidfd(pid).map(|fd| wait_exit(&fd, Duration::from_millis(200))).unwrap_or(true);
        if ended {
            bail!("{name}: init exited right after it started; see {}", _env.dir.join("boot.log").display());
        }
        Ok(())
    };
    let opts = RunOpts::default();
    run_or_boot(store, name, &opts, Vec::new(), false, false, Some(BootRequest { init, wait: &wait }))
}

#[derive(Serialize)]
struct Booted {
    name: String,
    pid: i32,
    since: u64,
}

pub(crate) fn status(store: &Store, json: bool) -> Result<i32> {
    let mut rows = Vec::new();
    for env in store.envs()? {
        if let Some((pin, pid)) = env.booted() {
            let since = std::fs::metadata(&pin).and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or(0);
            rows.push(Booted { name: env.name, pid, since });
        }
    }
    if json {
        return out_json(&rows).map(|_| 0);
    }
    let mut s = format!("{:<20} {:>8}  {}\n", "NAME", "PID", "UP");
    for r in &rows {
        s.push_str(&format!("{:<20} {:>8}  {}s\n", r.name, r.pid, crate::store::now_secs().saturating_sub(r.since)));
    }
    out(&s).map(|_| 0)
}

pub(crate) fn stop(store: &Store, name: &str, timeout: u64) -> Result<i32> {
    let env = store.env(name)?;
    let Some((_, pid)) = env.booted() else {
        crate::diag::info(&format!("'{name}' is not booted"));
        return Ok(0);
    };
    let init = env.current()?.settings.init.unwrap_or_else(|| "/sbin/init".to_owned());
    let fd = crate::sys::ns::pidfd(pid).context("cannot reach the environment's init")?;
    // systemd shuts down on SIGRTMIN+3 (as on `machinectl poweroff`); other inits on SIGTERM.
    let sig = if is_systemd(store, &env, &init) { libc::SIGRTMIN() + 3 } else { libc::SIGTERM };
    send(&fd, sig)?;
    if !wait_exit(&fd, Duration::from_secs(timeout)) {
        crate::diag::warn(&format!("{name}: init did not stop within {timeout}s; killing every process in it"));
        send(&fd, libc::SIGKILL)?;
        if !wait_exit(&fd, Duration::from_secs(10)) {
            bail!("{name}: init (pid {pid}) survived SIGKILL");
        }
    }
    // PID 1's end takes the whole pid namespace with it: nothing of the environment is left.
    crate::diag::info(&format!("{name}: stopped"));
    Ok(0)
}

fn send(fd: &std::os::fd::OwnedFd, sig: i32) -> Result<()> {
    // SAFETY: pidfd_send_signal on a valid pidfd with a null siginfo.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, std::os::fd::AsRawFd::as_raw_fd(fd), sig, std::ptr::null::<libc::siginfo_t>(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e).context("cannot signal the environment's init");
        }
    }
    Ok(())
}

/// Waits until the pidfd's process has ended (the pidfd turns readable).
fn wait_exit(fd: &std::os::fd::OwnedFd, within: Duration) -> bool {
    let mut p = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(fd), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, within.as_millis().min(i32::MAX as u128) as i32) };
    n > 0
}

pub(crate) fn login(store: Store, name: &str) -> Result<i32> {
    let env = store.env(name)?;
    if env.booted().is_none() {
        let root = store.root.clone();
        let status = Command::new(std::env::current_exe().context("cannot find plyroot")?).arg("--store").arg(&root).args(["boot", name]).status()?;
        if !status.success() {
            bail!("cannot boot '{name}' for the login");
        }
    }
    super::run::run(store, name, &RunOpts::default(), Vec::new(), true, false)
}
