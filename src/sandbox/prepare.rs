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
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::identity::{self, choose, host_subids, HostUser, Inside};
use super::launch::{Held, Recording};
use super::{plan, skel, HostFacts, Join, Plan, PlanInput, RootSpec, RunOptions, Skel, Start, Upper};
use crate::names::{HostShare, NixStore};
use crate::store::env::{Env, Generation};
use crate::store::runs::{Census, LiveRun, RunRecord};
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
    /// Which /nix to see (`--nix`); None: the environment's setting, else [`nix_store`]'s default.
    pub nix: Option<NixStore>,
    /// Empty: the login shell.
    pub command: Vec<OsString>,
    /// Start the shell as a login shell (`enter`).
    pub login: bool,
    /// A launcher: compose onto the environment it was started in, if any.
    pub compose: bool,
    /// Boot: the init to start as PID 1.
    pub boot: Option<String>,
    /// Start in the home, not the caller's directory (`login`, as a login shell does).
    pub home_start: bool,
    /// Directories that hold launchers, for PATH inside (see `launcher::path_dirs`).
    pub launcher_dirs: Vec<PathBuf>,
    /// A build step: nothing of the host's but /proc and /dev (and the resolver files when it has
    /// the network), nothing of the caller's (variables, home, user entries), the layers' /nix
    /// only, starting at `/`: what it writes depends on its declared inputs alone.
    pub pure: bool,
    /// A network namespace with only loopback.
    pub isolate_net: bool,
    /// The pid of the process the launch must not outlive (see `Plan::tied_to`).
    pub tied_to: Option<i32>,
}

/// A decided launch.
// One value per process, moved once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    bail!("the upper of '{name}' holds changes made on other layers than generation {} (current): {}", current.number, crate::store::upper::stale_choices(name))
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
    for name in names {
        let host = PathBuf::from("/").join(&name);
        if SKIP.contains(&name.as_str()) || !fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) || store.root.starts_with(&host) {
            continue;
        }
        if let Some(dirs) = under_layers(lowers, &name, host) {
            out.push((name, dirs));
        }
    }
    Ok(out)
}

/// The layers' directories `rel` (top first) with the host's directory `host` below them, as
/// overlayfs would merge them; None where a layer hides the host's (a non-directory, a whiteout,
/// an opaque directory).
fn under_layers(lowers: &[PathBuf], rel: &str, host: PathBuf) -> Option<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for l in lowers {
        match fs::symlink_metadata(l.join(rel)) {
            Err(_) => continue,
            // A non-directory in a layer (a whiteout too) hides the host's: nothing to union.
            Ok(m) if !m.is_dir() => {
                if dirs.is_empty() {
                    return None;
                }
                break;
            }
            Ok(_) => {
                dirs.push(l.join(rel));
                if crate::store::upper::is_opaque(&l.join(rel)) {
                    return None;
                }
            }
        }
    }
    dirs.push(host);
    Some(dirs)
}

/// Where `nix = "overlay"` puts the host's store, inside and on the host.
const NIX_STORE: &str = "nix/store";
/// The Nix database an overlay environment gets its own copy of.
const NIX_DB: &str = "nix/var/nix/db";

/// Gives the upper `upper` its own copy of the host's Nix database, once (`nix = "overlay"`): a
/// copy of the host's `/nix/var/nix/db` made beside it and renamed into place, so an interrupted
/// copy leaves none. The copy is the user's, so Nix inside can write it; the host's is only read.
fn own_nix_db(upper: &Path) -> Result<()> {
    let (host, own) = (Path::new("/").join(NIX_DB), upper.join(NIX_DB));
    if fs::symlink_metadata(&own).is_ok() || !host.is_dir() {
        return Ok(());
    }
    let parent = own.parent().context("the database's place has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = parent.join(".db.plyroot-copy");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove the unfinished copy {}", tmp.display()))?;
    }
    copy_tree(&host, &tmp).with_context(|| format!("cannot copy the host's Nix database {} for this environment", host.display()))?;
    fs::rename(&tmp, &own).with_context(|| format!("cannot move {} to {}", tmp.display(), own.display()))
}

/// Copies the directories and regular files of `src` to the new directory `dst` (modes kept;
/// owned by the caller). Symlinks are copied as links; other kinds are left out.
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for e in fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let m = fs::symlink_metadata(&from)?;
        if m.is_dir() {
            copy_tree(&from, &to)?;
        } else if m.is_file() {
            match fs::copy(&from, &to) {
                // Nix's `reserved` (disk space kept for the garbage collector) may be root's alone;
                // Nix makes its own.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    crate::diag::warn!("{} is not readable, so this environment's Nix database has none", from.display());
                    continue;
                }
                r => drop(r.with_context(|| format!("cannot copy {}", from.display()))?),
            }
        } else if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            continue;
        } else {
            continue;
        }
        fs::set_permissions(&to, fs::Permissions::from_mode(m.permissions().mode() | 0o200))?;
    }
    Ok(())
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

/// The pidfd of a booted environment's init, which every run of it joins, if it runs the current
/// generation.
fn booted_init(env: &Env, generation: &Generation, b: &LiveRun) -> Result<OwnedFd> {
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
    crate::sys::ns::pidfd(b.pid).context("cannot reach the booted environment's init")
}

/// What a launch that uses the environment's lock takes: its run slot, and for the persistent
/// upper the live mount to join or the workdir slot to mount it with (and a slot for its keeper).
struct Claim {
    slot: u32,
    join: Option<Join>,
    work_slot: Option<u32>,
    keeper_slot: Option<u32>,
}

/// Decides, under the environment's lock, whether the launch joins the live shared mount or makes
/// it. A keeper alone on another generation is ended (it is a cache); a run is not.
fn claim(env: &Env, generation: &Generation, req: &Request, persistent: bool, key: &str, real_root: bool, census: Option<Census>) -> Result<Claim> {
    let mut survey = env.survey_for_launch(census.unwrap_or_else(|| env.census()));
    // A keeper of a mount made otherwise (another generation; for this one, another skeleton or
    // other host directories; by real root for a user, or the other way round) gives way when
    // it is alone.
    let other = |r: &LiveRun| r.record.generation != generation.number || r.record.key != key || (r.record.user_ns == 0) != real_root;
    let stale_keeper = |s: &crate::store::runs::Survey| s.live.iter().all(|r| r.record.keeper) && s.live.iter().any(other);
    if persistent && stale_keeper(&survey) && env.dismiss_keeper()? {
        survey = env.survey_for_launch(env.census());
    }
    let live = &survey.live;
    // A keeper first: it stays while the runs come and go.
    let shared = live.iter().filter(|r| r.record.shared.is_some()).min_by_key(|r| !r.record.keeper);
    if let (None, Some(pid), true) = (shared, survey.escaped, persistent) {
        bail!(
            "a program an earlier run of '{}' started still lives, outside that run's mount namespace (pid {pid}: `{}`), and may hold its overlay over the upper, which must not be mounted twice: end it first (`kill {pid}`), or run with --ephemeral or --read-only",
            env.name,
            crate::sys::procs::cmdline(pid)
        );
    }
    let slot = env.free_slot(live, &[]);
    let (join, work_slot, keeper_slot) = match shared {
        Some(r) if persistent => {
            if r.record.generation != generation.number {
                // Name a run, not its keeper: ending the keeper would not help.
                let r = live.iter().find(|l| !l.record.keeper && l.record.shared.is_some()).unwrap_or(r);
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
            let join = Join { pid: r.pid, mnt_ns: r.record.mnt_ns, mnt_ns_id: r.record.mnt_ns_id, user_ns: r.record.user_ns, nested: r.record.nested.clone() };
            (Some(join), r.record.shared, None)
        }
        _ if persistent => {
            check_upper(env, generation, req.keep_upper)?;
            // The run that mounts the overlay lends it its own slot's workdir.
            let keeper = (req.boot.is_none() && !req.pid && super::keeper::linger().is_some()).then(|| env.free_slot(live, &[slot]));
            (None, Some(slot), keeper)
        }
        _ => (None, None, None),
    };
    Ok(Claim { slot, join, work_slot, keeper_slot })
}

/// With subordinate ids: the nested identity a keeper holds for the runs after this one (one map
/// for you and for `--root`), as its uid and gid maps.
fn keeper_ids(c: &Common) -> Vec<(Vec<crate::sys::ns::IdRange>, Vec<crate::sys::ns::IdRange>)> {
    if !matches!(c.inside.mapping, identity::Mapping::Ranges { .. }) {
        return Vec::new();
    }
    let Some(subids) = host_subids(&c.user) else { return Vec::new() };
    match choose(&c.user, false, Some(subids), false).nested {
        Some(identity::Nested::Maps(u, g)) => vec![(u, g)],
        _ => Vec::new(),
    }
}

/// What the shared mount is made of, as a short digest of its serialised parts (the lowers, the
/// skeleton, the `base = "host"` directories): a keeper whose mount was made of other parts is
/// not joined.
fn mount_key(c: &Common, host_dirs: &[(String, Vec<PathBuf>)]) -> String {
    #[derive(serde::Serialize)]
    struct Parts {
        lowers: Vec<String>,
        skel: String,
        host_dirs: Vec<(String, Vec<String>)>,
    }
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    let parts = Parts {
        lowers: c.lowers.iter().map(s).collect(),
        skel: match &c.skel {
            Skel::Dir(d) => s(d),
            Skel::Tmpfs(_) => String::new(),
        },
        host_dirs: host_dirs.iter().map(|(n, l)| (n.clone(), l.iter().map(s).collect())).collect(),
    };
    let json = serde_json::to_vec(&parts).unwrap_or_default();
    hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&json)[..8])
}

/// What a launch decides before it looks at the environment's live runs.
struct Common {
    generation: Generation,
    user: HostUser,
    inside: Inside,
    /// This process runs inside an environment (a launcher's hop, or plyroot run in there).
    inside_env: bool,
    /// The lowers include the root a launcher started from.
    composed: bool,
    /// Top first, without the skeleton.
    lowers: Vec<PathBuf>,
    facts: HostFacts,
    no_host: Vec<HostShare>,
    binds: Vec<String>,
    /// `base = "host"` applies.
    wants_host: bool,
    /// `nix = "overlay"` applies: the host's /nix/store under the layers' (see `under_layers`).
    nix_overlay: bool,
    skel: Skel,
    /// Where the program starts without --cwd.
    start: Option<Start>,
}

/// The lowers of a launch, top first: the generation's layers, over the root a composing
/// launcher started from. A layer both share (a common base) appears once, at its lowest place,
/// so each side still sees its own layers over it; overlayfs refuses a repeated lower anyway.
fn lowers(store: &Store, env: &Env, generation: &Generation, parent: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let layer_roots: Vec<PathBuf> = store.layer_roots(&generation.layers);
    if let Some((id, _)) = generation.layers.iter().rev().zip(&layer_roots).find(|(_, p)| !p.is_dir()) {
        bail!("environment '{}' uses layer {id}, which is missing from the store; run `plyroot verify` or re-create the environment", env.name);
    }
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
    Ok(lowers)
}

/// The host shares turned off (by the request, the manifest, and for a booted system).
fn no_host(req: &Request, settings: &crate::store::env::Settings) -> Vec<HostShare> {
    let mut no_host = req.no_host.clone();
    if req.boot.is_some() {
        // A booted system manages its own /tmp and /run: systemd-tmpfiles would empty the host's
        // /tmp if it were shared. It keeps the home, like WSL.
        no_host.extend([HostShare::Tmp, HostShare::RuntimeDir, HostShare::X11]);
    }
    for n in &settings.no_host {
        no_host.extend(n.parse::<HostShare>().ok());
    }
    if req.pure {
        no_host.extend([HostShare::Sys, HostShare::Tmp, HostShare::Home, HostShare::RuntimeDir, HostShare::X11, HostShare::Nix, HostShare::Gpu, HostShare::Localtime]);
        if req.isolate_net {
            no_host.extend([HostShare::Resolv, HostShare::Hosts]);
        }
    }
    no_host
}

/// The skeleton for this launch: cached in the store per generation and spec, or, where the store
/// is read-only (inside an environment), written to the run's tmpfs.
fn skeleton(store: &Store, env: &Env, c: &Common, wants_host: bool, pure: bool) -> Result<Skel> {
    let mut bind_points = Vec::new();
    for spec in &c.binds {
        let (src, dst, _) = super::parse_bind(spec, c.facts.cwd.as_deref())?;
        bind_points.push((dst, src.is_dir()));
    }
    if let Some(Start::Bind(p)) = &c.start {
        bind_points.push((p.clone(), true));
    }
    if c.nix_overlay {
        bind_points.push((Path::new("/").join(NIX_STORE), true));
    }
    // base = "host": the host's top-level symlinks (merged /usr) where the layers have nothing.
    let host_links: Vec<(String, PathBuf)> = if wants_host {
        fs::read_dir("/").into_iter().flatten().flatten().filter_map(|e| Some((e.file_name().into_string().ok()?, fs::read_link(e.path()).ok()?))).collect()
    } else {
        Vec::new()
    };
    let spec = if pure { skel::pure_spec(&c.lowers, &c.user, &c.inside, &bind_points) } else { skel::spec(&env.name, &c.lowers, &c.user, &c.inside, &c.facts, &bind_points, &host_links) };
    match skel::ensure(store, env, c.generation.number, &spec, &c.lowers) {
        Ok(dir) => Ok(Skel::Dir(dir)),
        Err(e) if c.inside_env => {
            crate::diag::debug!("skeleton on a tmpfs: {e:#}");
            Ok(Skel::Tmpfs(spec))
        }
        Err(e) => Err(e),
    }
}

/// Which /nix the launch shows: the request's choice, else the environment's, else the layers'
/// when they have one (the top-most entry named `nix` that is no whiteout: one stat a layer),
/// else the host's.
fn nix_store(req: &Request, settings: &crate::store::env::Settings, lowers: &[PathBuf]) -> NixStore {
    if req.pure {
        return NixStore::Layers;
    }
    if let Some(n) = req.nix.or_else(|| settings.nix.as_deref().and_then(|n| n.parse().ok())) {
        return n;
    }
    let top = lowers.iter().find_map(|l| fs::symlink_metadata(l.join("nix")).ok());
    let whiteout = |m: &fs::Metadata| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) && std::os::unix::fs::MetadataExt::rdev(m) == 0;
    match top {
        Some(m) if !whiteout(&m) => NixStore::Layers,
        _ => NixStore::Host,
    }
}

fn common(store: &Store, env: &Env, req: &Request, inside_env: bool) -> Result<Common> {
    let generation = env.current()?;
    let user = HostUser::current();
    let inside = identity(store, req, &generation, &user, inside_env);
    let parent = if req.compose && inside_env { parent_stack()? } else { Vec::new() };
    let composed = !parent.is_empty();
    let lowers = lowers(store, env, &generation, parent)?;
    let settings = &generation.settings;
    let wants_host = !composed && !inside_env && settings.base.as_deref() == Some("host");
    let mut facts = HostFacts::gather();
    if req.pure {
        // A build step has no terminal of the caller's: it could write to it, or type into it.
        facts.pty = None;
    }
    let mut nix = nix_store(req, settings, &lowers);
    // Inside an environment, the /nix there is shown as it is (a launcher's composed view has no
    // upper of its own to write a store into).
    if nix == NixStore::Overlay && (composed || inside_env) {
        nix = NixStore::Host;
    }
    let no_host = no_host(req, settings);
    // `--no-host nix` keeps the host's store out of an overlay too.
    let nix_shared = !no_host.iter().any(|h| matches!(h, HostShare::Nix | HostShare::All));
    let nix_overlay = nix == NixStore::Overlay && nix_shared && Path::new("/").join(NIX_STORE).is_dir();
    // Only the host's /nix is bound from the host: the layers' is part of the root.
    facts.nix = facts.nix && nix == NixStore::Host;
    let mut c = Common {
        no_host,
        binds: settings.binds.iter().chain(&req.binds).cloned().collect(),
        user,
        inside,
        inside_env,
        composed,
        lowers,
        facts,
        wants_host,
        nix_overlay,
        skel: Skel::Tmpfs(skel::Spec::default()),
        generation,
        start: None,
    };
    c.start = start_for(store, env, &c, req, false)?;
    c.skel = skeleton(store, env, &c, wants_host, req.pure)?;
    Ok(c)
}

/// Where the run starts without --cwd (see `sandbox::start`); `booted`: in the booted
/// environment's namespaces, with the shares and binds it was booted with.
fn start_for(store: &Store, env: &Env, c: &Common, req: &Request, booted: bool) -> Result<Option<Start>> {
    if req.boot.is_some() || req.pure {
        // init starts at the root of its system, a build step at the root of its; nothing of the
        // caller's is bound for either.
        return Ok(Some(Start::At(PathBuf::from("/"))));
    }
    let mut no_host = c.no_host.clone();
    if booted {
        no_host.extend([HostShare::Tmp, HostShare::RuntimeDir, HostShare::X11]);
    }
    let binds = if booted { c.generation.settings.binds.clone() } else { c.binds.clone() };
    let opts = RunOptions { pid: req.pid || booted, binds, no_host, cwd: req.cwd.clone(), ..RunOptions::default() };
    // The environment's own root: its layers and upper, not a root a launcher composes over
    // (the caller's directory there is what it binds).
    let own: Vec<PathBuf> = store.layer_roots(&c.generation.layers);
    let upper = (!c.inside_env).then(|| env.upper());
    let taken = |p: &Path| {
        skel::exists_in_layers(&own, &p.to_string_lossy()) || upper.as_ref().is_some_and(|u| fs::symlink_metadata(u.join(p.strip_prefix("/").unwrap_or(p))).is_ok())
    };
    super::start(&opts, &c.facts, &c.user, req.home_start, &super::StartCtx { env_name: &env.name, taken: &taken, booted })
}

/// The run slot(s) a launch that uses the environment's lock records itself in, and the upper it
/// gets: the shared one (joined or mounted), or one of its own.
fn recording(env: &Env, c: &Common, req: &Request, persistent: bool, host_dirs: &[(String, Vec<PathBuf>)], census: Option<Census>) -> Result<(Upper, Option<Join>, Recording)> {
    let key = mount_key(c, host_dirs);
    let claim = claim(env, &c.generation, req, persistent, &key, c.inside.mapping == identity::Mapping::Host, census)?;
    let upper = match claim.work_slot {
        Some(w) => Upper::Shared { upper: env.upper(), work: env.workdir(w) },
        None if req.read_only => Upper::None,
        None => Upper::Ephemeral,
    };
    let record = RunRecord {
        pid: 0,
        mnt_ns: 0,
        mnt_ns_id: 0,
        user_ns: 0,
        user_ns_id: 0,
        generation: c.generation.number,
        layers: c.generation.layers.clone(),
        skel: match &c.skel {
            Skel::Dir(d) => Some(d.clone()),
            Skel::Tmpfs(_) => None,
        },
        shared: claim.work_slot,
        boot: false,
        supervisor: None,
        started: now_secs(),
        keeper: false,
        nested: Vec::new(),
        key,
    };
    let keeper = match claim.keeper_slot {
        Some(k) => Some(super::keeper::Slot { file: env.open_slot(k)?, path: env.slot_path(k), record: record.clone() }),
        None => None,
    };
    Ok((upper, claim.join, Recording { file: env.open_slot(claim.slot)?, path: env.slot_path(claim.slot), record, keeper }))
}

/// Decides the launch of `req` in `env` (see the module header).
pub(crate) fn prepare(store: &Store, env: &Env, req: &Request) -> Result<Prepared> {
    let mut held: Held = vec![store.lock_file()?];
    let inside_env = std::env::var_os("PLYROOT_ENV").is_some() && root_is_plyroot();
    // A launch that may use the upper takes the environment's lock before it reads the current
    // generation: a commit, switch or rollback cannot then change it between the two, leaving the
    // run on the generation before (its writes then on other layers than the current ones).
    // Inside an environment the store is read-only, and such a launch cannot use the upper.
    let may_use_upper = req.boot.is_some() || !(req.read_only || req.ephemeral);
    let mut env_lock = if may_use_upper && !inside_env { Some(env.lock()?) } else { None };
    let c = common(store, env, req, inside_env)?;
    let settings = &c.generation.settings;
    // A run with a root of its own (--ephemeral, --read-only) does not join: its writes must not
    // reach the upper the booted system uses.
    // The run records, read once: for a booted init here, then for the decision to join.
    let mut census = None;
    if req.boot.is_none() && !req.ephemeral && !req.read_only {
        let found = env.census();
        if let Some(b) = found.booted() {
            let pidfd = booted_init(env, &c.generation, b)?;
            let mut input = plan_input(store, env, &c, req, Upper::None, None, Vec::new(), Vec::new())?;
            input.start = start_for(store, env, &c, req, true)?;
            let plan = plan(input)?;
            return Ok(Prepared::Booted { pidfd, plan, become_root: req.root || settings.root, inside: c.inside, held });
        }
        census = Some(found);
    }
    // A composed view has no upper of its own to keep: the parent's is live (it can only be a
    // lower here), and this environment's belongs to its own runs.
    let persistent = !(req.read_only || req.ephemeral || !settings.persist || c.composed);
    if persistent && c.inside_env {
        bail!(
            "cannot use the upper of '{}' from inside an environment (the store is read-only in there): run with --ephemeral or --read-only, or run it from the host",
            env.name
        );
    }
    let mut host_dirs = if c.wants_host { host_dirs(store, &c.lowers)? } else { Vec::new() };
    if c.nix_overlay {
        match under_layers(&c.lowers, NIX_STORE, Path::new("/").join(NIX_STORE)) {
            Some(dirs) => host_dirs.push((NIX_STORE.to_owned(), dirs)),
            None => crate::diag::warn!("the layers of '{}' hide /nix/store (a whiteout or an opaque directory): the host's store is not under it (nix = \"overlay\")", env.name),
        }
    }
    let (upper, join, recording) = if persistent || req.boot.is_some() {
        // From here until the program runs, no other launch of this environment decides.
        held.push(match env_lock.take() {
            Some(l) => l,
            None => env.lock()?,
        });
        let (upper, join, recording) = recording(env, &c, req, persistent, &host_dirs, census)?;
        if let (true, Upper::Shared { upper, .. }, None) = (c.nix_overlay, &upper, &join) {
            // Before the overlay is mounted: the upper is not written under a live mount.
            own_nix_db(upper)?;
        }
        (upper, join, Some(recording))
    } else {
        (if req.read_only { Upper::None } else { Upper::Ephemeral }, None, None)
    };
    let stack: Vec<PathBuf> = matches!(upper, Upper::Shared { .. }).then(|| env.upper()).into_iter().chain(c.lowers.iter().cloned()).collect();
    let mut plan = plan(plan_input(store, env, &c, req, upper, join, host_dirs, stack)?)?;
    if recording.as_ref().is_some_and(|r| r.keeper.is_some()) {
        plan.root.linger = super::keeper::linger();
        plan.root.keeper_ids = keeper_ids(&c);
    }
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
    Ok(Prepared::Launch { plan, inside: c.inside, recording, held })
}

#[allow(clippy::too_many_arguments)]
fn plan_input<'a>(
    store: &Store,
    env: &'a Env,
    c: &'a Common,
    req: &Request,
    upper: Upper,
    join: Option<Join>,
    host_dirs: Vec<(String, Vec<PathBuf>)>,
    stack: Vec<PathBuf>,
) -> Result<PlanInput<'a>> {
    let settings = &c.generation.settings;
    let shell = skel::shell(&c.lowers, &skel::base_passwd(&c.lowers), c.inside.uid);
    let env_vars: Vec<String> = settings
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain((!stack.is_empty() && !req.pure).then(|| std::env::join_paths(&stack).ok().and_then(|s| s.into_string().ok()).map(|s| format!("PLYROOT_STACK={s}"))).flatten())
        .chain(req.env.iter().cloned())
        .collect();
    let opts = RunOptions {
        pid: req.pid || req.boot.is_some(),
        binds: c.binds.clone(),
        no_host: c.no_host.clone(),
        env: env_vars,
        cwd: req.cwd.clone(),
        command: req.command.clone(),
        login: req.login,
        compose: req.compose,
        isolate_net: req.isolate_net,
        tied_to: req.tied_to,
        sealed: req.pure,
    };
    Ok(PlanInput {
        env_name: &env.name,
        root: RootSpec { lowers: c.lowers.clone(), skel: c.skel.clone(), upper, mount_point: env.mount_point(), host_dirs, join, linger: None, keeper_ids: Vec::new(), volatile: req.pure },
        store: Some(store.root.clone()),
        facts: &c.facts,
        opts,
        inside: &c.inside,
        user: &c.user,
        shell,
        // A build step inherits nothing: what it does must not depend on who runs it.
        host_env: if req.pure { Vec::new() } else { std::env::vars_os().collect() },
        start: c.start.clone(),
        launcher_dirs: if req.pure { Vec::new() } else { req.launcher_dirs.clone() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_store_is_asked_for_else_set_else_the_layers_when_they_have_one() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom) = (t.path().join("top"), t.path().join("bottom"));
        fs::create_dir_all(top.join("etc")).unwrap();
        fs::create_dir_all(bottom.join("nix/store")).unwrap();
        let (with, without) = (vec![top.clone(), bottom.clone()], vec![top.clone()]);
        let set = |n: Option<&str>| crate::store::env::Settings { nix: n.map(str::to_owned), ..Default::default() };
        let ask = |n: Option<NixStore>| Request { nix: n, ..Request::default() };
        assert_eq!(nix_store(&ask(None), &set(None), &with), NixStore::Layers);
        assert_eq!(nix_store(&ask(None), &set(None), &without), NixStore::Host);
        assert_eq!(nix_store(&ask(None), &set(Some("host")), &with), NixStore::Host);
        assert_eq!(nix_store(&ask(None), &set(Some("overlay")), &without), NixStore::Overlay);
        assert_eq!(nix_store(&ask(Some(NixStore::Layers)), &set(Some("host")), &without), NixStore::Layers);
        // A layer's /nix that is no directory still is the layers' (a symlink into their tree).
        std::os::unix::fs::symlink("opt/nix", top.join("nix")).unwrap();
        assert_eq!(nix_store(&ask(None), &set(None), &without), NixStore::Layers);
    }

    #[test]
    fn the_hosts_dir_goes_under_the_layers_unless_they_hide_it() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(a.join("nix/store")).unwrap();
        fs::create_dir_all(b.join("nix")).unwrap();
        fs::write(b.join("nix/store"), "").unwrap();
        let host = PathBuf::from("/nix/store");
        assert_eq!(under_layers(std::slice::from_ref(&a), "nix/store", host.clone()), Some(vec![a.join("nix/store"), host.clone()]));
        // A file below a directory ends the union there; a file on top hides the host's.
        assert_eq!(under_layers(&[a.clone(), b.clone()], "nix/store", host.clone()), Some(vec![a.join("nix/store"), host.clone()]));
        assert_eq!(under_layers(&[b, a], "nix/store", host), None);
    }
}
