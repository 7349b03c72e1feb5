//! boot, status, stop, login: an environment's own init as PID 1, in the background.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{out, out_json};
use crate::sandbox::prepare::{prepare, Prepared, Request};
use crate::store::env::Env;
use crate::store::Store;

/// Whether `init` (inside the environment) is systemd: the path, or what it links to, says so.
fn is_systemd(store: &Store, env: &Env, init: &str) -> bool {
    if init.contains("systemd") {
        return true;
    }
    let Ok(g) = env.current() else { return false };
    let mut stack = vec![env.upper()];
    stack.extend(store.layer_roots(&g.layers));
    let mut rel = init.trim_start_matches('/').to_owned();
    for _ in 0..8 {
        // Follow the link through the stack, as the root would (merged /usr included).
        let found = crate::store::upper::lookup(&stack, &rel).or_else(|| rel.strip_prefix("sbin/").and_then(|r| crate::store::upper::lookup(&stack, format!("usr/sbin/{r}"))));
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

/// `plyroot --store S run --booted NAME -- ARGS…` as a child: a readiness check, which runs only
/// in the booted environment's namespaces (it fails when init is gone, never in a fresh root).
fn inside(store: &Store, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("plyroot")));
    c.arg("--store").arg(&store.root).args(["-q", "run", "--booted", "--cwd", "/", name, "--"]).args(args).stdin(Stdio::null());
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

/// Why a booted init is gone, for the error that says so.
fn init_died(env: &Env, systemd: bool) -> anyhow::Error {
    let log = env.dir.join("boot.log");
    let cgroups = systemd && std::fs::read_to_string(&log).is_ok_and(|l| l.contains("control group"));
    let hint = if cgroups {
        " (it needs a cgroup of its own, which plyroot makes in the cgroup it runs in when that is writable: as root, or from a delegated one, e.g. `systemd-run --user --scope -p Delegate=yes plyroot boot NAME` on a host with systemd and cgroup v2)"
    } else {
        ""
    };
    anyhow::anyhow!("{}: init exited while booting{hint}; see {}", env.name, log.display())
}

/// Waits until the booted init is ready: systemd says it is running, `--ready CMD` succeeds
/// inside, or (any other init) it is still there a moment after it started. Init's death is
/// checked before every check, so a dead init never counts as ready.
fn wait_ready(store: &Store, env: &Env, init: &std::os::fd::OwnedFd, systemd: bool, ready: Option<&str>, timeout: u64) -> Result<()> {
    let name = &env.name;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let check: Option<Vec<&str>> = if systemd { Some(vec!["systemctl", "is-system-running", "--wait"]) } else { ready.map(|c| vec!["sh", "-c", c]) };
    let Some(check) = check else {
        // A failed exec ends init at once. A pidfd turns readable when the process ends, zombie
        // or not; kill(pid, 0) would not tell.
        if wait_exit(init, Duration::from_millis(200)) {
            return Err(init_died(env, systemd));
        }
        return Ok(());
    };
    let mut last;
    loop {
        if wait_exit(init, Duration::ZERO) {
            return Err(init_died(env, systemd));
        }
        let (ok, text) = until_ok(inside(store, name, &check), deadline)?;
        last = text.trim().to_owned();
        // `is-system-running --wait` returns once boot has finished (running or degraded);
        // before systemd's bus is up it fails at once, so ask again until the deadline.
        let done = if systemd { last == "running" || last == "degraded" } else { ok };
        if done && !wait_exit(init, Duration::ZERO) {
            if systemd {
                crate::diag::info!("{name}: systemd is {last}");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if wait_exit(init, Duration::ZERO) {
        return Err(init_died(env, systemd));
    }
    if systemd {
        let jobs = inside(store, name, &["systemctl", "list-jobs", "--no-pager"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        crate::diag::quote(&jobs);
        bail!("{name}: systemd did not finish booting within {timeout}s (state: {last}; the jobs still starting are above); the environment stays booted: `plyroot stop {name}`");
    }
    bail!("{name}: the readiness check `{}` did not succeed within {timeout}s: {last} (the environment stays booted: `plyroot stop {name}`)", ready.unwrap_or_default())
}

pub(crate) fn boot(store: Store, name: &str, timeout: u64, ready: Option<&str>) -> Result<i32> {
    let env = store.env(name)?;
    super::run::recover(&env)?;
    if env.booted().is_some() {
        crate::diag::info!("'{name}' is already booted (`plyroot status`)");
        return Ok(0);
    }
    let generation = env.current()?;
    let init = generation.settings.init.clone().unwrap_or_else(|| "/sbin/init".to_owned());
    let roots: Vec<PathBuf> = std::iter::once(env.upper()).chain(store.layer_roots(&generation.layers)).collect();
    // As an entry of the merged tree (a link to an init in another layer counts), merged /usr too.
    let rel = init.trim_start_matches('/');
    let usr = ["bin/", "sbin/", "lib/"].iter().any(|p| rel.starts_with(p)).then(|| format!("usr/{rel}"));
    let present = crate::store::upper::lookup(&roots, rel).is_some() || usr.is_some_and(|u| crate::store::upper::lookup(&roots, &u).is_some());
    if !present {
        bail!("'{name}' has no {init} to boot: install an init in it (e.g. `plyroot run --root {name} -- apt-get install -y systemd-sysv`), or name one with `init = \"…\"` in its manifest");
    }
    let systemd = is_systemd(&store, &env, &init);
    let req = Request { boot: Some(init.clone()), ..Request::default() };
    let Prepared::Launch { plan, inside, recording: Some(recording), held } = prepare(&store, &env, &req)? else {
        bail!("'{name}' is already booted (`plyroot status`)");
    };
    let log_path = env.dir.join("boot.log");
    let log = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&log_path).with_context(|| format!("cannot open {}", log_path.display()))?;
    let booted = crate::sandbox::boot::boot(&plan, &inside, name, log, recording, held)?;
    crate::diag::info!("{name}: init {init} is PID 1 (host pid {}); output in {}", booted.init, log_path.display());
    let fd = crate::sys::ns::pidfd(booted.init).map_err(|_| init_died(&env, systemd))?;
    wait_ready(&store, &env, &fd, systemd, ready, timeout)?;
    Ok(0)
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
        if let Some(b) = env.booted() {
            rows.push(Booted { name: env.name, pid: b.record.pid, since: b.record.started });
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
    let Some(b) = env.booted() else {
        crate::diag::info!("'{name}' is not booted");
        return Ok(0);
    };
    let pid = b.record.pid;
    let init = env.current()?.settings.init.unwrap_or_else(|| "/sbin/init".to_owned());
    let fd = crate::sys::ns::pidfd(pid).context("cannot reach the environment's init")?;
    // Its supervisor ends after init (it drains the console and removes init's cgroup): stop
    // returns when both are gone, so a `boot` right after it starts afresh.
    let supervisor = b.record.supervisor.and_then(|s| crate::sys::ns::pidfd(s).ok());
    // systemd shuts down on SIGRTMIN+3 (as on `machinectl poweroff`); other inits on SIGTERM.
    let sig = if is_systemd(store, &env, &init) { libc::SIGRTMIN() + 3 } else { libc::SIGTERM };
    send(&fd, sig)?;
    if !wait_exit(&fd, Duration::from_secs(timeout)) {
        crate::diag::warn!("{name}: init did not stop within {timeout}s; killing every process in it");
        send(&fd, libc::SIGKILL)?;
        if !wait_exit(&fd, Duration::from_secs(10)) {
            bail!("{name}: init (pid {pid}) survived SIGKILL");
        }
    }
    // PID 1's end takes the whole pid namespace with it: nothing of the environment is left.
    if let Some(s) = supervisor {
        if !wait_exit(&s, Duration::from_secs(10)) {
            crate::diag::warn!("{name}: init stopped, but its supervisor (pid {}) is still there", b.record.supervisor.unwrap_or(0));
        }
    }
    crate::diag::info!("{name}: stopped");
    Ok(0)
}

fn send(fd: &std::os::fd::OwnedFd, sig: i32) -> Result<()> {
    crate::sys::process::pidfd_signal(fd, sig).context("cannot signal the environment's init")
}

/// Waits until the pidfd's process has ended; true when it has.
fn wait_exit(fd: &std::os::fd::OwnedFd, within: Duration) -> bool {
    crate::sys::process::pidfd_wait(fd, within)
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
    // A login shell starts in the home, as ssh's and machinectl's do, not where it was called.
    super::run::run(store, name, Request { login: true, home_start: true, ..Request::default() }, false)
}
