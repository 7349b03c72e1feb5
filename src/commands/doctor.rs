//! doctor: what this kernel and user allow, probed for real, and how to fix what they don't.

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{out, out_json};
use crate::sandbox::identity::choose;
use crate::store::Store;
use crate::sys::{mount, ns, process};
use crate::userns::{find_in_path, host_subids, subid_range, HostUser, Mapping};

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Essential checks fail plyroot's main job; the others turn off a feature.
    essential: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn read_num(p: &str) -> Option<i64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Probes in a forked child (namespaces cannot be undone), which returns what it found.
fn probe(store: &Store, pid_ns: bool) -> Vec<(String, bool, String)> {
    let user = HostUser::current();
    let inside = choose(&user, rustix::process::geteuid().is_root(), None, true);
    let Ok(st) = store.staging() else { return vec![("store".into(), false, "cannot create a staging dir".into())] };
    for d in ["l1", "l2", "up", "wk", "mnt"] {
        let _ = fs::create_dir(st.path.join(d));
    }
    let p = st.path.clone();
    let found = process::in_child(move || {
        let mut out = Vec::new();
        let mut say = |name: &str, r: std::result::Result<(), String>| out.push((name.to_owned(), r.is_ok(), r.err().unwrap_or_default().replace('\n', " ")));
        let userns = if inside.mapping == Mapping::Host {
            ns::unshare(false, pid_ns).map_err(|e| e.to_string())
        } else {
            ns::unshare(true, pid_ns).and_then(|_| ns::map_single(0, user.uid, 0, user.gid)).map_err(|e| e.to_string())
        };
        say(if pid_ns { "pid namespace" } else { "user namespace" }, userns.clone());
        if userns.is_err() {
            return Ok(out);
        }
        if pid_ns {
            // The first child is PID 1 of the new namespace and may mount a fresh procfs.
            let r = process::in_child(|| {
                mount::make_private_recursive()?;
                mount::pseudo("proc", &[], rustix::mount::MountAttrFlags::empty())?;
                Ok(())
            });
            say("fresh /proc", r.map_err(|e| format!("{e:#}")));
            return Ok(out);
        }
        let _ = mount::make_private_recursive();
        let wh = rustix::fs::mknodat(rustix::fs::CWD, p.join("l2/wh"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0);
        say("whiteout mknod", wh.map_err(|e| format!("mknod char 0:0: {e}")));
        let ov = mount::overlay(&[p.join("l2"), p.join("l1")], Some((&p.join("up"), &p.join("wk"))), false)
            .and_then(|m| mount::attach_at(m.as_fd(), &p.join("mnt")))
            .map_err(|e| e.to_string());
        say("overlayfs (userxattr, lowerdir+)", ov);
        // Distinct directories: overlayfs refuses the same lower twice (ELOOP).
        let many: Vec<_> = (0..200).map(|i| p.join(format!("many/{i}"))).collect();
        let made = many.iter().try_for_each(fs::create_dir_all).map_err(|e| e.to_string());
        say("overlay with 200 lowers", made.and_then(|_| mount::overlay(&many, None, false).map(drop).map_err(|e| e.to_string())));
        Ok(out)
    });
    drop(st);
    found.unwrap_or_else(|e| vec![("probe".into(), false, format!("{e:#}"))])
}

pub(crate) fn doctor(store: &Store, json: bool) -> Result<i32> {
    let mut checks = Vec::new();
    let uname = rustix::system::uname();
    checks.push(Check { name: "kernel", ok: true, essential: false, detail: uname.release().to_string_lossy().into_owned(), fix: None });
    let real_root = rustix::process::geteuid().is_root();
    if !real_root {
        if read_num("/proc/sys/user/max_user_namespaces") == Some(0) {
            checks.push(Check { name: "user namespaces allowed", ok: false, essential: true, detail: "user.max_user_namespaces is 0".into(), fix: Some("sudo sysctl -w user.max_user_namespaces=15000".into()) });
        }
        if read_num("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
            checks.push(Check { name: "user namespaces allowed", ok: false, essential: true, detail: "kernel.unprivileged_userns_clone is 0".into(), fix: Some("sudo sysctl -w kernel.unprivileged_userns_clone=1".into()) });
        }
        if read_num("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
            checks.push(Check { name: "AppArmor user namespace restriction", ok: false, essential: true, detail: "kernel.apparmor_restrict_unprivileged_userns is 1".into(), fix: Some("add an AppArmor profile granting `userns,` to the plyroot binary, or sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0".into()) });
        }
    }
    for (name, ok, detail) in probe(store, false).into_iter().chain(probe(store, true)) {
        let essential = !name.contains("pid") && !name.contains("proc") && !name.contains("200");
        let fix = (!ok).then(|| match name.as_str() {
            "user namespace" => "enable unprivileged user namespaces (see the checks above), or run plyroot as root".to_owned(),
            "whiteout mknod" => "a kernel ≥ 5.8 allows unprivileged whiteouts; the store's filesystem must support device nodes (not nodev)".to_owned(),
            n if n.starts_with("overlayfs") => format!("overlayfs in user namespaces needs kernel ≥ 5.11 and `lowerdir+` ≥ 6.8; the store ({}) must be on a filesystem overlayfs accepts as upper (ext4, xfs, btrfs, tmpfs)", store.root.display()),
            n if n.contains("200") => "environments with many layers need `lowerdir+` (kernel ≥ 6.8)".to_owned(),
            _ => "`--pid` is unavailable here; other commands work".to_owned(),
        });
        let name: &'static str = Box::leak(name.into_boxed_str());
        checks.push(Check { name, ok, essential, detail, fix });
    }
    let probe_file = store.root.join("lock");
    let xattr = rustix::fs::setxattr(&probe_file, "user.plyroot.probe", b"1", rustix::fs::XattrFlags::empty());
    let _ = rustix::fs::removexattr(&probe_file, "user.plyroot.probe");
    checks.push(Check {
        name: "user xattrs on the store",
        ok: xattr.is_ok(),
        essential: true,
        detail: match &xattr { Ok(()) => store.root.display().to_string(), Err(e) => format!("{}: {e}", store.root.display()) },
        fix: xattr.is_err().then(|| "put the store on a filesystem with user xattrs (ext4, xfs, btrfs, tmpfs ≥ 6.6): --store DIR or PLYROOT_HOME".into()),
    });
    if !real_root {
        let user = HostUser::current();
        let sub = |f: &str| fs::read_to_string(f).ok().and_then(|t| subid_range(&t, &user.name, user.uid));
        let (su, sg) = (sub("/etc/subuid"), sub("/etc/subgid"));
        let helpers = [find_in_path("newuidmap"), find_in_path("newgidmap")];
        let helpers_ok = helpers.iter().all(|h| h.as_ref().is_some_and(|p| is_privileged_helper(p)));
        let ok = su.is_some() && sg.is_some() && helpers_ok && host_subids(&user).is_some();
        let detail = match (su, sg) {
            (Some(u), Some(g)) => format!("uids {}+{}, gids {}+{}; newuidmap/newgidmap {}", u.0, u.1, g.0, g.1, if helpers_ok { "present" } else { "missing or not setuid" }),
            _ => format!("no range for {} in /etc/subuid and /etc/subgid: you will be root inside (one id mapped)", user.name),
        };
        let fix = (!ok).then(|| {
            if helpers_ok {
                let (start, end) = free_range();
                format!("sudo usermod --add-subuids {start}-{end} --add-subgids {start}-{end} {}", user.name)
            } else {
                "install the uidmap package (newuidmap/newgidmap), e.g. sudo apt-get install uidmap".into()
            }
        });
        checks.push(Check { name: "subordinate ids (be yourself inside)", ok, essential: false, detail, fix });
    }
    let failed = checks.iter().any(|c| c.essential && !c.ok);
    if json {
        out_json(&checks)?;
    } else {
        let mut s = String::new();
        for c in &checks {
            let mark = if c.ok { "ok  " } else if c.essential { "FAIL" } else { "warn" };
            s.push_str(&format!("{mark}  {:<38} {}\n", c.name, c.detail));
            if let Some(f) = &c.fix {
                s.push_str(&format!("      fix: {f}\n"));
            }
        }
        s.push_str(if failed { "plyroot cannot run environments here until the FAIL lines are fixed.\n" } else { "plyroot can run environments here.\n" });
        out(&s)?;
    }
    Ok(if failed { 1 } else { 0 })
}

/// A 65536-id range past every range /etc/subuid and /etc/subgid already give out.
pub(crate) fn free_range() -> (u64, u64) {
    let past = |f: &str| {
        fs::read_to_string(f).unwrap_or_default().lines().filter_map(|l| {
            let mut p = l.split(':').skip(1);
            Some(p.next()?.parse::<u64>().ok()? + p.next()?.parse::<u64>().ok()?)
        }).max().unwrap_or(0)
    };
    let start = past("/etc/subuid").max(past("/etc/subgid")).max(100_000);
    (start, start + 65535)
}

fn is_privileged_helper(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let setuid = fs::metadata(p).map(|m| m.permissions().mode() & 0o4000 != 0).unwrap_or(false);
    let mut xattrs = Vec::new();
    setuid || (crate::sys::xattr::read_all(crate::sys::xattr::Target::Path(p), &mut xattrs).is_ok() && xattrs.iter().any(|(k, _)| k == b"security.capability"))
}
