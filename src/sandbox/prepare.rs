//! Deciding a launch: everything `run`, `enter`, `boot`, `login` and launchers share.
//!
//! [`prepare`] reads the environment's current generation and what the host offers, chooses the
//! identity, the lowers and the skeleton, and — for a run that uses the persistent upper — whether
//! to mount the environment's overlay or to join the live one, under the environment's lock, so
//! two launches never both mount it. The result is a [`Plan`] plus what the launch must hold
//! (locks) and record (its run slot) while it carries the plan out.

use std::ffi::OsString;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::identity::{self, choose, host_subids, HostUser, Inside};
use super::launch::{Held, Recording};
use super::{plan, skel, HostFacts, Join, Plan, PlanInput, RootSpec, RunOptions, Skel, Upper};
use crate::names::HostShare;
use crate::store::env::{Env, Generation};
use crate::store::runs::RunRecord;
use crate::store::{now_secs, Store};

/// What the caller asks for (the run options, after parsing).
#[derive(Clone, Debug, Default)]
pub(crate) struct Request {
    pub root: bool,
    pub ephemeral: bool,
    pub read_only: bool,
    pub pid: bool,
    pub binds: Vec<String>,
    pub no_host: Vec<HostShare>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub keep_upper: bool,
    /// Empty: the login shell.
    pub command: Vec<OsString>,
    /// Start the shell as a login shell (`enter`).
    pub login: bool,
    /// A launcher: compose onto the environment it was started in, if any.
    pub compose: bool,
    /// Boot: the init to start as PID 1.
    pub boot: Option<String>,
}

/// A decided launch.
pub(crate) enum Prepared {
    /// The environment is booted: join its init's namespaces.
    Booted { pidfd: OwnedFd, plan: Plan, inside: Inside, become_root: bool, held: Held },
    /// Mount (or join the live mount of) the root and start the program.
    Launch { plan: Plan, inside: Inside, recording: Option<Recording>, held: Held },
}

/// Shows a notice once per store (a marker file under notes/ remembers it).
fn notice_once(store: &Store, key: &str, msg: &str) {
    let p = store.root.join("notes").join(key);
    if !p.exists() {
        crate::diag::info!("{}", msg);
        let _ = fs::create_dir_all(store.root.join("notes"));
        let _ = fs::write(&p, b"");
    }
}

/// Checks that the upper was written on the current layers (or is empty, or the user accepts).
fn check_upper(env: &Env, current: &Generation, keep: bool) -> Result<()> {
    let base = env.upper_base()?;
    if base == current.layers {
        return Ok(());
    }
    if env.upper_is_empty() || keep {
        if !env.upper_is_empty() {
            crate::diag::warn!("using the upper of '{}' on generation {} although it was written on other layers (--keep-upper)", env.name, current.number);
        }
        return env.set_upper_base(&current.layers);
    }
    let name = &env.name;
    bail!(
        "the upper of '{name}' holds changes made on other layers than generation {} (current): choose `plyroot rebase {name}` to replay them onto it, `plyroot reset {name}` to set them aside, or run with --keep-upper to use them as they are",
        current.number
    )
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

/// Who the launch is inside, and the one-time note for users without subordinate ids.
fn identity(store: &Store, req: &Request, generation: &Generation, user: &HostUser, inside_env: bool) -> Inside {
    let real_root = rustix::process::geteuid().is_root() && identity::in_initial_userns();
    let subids = if real_root || inside_env { None } else { host_subids(user) };
    // A booted init is root by a setuid inside the base; so is `--root` in a booted environment.
    let want_root = req.boot.is_none() && (req.root || generation.settings.root);
    let inside = if inside_env && !real_root { identity::keep_id(user.uid, user.gid) } else { choose(user, real_root, subids, want_root) };
    if inside.forced_root {
        notice_once(
            store,
            "single-id",
            &format!(
                "note: {} has no subordinate ids in /etc/subuid and /etc/subgid, so only one id can be mapped: you are root inside (and yourself, uid {}, outside). To be yourself inside, ask an admin for a range (`plyroot doctor` suggests a free one). Shown once.",
                user.name, user.uid
            ),
        );
    }
    inside
}

/// Decides the launch of `req` in `env` (see the module header).
pub(crate) fn prepare(store: &Store, env: &Env, req: &Request) -> Result<Prepared> {
    let generation = env.current()?;
    let settings = &generation.settings;
    let user = HostUser::current();
    let inside_env = std::env::var_os("PLYROOT_ENV").is_some() && root_is_plyroot();
    let inside = identity(store, req, &generation, &user, inside_env);
    let parent = if req.compose && inside_env { parent_stack()? } else { Vec::new() };
    let composed = !parent.is_empty();
    let layer_roots: Vec<PathBuf> = generation.layers.iter().rev().map(|l| store.layer_root(l)).collect();
    if let Some((id, _)) = generation.layers.iter().rev().zip(&layer_roots).find(|(_, p)| !p.is_dir()) {
        bail!("environment '{}' uses layer {id}, which is missing from the store; run `plyroot verify` or re-create the environment", env.name);
    }
    // A composed root: this environment's layers over the root the launcher started from. A layer
    // both share (a common base) appears once, at its lowest place, so each side still sees its
    // own layers over it; overlayfs refuses a repeated lower anyway.
    let mut lowers: Vec<PathBuf> = Vec::with_capacity(layer_roots.len() + parent.len());
    for l in layer_roots.into_iter().chain(parent).rev() {
        if !lowers.contains(&l) {
            lowers.push(l);
        }
    }
    lowers.reverse();
    // Environments are kept under the kernel's limit when made; this catches one made before
    // that, and two that are too large together.
    crate::store::limits::check_launch(&env.name, generation.layers.len(), lowers.len())?;

    let facts = HostFacts::gather();
    let mut no_host = req.no_host.clone();
    if req.boot.is_some() {
        // A booted system manages its own /tmp and /run: systemd-tmpfiles would empty the host's
        // /tmp if it were shared. It keeps the home, like WSL.
        no_host.extend([HostShare::Tmp, HostShare::RuntimeDir, HostShare::X11]);
    }
    for n in &settings.no_host {
        no_host.extend(n.parse::<HostShare>().ok());
    }
    let binds: Vec<String> = settings.binds.iter().chain(&req.binds).cloned().collect();
    let mut bind_points = Vec::new();
    for spec in &binds {
        let (src, dst, _) = super::parse_bind(spec, facts.cwd.as_deref())?;
        bind_points.push((dst, src.is_dir()));
    }
    // base = "host": the host's top-level symlinks (merged /usr) where the layers have nothing.
    let wants_host = !composed && !inside_env && settings.base.as_deref() == Some("host");
    let host_links: Vec<(String, PathBuf)> = if wants_host {
        fs::read_dir("/").into_iter().flatten().flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, fs::read_link(e.path()).ok()?))).collect()
    } else {
        Vec::new()
    };
    let spec = skel::spec(&lowers, &user, &inside, &facts, &bind_points, &host_links);
    let skel = match skel::ensure(store, env, generation.number, &spec) {
        Ok(dir) => Skel::Dir(dir),
        // Inside an environment the store is read-only: the skeleton goes on the run's tmpfs.
        Err(e) if inside_env => {
            crate::diag::debug!("skeleton on a tmpfs: {e:#}");
            Skel::Tmpfs(spec)
        }
        Err(e) => return Err(e),
    };

    let mut held: Held = vec![store.lock_file()?];
    // A run with a root of its own (--ephemeral, --read-only) does not join: its writes must not
    // reach the upper the booted system uses.
    if req.boot.is_none() && !req.ephemeral && !req.read_only {
        if let Some(b) = env.booted() {
            if b.record.generation != generation.number {
                bail!(
                    "'{}' is booted on generation {} (init is pid {}), not on generation {} (current): stop it (`plyroot stop {}`) and boot again, run with --ephemeral or --read-only, or `plyroot switch {} {}`",
                    env.name,
                    b.record.generation,
                    b.pid,
                    generation.number,
                    env.name,
                    env.name,
                    b.record.generation
                );
            }
            // A booted environment: every run joins its init's namespaces.
            let pidfd = crate::sys::ns::pidfd(b.pid).context("cannot reach the booted environment's init")?;
            let plan = plan(plan_input(store, env, &generation, req, &inside, &user, &facts, no_host, binds, &lowers, skel, Upper::None, None, Vec::new(), Vec::new())?)?;
            return Ok(Prepared::Booted { pidfd, plan, inside, become_root: req.root || settings.root, held });
        }
    }
    // A composed view has no upper of its own to keep: the parent's is live (it can only be a
    // lower here), and this environment's belongs to its own runs.
    let persistent = !(req.read_only || req.ephemeral || !settings.persist || composed);
    if persistent && inside_env {
        bail!(
            "cannot use the upper of '{}' from inside an environment (the store is read-only in there): run with --ephemeral or --read-only, or run it from the host",
            env.name
        );
    }
    let host_dirs = if wants_host { host_dirs(store, &lowers)? } else { Vec::new() };
    let (upper, join, recording) = if persistent || req.boot.is_some() {
        // From here until the program runs, no other launch of this environment decides.
        held.push(env.lock()?);
        let survey = env.survey();
        let live = survey.live;
        let shared = live.iter().find(|r| r.record.shared.is_some());
        if let (None, Some(pid), true) = (shared, survey.escaped, persistent) {
            bail!(
                "a program an earlier run of '{}' started still lives, outside that run's mount namespace (pid {pid}: `{}`), and may hold its overlay over the upper, which must not be mounted twice: end it first (`kill {pid}`), or run with --ephemeral or --read-only",
                env.name,
                crate::sys::procs::cmdline(pid)
            );
        }
        let (join, work_slot) = match shared {
            Some(r) if persistent => {
                if r.record.generation != generation.number {
                    bail!(
                        "'{}' is in use on generation {} (pid {}: `{}`), and its upper can be mounted on one generation at a time: end that run first, run generation {} without the upper (--ephemeral or --read-only), or `plyroot switch {} {}`",
                        env.name,
                        r.record.generation,
                        r.pid,
                        crate::sys::procs::cmdline(r.pid),
                        generation.number,
                        env.name,
                        r.record.generation
                    );
                }
                (Some(Join { pid: r.pid, mnt_ns: r.record.mnt_ns, mnt_ns_id: r.record.mnt_ns_id, user_ns: r.record.user_ns }), r.record.shared)
            }
            _ if persistent => {
                check_upper(env, &generation, req.keep_upper)?;
                (None, Some(env.free_slot(&live)))
            }
            _ => (None, None),
        };
        let slot = env.free_slot(&live);
        let record = RunRecord {
            pid: 0,
            mnt_ns: 0,
            mnt_ns_id: 0,
            user_ns: 0,
            user_ns_id: 0,
            generation: generation.number,
            layers: generation.layers.clone(),
            skel: match &skel {
                Skel::Dir(d) => Some(d.clone()),
                Skel::Tmpfs(_) => None,
            },
            shared: work_slot,
            boot: false,
            supervisor: None,
            started: now_secs(),
        };
        let recording = Recording { file: env.open_slot(slot)?, path: env.dir.join("runs").join(format!("{slot}.json")), record };
        let upper = match work_slot {
            Some(w) => Upper::Shared { upper: env.upper(), work: env.workdir(w) },
            None if req.read_only => Upper::None,
            None => Upper::Ephemeral,
        };
        (upper, join, Some(recording))
    } else {
        (if req.read_only { Upper::None } else { Upper::Ephemeral }, None, None)
    };
    let stack: Vec<PathBuf> = matches!(upper, Upper::Shared { .. }).then(|| env.upper()).into_iter().chain(lowers.iter().cloned()).collect();
    let mut plan = plan(plan_input(store, env, &generation, req, &inside, &user, &facts, no_host, binds, &lowers, skel, upper, join, host_dirs, stack)?)?;
    if let Some(init) = &req.boot {
        // init gets a clean environment, as a container manager gives it.
        plan.exec.argv = vec![init.into()];
        plan.exec.env = vec![
            ("container".into(), "plyroot".into()),
            ("PATH".into(), super::PATH.into()),
            ("TERM".into(), "linux".into()),
            ("HOME".into(), "/root".into()),
        ];
    }
    Ok(Prepared::Launch { plan, inside, recording, held })
}

#[allow(clippy::too_many_arguments)]
fn plan_input<'a>(
    store: &Store,
    env: &'a Env,
    generation: &Generation,
    req: &Request,
    inside: &'a Inside,
    user: &'a HostUser,
    facts: &'a HostFacts,
    no_host: Vec<HostShare>,
    binds: Vec<String>,
    lowers: &[PathBuf],
    skel: Skel,
    upper: Upper,
    join: Option<Join>,
    host_dirs: Vec<(String, Vec<PathBuf>)>,
    stack: Vec<PathBuf>,
) -> Result<PlanInput<'a>> {
    let settings = &generation.settings;
    let shell = skel::shell(lowers, &skel::base_passwd(lowers), inside.uid);
    let env_vars: Vec<String> = settings
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain((!stack.is_empty()).then(|| std::env::join_paths(&stack).ok().and_then(|s| s.into_string().ok()).map(|s| format!("PLYROOT_STACK={s}"))).flatten())
        .chain(req.env.iter().cloned())
        .collect();
    let opts = RunOptions { pid: req.pid || req.boot.is_some(), binds, no_host, env: env_vars, cwd: req.cwd.clone(), command: req.command.clone(), login: req.login };
    Ok(PlanInput {
        env_name: &env.name,
        root: RootSpec { lowers: lowers.to_vec(), skel, upper, mount_point: env.mount_point(), host_dirs, join },
        store: Some(store.root.clone()),
        facts,
        opts,
        inside,
        user,
        shell,
        host_env: std::env::vars_os().collect(),
    })
}
