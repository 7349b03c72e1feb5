//! Carries out a [`Plan`]: namespaces, the root, the run's record, exec.
//!
//! On the fast path (no pid namespace) this process becomes the program: it enters the
//! namespaces, mounts, pivots and execs, with no waiting parent, so signals and the exit status
//! need no forwarding. With subordinate ranges a short-lived helper writes the id maps and exits.
//! With `--pid` the program runs under a reaping PID 1, and this process supervises it.

use std::cell::Cell;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::identity::{Inside, Mapping};
use super::keeper;
use super::{mounts, namespaces, Plan};
use crate::store::runs::{write_record, RunRecord};
use crate::sys::{ns, process};

/// How a failed exec ends the run (as shells do: 127 not found, 126 not executable).
pub(crate) struct ExecFailed {
    pub code: i32,
    pub message: String,
}

/// A run slot taken for this launch: its record is written once the run's namespaces exist.
pub(crate) struct Recording {
    pub file: fs::File,
    pub path: PathBuf,
    pub record: RunRecord,
    /// A second slot, for the keeper this launch leaves if it mounts the shared overlay.
    pub keeper: Option<keeper::Slot>,
}

impl Recording {
    /// Fills in what only the running launch knows and writes the record.
    pub(crate) fn write(mut self, pid: i32, base: &namespaces::Base, (mnt_ns, mnt_ns_id): (u64, u64)) -> Result<()> {
        self.record.user_ns = base.user_ns;
        self.record.user_ns_id = base.user_ns_id;
        self.record.pid = pid;
        self.record.mnt_ns = mnt_ns;
        self.record.mnt_ns_id = mnt_ns_id;
        write_record(&mut self.file, &self.record, &self.path)
    }
}

/// Locks a launch holds until its root is in place and recorded (so that no second launch mounts
/// the same upper, and gc waits): released when the program starts.
pub(crate) type Held = Vec<fs::File>;

fn enter_cwd(plan: &Plan) -> Result<()> {
    for dir in &plan.exec.cwd {
        if process::chdir(dir).is_ok() {
            return Ok(());
        }
    }
    if plan.exec.cwd_required {
        bail!("cannot start in {}: no such directory inside the environment (--cwd DIR starts elsewhere)", plan.exec.cwd[0].display());
    }
    Ok(())
}

/// Starts the plan's program (in the root, after the pivot). A launcher's program is looked up
/// in the environment's own PATH only: found in a launcher's directory it would be a launcher
/// again, maybe this one.
fn exec(plan: &Plan) -> std::io::Error {
    use std::os::unix::ffi::OsStrExt;
    let name = &plan.exec.argv[0];
    let program = plan.exec.lookup.as_deref().filter(|_| !name.as_bytes().contains(&b'/')).map(|lookup| {
        let candidates = lookup.split(':').filter(|d| d.starts_with('/')).map(|d| std::path::Path::new(d).join(name));
        let mut first = None;
        for c in candidates {
            if fs::metadata(&c).is_ok_and(|m| m.is_file()) && rustix::fs::access(&c, rustix::fs::Access::EXEC_OK).is_ok() {
                return c;
            }
            first.get_or_insert(c);
        }
        // Not there: exec fails as a missing program does.
        first.unwrap_or_else(|| PathBuf::from("/").join(name))
    });
    process::exec(&plan.exec.argv, program.as_deref(), &plan.exec.env)
}

fn exec_failed(plan: &Plan, env_name: &str, e: std::io::Error) -> ExecFailed {
    let prog = plan.exec.argv[0].to_string_lossy();
    match e.raw_os_error() {
        Some(libc::ENOENT) => ExecFailed { code: 127, message: format!("'{prog}' was not found in environment '{env_name}' (PATH={})", plan.exec.lookup.clone().or_else(|| plan.exec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.to_string_lossy().into_owned())).unwrap_or_default()) },
        _ => ExecFailed { code: 126, message: format!("cannot execute '{prog}' in environment '{env_name}': {e}") },
    }
}

/// Carries out the plan and starts the program. Returns only on failure, or, when this process
/// must supervise (pid namespace), with the program's status.
pub(crate) fn launch(plan: &Plan, inside: &Inside, env_name: &str, recording: Option<Recording>, held: Held) -> Result<std::result::Result<i32, ExecFailed>> {
    if plan.pid {
        process::block_signals();
    }
    let mut recording = recording;
    let keeper_slot = recording.as_mut().and_then(|r| r.keeper.take());
    let (base, shared) = namespaces::enter(inside, plan.root.join.as_ref(), plan.store.as_deref(), plan.pid, false, |b| {
        let shared = mounts::shared(&plan.root, b)?;
        // This launch made the shared overlay: leave a keeper of it for the launches after it.
        if let (Some(s), Some(linger), Some(slot)) = (&shared, plan.root.linger, keeper_slot) {
            if b.joined.is_none() && !plan.pid {
                if let Err(e) = keeper::start(s, &plan.root, linger, slot, (b.user_ns, b.user_ns_id)) {
                    crate::diag::debug!("no keeper for this environment's mount: {e:#}");
                }
            }
        }
        Ok(shared)
    })?;
    if let Some(parent) = plan.tied_to {
        // Entering the namespaces changed our credentials, which clears the parent-death signal:
        // set it (again), then make sure the parent did not die before it was set.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).context("cannot tie the run to its parent")?;
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
            process::exit_child(128 + 9);
        }
    }
    if plan.isolate_net {
        // In the run's own user namespace, which owns the new network namespace.
        crate::sys::ns::unshare_net_loopback_only()?;
    }
    let me = rustix::process::getpid().as_raw_nonzero().get();
    if let Some(r) = recording {
        r.write(me, &base, namespaces::mnt_ns()?)?;
    }
    if plan.pid {
        // unshare(CLONE_NEWPID) applies to children: the first one is PID 1 inside. It builds
        // the root (its /proc is the new namespace's) and closes `ready` once the root is in
        // place; until then we hold the locks, so no later launch joins a half-built root.
        let (ready_rd, ready_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
        let (ready_rd, ready_wr) = (Cell::new(Some(ready_rd)), Cell::new(Some(ready_wr)));
        let held = Cell::new(Some(held));
        let shared = Cell::new(shared);
        let child = process::spawn(|| {
            // A supervisor killed outright (kill -9) takes PID 1 along, and the kernel the rest
            // of the pid namespace: nothing of the run is left behind.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).context("cannot tie PID 1 to its supervisor")?;
            drop(ready_rd.take());
            let root = mounts::build(plan, shared.take())?;
            mounts::pivot(&root)?;
            if plan.sealed {
                mounts::proc_read_only()?;
                namespaces::seal()?;
            }
            enter_cwd(plan)?;
            drop((ready_wr.take(), held.take()));
            pid1(plan, env_name)
        })?;
        drop((ready_wr.take(), shared.take()));
        if let Some(rd) = ready_rd.take() {
            let _ = fs::File::from(rd).read(&mut [0u8; 1]);
        }
        drop(held.take());
        return Ok(Ok(process::supervise(child, false)));
    }
    let root = mounts::build(plan, shared)?;
    mounts::pivot(&root)?;
    if plan.sealed {
        mounts::proc_read_only()?;
        namespaces::seal()?;
    }
    enter_cwd(plan)?;
    drop(held);
    let e = exec(plan);
    Ok(Err(exec_failed(plan, env_name, e)))
}

/// PID 1 of the run's pid namespace: starts the program as PID 2, reaps every orphan until the
/// program ends, and ends with its status.
fn pid1(plan: &Plan, env_name: &str) -> Result<i32> {
    let program = process::spawn(|| {
        process::unblock_signals();
        let e = exec(plan);
        let f = exec_failed(plan, env_name, e);
        eprintln!("plyroot: error: {}", crate::text::escape(&f.message));
        Ok(f.code)
    })?;
    Ok(process::supervise(program, true))
}

/// Starts the program inside a booted environment: joins all its namespaces through init's
/// pidfd, forks into its pid namespace, and supervises the program (signals pass through, its
/// status is ours).
pub(crate) fn start_in_booted(pidfd: &OwnedFd, plan: &Plan, inside: &Inside, become_root: bool, env_name: &str, held: Held) -> Result<std::result::Result<i32, ExecFailed>> {
    process::block_signals();
    ns::join_with(pidfd, inside.mapping != Mapping::Host, true)?;
    if matches!(inside.mapping, Mapping::Ranges { .. }) {
        if become_root {
            ns::become_id(0, 0)?;
        }
        ns::clear_groups()?;
    }
    // A terminal of the environment's own, relayed: the caller's cannot be bound in there.
    let pty = match super::relay::open() {
        Ok(p) => p,
        Err(e) => {
            crate::diag::debug!("no terminal of the booted environment's own: {e:#}");
            None
        }
    };
    let held = Cell::new(Some(held));
    let child = process::spawn(|| {
        drop(held.take());
        process::unblock_signals();
        if let Some(p) = &pty {
            p.attach()?;
        }
        enter_cwd(plan)?;
        let e = exec(plan);
        let f = exec_failed(plan, env_name, e);
        eprintln!("plyroot: error: {}", crate::text::escape(&f.message));
        Ok(f.code)
    })?;
    drop(held.take());
    match pty {
        Some(p) => Ok(Ok(p.relay(child)?)),
        None => Ok(Ok(process::supervise(child, false))),
    }
}
