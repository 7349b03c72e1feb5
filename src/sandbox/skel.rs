//! The skeleton: a small generated directory that sits on top of an environment's layers as its
//! highest lower. It holds what a launch needs but no layer should be changed for: the user's
//! passwd/group entries, and the mount points for the host integration.
//!
//! [`spec`] decides its content as data. Runs from the host keep it in the store, built once per
//! generation and content (then cached), so a launch creates nothing in the upper. Its content
//! depends on who the user is, not on the run's identity (`--root` or not), because runs with
//! either identity share one overlay mount. A launch whose store is read-only (a launcher composing
//! inside an environment, where the store is bound read-only) puts it on the tmpfs of its own
//! throwaway upper instead.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::identity::{passwd_with, shell_of, user_inside, HostUser, Inside, Mapping};
use super::HostFacts;
use crate::store::env::Env;
use crate::store::Store;

/// Whether `path` resolves to something in any of the layer trees (top first), following
/// symlinks as they would resolve inside the root, and allowing for merged /usr.
pub(crate) fn exists_in_layers(lowers: &[PathBuf], path: &str) -> bool {
    let alt = ["/bin/", "/sbin/", "/lib/"].iter().find(|p| path.starts_with(*p)).map(|_| format!("/usr{path}"));
    lowers.iter().any(|l| {
        [Some(path.to_owned()), alt.clone()].into_iter().flatten().any(|p| {
            rustix::fs::open(l, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .and_then(|root| rustix::fs::openat2(&root, p.as_str(), OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::IN_ROOT))
                .is_ok()
        })
    })
}

/// The first layer (top first) that has `rel` decides what it is.
fn top_entry(lowers: &[PathBuf], rel: &str) -> Option<fs::Metadata> {
    lowers.iter().find_map(|l| fs::symlink_metadata(l.join(rel)).ok())
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// The layers' /etc/passwd text (the top-most that has one).
pub(crate) fn base_passwd(lowers: &[PathBuf]) -> String {
    lowers.iter().map(|l| l.join("etc/passwd")).find(|p| p.is_file()).and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default()
}

/// The login shell of `uid` in the root: its passwd entry's, else `$SHELL`, else bash or sh,
/// whichever exists in the layers.
pub(crate) fn shell(lowers: &[PathBuf], passwd: &str, uid: u32) -> String {
    shell_of(passwd, uid)
        .filter(|s| exists_in_layers(lowers, s))
        .or_else(|| std::env::var("SHELL").ok().filter(|s| s.starts_with('/') && exists_in_layers(lowers, s)))
        .or_else(|| ["/bin/bash", "/bin/sh"].iter().find(|s| exists_in_layers(lowers, s)).map(|s| s.to_string()))
        .unwrap_or_else(|| "/bin/sh".into())
}

/// A skeleton's content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Spec {
    /// Directories, relative to the skeleton's root.
    pub dirs: Vec<PathBuf>,
    /// Files with their content (empty files are mount points).
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Symlinks: name → target.
    pub links: Vec<(PathBuf, PathBuf)>,
    /// The directories that are the user's (home, runtime dir); the rest is root's.
    pub owned: Vec<PathBuf>,
    /// The user's uid and gid inside.
    pub owner: (u32, u32),
}

/// The sudoers drop-in of a skeleton (see [`spec`]); sudo wants it owned by root, mode 0440.
pub(crate) const SUDOERS: &str = "etc/sudoers.d/plyroot";

impl Spec {
    fn fingerprint(&self) -> u64 {
        // The version of how a skeleton is written (2: owned as inside, root's by root).
        fnv(&format!("2 {self:?}"))
    }
}

/// Decides the skeleton for `lowers` (top first).
/// `binds`: (destination, is a directory) of the run's binds; those the layers lack get their
/// mount point here, so binding creates nothing in the upper.
/// `links`: top-level symlinks to add where the layers have nothing (the host's `/bin → usr/bin`
/// and the like, for `base = "host"`).
/// `env_name`: the environment, for the prompt ([`prompt_files`]).
pub(crate) fn spec(env_name: &str, lowers: &[PathBuf], user: &HostUser, inside: &Inside, facts: &HostFacts, binds: &[(PathBuf, bool)], links: &[(String, PathBuf)]) -> Spec {
    let mut owned = vec![user.home.strip_prefix("/").unwrap_or(&user.home).to_owned()];
    if let Some(rd) = &facts.runtime_dir {
        owned.push(rd.strip_prefix("/").unwrap_or(rd).to_owned());
    }
    let mut spec = Spec { dirs: ["proc", "dev", "sys", "tmp", "run"].iter().map(PathBuf::from).collect(), owner: (user.uid, user.gid), ..Spec::default() };
    spec.dirs.extend(owned.iter().cloned());
    spec.owned = owned;
    if facts.nix {
        spec.dirs.push("nix".into());
    }
    mount_points(&mut spec, lowers, binds, &["etc/resolv.conf", "etc/hosts", "etc/localtime"]);
    apt_single_id(&mut spec, lowers, inside);
    // Being yourself with every id of the image mapped, `sudo` works as it does on your own
    // machine: without a password, as in distrobox and toolbox (`#uid`: whatever your name).
    if matches!(inside.mapping, Mapping::Ranges { .. }) {
        spec.dirs.push("etc/sudoers.d".into());
        spec.files.push((SUDOERS.into(), format!("# Written by plyroot: you are yourself inside, and root when you ask.\n#{} ALL=(ALL:ALL) NOPASSWD: ALL\n", user.uid).into_bytes()));
    }
    spec.files.extend(prompt_files(env_name));
    spec.dirs.push("etc/profile.d".into());
    let passwd = base_passwd(lowers);
    let group = lowers.iter().map(|l| l.join("etc/group")).find(|p| p.is_file()).and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default();
    let (p2, g2) = passwd_with(&passwd, &group, user, user_inside(inside, user), &shell(lowers, &passwd, user.uid));
    if p2 != passwd {
        spec.files.push(("etc/passwd".into(), p2.into_bytes()));
    }
    if g2 != group {
        spec.files.push(("etc/group".into(), g2.into_bytes()));
    }
    spec.links = links.iter().filter(|(n, _)| top_entry(lowers, n).is_none()).map(|(n, t)| (PathBuf::from(n), t.clone())).collect();
    spec
}

/// The mount points the layers (top first) lack: of the binds (destination, is a directory), so
/// binding creates nothing in the upper, and `/etc`'s file mount points `files` (needed where the
/// layers have no regular file there: absent, or a symlink such as Debian's /etc/localtime,
/// which must not be followed out of the root).
fn mount_points(spec: &mut Spec, lowers: &[PathBuf], binds: &[(PathBuf, bool)], files: &[&str]) {
    for (dst, is_dir) in binds {
        let rel = dst.strip_prefix("/").unwrap_or(dst).to_owned();
        if rel.as_os_str().is_empty() || exists_in_layers(lowers, &dst.to_string_lossy()) {
            continue;
        }
        if *is_dir {
            spec.dirs.push(rel);
        } else {
            spec.dirs.extend(rel.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_owned));
            spec.files.push((rel, Vec::new()));
        }
    }
    spec.dirs.push("etc".into());
    for f in files {
        if !top_entry(lowers, f).is_some_and(|m| m.file_type().is_file()) {
            spec.files.push((f.into(), Vec::new()));
        }
    }
}

/// The skeleton of a build step: mount points only (the API filesystems, the binds of its
/// inputs, the resolver files), and apt's single-id setting where it needs it. Nothing names the
/// user, so nothing of theirs can reach the layer the step makes (a `useradd` copies up
/// `/etc/passwd` from here). `user` owns the skeleton's root only (to move it into place).
pub(crate) fn pure_spec(lowers: &[PathBuf], user: &HostUser, inside: &Inside, binds: &[(PathBuf, bool)]) -> Spec {
    let mut spec = Spec { dirs: ["proc", "dev", "sys", "tmp", "run"].iter().map(PathBuf::from).collect(), owner: (user.uid, user.gid), ..Spec::default() };
    mount_points(&mut spec, lowers, binds, &["etc/resolv.conf", "etc/hosts"]);
    apt_single_id(&mut spec, lowers, inside);
    spec
}

/// With one id mapped, apt cannot drop to its `_apt` sandbox user (no other id exists): tell it
/// to stay root, the way apt's own docs advise for containers without id ranges.
fn apt_single_id(spec: &mut Spec, lowers: &[PathBuf], inside: &Inside) {
    if matches!(inside.mapping, Mapping::Single { .. }) && lowers.iter().any(|l| l.join("etc/apt/apt.conf.d").is_dir()) {
        spec.dirs.push("etc/apt/apt.conf.d".into());
        spec.files.push(("etc/apt/apt.conf.d/00plyroot-single-id".into(), b"// Written by plyroot: only one id is mapped, so apt cannot switch to _apt.\nAPT::Sandbox::User \"root\";\n".to_vec()));
    }
}

/// What makes a shell's prompt name the environment: `/etc/debian_chroot`, which Debian's and
/// Ubuntu's `bash.bashrc` and default `~/.bashrc` show as `(NAME)`, and for the other shells a
/// `profile.d` script that login shells (`enter`, `login`) read through `/etc/profile`.
fn prompt_files(env_name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let profile = "# Written by plyroot: the prompt names the environment ($PLYROOT_ENV).\n\
        # bash on Debian shows it through /etc/debian_chroot already.\n\
        if [ -n \"${PLYROOT_ENV-}\" ] && [ -n \"${PS1-}\" ]; then\n\
        \x20   case \"$PS1\" in\n\
        \x20       *debian_chroot* | *\"($PLYROOT_ENV)\"*) ;;\n\
        \x20       *) PS1=\"($PLYROOT_ENV)$PS1\" ;;\n\
        \x20   esac\n\
        fi\n";
    vec![("etc/debian_chroot".into(), format!("{env_name}\n").into_bytes()), ("etc/profile.d/plyroot-prompt.sh".into(), profile.as_bytes().to_vec())]
}

/// Directories of `spec` (or on their way) that the layers (top first) have with another mode
/// than 0755 (`/var/tmp` is 1777): as the top lower, the skeleton's directory decides the merged
/// one's mode, so it takes the layers'. Not part of the spec: the layers of a generation do not
/// change, so this is worked out only when a skeleton is written, not at every launch.
fn layer_modes(spec: &Spec, lowers: &[PathBuf]) -> Vec<(PathBuf, u32)> {
    let mut modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut seen: Vec<&Path> = Vec::new();
    for d in spec.dirs.iter().map(PathBuf::as_path).chain(spec.files.iter().filter_map(|(f, _)| f.parent())) {
        for a in d.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if seen.contains(&a) {
                continue;
            }
            seen.push(a);
            if let Some(m) = top_entry(lowers, &a.to_string_lossy()).filter(|m| m.is_dir()) {
                let mode = std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777;
                if mode != 0o755 {
                    modes.push((a.to_owned(), mode));
                }
            }
        }
    }
    modes
}

/// Writes `spec` into the empty directory `root`, its directories with the modes `lowers` give
/// them.
pub(crate) fn materialize(spec: &Spec, lowers: &[PathBuf], root: &Path) -> Result<()> {
    let mk = |p: &Path| fs::DirBuilder::new().recursive(true).mode(0o755).create(root.join(p)).with_context(|| format!("cannot create {}", root.join(p).display()));
    mk(Path::new(""))?;
    for d in &spec.dirs {
        mk(d)?;
    }
    for (name, target) in &spec.links {
        std::os::unix::fs::symlink(target, root.join(name)).with_context(|| format!("cannot create the skeleton's /{}", name.display()))?;
    }
    for (f, content) in &spec.files {
        let p = root.join(f);
        let mode = if f == Path::new(SUDOERS) { 0o440 } else { 0o644 };
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&p).with_context(|| format!("cannot create {}", p.display()))?;
        std::io::Write::write_all(&mut file, content).with_context(|| format!("cannot write {}", p.display()))?;
    }
    // Last: a mode without write permission would stop the writes above.
    for (d, mode) in layer_modes(spec, lowers) {
        let p = root.join(d);
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).with_context(|| format!("cannot set the mode of {}", p.display()))?;
    }
    Ok(())
}

/// The skeleton's directory in the store for this generation and content, built on first use.
/// Fails on a read-only store (inside an environment); the caller then uses a tmpfs.
pub(crate) fn ensure(store: &Store, env: &Env, generation: u32, spec: &Spec, lowers: &[PathBuf]) -> Result<PathBuf> {
    let dir = env.dir.join("skel").join(format!("{generation}-{:016x}", spec.fingerprint()));
    if dir.is_dir() {
        return Ok(dir);
    }
    let st = store.staging()?;
    let root = st.path.join("skel");
    materialize(spec, lowers, &root)?;
    // Owned as on any system: root's, but the user's own directories (home, runtime dir), and
    // the skeleton's root, which the user must be able to move into place (`/` takes its owner
    // from the upper anyway).
    let mine: Vec<Vec<u8>> = spec.owned.iter().map(|p| p.as_os_str().as_encoded_bytes().to_vec()).chain([Vec::new()]).collect();
    let me = spec.owner;
    crate::store::owners::give_tree(&root, &|path| if mine.iter().any(|m| m == path) { me } else { (0, 0) })?;
    fs::create_dir_all(env.dir.join("skel")).with_context(|| format!("cannot create {}", env.dir.join("skel").display()))?;
    // A concurrent launch may have published the same skeleton first; either copy is right.
    if let Err(e) = fs::rename(&root, &dir) {
        if !dir.is_dir() {
            return Err(e).with_context(|| format!("cannot move {} to {}", root.display(), dir.display()));
        }
    }
    drop(st);
    Ok(dir)
}
