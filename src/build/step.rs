//! Running one build step: a throwaway environment on the layers below (`store::steps`), a child
//! `plyroot` that launches the step's command in it through `sandbox::prepare` (so the build's
//! own process stays single-threaded and outside every namespace), its output streamed or kept,
//! and its upper published as a layer the way `commit` makes one.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::manifest::{Step, StepKind};
use crate::sandbox::in_image_view;
use crate::sandbox::prepare::{prepare, Prepared, Request};
use crate::store::env::{Env, Settings};
use crate::store::layer::LayerInfo;
use crate::store::meta::Overrides;
use crate::store::steps::FailedStep;
use crate::store::{canonical, now_secs, write_atomic, Store};

/// How many of a failed step's last output lines are shown, and how much of each line's start and
/// end.
const TAIL: usize = 25;
const LINE: usize = 300;

/// A line of output as shown in a failure: its start and end when it is long.
fn shortened(line: &[u8]) -> String {
    if line.len() <= 2 * LINE {
        return String::from_utf8_lossy(line).into_owned();
    }
    format!("{} […{} bytes…] {}", String::from_utf8_lossy(&line[..LINE]), line.len() - 2 * LINE, String::from_utf8_lossy(&line[line.len() - LINE..]))
}

/// The command line (`/bin/sh -c …`) of `step` on the layers `below`.
pub(crate) fn argv(store: &Store, below: &[String], step: &Step) -> Result<Vec<OsString>> {
    let script = match &step.what {
        StepKind::Run(c) => c.clone(),
        StepKind::Packages(names) => super::packages::command(&store.layer_roots(below), names)?,
    };
    Ok(vec!["/bin/sh".into(), "-c".into(), script.into()])
}

/// The settings of the environment a step runs in.
fn settings(step: &Step, extra_env: &[(String, String)]) -> Settings {
    let mut env = step.env.clone();
    env.extend(extra_env.iter().cloned());
    Settings {
        root: true,
        binds: step.inputs.iter().map(|i| format!("{}:{}:ro", i.src.display(), i.dst.display())).collect(),
        env,
        ..Settings::default()
    }
}

/// Runs `step` of environment `name` on the layers `below` and publishes what it wrote as a
/// layer; returns the layer's id. `place` (`[3/7] dev`) prefixes what is shown. `extra_env`: variables
/// added for this run only (`build --check` sets SOURCE_DATE_EPOCH), not part of the key.
pub(crate) fn run(store: &Store, name: &str, below: &[String], step: &Step, place: &str) -> Result<String> {
    let env = run_only(store, name, below, step, place, &[])?;
    let id = publish(store, &env, format!("build step {place}: {}", step.title()))?;
    store.remove_build_env(name)?;
    Ok(id)
}

/// Runs `step` and leaves what it wrote in the upper of the returned build environment.
pub(crate) fn run_only(store: &Store, name: &str, below: &[String], step: &Step, place: &str, extra_env: &[(String, String)]) -> Result<Env> {
    let argv = argv(store, below, step).with_context(|| format!("{place}: `{}`", crate::text::field(&step.title())))?;
    let failed = FailedStep { title: format!("{place}: {}", step.title()), network: step.network };
    let env = store.fresh_build_env(name, below.to_vec(), settings(step, extra_env), &failed)?;
    let (code, tail, streamed) = spawn(store, &env, step.network, &argv)?;
    if code != 0 {
        if !streamed && !tail.is_empty() {
            // Line by line: the error itself is one line, with its control characters escaped.
            eprintln!("plyroot: {place}: the last lines of its output:");
            for l in &tail {
                eprintln!("  | {}", crate::text::escape(l));
            }
        }
        let mut msg = format!("{place}: the step `{}` failed (exit status {code}); ", crate::text::field(&step.title()));
        msg.push_str(&format!(
            "its full output is in {}, and what it left is kept until the next build: `plyroot build --shell {name}` opens a shell in exactly that state",
            env.dir.join("log").display()
        ));
        bail!(msg);
    }
    Ok(env)
}

/// Starts the child that runs `argv` in `env` and waits for it, streaming its output to stderr on
/// a terminal (or with -v) and keeping its last lines and a log. Returns the exit status, the last
/// lines, and whether they were streamed.
fn spawn(store: &Store, env: &Env, network: bool, argv: &[OsString]) -> Result<(i32, Vec<String>, bool)> {
    let exe = std::env::current_exe().context("cannot find plyroot's own executable to run the step")?;
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe for the step's output")?;
    let wr2 = wr.try_clone().context("cannot duplicate the step's output pipe")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--store").arg(&store.root).arg("__step").arg(&env.dir).arg(&env.name).arg("--parent").arg(std::process::id().to_string());
    if network {
        cmd.arg("--network");
    }
    // Nothing of the caller's environment: the step's PID 1 is a fork of this child, and a step
    // can read its /proc/1/environ. PATH finds newuidmap and newgidmap.
    cmd.env_clear().envs(std::env::var_os("PATH").map(|p| ("PATH", p)));
    cmd.arg("--").args(argv).stdin(Stdio::null()).stdout(Stdio::from(wr)).stderr(Stdio::from(wr2));
    let mut child = cmd.spawn().with_context(|| format!("cannot start {} for the step", exe.display()))?;
    drop(cmd);
    let stream = std::io::stderr().is_terminal() || crate::diag::level() >= 2;
    let log_path = env.dir.join("log");
    let mut log = fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut out = fs::File::from(rd);
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read the step's output"),
        };
        let chunk = &buf[..n];
        log.write_all(chunk).with_context(|| format!("cannot write {}", log_path.display()))?;
        if stream {
            let _ = std::io::stderr().write_all(chunk);
        }
        partial.extend_from_slice(chunk);
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            tail.push_back(shortened(&line[..line.len() - 1]));
            if tail.len() > TAIL {
                tail.pop_front();
            }
        }
        // A line without end is kept to its shown length only (the log has it whole).
        if partial.len() > 2 * LINE {
            partial.drain(LINE..partial.len() - LINE);
        }
    }
    if !partial.is_empty() {
        tail.push_back(shortened(&partial));
    }
    let status = child.wait().context("cannot wait for the step")?;
    let code = status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
    Ok((code, tail.into(), stream))
}

/// The child's side (`plyroot __step`): launches `command` in the build environment at `dir` as
/// a build step. Ends with the step when the build that started it dies (kill -9 included): a
/// step outliving its build would write into an upper nobody publishes.
pub(crate) fn child(store: Store, dir: &Path, name: &str, network: bool, parent: Option<i32>, command: Vec<OsString>) -> Result<i32> {
    if parent.is_some() {
        // A session of its own: no controlling terminal, so the step can neither write to the
        // caller's nor type into it (TIOCSTI) through /dev/tty.
        rustix::process::setsid().context("cannot start the build step in a session of its own")?;
    }
    // The caller's session keyring (a login's links the user's keys) stays outside.
    crate::sys::process::new_session_keyring()?;
    if let Some(p) = parent {
        // Until the launch ties itself again after entering its namespaces (see `Plan::tied_to`).
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL)).context("cannot tie the step to its build")?;
        // The build may have died before the line above: then our parent is another process.
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(p) {
            return Ok(137);
        }
    }
    let env = Env { name: name.to_owned(), dir: dir.to_owned() };
    let req = Request { root: true, pid: true, pure: true, isolate_net: !network, tied_to: parent, command, ..Request::default() };
    let prepared = prepare(&store, &env, &req)?;
    drop(store);
    let Prepared::Launch { plan, inside, recording, held } = prepared else { bail!("a build step cannot join a booted environment") };
    match crate::sandbox::launch::launch(&plan, &inside, name, recording, held)? {
        Ok(code) => Ok(code),
        Err(failed) => {
            eprintln!("plyroot: error: {}", crate::text::escape(&failed.message));
            Ok(failed.code)
        }
    }
}

/// `plyroot build --shell NAME`: a shell in the state the last failed step of NAME left, as that
/// step ran (root, its inputs, its network).
pub(crate) fn shell(store: Store, name: &str) -> Result<i32> {
    crate::names::check_name(name)?;
    let Some((env, step)) = store.failed_build(name) else {
        bail!("no failed build step of '{name}' is kept (a build that failed keeps its last step's state until the next build or gc)");
    };
    // The step's overlay was volatile: the kernel mounts its upper again only with a fresh
    // workdir (the old one carries the `incompat/volatile` mark). The step is over; so is its use.
    let work = env.dir.join("work");
    crate::store::remove_tree_mapped(&work)?;
    fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
    crate::diag::info!("a shell where {} failed; what you change here is thrown away by the next build", step.title);
    child(store, &env.dir.clone(), name, step.network, None, vec!["/bin/sh".into()])
}

/// Publishes the upper of the build environment `env` as a layer (unless the store has the same
/// content already); returns its id. The upper is moved into a staging directory first: the
/// environment is thrown away after.
pub(crate) fn publish(store: &Store, env: &Env, source: String) -> Result<String> {
    let st = store.staging()?;
    let root = st.path.join("root");
    fs::rename(env.upper(), &root).with_context(|| format!("cannot move {} into {}", env.upper().display(), st.path.display()))?;
    let info = digest_into(&st.path, source, |_| Ok(()))?;
    let dest = store.layer_dir(&info.id);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // false: the store has this content already; the staged copy goes with the staging dir.
    st.publish(&dest)?;
    Ok(info.id)
}

/// Digests the tree `dir/root` where owners read as they do inside, and writes `dir/layer.json`,
/// made durable with the files: what a published layer holds (a step's, a commit's). `before`
/// runs there first, on the tree (a commit leaves plyroot's own files out).
pub(crate) fn digest_into(dir: &Path, source: String, before: impl FnOnce(&Path) -> Result<()>) -> Result<LayerInfo> {
    let root = dir.join("root");
    let (id, size, entries) = in_image_view(move || {
        before(&root)?;
        let s = canonical::digest(&root, &Overrides::default())?;
        Ok((s.id, s.size, s.entries))
    })?;
    let info = LayerInfo { id, size, entries, source, created: now_secs() };
    write_atomic(&dir.join("layer.json"), &serde_json::to_vec_pretty(&info)?)?;
    crate::store::owners::mark_new(dir)?;
    // The layer's files are durable before any record names them.
    let d = fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    rustix::fs::syncfs(&d).with_context(|| format!("cannot sync the file system of {}", dir.display()))?;
    Ok(info)
}
