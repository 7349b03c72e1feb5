//! run and enter: resolve the environment, plan the launch, carry it out.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rustix::fs::{flock, FlockOperation};

use crate::cli::RunOpts;
use crate::sandbox::identity::{choose, host_subids, HostUser, Mapping};
use crate::sandbox::{launch, plan, skel, HostFacts, PlanInput, RunOptions, Upper};
use crate::store::env::{Env, Generation, RunPin};
use crate::store::Store;
use crate::sys::{ns, process};

/// Removes the pins and workdirs of runs that have ended (their lock is free). Runs exec away
/// and cannot clean up after themselves; each launch collects what earlier ones left.
fn collect_ended_runs(env: &Env) {
    let Ok(rd) = fs::read_dir(env.dir.join("runs")) else { return };
    for e in rd.flatten() {
        let lock = e.path();
        let Ok(f) = fs::File::open(&lock) else { continue };
        if flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok() {
            if let Some(id) = lock.file_stem() {
                let _ = crate::store::remove_tree(&env.dir.join("work").join(id));
            }
            let _ = fs::remove_file(&lock);
        }
    }
}

/// Pins the generation this run uses, for as long as the run (and, across exec, its program)
/// lives, with our pid and namespace key when others may join us.
fn pin_run(env: &Env, generation: &Generation, key: Option<String>, id: &str) -> Result<fs::File> {
    collect_ended_runs(env);
    let lock_path = env.dir.join("runs").join(format!("{id}.lock"));
    let mut lock = fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_CLOEXEC).open(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    flock(&lock, FlockOperation::LockExclusive).with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let pid = key.as_ref().map(|_| std::process::id() as i32);
    let pin = RunPin { generation: generation.number, layers: generation.layers.clone(), pid, key };
    lock.write_all(&serde_json::to_vec(&pin)?).with_context(|| format!("cannot write {}", lock_path.display()))?;
    Ok(lock)
}

/// A live run of this environment whose namespaces we can join: same key, process still there.
fn joinable(env: &Env, key: &str) -> Option<std::os::fd::OwnedFd> {
    for (path, pin) in env.live_pins() {
        let (Some(pid), Some(k)) = (pin.pid, pin.key.as_deref()) else { continue };
        if k != key || pid == std::process::id() as i32 {
            continue;
        }
        let Ok(fd) = ns::pidfd(pid) else { continue };
        // The pidfd pins the process; the pin still being held proves it is the run's own
        // process and not a recycled pid.
        if Env::pin_alive(&path) {
            return Some(fd);
        }
    }
    None
}

/// Serializes launches of one environment from the join decision until the program starts (the
/// lock is close-on-exec), so two launches cannot both decide to mount the same upper.
fn launch_lock(env: &Env) -> Result<fs::File> {
    let p = env.dir.join("launch.lock");
    let f = fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).custom_flags(libc::O_CLOEXEC).open(&p).with_context(|| format!("cannot open {}", p.display()))?;
    flock(&f, FlockOperation::LockExclusive).with_context(|| format!("cannot lock {}", p.display()))?;
    Ok(f)
}

/// Checks that the upper was written on the current layers (or is empty, or the user accepts).
fn check_upper(env: &Env, current: &Generation, keep: bool) -> Result<()> {
    let base = env.upper_base()?;
    if base == current.layers {
        return Ok(());
    }
    if env.upper_is_empty() || keep {
        if !env.upper_is_empty() {
            crate::diag::warn(&format!("using the upper of '{}' on generation {} although it was written on other layers (--keep-upper)", env.name, current.number));
        }
        return env.set_upper_base(&current.layers);
    }
    let name = &env.name;
    bail!(
        "the upper of '{name}' holds changes made on other layers than generation {} (current): choose `plyroot rebase {name}` to replay them onto it, `plyroot reset {name}` to set them aside, or run with --keep-upper to use them as they are",
        current.number
    )
}

/// Shows a notice once per store (a marker file under notes/ remembers it).
fn notice_once(store: &Store, key: &str, msg: &str) {
    let p = store.root.join("notes").join(key);
    if !p.exists() {
        crate::diag::info(msg);
        let _ = fs::create_dir_all(store.root.join("notes"));
        let _ = fs::write(&p, b"");
    }
}

pub(crate) fn run(store: Store, name: &str, opts: &RunOpts, command: Vec<String>, login: bool) -> Result<i32> {
    let env = store.env(name)?;
    if env.dir.join("upper.new").exists() || env.dir.join("upper.old").exists() {
        let _lock = env.lock()?;
        env.recover(store.remover)?;
    }
    let generation = env.current()?;
    let settings = &generation.settings;
    let user = HostUser::current();
    let real_root = rustix::process::geteuid().is_root();
    let subids = if real_root { None } else { host_subids(&user) };
    let inside = choose(&user, real_root, subids, opts.root || settings.root);
    if inside.forced_root {
        notice_once(
            &store,
            "single-id",
            &format!(
                "note: {} has no subordinate ids in /etc/subuid and /etc/subgid, so only one id can be mapped: you are root inside (and yourself, uid {}, outside). To be yourself inside, ask an admin for a range (`plyroot doctor` suggests a free one). Shown once.",
                user.name, user.uid
            ),
        );
    }
    let layer_roots: Vec<PathBuf> = generation.layers.iter().rev().map(|l| store.layer_root(l)).collect();
    if let Some((id, _)) = generation.layers.iter().rev().zip(&layer_roots).find(|(_, p)| !p.is_dir()) {
        anyhow::bail!("environment '{name}' uses layer {id}, which is missing from the store; run `plyroot verify` or re-create the environment");
    }
    let facts = HostFacts::gather();
    let (skel_dir, shell) = skel::ensure(&store, &env, generation.number, &layer_roots, &user, &inside, &facts)?;
    let mut lowers = vec![skel_dir];
    lowers.extend(layer_roots);

    let persistent = !(opts.read_only || opts.ephemeral || !settings.persist);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let run_id = format!("{}-{nanos}", std::process::id());
    let work = env.dir.join("work").join(&run_id);
    let upper = if opts.read_only {
        Upper::None
    } else if !persistent {
        Upper::Ephemeral
    } else {
        check_upper(&env, &generation, opts.keep_upper)?;
        Upper::Persistent { upper: env.upper(), work: work.clone() }
    };
    let mut no_host = opts.no_host.clone();
    for n in &settings.no_host {
        use clap::ValueEnum;
        no_host.extend(crate::cli::HostShare::from_str(n, false).ok());
    }
    let run_opts = RunOptions {
        pid: opts.pid,
        binds: settings.binds.iter().chain(&opts.binds).cloned().collect(),
        no_host,
        env: settings.env.iter().map(|(k, v)| format!("{k}={v}")).chain(opts.env.iter().cloned()).collect(),
        cwd: opts.cwd.clone(),
        command,
        login,
    };
    let p = plan(PlanInput {
        env_name: name,
        lowers,
        upper,
        mount_point: env.mount_point(),
        facts: &facts,
        opts: &run_opts,
        inside: &inside,
        user: &user,
        shell,
        host_env: std::env::vars_os().collect(),
    })?;
    crate::diag::debug(&format!("plan: {:#?}", p.ops));
    // Runs that share the persistent upper share one mount: what shaped it is the key (the
    // per-run workdir aside). A pid namespace is the run's own, so such runs mount their own.
    let key = (persistent && !p.pid).then(|| {
        let shape: Vec<String> = p
            .ops
            .iter()
            .map(|o| match o {
                crate::sandbox::Op::Root { lowers, mount_point, .. } => format!("root {lowers:?} {}", mount_point.display()),
                o => format!("{o:?}"),
            })
            .collect();
        format!("gen {} | {:?} | {}", generation.number, inside.mapping, shape.join(" | "))
    });
    let _launch = key.as_ref().map(|_| launch_lock(&env)).transpose()?;
    // Join a live run when one fits; its process may be on its way out (a child still holding
    // the pin), in which case setns fails and nothing has changed yet: mount our own.
    let joined = key.as_deref().and_then(|k| joinable(&env, k)).is_some_and(|fd| match ns::join(&fd, inside.mapping != Mapping::Host) {
        Ok(()) => true,
        Err(e) => {
            crate::diag::debug(&format!("not joining a run that is ending: {e}"));
            false
        }
    });
    let run_lock = pin_run(&env, &generation, key, &run_id)?;
    if !joined && persistent {
        fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
    }
    // The run's pin stays held by the program after exec, so gc and workdir collection see the
    // run as alive for exactly as long as it is. The store lock is close-on-exec: gc waits only
    // for launches in progress, never for programs that run for days.
    ns::inherit_fd(&run_lock, &env.dir)?;
    drop(store);
    let started = if joined {
        crate::diag::debug("joined a live run's namespaces");
        launch::start_joined(&p, &inside, name)?
    } else {
        launch::launch(&p, &inside, name)?
    };
    match started {
        Ok(code) => process::exit_like(code),
        Err(failed) => {
            eprintln!("plyroot: error: {}", failed.message);
            Ok(failed.code)
        }
    }
}
