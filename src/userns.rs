//! The invoking user as the host knows them, the ids they may map (`/etc/subuid`, `/etc/subgid`
//! and the setuid `newuidmap`/`newgidmap`), and entering a user namespace that maps them.
//!
//! Mechanism under two users: the sandbox builds each launch's namespaces on it
//! (`sandbox::namespaces`, `sandbox::identity`), and the store removes trees that runs wrote as
//! subordinate ids ([`crate::store::remove_tree_mapped`]) through [`enter_one_level`] in a forked
//! child. Everything here that enters a namespace must run while plyroot is single-threaded.

use std::cell::Cell;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::sys::ns::{self, IdRange};
use crate::sys::process;

/// The invoking user, as the host knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostUser {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
}

impl HostUser {
    pub(crate) fn current() -> HostUser {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let entry = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| passwd_entry(&p, uid));
        let name = std::env::var("USER").ok().filter(|u| !u.is_empty()).or_else(|| entry.as_ref().map(|e| e.0.clone())).unwrap_or_else(|| format!("u{uid}"));
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from).or_else(|| entry.map(|e| PathBuf::from(e.1))).unwrap_or_else(|| "/".into());
        HostUser { uid, gid, name, home }
    }
}

/// (name, home) of `uid` in a passwd file's text.
fn passwd_entry(text: &str, uid: u32) -> Option<(String, String)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| (f[0].to_owned(), f[5].to_owned()))
    })
}

/// Whether this process is in the initial user namespace (so euid 0 is real root, and
/// `/etc/subuid` speaks of host ids).
pub(crate) fn in_initial_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// The first range `/etc/subuid`-style text gives `name` or `uid`.
pub(crate) fn subid_range(text: &str, name: &str, uid: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse::<u32>().ok()?);
        ((who == name || who.parse() == Ok(uid)) && count > 0).then_some((start, count))
    })
}

/// How ids are mapped in a user namespace: a launch's base, or a helper's one level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Real root: no user namespace.
    Host,
    /// One id, written by ourselves (setgroups denied).
    Single { inside_uid: u32, inside_gid: u32, uid: u32, gid: u32 },
    /// Ranges written by newuidmap/newgidmap from outside.
    Ranges { uids: Vec<IdRange>, gids: Vec<IdRange> },
}

/// Subordinate ranges available to a user, when both files give one and the helpers exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SubIds {
    pub uid: (u32, u32),
    pub gid: (u32, u32),
}

pub(crate) fn host_subids(user: &HostUser) -> Option<SubIds> {
    let (subuid, subgid, helpers) = subid_sources();
    let uid = subid_range(subuid.as_deref()?, &user.name, user.uid)?;
    let gid = subid_range(subgid.as_deref()?, &user.name, user.uid)?;
    helpers.then_some(SubIds { uid, gid })
}

/// `/etc/subuid`, `/etc/subgid` and whether `newuidmap` and `newgidmap` are on the PATH, read
/// once per process: a launch asks for the user's ranges several times (the store's owners, the
/// identity, the keeper's), and each answer would read both files and search the PATH again.
fn subid_sources() -> &'static (Option<String>, Option<String>, bool) {
    static SOURCES: std::sync::OnceLock<(Option<String>, Option<String>, bool)> = std::sync::OnceLock::new();
    SOURCES.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        (read("/etc/subuid"), read("/etc/subgid"), find_in_path("newuidmap").is_some() && find_in_path("newgidmap").is_some())
    })
}

pub(crate) fn find_in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"));
    std::env::split_paths(&path).chain(["/usr/bin".into(), "/usr/sbin".into()]).map(|d| d.join(prog)).find(|p| p.is_file())
}

/// Maps inside ids `0..count` onto the subordinate range as `k → start + k`, except `me`
/// inside, which is `me_out`. The same `k → start + k` rule in every mode keeps files written
/// by, say, `_apt` (42) owned by the same host id whether the run used `--root` or not.
pub(crate) fn ranges_around(me: u32, me_out: u32, sub: (u32, u32)) -> Vec<IdRange> {
    let (start, count) = sub;
    let mut v = vec![IdRange { inside: me, outside: me_out, count: 1 }];
    if me > 0 {
        v.push(IdRange { inside: 0, outside: start, count: me.min(count) });
    }
    if count > me + 1 {
        v.push(IdRange { inside: me + 1, outside: start + me + 1, count: count - me - 1 });
    }
    v
}

/// The one-level mapping in which every id reads as it does inside an environment: with ranges
/// you are yourself and subordinate id k is k (root is the first subordinate id), exactly the
/// map a run's nested identity has, composed with its base; with one id, you are 0. The store's
/// owners on disk follow it (`store::owners`), and the helpers that read or change what is in
/// layers and uppers (digests, export, push, `plyroot unshare`) run in it. The process that
/// enters it stays yourself there, holding every capability over those ids.
pub(crate) fn image_view(user: &HostUser, subids: Option<SubIds>) -> Mapping {
    // Plus, past the image's ids, the one subordinate id the map leaves out (the one of your own
    // number), which owns what an image gives to ids past the range (`store::owners`): the
    // helpers can read and remove it; runs cannot see it (nobody).
    let with_hole = |me: u32, (start, count): (u32, u32)| {
        let mut v = ranges_around(me, me, (start, count));
        if me < count {
            v.push(IdRange { inside: count, outside: start + me, count: 1 });
        }
        v
    };
    match subids {
        Some(s) => Mapping::Ranges { uids: with_hole(user.uid, s.uid), gids: with_hole(user.gid, s.gid) },
        None => Mapping::Single { inside_uid: 0, inside_gid: 0, uid: user.uid, gid: user.gid },
    }
}

/// A mapping in which every id runs may have written is mapped (you, and the whole subordinate
/// range): for removing trees, where the view of owners does not matter. It is the base of every
/// launch (`sandbox::identity::choose`): you are 0, subordinate id k is k + 1.
pub(crate) fn all_ids(user: &HostUser, subids: Option<SubIds>) -> Mapping {
    match subids {
        Some(s) => {
            let base = |me_out: u32, (start, count): (u32, u32)| vec![IdRange { inside: 0, outside: me_out, count: 1 }, IdRange { inside: 1, outside: start, count }];
            Mapping::Ranges { uids: base(user.uid, s.uid), gids: base(user.gid, s.gid) }
        }
        None => Mapping::Single { inside_uid: 0, inside_gid: 0, uid: user.uid, gid: user.gid },
    }
}

/// A helper process that writes id maps for us: newuidmap/newgidmap for the base (they are
/// setuid, so they must run outside it), then the nested identity's maps from inside the base.
pub(crate) struct Mapper {
    pid: i32,
    go: fs::File,
    done: fs::File,
}

impl Mapper {
    /// Forks the helper. `base`: ranges for newuidmap/newgidmap (a fresh base); `nested`: the
    /// identity's maps, written once the caller has unshared its nested namespace.
    pub(crate) fn start(base: Option<(Vec<IdRange>, Vec<IdRange>)>, nested: Option<(Vec<IdRange>, Vec<IdRange>)>) -> Result<Mapper> {
        let parent = rustix::process::getpid().as_raw_nonzero().get();
        let (go_rd, go_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
        let (done_rd, done_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("cannot create a pipe")?;
        // The parent's ends, dropped in the child; the child's, dropped in the parent.
        let (go_wr, done_rd) = (Cell::new(Some(go_wr)), Cell::new(Some(done_rd)));
        let (theirs_go, theirs_done) = (&go_wr, &done_rd);
        let pid = process::spawn(move || {
            drop((theirs_go.take(), theirs_done.take()));
            let (mut go, mut done) = (fs::File::from(go_rd), fs::File::from(done_wr));
            let mut step = |f: &mut dyn FnMut() -> Result<()>| -> Result<bool> {
                let mut b = [0u8; 1];
                if go.read(&mut b)? != 1 {
                    return Ok(false); // the launch gave up
                }
                f()?;
                done.write_all(b"1")?;
                Ok(true)
            };
            if let Some((uids, gids)) = &base {
                let mapped = step(&mut || {
                    ns::map_ranges(parent, uids, gids)?;
                    // Into the base, where the nested maps are written from.
                    ns::enter(&ns::open_ns(parent, "user")?, LinkNameSpaceType::User)?;
                    Ok(())
                })?;
                if !mapped {
                    return Ok(1);
                }
            }
            if let Some((uids, gids)) = &nested {
                step(&mut || Ok(ns::write_maps(parent, uids, gids)?))?;
            }
            Ok(0)
        })?;
        let (go, done) = (go_wr.take().context("lost a pipe")?, done_rd.take().context("lost a pipe")?);
        Ok(Mapper { pid, go: fs::File::from(go), done: fs::File::from(done) })
    }

    /// Lets the helper do its next step and waits until it has.
    pub(crate) fn step(&mut self, what: &str) -> Result<()> {
        let mut b = [0u8; 1];
        let ok = self.go.write_all(b"1").is_ok() && self.done.read(&mut b).map(|n| n == 1).unwrap_or(false);
        if !ok {
            let status = process::waitpid(self.pid).map(process::status_code).unwrap_or(-1);
            bail!("{what} failed (the id-mapping helper ended with status {status}; see the message above; `plyroot doctor` checks subordinate ids)");
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<()> {
        drop(self.go);
        process::waitpid(self.pid)?;
        Ok(())
    }
}

/// `unshare(2)`, with what to do about it when user namespaces are not allowed.
pub(crate) fn unshare(flags: UnshareFlags) -> Result<()> {
    ns::unshare_flags(flags).map_err(|e| {
        let denied = matches!(e.source.raw_os_error(), Some(libc::EPERM | libc::ENOSPC | libc::EACCES)) && flags.contains(UnshareFlags::NEWUSER);
        let e = anyhow::Error::new(e);
        if denied {
            e.context("this system does not let you create user namespaces (disabled by sysctl, limited by max_user_namespaces, or restricted by AppArmor); `plyroot doctor` says which and how to allow it")
        } else {
            e
        }
    })
}

/// A mount namespace, plus a user namespace (`user`), a pid namespace (`pid`) and UTS and IPC
/// namespaces (`machine`).
pub(crate) fn flags(user: bool, pid: bool, machine: bool) -> UnshareFlags {
    let mut f = UnshareFlags::NEWNS;
    if user {
        f |= UnshareFlags::NEWUSER;
    }
    if pid {
        f |= UnshareFlags::NEWPID;
    }
    if machine {
        f |= UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    }
    f
}

/// One user namespace with `mapping` and a mount namespace (for helpers that read or remove
/// what runs wrote; not for launches).
pub(crate) fn enter_one_level(mapping: &Mapping) -> Result<()> {
    match mapping {
        Mapping::Host => unshare(flags(false, false, false))?,
        Mapping::Single { inside_uid, inside_gid, uid, gid } => {
            unshare(flags(true, false, false))?;
            ns::map_single(*inside_uid, *uid, *inside_gid, *gid)?;
        }
        Mapping::Ranges { uids, gids } => {
            let mut m = Mapper::start(Some((uids.clone(), gids.clone())), None)?;
            unshare(flags(true, false, false))?;
            m.step("mapping the subordinate ids from /etc/subuid and /etc/subgid with newuidmap/newgidmap")?;
            m.finish()?;
            ns::clear_groups()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_lines_match_by_name_or_uid() {
        let t = "bob:100000:65536\nalice:165536:65536\n";
        assert_eq!(subid_range(t, "alice", 1000), Some((165536, 65536)));
        assert_eq!(subid_range("1000:300000:10\n", "alice", 1000), Some((300000, 10)));
        assert_eq!(subid_range("carol:1:5\n", "alice", 1000), None);
        assert_eq!(subid_range("alice:1:0\n", "alice", 1000), None);
    }

    #[test]
    fn all_ids_is_the_base_of_every_launch() {
        let alice = HostUser { uid: 1000, gid: 1000, name: "alice".into(), home: "/home/alice".into() };
        for subids in [None, Some(SubIds { uid: (165536, 65536), gid: (231072, 65536) })] {
            assert_eq!(all_ids(&alice, subids), crate::sandbox::identity::choose(&alice, false, subids, true).mapping);
        }
    }
}
