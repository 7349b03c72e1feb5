//! Policy: what a launch mounts where, who it runs as, and with which environment.
//!
//! [`prepare`] decides everything a launch needs (identity, lowers, skeleton, the upper and
//! whether to join the environment's live mount) and [`plan`] turns it, purely, into a [`Plan`]:
//! a [`RootSpec`], a list of per-run [`Op`]s and an [`Exec`]. `launch` carries it out. The plan is
//! tested as data.

pub(crate) mod boot;
pub(crate) mod identity;
pub(crate) mod keeper;
pub(crate) mod launch;
pub(crate) mod mounts;
pub(crate) mod namespaces;
pub(crate) mod prepare;
pub(crate) mod relay;
pub(crate) mod skel;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::names::HostShare;
use crate::sys::mount::Kind;
use identity::{HostUser, Inside};

/// Runs `f` in a forked child inside the image view ([`identity::image_view`]: ids read as they
/// do inside an environment, you are yourself holding every capability over them), and returns
/// its result. There the user can read and change every file of their layers and uppers, and
/// owners read as the image gives them. Real root runs `f` directly.
pub(crate) fn in_image_view<T: serde::Serialize + serde::de::DeserializeOwned>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    if rustix::process::geteuid().is_root() {
        return f();
    }
    let user = identity::HostUser::current();
    let view = identity::image_view(&user, identity::host_subids(&user));
    crate::sys::process::in_child(move || {
        namespaces::enter_one_level(&view)?;
        f()
    })
}

/// Makes this process root of a fresh image view ([`identity::image_view`]), for `plyroot
/// unshare`: with subordinate ids it holds every id an environment's files may have, as they read
/// inside; without, root there is the user. Real root needs none and gets none.
pub(crate) fn become_image_root() -> Result<()> {
    if !identity::in_initial_userns() {
        anyhow::bail!("plyroot unshare runs on the host: here, inside an environment (or another user namespace), /etc/subuid is not the host's and your ids are mapped already");
    }
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let user = identity::HostUser::current();
    let subids = identity::host_subids(&user);
    namespaces::enter_one_level(&identity::image_view(&user, subids))?;
    if subids.is_some() {
        crate::sys::ns::become_id(0, 0)?;
    }
    Ok(())
}

/// The writable part of the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Upper {
    /// The environment's persistent upper, through its one shared overlay mount, whose workdir is
    /// `work` (a run slot's).
    Shared { upper: PathBuf, work: PathBuf },
    /// A tmpfs thrown away when the run ends.
    Ephemeral,
    /// No upper: the root is read-only.
    None,
}

/// Where the skeleton (the root's top lower) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Skel {
    /// Built in the store, cached per generation.
    Dir(PathBuf),
    /// Written to a tmpfs at launch (the store is read-only here: inside an environment).
    Tmpfs(skel::Spec),
}

/// A live run whose overlay a launch clones instead of mounting a second one over the same upper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Join {
    /// A process in the run's mount namespace.
    pub pid: i32,
    pub mnt_ns: u64,
    /// Its id (0: not known); checked instead of the inode where known.
    pub mnt_ns_id: u64,
    /// The environment's base user namespace (0: none).
    pub user_ns: u64,
    /// The identity namespaces the joined run (a keeper) holds open.
    pub nested: Vec<crate::store::runs::NestedNs>,
}

/// The root: an overlay of `lowers` (top first, the skeleton on top of them) with `upper`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RootSpec {
    pub lowers: Vec<PathBuf>,
    pub skel: Skel,
    pub upper: Upper,
    /// Where the root is put together before the pivot.
    pub mount_point: PathBuf,
    /// `base = "host"`: each host directory `/NAME` under the layers' `NAME` directories (top
    /// first), as an overlay of its own; with an upper, its upper is `NAME` in the root's.
    /// `nix = "overlay"` adds `nix/store` the same way.
    pub host_dirs: Vec<(String, Vec<PathBuf>)>,
    /// With a shared upper: the live run to take the mount from; none: mount it.
    pub join: Option<Join>,
    /// When this launch mounts the shared overlay: how long its keeper waits for the next launch
    /// (see `keeper`); None: no keeper.
    pub linger: Option<std::time::Duration>,
    /// The nested identities (uid and gid maps) the keeper makes and holds for later runs.
    pub keeper_ids: Vec<(Vec<crate::sys::ns::IdRange>, Vec<crate::sys::ns::IdRange>)>,
    /// The shared upper is a build step's, published with its own syncfs or thrown away: its
    /// overlay is `volatile` (no sync at every fsync inside, nor at unmount).
    pub volatile: bool,
}

/// One per-run step of building the root, after the overlay is in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A host path bound at `dst` inside the root.
    Bind { src: PathBuf, dst: PathBuf, kind: Kind, ro: bool, recursive: bool },
    /// A fresh procfs (the run has its own pid namespace).
    Proc,
    /// A tmpfs /dev with the safe host nodes, a private devpts and shm, plus `gpu` nodes, and
    /// the caller's terminal at its name, /dev/pts/`pty`, so that `tty` and ttyname(3) find it.
    Dev { gpu: Vec<PathBuf>, pty: Option<u32> },
}

/// What the host offers, gathered once per launch (a few stats).
#[derive(Clone, Debug, Default)]
pub(crate) struct HostFacts {
    pub cwd: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub x11_socket: bool,
    pub xauthority: Option<PathBuf>,
    /// The host has /nix, and the launch shows it (see `prepare::nix_store`): bound over the
    /// layers' /nix, if any.
    pub nix: bool,
    pub gpu: Vec<PathBuf>,
    pub resolv: bool,
    pub hosts: bool,
    pub localtime: bool,
    /// The caller's terminal, /dev/pts/N, when stdin, stdout or stderr is one.
    pub pty: Option<u32>,
}

/// N of the caller's terminal /dev/pts/N, when stdin, stdout or stderr is one and that name here
/// is that terminal (three fstats, and one stat on a terminal).
fn caller_pty() -> Option<u32> {
    use std::os::fd::AsFd;
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    for fd in [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()] {
        let Ok(st) = rustix::fs::fstat(fd) else { continue };
        let major = rustix::fs::major(st.st_rdev);
        // UNIX98 pty slaves (devpts).
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::CharacterDevice || !(136..=143).contains(&major) {
            continue;
        }
        let n = (major - 136) * 256 + rustix::fs::minor(st.st_rdev);
        if rustix::fs::stat(format!("/dev/pts/{n}")).is_ok_and(|named| named.st_dev == st.st_dev && named.st_ino == st.st_ino) {
            return Some(n);
        }
    }
    None
}

impl HostFacts {
    pub(crate) fn gather() -> HostFacts {
        let is = |p: &str| Path::new(p).exists();
        let mut gpu = Vec::new();
        if is("/dev/dri") {
            gpu.push(PathBuf::from("/dev/dri"));
        }
        if let Ok(rd) = std::fs::read_dir("/dev") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("nvidia") {
                    gpu.push(e.path());
                }
            }
        }
        gpu.sort();
        HostFacts {
            cwd: std::env::current_dir().ok(),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_absolute() && p.is_dir()),
            x11_socket: is("/tmp/.X11-unix"),
            xauthority: std::env::var_os("XAUTHORITY").map(PathBuf::from).filter(|p| p.is_absolute() && p.is_file()),
            nix: is("/nix"),
            gpu,
            resolv: is("/etc/resolv.conf"),
            hosts: is("/etc/hosts"),
            localtime: is("/etc/localtime"),
            pty: caller_pty(),
        }
    }
}

/// Run options after parsing (see `cli::RunOpts`).
#[derive(Clone, Debug, Default)]
pub(crate) struct RunOptions {
    pub pid: bool,
    pub binds: Vec<String>,
    pub no_host: Vec<HostShare>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Empty: the login shell.
    pub command: Vec<OsString>,
    /// Start the shell as a login shell (`enter`).
    pub login: bool,
    /// A launcher: its program is looked up in the environment's own PATH only, never in the
    /// directories of launchers (a launcher never starts another for its own program).
    pub compose: bool,
    /// A network namespace of the run's own, with only loopback (a build step without network).
    pub isolate_net: bool,
    /// End with this process (a build step with its build): see `Plan::tied_to`.
    pub tied_to: Option<i32>,
    /// A build step: see `Plan::sealed`.
    pub sealed: bool,
}

/// The program to start once the root is in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exec {
    pub argv: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// Directories to try in order; the first that exists inside wins.
    pub cwd: Vec<PathBuf>,
    /// Failing to enter `cwd[0]` is an error, not a fallback: `--cwd` was given, or it is the
    /// caller's directory (see [`Start`]).
    pub cwd_required: bool,
    /// Where a program name without `/` is looked up (a launcher: the environment's own PATH);
    /// None: the PATH of `env`, as exec does.
    pub lookup: Option<String>,
}

/// Where the program starts when no `--cwd` is given: the caller's directory, never silently
/// another one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Shown inside at this path by a host share or a bind (the root itself for `/`).
    At(PathBuf),
    /// Not shown by anything: bound at its own path for this run.
    Bind(PathBuf),
    /// A login shell (`login`), or a caller whose directory is gone: the home, else `/`.
    Home,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub root: RootSpec,
    /// The store, made read-only before any share that holds it is copied in (see
    /// `namespaces::enter`): programs inside must not change layers or records.
    pub store: Option<PathBuf>,
    pub ops: Vec<Op>,
    pub exec: Exec,
    pub pid: bool,
    /// A network namespace of its own with only loopback up (see `RunOptions::isolate_net`).
    pub isolate_net: bool,
    /// The parent this launch must not outlive (a build step's build, killed or not): its death
    /// kills the supervisor, and with it PID 1 and the whole pid namespace.
    pub tied_to: Option<i32>,
    /// A build step: once its root is built, the program runs in a user namespace of its own
    /// where every mount flag is locked and the host's kernel settings are out of reach (see
    /// `namespaces::seal`).
    pub sealed: bool,
}

pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which host shares are on.
fn shares(no_host: &[HostShare]) -> impl Fn(HostShare) -> bool + '_ {
    let off: HashSet<HostShare> = no_host.iter().copied().collect();
    move |s| !off.contains(&HostShare::All) && !off.contains(&s)
}

/// Parses `SRC:DST[:ro|:rw]` (SRC relative to `cwd`). Neither path may hold a `:`: a third field
/// is the option, and one plyroot does not know is refused rather than taken as part of DST
/// (`/a:/b:bogus` would otherwise bind `/b:bogus`, read-write).
pub(crate) fn parse_bind(spec: &str, cwd: Option<&Path>) -> Result<(PathBuf, PathBuf, bool)> {
    let (src, dst, ro) = match spec.split(':').collect::<Vec<_>>()[..] {
        [src, dst] => (src, dst, false),
        [src, dst, "ro"] => (src, dst, true),
        [src, dst, "rw"] => (src, dst, false),
        [_, _, opt] => bail!("--bind '{spec}': '{opt}' is not a bind option: use SRC:DST, SRC:DST:ro or SRC:DST:rw"),
        [_] => bail!("--bind '{spec}': expected SRC:DST or SRC:DST:ro"),
        _ => bail!("--bind '{spec}': too many ':': use SRC:DST, SRC:DST:ro or SRC:DST:rw (paths with ':' cannot be bound)"),
    };
    if src.is_empty() || !dst.starts_with('/') {
        bail!("--bind '{spec}': SRC must be a host path and DST an absolute path inside");
    }
    let src = PathBuf::from(src);
    let src = if src.is_absolute() { src } else { cwd.unwrap_or(Path::new("/")).join(src.strip_prefix(".").unwrap_or(&src)) };
    Ok((src, PathBuf::from(dst), ro))
}

/// The path inside at which `ops` show the host path `p`, if any: the last mount that holds it,
/// unless a later one covers that place.
fn shown_at(ops: &[Op], p: &Path) -> Option<PathBuf> {
    for (i, op) in ops.iter().enumerate().rev() {
        let Op::Bind { src, dst: at, .. } = op else { continue };
        let Ok(rel) = p.strip_prefix(src) else { continue };
        let q = if rel.as_os_str().is_empty() { at.clone() } else { at.join(rel) };
        if ops[i + 1..].iter().any(|o| q.starts_with(op_dst(o))) {
            continue;
        }
        return Some(q);
    }
    None
}

/// Where a per-run mount goes inside.
fn op_dst(o: &Op) -> PathBuf {
    match o {
        Op::Bind { dst, .. } => dst.clone(),
        Op::Proc => PathBuf::from("/proc"),
        Op::Dev { .. } => PathBuf::from("/dev"),
    }
}

/// What decides where a run without `--cwd` starts, besides its options.
pub(crate) struct StartCtx<'a> {
    pub env_name: &'a str,
    /// Whether a path exists in the environment's own root (its layers and upper): binding the
    /// caller's directory there would hide the environment's.
    pub taken: &'a dyn Fn(&Path) -> bool,
    /// The run joins a booted environment, whose mounts it cannot add to.
    pub booted: bool,
}

/// Where a run without `--cwd` starts (see [`Start`]): the caller's directory where a share or
/// bind shows it; bound at its own path where nothing does; refused, naming it, where binding
/// it would go against what was asked (a share turned off), hide the environment's own
/// directory of that name, or is impossible (a booted environment).
pub(crate) fn start(opts: &RunOptions, facts: &HostFacts, user: &HostUser, home_start: bool, ctx: &StartCtx<'_>) -> Result<Option<Start>> {
    if opts.cwd.is_some() {
        return Ok(None);
    }
    if home_start {
        return Ok(Some(Start::Home));
    }
    let Some(cwd) = &facts.cwd else {
        crate::diag::warn!("your current directory no longer exists: starting in your home inside '{}'", ctx.env_name);
        return Ok(Some(Start::Home));
    };
    if cwd == Path::new("/") {
        return Ok(Some(Start::At(cwd.clone())));
    }
    let ops = host_ops(opts, facts, user)?;
    if let Some(q) = shown_at(&ops, cwd) {
        return Ok(Some(Start::At(q)));
    }
    let (env, c) = (ctx.env_name, cwd.display());
    if ctx.booted {
        bail!("'{env}' is booted, and your directory {c} is not visible in it (a booted environment has its own /tmp and /run, and takes no binds once it runs): start from a directory under your home, or pass --cwd DIR");
    }
    let on = shares(&opts.no_host);
    let off_share = [(HostShare::Home, Some(user.home.as_path())), (HostShare::Tmp, Some(Path::new("/tmp"))), (HostShare::Nix, Some(Path::new("/nix"))), (HostShare::RuntimeDir, f_rd(facts))]
        .into_iter()
        .find(|(s, p)| !on(*s) && p.is_some_and(|p| cwd.starts_with(p)));
    if let Some((share, _)) = off_share {
        bail!("your directory {c} is not shared with '{env}' (--no-host {} keeps it out): pass --cwd DIR to start in a directory inside, or --bind {c}:{c} to take it in", share.as_str());
    }
    if let Some(d) = ops.iter().rev().map(op_dst).find(|d| cwd.starts_with(d)) {
        bail!("your directory {c} is not visible in '{env}': {} is mounted over that place inside: pass --cwd DIR to start in a directory inside, or --bind {c}:DIR --cwd DIR to take it in", d.display());
    }
    if (ctx.taken)(cwd) {
        bail!("your directory {c} is the host's, and '{env}' has its own {c}: pass --cwd {c} to start in the environment's, or --bind {c}:DIR --cwd DIR to take yours in at another place");
    }
    Ok(Some(Start::Bind(cwd.clone())))
}

fn f_rd(f: &HostFacts) -> Option<&Path> {
    f.runtime_dir.as_deref()
}

pub(crate) struct PlanInput<'a> {
    pub env_name: &'a str,
    pub root: RootSpec,
    /// The store: read-only wherever a host share makes it visible inside.
    pub store: Option<PathBuf>,
    pub facts: &'a HostFacts,
    pub opts: RunOptions,
    pub inside: &'a Inside,
    pub user: &'a HostUser,
    /// The inside user's shell, known to exist in the root.
    pub shell: String,
    /// The inherited environment.
    pub host_env: Vec<(OsString, OsString)>,
    /// Where the program starts without `--cwd` (see [`start`]); None with `--cwd`.
    pub start: Option<Start>,
    /// Directories that hold launchers, kept on PATH after the environment's own (see
    /// `launcher::path_dirs`).
    pub launcher_dirs: Vec<PathBuf>,
}

pub(crate) fn plan(i: PlanInput<'_>) -> Result<Plan> {
    let mut ops = host_ops(&i.opts, i.facts, i.user)?;
    let home = if shares(&i.opts.no_host)(HostShare::Home) || i.inside.uid != 0 { i.user.home.clone() } else { "/root".into() };
    let (env, own_path) = exec_env(&i, &home)?;
    let argv: Vec<OsString> = if i.opts.command.is_empty() {
        let mut v = vec![OsString::from(&i.shell)];
        if i.opts.login {
            v.push("-l".into());
        }
        v
    } else {
        i.opts.command.clone()
    };
    let (cwd, cwd_required) = match (&i.opts.cwd, &i.start) {
        (Some(c), _) => (vec![c.clone()], true),
        (None, Some(Start::At(p))) => (vec![p.clone()], true),
        (None, Some(Start::Bind(p))) => {
            // Last: no share or bind may cover it.
            ops.push(Op::Bind { src: p.clone(), dst: p.clone(), kind: Kind::Dir, ro: false, recursive: true });
            (vec![p.clone()], true)
        }
        (None, Some(Start::Home) | None) => (vec![home, PathBuf::from("/")], false),
    };
    let lookup = i.opts.compose.then_some(own_path);
    Ok(Plan { root: i.root, store: i.store, ops, exec: Exec { argv, env, cwd, cwd_required, lookup }, pid: i.opts.pid, isolate_net: i.opts.isolate_net, tied_to: i.opts.tied_to, sealed: i.opts.sealed })
}

/// The per-run mounts: the host shares that are on, then the binds asked for.
fn host_ops(opts: &RunOptions, f: &HostFacts, user: &HostUser) -> Result<Vec<Op>> {
    let on = shares(&opts.no_host);
    let mut ops = Vec::new();
    let bind = |src: &Path, kind, ro, recursive| Op::Bind { src: src.to_owned(), dst: src.to_owned(), kind, ro, recursive };
    if on(HostShare::Proc) {
        // A fresh procfs needs a pid namespace we own; without one, the host's /proc is the
        // truthful view of our pid namespace anyway.
        ops.push(if opts.pid { Op::Proc } else { bind(Path::new("/proc"), Kind::Dir, false, true) });
    }
    if on(HostShare::Dev) {
        ops.push(Op::Dev { gpu: if on(HostShare::Gpu) { f.gpu.clone() } else { Vec::new() }, pty: f.pty });
    }
    if on(HostShare::Sys) {
        ops.push(bind(Path::new("/sys"), Kind::Dir, true, true));
    }
    if on(HostShare::Tmp) {
        // Recursive: /tmp may carry submounts (a home under it); inside an environment they are
        // locked, and the kernel refuses a non-recursive clone of a mount with locked children.
        ops.push(bind(Path::new("/tmp"), Kind::Dir, false, true));
    } else if on(HostShare::X11) && f.x11_socket {
        ops.push(bind(Path::new("/tmp/.X11-unix"), Kind::Dir, false, true));
    }
    if on(HostShare::Nix) && f.nix {
        ops.push(bind(Path::new("/nix"), Kind::Dir, false, true));
    }
    if on(HostShare::Home) {
        ops.push(bind(&user.home, Kind::Dir, false, true));
    }
    let runtime_dir = f.runtime_dir.as_ref().filter(|_| on(HostShare::RuntimeDir));
    if let Some(rd) = runtime_dir {
        ops.push(bind(rd, Kind::Dir, false, true));
    }
    if let Some(xa) = f.xauthority.as_ref().filter(|_| on(HostShare::X11)) {
        let covered = (on(HostShare::Home) && xa.starts_with(&user.home))
            || runtime_dir.is_some_and(|rd| xa.starts_with(rd))
            || (on(HostShare::Tmp) && xa.starts_with("/tmp"));
        if !covered {
            ops.push(bind(xa, Kind::File, true, false));
        }
    }
    for (share, path, present) in [
        (HostShare::Resolv, "/etc/resolv.conf", f.resolv),
        (HostShare::Hosts, "/etc/hosts", f.hosts),
        (HostShare::Localtime, "/etc/localtime", f.localtime),
    ] {
        if on(share) && present {
            ops.push(bind(Path::new(path), Kind::File, true, false));
        }
    }
    for spec in &opts.binds {
        let (src, dst, ro) = parse_bind(spec, f.cwd.as_deref())?;
        let kind = if src.is_dir() { Kind::Dir } else { Kind::File };
        ops.push(Op::Bind { src, dst, kind, ro, recursive: true });
    }
    Ok(ops)
}

/// The program's environment: the inherited one without what names the host's user and paths,
/// then the run's own variables and `--env`; and the PATH without the launchers' directories.
///
/// PATH is not the host's: the host's directories (`/nix/...`, `/usr/bin` of another
/// distribution) would shadow the environment's own programs. It is the distribution's default,
/// then the directories that hold launchers, so a program inside finds an exported command of
/// another environment by name, after its own.
fn exec_env(i: &PlanInput<'_>, home: &Path) -> Result<(Vec<(OsString, OsString)>, String)> {
    let mut env: Vec<(OsString, OsString)> = i
        .host_env
        .iter()
        .filter(|(k, _)| !matches!(k.to_str(), Some("PATH" | "HOME" | "USER" | "LOGNAME" | "SHELL" | "PLYROOT_ENV" | "PLYROOT_STACK" | "LD_LIBRARY_PATH" | "LD_PRELOAD")))
        .cloned()
        .collect();
    let user_name = if i.inside.uid == 0 { "root".to_owned() } else { i.user.name.clone() };
    let mut path = PATH.to_owned();
    for d in &i.launcher_dirs {
        if let Some(d) = d.to_str().filter(|d| !d.contains(':') && !path.split(':').any(|p| p == *d)) {
            path.push(':');
            path.push_str(d);
        }
    }
    for (k, v) in [
        ("PATH", path),
        ("HOME", home.display().to_string()),
        ("USER", user_name.clone()),
        ("LOGNAME", user_name),
        ("SHELL", i.shell.clone()),
        ("PLYROOT_ENV", i.env_name.to_owned()),
    ] {
        env.push((k.into(), v.into()));
    }
    for kv in &i.opts.env {
        let Some((k, v)) = kv.split_once('=') else { bail!("--env '{kv}': expected KEY=VALUE") };
        if k.is_empty() {
            bail!("--env '{kv}': the name is empty");
        }
        env.retain(|(ek, _)| ek != k);
        env.push((k.into(), v.into()));
    }
    // A PATH set for the environment (manifest `env`, `-e`) is its own, launchers' or not.
    let own = i.opts.env.iter().rev().find_map(|kv| kv.strip_prefix("PATH=")).unwrap_or(PATH).to_owned();
    Ok((env, own))
}

#[cfg(test)]
mod tests {
    use super::*;
    use identity::choose;

    fn user() -> HostUser {
        HostUser { uid: 1000, gid: 1000, name: "alice".into(), home: "/home/alice".into() }
    }

    fn facts() -> HostFacts {
        HostFacts {
            cwd: Some("/home/alice/src".into()),
            runtime_dir: Some("/run/user/1000".into()),
            x11_socket: true,
            xauthority: Some("/run/user/1000/xauth".into()),
            nix: true,
            gpu: vec!["/dev/dri".into()],
            resolv: true,
            hosts: true,
            localtime: false,
            pty: None,
        }
    }

    fn run(opts: RunOptions, f: &HostFacts) -> Plan {
        let inside = choose(&user(), false, None, false);
        plan(PlanInput {
            env_name: "dev",
            root: RootSpec {
                lowers: vec!["/s/l2".into(), "/s/l1".into()],
                skel: Skel::Dir("/s/skel".into()),
                upper: Upper::None,
                mount_point: "/s/mnt".into(),
                host_dirs: Vec::new(),
                join: None,
                linger: None,
                keeper_ids: Vec::new(),
                volatile: false,
            },
            store: Some("/home/alice/.local/share/plyroot".into()),
            facts: f,
            opts,
            inside: &inside,
            user: &user(),
            shell: "/bin/sh".into(),
            host_env: vec![("TERM".into(), "xterm".into()), ("PATH".into(), "/nix/bin".into())],
            start: Some(Start::At("/home/alice/src".into())),
            launcher_dirs: Vec::new(),
        })
        .unwrap()
    }

    fn dsts(p: &Plan) -> Vec<String> {
        p.ops
            .iter()
            .map(|o| match o {
                Op::Bind { dst, ro, .. } => format!("{}{}", dst.display(), if *ro { ":ro" } else { "" }),
                Op::Proc => "proc".into(),
                Op::Dev { gpu, .. } => format!("dev+{}", gpu.len()),
            })
            .collect()
    }

    #[test]
    fn default_plan_shares_the_host_integration() {
        let p = run(RunOptions::default(), &facts());
        assert_eq!(
            dsts(&p),
            ["/proc", "dev+1", "/sys:ro", "/tmp", "/nix", "/home/alice", "/run/user/1000", "/etc/resolv.conf:ro", "/etc/hosts:ro"]
        );
        assert_eq!(p.exec.argv, vec![OsString::from("/bin/sh")]);
        assert_eq!(p.exec.cwd[0], PathBuf::from("/home/alice/src"));
        let get = |k: &str| p.exec.env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH").unwrap(), PATH);
        assert_eq!(get("TERM").unwrap(), "xterm");
        assert_eq!(get("USER").unwrap(), "root", "single-id mode is root inside");
        assert_eq!(get("PLYROOT_ENV").unwrap(), "dev");
    }

    #[test]
    fn host_shares_turn_off_one_by_one_and_all() {
        let p = run(RunOptions { no_host: vec![HostShare::Home, HostShare::Tmp, HostShare::Gpu], ..Default::default() }, &facts());
        let d = dsts(&p);
        assert!(d.contains(&"/tmp/.X11-unix".to_string()), "x11 socket still shared without /tmp: {d:?}");
        assert!(d.contains(&"dev+0".to_string()));
        assert!(!d.iter().any(|x| x.starts_with("/home")));
        let p = run(RunOptions { no_host: vec![HostShare::All], ..Default::default() }, &facts());
        assert_eq!(dsts(&p), Vec::<String>::new());
        let home = p.exec.env.iter().find(|(k, _)| k == "HOME").unwrap().1.clone();
        assert_eq!(home, "/root");
    }

    #[test]
    fn pid_namespace_gets_a_fresh_proc_and_binds_and_env_parse() {
        let opts = RunOptions {
            pid: true,
            binds: vec!["src:/src:ro".into(), "/data:/data".into()],
            env: vec!["A=1".into(), "TERM=dumb".into()],
            command: vec!["make".into(), "-j2".into()],
            ..Default::default()
        };
        let p = run(opts, &facts());
        let d = dsts(&p);
        assert_eq!(d[0], "proc");
        assert!(d.contains(&"/src:ro".to_string()) && d.contains(&"/data".to_string()));
        let Some(Op::Bind { src, .. }) = p.ops.iter().find(|o| matches!(o, Op::Bind { dst, .. } if dst == Path::new("/src"))) else { panic!() };
        assert_eq!(src, Path::new("/home/alice/src/src"));
        assert!(p.exec.env.contains(&("TERM".into(), "dumb".into())) && p.exec.env.contains(&("A".into(), "1".into())));
        assert_eq!(p.exec.argv, vec![OsString::from("make"), OsString::from("-j2")]);
    }

    #[test]
    fn bad_binds_and_env_are_errors_that_name_them() {
        for b in ["nocolon", "a:relative", ":/x", "/a:/b:bogus", "/a:/b:ro:rw", "/a:/b:"] {
            let e = parse_bind(b, None).unwrap_err().to_string();
            assert!(e.contains(b), "{e}");
        }
        assert!(parse_bind("/a:/b:bogus", None).unwrap_err().to_string().contains("'bogus' is not a bind option"));
        assert_eq!(parse_bind("/a:/b:ro", None).unwrap(), ("/a".into(), "/b".into(), true));
        assert_eq!(parse_bind("/a:/b:rw", None).unwrap(), ("/a".into(), "/b".into(), false));
        assert_eq!(parse_bind("/a:/b", None).unwrap(), ("/a".into(), "/b".into(), false));
    }

    fn ctx<'a>(taken: &'a dyn Fn(&Path) -> bool, booted: bool) -> StartCtx<'a> {
        StartCtx { env_name: "dev", taken, booted }
    }

    #[test]
    fn the_caller_directory_is_where_the_program_starts_or_a_refusal_names_it() {
        let f = |cwd: &str| HostFacts { cwd: Some(cwd.into()), ..facts() };
        let none = |_: &Path| false;
        let all = |_: &Path| true;
        let start_at = |o: &RunOptions, cwd: &str, taken: &dyn Fn(&Path) -> bool, booted| start(o, &f(cwd), &user(), false, &ctx(taken, booted));
        let d = RunOptions::default();
        // Shown by a share: there.
        assert_eq!(start_at(&d, "/home/alice/src", &none, false).unwrap(), Some(Start::At("/home/alice/src".into())));
        assert_eq!(start_at(&d, "/tmp/x", &all, false).unwrap(), Some(Start::At("/tmp/x".into())));
        // Shown by a bind elsewhere: at its place inside.
        let b = RunOptions { binds: vec!["/data/proj:/src".into()], ..Default::default() };
        assert_eq!(start_at(&b, "/data/proj/sub", &none, false).unwrap(), Some(Start::At("/src/sub".into())));
        // A bind over a share's place hides the share's directory there.
        let over = RunOptions { binds: vec!["/data:/tmp/x".into()], ..Default::default() };
        let e = start_at(&over, "/tmp/x/y", &none, false).unwrap_err().to_string();
        assert!(e.contains("/tmp/x/y") && e.contains("/tmp/x is mounted over"), "the bind shows /data/y there, not the host's /tmp/x/y: {e}");
        assert_eq!(start_at(&over, "/data/y", &none, false).unwrap(), Some(Start::At("/tmp/x/y".into())));
        // Shown by nothing: bound, unless the environment has its own directory there.
        assert_eq!(start_at(&d, "/var/tmp/proj", &none, false).unwrap(), Some(Start::Bind("/var/tmp/proj".into())));
        let e = start_at(&d, "/etc", &all, false).unwrap_err().to_string();
        assert!(e.contains("/etc") && e.contains("--cwd") && e.contains("--bind"), "{e}");
        assert_eq!(start_at(&d, "/", &all, false).unwrap(), Some(Start::At("/".into())));
        // A share turned off is not bound behind the user's back.
        let off = RunOptions { no_host: vec![HostShare::Tmp], ..Default::default() };
        let e = start_at(&off, "/tmp/x", &none, false).unwrap_err().to_string();
        assert!(e.contains("/tmp/x") && e.contains("--no-host tmp") && e.contains("--cwd") && e.contains("--bind"), "{e}");
        // A booted environment takes no binds.
        let e = start_at(&d, "/var/tmp/proj", &none, true).unwrap_err().to_string();
        assert!(e.contains("/var/tmp/proj") && e.contains("booted") && e.contains("--cwd"), "{e}");
        // --cwd and a login decide for themselves.
        assert_eq!(start_at(&RunOptions { cwd: Some("/etc".into()), ..Default::default() }, "/var/tmp/proj", &none, true).unwrap(), None);
        assert_eq!(start(&d, &f("/etc"), &user(), true, &ctx(&all, false)).unwrap(), Some(Start::Home));
    }

    #[test]
    fn a_bound_caller_directory_is_the_last_mount_and_must_be_entered() {
        let f = HostFacts { cwd: Some("/var/tmp/proj".into()), ..facts() };
        let inside = choose(&user(), false, None, false);
        let alice = user();
        let mut i = PlanInput {
            env_name: "dev",
            root: run(RunOptions::default(), &facts()).root,
            store: None,
            facts: &f,
            opts: RunOptions { compose: true, ..Default::default() },
            inside: &inside,
            user: &alice,
            shell: "/bin/sh".into(),
            host_env: vec![("PATH".into(), "/host/bin".into())],
            start: Some(Start::Bind("/var/tmp/proj".into())),
            launcher_dirs: vec!["/home/alice/.local/bin".into(), "/usr/bin".into()],
        };
        let p = plan(PlanInput { opts: RunOptions { compose: true, ..Default::default() }, ..i }).unwrap();
        assert_eq!(dsts(&p).last().unwrap(), "/var/tmp/proj");
        assert_eq!((p.exec.cwd.clone(), p.exec.cwd_required), (vec![PathBuf::from("/var/tmp/proj")], true));
        // PATH: the environment's own directories, then the launchers' (once each); a launcher's
        // program is looked up in the environment's own only.
        let path = p.exec.env.iter().find(|(k, _)| k == "PATH").unwrap().1.clone();
        assert_eq!(path, OsString::from(format!("{PATH}:/home/alice/.local/bin")));
        assert_eq!(p.exec.lookup.as_deref(), Some(PATH));
        i = PlanInput {
            env_name: "dev",
            root: p.root,
            store: None,
            facts: &f,
            opts: RunOptions { env: vec!["PATH=/opt/x".into()], ..Default::default() },
            inside: &inside,
            user: &alice,
            shell: "/bin/sh".into(),
            host_env: Vec::new(),
            start: None,
            launcher_dirs: vec!["/home/alice/.local/bin".into()],
        };
        let p = plan(i).unwrap();
        assert!(p.exec.env.contains(&("PATH".into(), "/opt/x".into())) && p.exec.lookup.is_none());
        assert_eq!(p.exec.cwd, vec![PathBuf::from("/home/alice"), PathBuf::from("/")]);
    }
}
