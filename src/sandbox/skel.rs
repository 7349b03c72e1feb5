//! The skeleton: a small generated directory that sits on top of an environment's layers as its
//! highest lower. It holds what a launch needs but no layer should be changed for: the user's
//! passwd/group entries, and the mount points for the host integration. It is built once per
//! generation and identity (then cached), so a launch creates nothing in the upper.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::identity::{passwd_with, shell_of, HostUser, Inside};
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

/// Returns the skeleton directory for this generation and identity (building it on first use)
/// and the shell the inside user gets.
/// `binds`: (destination, is a directory) of the run's binds; those the layers lack get their
/// mount point here, so binding creates nothing in the upper.
/// `links`: top-level symlinks to add where the layers have nothing (the host's `/bin → usr/bin`
/// and the like, for `base = "host"`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ensure(store: &Store, env: &Env, generation: u32, lowers: &[PathBuf], user: &HostUser, inside: &Inside, facts: &HostFacts, binds: &[(PathBuf, bool)], links: &[(String, PathBuf)]) -> Result<(PathBuf, String)> {
    let passwd_src = lowers.iter().map(|l| l.join("etc/passwd")).find(|p| p.is_file());
    let base_passwd = passwd_src.as_ref().and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default();
    let shell = shell_of(&base_passwd, inside.uid)
        .filter(|s| exists_in_layers(lowers, s))
        .or_else(|| std::env::var("SHELL").ok().filter(|s| s.starts_with('/') && exists_in_layers(lowers, s)))
        .or_else(|| ["/bin/bash", "/bin/sh"].iter().find(|s| exists_in_layers(lowers, s)).map(|s| s.to_string()))
        .unwrap_or_else(|| "/bin/sh".into());

    let mut dirs: Vec<PathBuf> = ["proc", "dev", "sys", "tmp", "run"].iter().map(PathBuf::from).collect();
    dirs.push(user.home.strip_prefix("/").unwrap_or(&user.home).to_owned());
    if let Some(rd) = &facts.runtime_dir {
        dirs.push(rd.strip_prefix("/").unwrap_or(rd).to_owned());
    }
    if facts.nix {
        dirs.push("nix".into());
    }
    let mut bind_files: Vec<PathBuf> = Vec::new();
    for (dst, is_dir) in binds {
        let rel = dst.strip_prefix("/").unwrap_or(dst).to_owned();
        if rel.as_os_str().is_empty() || exists_in_layers(lowers, &dst.to_string_lossy()) {
            continue;
        }
        if *is_dir {
            dirs.push(rel);
        } else {
            bind_files.push(rel);
        }
    }
    // File mount points: needed where the layers have no regular file there (absent, or a
    // symlink such as Debian's /etc/localtime, which must not be followed out of the root).
    let files: Vec<&str> = ["etc/resolv.conf", "etc/hosts", "etc/localtime"]
        .into_iter()
        .filter(|f| !top_entry(lowers, f).is_some_and(|m| m.file_type().is_file()))
        .collect();
    // With one id mapped, apt cannot drop to its `_apt` sandbox user (no other id exists): tell it
    // to stay root, the way apt's own docs advise for containers without id ranges.
    let single_id = matches!(inside.mapping, super::identity::Mapping::Single { .. });
    let apt_conf = single_id && lowers.iter().any(|l| l.join("etc/apt/apt.conf.d").is_dir());
    let links: Vec<&(String, PathBuf)> = links.iter().filter(|(n, _)| top_entry(lowers, n).is_none()).collect();
    let fingerprint = format!("{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{}|{}", dirs, files, bind_files, links, inside.uid, inside.gid, user, shell, apt_conf);
    let dir = env.dir.join("skel").join(format!("{generation}-{}-{:016x}", inside.uid, fnv(&fingerprint)));
    if dir.is_dir() {
        return Ok((dir, shell));
    }

    let st = store.staging()?;
    let root = st.path.join("skel");
    let mk = |p: &Path| fs::DirBuilder::new().recursive(true).mode(0o755).create(root.join(p)).with_context(|| format!("cannot create {}", root.join(p).display()));
    mk(Path::new(""))?;
    for d in &dirs {
        mk(d)?;
    }
    mk(Path::new("etc"))?;
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, root.join(name)).with_context(|| format!("cannot create the skeleton's /{name}"))?;
    }
    for f in &bind_files {
        if let Some(parent) = f.parent() {
            mk(parent)?;
        }
        fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).open(root.join(f)).with_context(|| format!("cannot create {}", root.join(f).display()))?;
    }
    for f in &files {
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(root.join(f)).with_context(|| format!("cannot create {}", root.join(f).display()))?;
    }
    if apt_conf {
        mk(Path::new("etc/apt/apt.conf.d"))?;
        fs::write(root.join("etc/apt/apt.conf.d/00plyroot-single-id"), "// Written by plyroot: only one id is mapped, so apt cannot switch to _apt.\nAPT::Sandbox::User \"root\";\n")
            .context("cannot write the skeleton's apt configuration")?;
    }
    let base_group = lowers.iter().map(|l| l.join("etc/group")).find(|p| p.is_file()).and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default();
    let (passwd, group) = passwd_with(&base_passwd, &base_group, user, inside, &shell);
    if passwd != base_passwd {
        fs::write(root.join("etc/passwd"), passwd).context("cannot write the skeleton's /etc/passwd")?;
    }
    if group != base_group {
        fs::write(root.join("etc/group"), group).context("cannot write the skeleton's /etc/group")?;
    }
    fs::create_dir_all(env.dir.join("skel")).with_context(|| format!("cannot create {}", env.dir.join("skel").display()))?;
    // A concurrent launch may have published the same skeleton first; either copy is right.
    let _ = fs::rename(&root, &dir);
    drop(st);
    Ok((dir, shell))
}
