//! run and enter: resolve the environment, plan the launch, carry it out.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rustix::fs::{flock, FlockOperation};

use crate::cli::RunOpts;
use crate::sandbox::identity::{self, choose, host_subids, HostUser, Mapping};
use crate::sandbox::{launch, plan, skel, HostFacts, PlanInput, RunOptions, Upper};
use crate::store::env::{Env, Generation, RunPin};
use crate::store::Store;
use crate::sys::{ns, process};

/// Takes the first free run slot: `runs/<n>.lock`, flock'd for as long as the run (and, across
/// exec, its program) lives, with the generation it uses written inside, plus our pid and
/// namespace key when others may join us. Slots and their overlay workdirs (`work/<n>`) are
/// reused by later runs, so a launch creates and deletes nothing on disk.
fn pin_run(env: &Env, generation: &Generation, key: Option<String>) -> Result<(fs::File, String)> {
    use std::io::Seek;
    for n in 0..4096u32 {
        let lock_path = env.dir.join("runs").join(format!("{n}.lock"));
        let mut lock = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).custom_flags(libc::O_CLOEXEC).open(&lock_path).with_context(|| format!("cannot open {}", lock_path.display()))?;
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        let pid = key.as_ref().map(|_| std::process::id() as i32);
        let pin = RunPin { generation: generation.number, layers: generation.layers.clone(), pid, key };
        let data = serde_json::to_vec(&pin)?;
        lock.set_len(0).and_then(|_| lock.rewind()).and_then(|_| lock.write_all(&data)).with_context(|| format!("cannot write {}", lock_path.display()))?;
        return Ok((lock, n.to_string()));
    }
    bail!("environment '{}' has 4096 runs at once: end some first", env.name)
}

/// Gives the plan's persistent upper the run slot's workdir (kept between runs: overlayfs cleans
/// its contents at mount).
fn use_workdir(p: &mut crate::sandbox::Plan, work: &std::path::Path) -> Result<()> {
    if let Some(crate::sandbox::Op::Root { upper: Upper::Persistent { work: w, .. }, .. }) = p.ops.first_mut() {
        fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
        *w = work.to_owned();
    }
    Ok(())
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

/// Host directories that `base = "host"` puts under the layers: every top-level directory of the
/// host but the API filesystems and the shared ones (bound anyway), each with the layers'
/// directories of the same name above it (top first), as overlayfs would merge them.
///
/// Not `/` itself as one lower: in a user namespace it carries locked submounts, and overlayfs
/// refuses such a lower ("failed to clone lowerpath"); it would also contain the store.
fn host_dirs(store: &Store, lowers: &[PathBuf]) -> Result<Vec<(String, Vec<PathBuf>)>> {
    const SKIP: &[&str] = &["proc", "sys", "dev", "run", "tmp", "home", "nix", "mnt", "media", "boot", "root", "lost+found", "snap"];
    let mut names: Vec<String> = fs::read_dir("/").context("cannot list the host's /")?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut out = Vec::new();
    'names: for name in names {
        let host = PathBuf::from("/").join(&name);
        if SKIP.contains(&name.as_str()) || !fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) || store.root.starts_with(&host) {
            continue;
        }
        let mut dirs = Vec::new();
        for l in lowers {
            match fs::symlink_metadata(l.join(&name)) {
                Err(_) => continue,
                // A non-directory in a layer (a whiteout too) hides the host's: nothing to union.
                Ok(m) if !m.is_dir() => {
                    if dirs.is_empty() {
                        continue 'names;
                    }
                    break;
                }
                Ok(_) => {
                    dirs.push(l.join(&name));
                    if crate::store::upper::is_opaque(&l.join(&name)) {
                        continue 'names;
                    }
                }
            }
        }
        dirs.push(host);
        out.push((name, dirs));
    }
    Ok(out)
}

/// Whether this process's root is an environment's root (an overlay plyroot mounted).
fn root_is_plyroot() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-");
            f.get(4) == Some(&"/") && sep.is_some_and(|i| f.get(i + 1) == Some(&"overlay") && f.get(i + 2) == Some(&"plyroot"))
        })
    })
}

/// The stack of plain directories (top first) a composing launcher puts under its own layers:
/// the root it was started from, as that root's launch described it in PLYROOT_STACK.
fn parent_stack() -> Result<Vec<PathBuf>> {
    let Some(s) = std::env::var_os("PLYROOT_STACK").filter(|s| !s.is_empty()) else { return Ok(Vec::new()) };
    let dirs: Vec<PathBuf> = std::env::split_paths(&s).collect();
    if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
        bail!(
            "cannot compose with the environment this launcher was started in: {} is not visible here (keep the store under your home, or bind it into that environment)",
            missing.display()
        );
    }
    Ok(dirs)
}

/// How `boot` starts an environment's init (see commands::boot).
pub(crate) struct BootRequest<'a> {
    pub init: String,
    pub wait: &'a dyn Fn(&Store, &Env, i32) -> Result<()>,
}

pub(crate) fn run(store: Store, name: &str, opts: &RunOpts, command: Vec<std::ffi::OsString>, login: bool, compose: bool) -> Result<i32> {
    run_or_boot(store, name, opts, command, login, compose, None)
}

pub(crate) fn run_or_boot(
    store: Store,
    name: &str,
    opts: &RunOpts,
    command: Vec<std::ffi::OsString>,
    login: bool,
    compose: bool,
    boot: Option<BootRequest<'_>>,
) -> Result<i32> {
    let env = store.env(name)?;
    if env.dir.join("upper.new").exists() || env.dir.join("upper.old").exists() || crate::commands::upper::commit_interrupted(&env) {
        let _lock = env.lock()?;
        env.recover(store.remover)?;
        crate::commands::upper::recover_commit(&store, &env)?;
    }
    let generation = env.current()?;
    let settings = &generation.settings;
    let user = HostUser::current();
    let inside_env = std::env::var_os("PLYROOT_ENV").is_some() && root_is_plyroot();
    let real_root = rustix::process::geteuid().is_root() && identity::in_initial_userns();
    let subids = if real_root || inside_env { None } else { host_subids(&user) };
    // A booted environment's namespaces have the default mapping; root inside is a setuid there.
    let want_root = boot.is_none() && env.booted().is_none() && (opts.root || settings.root);
    let inside = if inside_env && !real_root { identity::keep_id(user.uid, user.gid) } else { choose(&user, real_root, subids, want_root) };
    let parent = if compose && inside_env { parent_stack()? } else { Vec::new() };
    let composed = !parent.is_empty();
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
    let seen: Vec<PathBuf> = layer_roots.iter().chain(&parent).cloned().collect();
    let mut bind_points = Vec::new();
    for spec in settings.binds.iter().chain(&opts.binds) {
        let (src, dst, _) = crate::sandbox::parse_bind(spec, facts.cwd.as_deref())?;
        bind_points.push((dst, src.is_dir()));
    }
    // base = "host": the host's top-level symlinks (merged /usr) where the layers have nothing.
    let wants_host = !composed && !inside_env && settings.base.as_deref() == Some("host");
    let host_links: Vec<(String, PathBuf)> = if wants_host {
        fs::read_dir("/").into_iter().flatten().flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, fs::read_link(e.path()).ok()?))).collect()
    } else {
        Vec::new()
    };
    let (skel_dir, shell) = skel::ensure(&store, &env, generation.number, &seen, &user, &inside, &facts, &bind_points, &host_links)?;
    let mut lowers = vec![skel_dir];
    lowers.extend(layer_roots);
    // A composed root: this environment's layers over the root the launcher started from. A layer
    // both share (a common base) appears once, at its lowest place, so each side still sees its
    // own layers over it; overlayfs refuses a repeated lower anyway.
    lowers.extend(parent);
    let mut kept: Vec<PathBuf> = Vec::with_capacity(lowers.len());
    for l in lowers.into_iter().rev() {
        if !kept.contains(&l) {
            kept.push(l);
        }
    }
    kept.reverse();
    let lowers = kept;
    let host_base = wants_host;

    // A composed view has no upper of its own to keep: the parent's is live (it can only be a
    // lower here), and this environment's belongs to its own runs.
    let persistent = !(opts.read_only || opts.ephemeral || !settings.persist || composed);
    let mut stack: Vec<PathBuf> = if persistent { vec![env.upper()] } else { Vec::new() };
    stack.extend(lowers.iter().cloned());
    let host_dirs = if host_base { host_dirs(&store, &lowers)? } else { Vec::new() };
    // The workdir belongs to the run slot taken below; its path is known once the slot is.
    let work_base = env.dir.join("work");
    let upper = if opts.read_only {
        Upper::None
    } else if !persistent {
        Upper::Ephemeral
    } else {
        check_upper(&env, &generation, opts.keep_upper)?;
        Upper::Persistent { upper: env.upper(), work: PathBuf::new() }
    };
    let mut no_host = opts.no_host.clone();
    if boot.is_some() {
        // A booted system manages its own /tmp and /run: systemd-tmpfiles would empty the host's
        // /tmp if it were shared. It keeps the home, like WSL.
        no_host.extend([crate::cli::HostShare::Tmp, crate::cli::HostShare::RuntimeDir, crate::cli::HostShare::X11]);
    }
    for n in &settings.no_host {
        use clap::ValueEnum;
        no_host.extend(crate::cli::HostShare::from_str(n, false).ok());
    }
    let run_opts = RunOptions {
        pid: opts.pid || boot.is_some(),
        binds: settings.binds.iter().chain(&opts.binds).cloned().collect(),
        no_host,
        env: settings
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(std::env::join_paths(&stack).ok().and_then(|s| s.into_string().ok()).map(|s| format!("PLYROOT_STACK={s}")))
            .chain(opts.env.iter().cloned())
            .collect(),
        cwd: opts.cwd.clone(),
        command,
        login,
    };
    let mut p = plan(PlanInput {
        env_name: name,
        lowers,
        upper,
        mount_point: env.mount_point(),
        host_dirs,
        facts: &facts,
        opts: &run_opts,
        inside: &inside,
        user: &user,
        shell,
        host_env: std::env::vars_os().collect(),
    })?;
    crate::diag::debug(&format!("plan: {:#?}", p.ops));
    if let Some(b) = boot {
        return boot_env(store, &env, &generation, p, &inside, &work_base, b);
    }
    // A booted environment: join its namespaces (init's), as every run does while it is up.
    if let Some((pin_path, pid)) = env.booted() {
        if let Ok(fd) = ns::pidfd(pid) {
            if Env::pin_alive(&pin_path) {
                let (run_lock, _) = pin_run(&env, &generation, None)?;
                ns::inherit_fd(&run_lock, &env.dir)?;
                drop(store);
                crate::diag::debug("joining the booted environment");
                return match launch::start_in_booted(&fd, &p, &inside, opts.root || settings.root, name)? {
                    Ok(code) => process::exit_like(code),
                    Err(failed) => {
                        eprintln!("plyroot: error: {}", failed.message);
                        Ok(failed.code)
                    }
                };
            }
        }
    }
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
    let (run_lock, slot) = pin_run(&env, &generation, key)?;
    if !joined && persistent {
        use_workdir(&mut p, &work_base.join(&slot))?;
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

/// Starts the environment's init as PID 1 in the background and waits until it is ready.
#[allow(clippy::too_many_arguments)]
fn boot_env(store: Store, env: &Env, generation: &Generation, mut p: crate::sandbox::Plan, inside: &crate::sandbox::identity::Inside, work_base: &std::path::Path, b: BootRequest<'_>) -> Result<i32> {
    use std::io::Seek;
    if env.booted().is_some() {
        crate::diag::info(&format!("'{}' is already booted (`plyroot status`)", env.name));
        return Ok(0);
    }
    // init gets a clean environment, as a container manager gives it.
    p.exec.argv = vec![b.init.clone().into()];
    p.exec.env = vec![
        ("container".into(), "plyroot".into()),
        ("PATH".into(), crate::sandbox::PATH.into()),
        ("TERM".into(), "linux".into()),
        ("HOME".into(), "/root".into()),
    ];
    let (mut pin, slot) = pin_run(env, generation, Some(crate::store::env::BOOT_KEY.to_owned()))?;
    use_workdir(&mut p, &work_base.join(&slot))?;
    let log_path = env.dir.join("boot.log");
    let log = fs::OpenOptions::new().create(true).write(true).truncate(true).open(&log_path).with_context(|| format!("cannot open {}", log_path.display()))?;
    // The pin's lock passes to init (the supervisor and init inherit it): the environment counts
    // as booted for exactly as long as init lives.
    ns::inherit_fd(&pin, &env.dir)?;
    let pid = launch::boot(&p, inside, &env.name, log, &log_path)?;
    let record = RunPin { generation: generation.number, layers: generation.layers.clone(), pid: Some(pid), key: Some(crate::store::env::BOOT_KEY.to_owned()) };
    pin.set_len(0)?;
    pin.rewind()?;
    pin.write_all(&serde_json::to_vec(&record)?)?;
    drop(pin);
    crate::diag::info(&format!("{}: init {} is PID 1 (host pid {pid}); output in {}", env.name, b.init, log_path.display()));
    (b.wait)(&store, env, pid)?;
    Ok(0)
}
