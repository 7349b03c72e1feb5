//! Ownership true to the image (issue 12, items 1-6): with subordinate ids, a layer's files have
//! the owners its image gives them, inside and on disk (as subordinate ids); `sudo` works for you;
//! `--root` is uid 0 and what it writes to shared host paths is owned by the first subordinate
//! id, which `plyroot unshare` manages; a store of the previous version is migrated; and a store
//! can be removed completely. Without subordinate ids and as real root, nothing changes: these
//! tests say what each regime sees.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::*;

/// Removes each layer's mark of the owners it follows (a previous version wrote none).
fn forget_layer_marks(s: &Store) {
    for e in fs::read_dir(s.home.join("layers")).unwrap().flatten() {
        let _ = fs::remove_file(e.path().join("owners"));
    }
}

/// A Debian environment `deb` (systemd, sudo) in a fresh store.
fn debian() -> Result<Store, String> {
    userns()?;
    let tarball = debian_rootfs()?;
    let s = Store::new();
    s.create("deb", &[&format!("tar:{}", tarball.display())]);
    Ok(s)
}

#[test]
fn system_files_are_roots_and_writing_them_needs_root() {
    let s = need!(debian());
    let me = me();
    let o = s.run("deb", &[], &["stat", "-c", "%U:%G %a", "/usr/bin", "/usr/bin/sudo", "/etc/shadow", "/etc/sudoers"]).ok();
    // With one id mapped every file reads as root's (that id): the image's other owners are kept
    // in the layer's metadata only.
    let shadow = if me.regime == Regime::NoSubIds { "root:root 640" } else { "root:shadow 640" };
    assert_eq!(o.lines(), ["root:root 755", "root:root 4755", shadow, "root:root 440"], "{o}");
    let write = s.run("deb", &[], &["sh", "-c", "id -u; touch /usr/bin/mine"]);
    match me.regime {
        Regime::SubIds => {
            // Yourself inside, and /usr/bin is root's: EACCES, as on any system.
            assert_ne!(write.code, 0, "{write}");
            assert!(write.stdout.starts_with(&format!("{}\n", me.uid)), "{write}");
            assert!(write.stderr.contains("Permission denied"), "{write}");
            // The layer's files on disk belong to the subordinate ids the image's owners are.
            let bin = fs::read_dir(s.home.join("layers")).unwrap().flatten().map(|e| e.path().join("root/usr/bin")).find(|p| p.is_dir()).unwrap();
            assert_eq!(fs::metadata(&bin).unwrap().uid(), first_subids().0, "root's files are the first subordinate id's on disk");
        }
        // Root inside (you outside, or real root): writing /usr/bin is root's right.
        Regime::NoSubIds | Regime::Root => {
            assert_eq!(write.code, 0, "{write}");
            assert_eq!(write.line(), "0");
        }
    }
    // --root is uid 0 and may write there, in every regime.
    s.run("deb", &["--root"], &["sh", "-c", "touch /usr/bin/mine && rm /usr/bin/mine && id -u"]).ok();
    // The layer's id did not change: it comes from the image, whoever unpacked it.
    s.plyroot(&["verify"]).ok();
}

#[test]
fn sudo_works_for_you_without_a_password() {
    let s = need!(debian());
    if me().regime != Regime::SubIds {
        // Without subordinate ids you are root inside already (one id: sudo cannot switch).
        return;
    }
    let o = s.run("deb", &[], &["sh", "-c", "id -u; sudo -n id -u; sudo -n -u _apt id -un"]).ok();
    assert_eq!(o.lines(), [me().uid.to_string(), "0".into(), "_apt".into()], "{o}");
    // Nothing of sudo's is in a layer: the drop-in is the skeleton's, and the upper is empty.
    let diff = s.plyroot(&["diff", "deb"]).ok();
    assert!(diff.stdout.trim().is_empty(), "sudo changed the upper: {diff}");
    // apt as you says what apt says to a user who is not root, not a mapping error.
    let apt = s.run("deb", &[], &["apt-get", "install", "-y", "--no-download", "hello"]);
    assert!(apt.stderr.contains("are you root?"), "{apt}");
}

#[test]
fn what_root_writes_into_the_home_is_the_first_subordinate_ids_and_unshare_manages_it() {
    let s = need!(Store::with_busybox_env());
    let dir = s.path("shared");
    fs::create_dir(&dir).unwrap();
    let made = dir.join("byroot");
    s.run("t", &["--root"], &["sh", "-c", &format!("mkdir {0} && echo x > {0}/f", made.display())]).ok();
    let owner = fs::metadata(&made).unwrap().uid();
    match me().regime {
        Regime::SubIds => {
            assert_eq!(owner, first_subids().0, "--root writes as the first subordinate id");
            // Not yours to delete on the host…
            let rm = Command::new("rm").arg("-rf").arg(&made).output().unwrap();
            assert!(!rm.status.success() && made.join("f").exists(), "rm removed a file of another id");
            // …but `plyroot unshare` is root over it, with ids as they read inside.
            let o = s.plyroot(&["unshare", "--", "stat", "-c", "%u %U", made.to_str().unwrap()]).ok();
            assert_eq!(o.line(), "0 root", "{o}");
            s.plyroot(&["unshare", "--", "rm", "-rf", made.to_str().unwrap()]).ok();
            assert!(!made.exists());
        }
        _ => assert_eq!(owner, me().uid, "without subordinate ids root inside is you"),
    }
    // A command that does not exist: the shell's 127, named.
    let o = s.cmd(&["unshare", "--", "no-such-program-xyz"]).env("PATH", "/usr/bin:/bin").output().unwrap();
    assert_eq!(status_code(o.status), 127, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-program-xyz"));
}

#[test]
fn a_store_of_the_previous_version_is_migrated_once() {
    let s = need!(Store::with_busybox_env());
    if me().regime != Regime::SubIds {
        return;
    }
    let (sub_uid, _) = first_subids();
    let me = me();
    // A commit by `--root`: root's file, on disk the first subordinate id's.
    s.run("t", &["--root"], &["sh", "-c", "mkdir /opt/new && echo x > /opt/new/f && chown 42:42 /opt/new/f"]).ok();
    s.plyroot(&["commit", "t"]).ok();
    let ids_before = s.layer_ids();
    // What the previous version left: every file of an import the user's, a commit's root
    // files the user's (you stood for root), and no marker.
    let layers = s.home.join("layers");
    for e in fs::read_dir(&layers).unwrap().flatten() {
        let root = e.path().join("root");
        // chown clears setuid bits: each file's mode is put back, as the old layout had it.
        let script = format!("find {} -uid 0 -exec sh -c 'for f; do m=$(stat -c %a \"$f\"); chown -h {}:{} \"$f\"; [ -L \"$f\" ] || chmod \"$m\" \"$f\"; done' sh {{}} +", root.display(), me.uid, me.gid);
        s.plyroot(&["unshare", "--", "sh", "-c", &script]).ok();
    }
    fs::remove_file(s.home.join("owners")).unwrap();
    forget_layer_marks(&s);
    let bin = |name: &str| fs::read_dir(&layers).unwrap().flatten().map(|e| e.path().join("root").join(name)).find(|p| p.exists()).unwrap();
    assert_eq!(fs::symlink_metadata(bin("bin")).unwrap().uid(), me.uid, "the old layout, as the previous version left it");
    assert_eq!(fs::symlink_metadata(bin("opt/new/f")).unwrap().uid(), sub_uid + 42);
    // The next command migrates, says so once, and everything reads as before the upgrade.
    let o = s.run("t", &[], &["stat", "-c", "%U %u", "/bin", "/opt/new", "/opt/new/f"]).ok();
    assert!(o.stderr.contains("owners their images give them"), "{o}");
    assert_eq!(o.lines(), ["root 0", "root 0", "UNKNOWN 42"], "busybox names no user 42: {o}");
    assert_eq!(fs::symlink_metadata(bin("bin")).unwrap().uid(), sub_uid);
    assert_eq!(fs::symlink_metadata(bin("opt/new")).unwrap().uid(), sub_uid, "the commit's root files, root's again");
    assert_eq!(s.layer_ids(), ids_before);
    s.plyroot(&["verify"]).ok();
    let again = s.run("t", &[], &["true"]).ok();
    assert!(!again.stderr.contains("owners"), "migrated twice: {again}");
    // A commit of this version, with a file of yours; then the store's marker goes (as when the
    // ranges change): no layer is migrated a second time, no owner changes, no id breaks.
    s.run("t", &["--root"], &["sh", "-c", &format!("mkdir /opt/yours && chown {}:{} /opt/yours", me.uid, me.gid)]).ok();
    s.run("t", &[], &["sh", "-c", "echo mine > /opt/yours/f"]).ok();
    s.plyroot(&["commit", "t"]).ok();
    fs::remove_file(s.home.join("owners")).unwrap();
    let o = s.run("t", &[], &["stat", "-c", "%u", "/opt/yours/f", "/bin"]).ok();
    assert_eq!(o.lines(), [me.uid.to_string(), "0".into()], "{o}");
    assert!(!o.stderr.contains("giving"), "a layer was migrated again: {o}");
    s.plyroot(&["verify"]).ok();
}

#[test]
fn a_layer_deleted_by_hand_is_listed_and_gc_removes_the_rest() {
    let s = need!(Store::with_busybox_env());
    let extra = s.path("extra");
    fs::create_dir_all(extra.join("etc/x")).unwrap();
    fs::write(extra.join("etc/x/f"), "x\n").unwrap();
    let id = s.import(&format!("dir:{}", extra.display())).remove(0);
    let dir = s.home.join("layers").join(id.trim_start_matches("sha256:"));
    let _ = Command::new("rm").arg("-rf").arg(&dir).output().unwrap();
    if !dir.exists() {
        return; // all of it was the user's to delete (no subordinate ids, or root)
    }
    let o = s.plyroot(&["layers"]).ok();
    assert!(o.stderr.contains("deleted by hand") && o.stderr.contains("plyroot gc"), "{o}");
    s.plyroot(&["verify"]).ok();
    let o = s.plyroot(&["gc"]).ok();
    assert!(o.stderr.contains("what was left of layer"), "{o}");
    assert!(!dir.exists());
    s.run("t", &[], &["true"]).ok();
}

#[test]
fn a_store_of_another_user_is_refused() {
    need!(userns());
    if me().regime != Regime::Root {
        return;
    }
    let s = Store::new();
    fs::create_dir_all(&s.home).unwrap();
    std::os::unix::fs::chown(&s.home, Some(65534), Some(65534)).unwrap();
    s.plyroot(&["layers"]).plyroot_error(&["belongs to uid 65534", "one store per user"]);
    std::os::unix::fs::chown(&s.home, Some(0), Some(0)).unwrap();
}

#[test]
fn after_rm_and_gc_the_store_is_the_users_to_delete() {
    let s = need!(Store::with_busybox_env());
    s.run("t", &["--root"], &["sh", "-c", "mkdir -p /opt/x && echo x > /opt/x/f && { chown -R 42:42 /opt/x || true; } && chmod 700 /opt/x"]).ok();
    s.plyroot(&["commit", "t"]).ok();
    s.run("t", &["--root"], &["sh", "-c", "echo y > /opt/y && chmod 600 /opt/y"]).ok();
    s.plyroot(&["rm", "t"]).ok();
    s.plyroot(&["gc"]).ok();
    let o = Command::new("rm").arg("-rf").arg(&s.home).output().unwrap();
    assert!(o.status.success() && !s.home.exists(), "rm -rf of the store failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn an_environment_deleted_by_hand_can_be_removed_and_made_again() {
    let s = need!(Store::with_busybox_env());
    s.run("t", &["--root"], &["sh", "-c", "mkdir -p /opt/x && echo x > /opt/x/f && { chown -R 42:42 /opt/x || true; } && chmod 700 /opt/x"]).ok();
    let dir = s.home.join("envs/t");
    let _ = Command::new("rm").arg("-rf").arg(&dir).output().unwrap();
    if !dir.exists() {
        // Nothing of another id was left (no subordinate ids, or real root): nothing to test.
        assert!(s.plyroot(&["list"]).ok().stdout.lines().count() == 1);
        return;
    }
    assert!(!dir.join("current").exists(), "the hand deletion must have removed `current`");
    let list = s.plyroot(&["list"]).ok();
    assert!(list.stderr.contains("'t' is what is left") && list.stderr.contains("plyroot rm t"), "{list}");
    s.run("t", &[], &["true"]).plyroot_error(&["deleted by hand", "plyroot rm t"]);
    let root = s.path("t-rootfs");
    s.plyroot(&["create", "t", "--from", &format!("dir:{}", root.display())]).plyroot_error(&["plyroot rm t"]);
    let o = s.plyroot(&["rm", "t"]).ok();
    assert!(o.stderr.contains("removed what was left"), "{o}");
    assert!(!dir.exists());
    s.create("t", &[&format!("dir:{}", root.display())]);
    s.run("t", &[], &["true"]).ok();
}

#[test]
fn unshare_without_a_command_runs_the_shell() {
    need!(userns());
    let s = Store::new();
    let o = run_with(s.cmd(&["unshare"]).env("SHELL", "/bin/sh"), Some(b"id -u\n"), std::time::Duration::from_secs(60));
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.line(), "0", "root of the view (real root: root itself): {o}");
}

#[test]
fn a_migration_killed_midway_is_finished_by_the_next_command() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let s = need!(debian());
    let me = me();
    if me.regime != Regime::SubIds {
        return;
    }
    // The previous version's layout: every file of the import the user's (setuid bits kept).
    let root = fs::read_dir(s.home.join("layers")).unwrap().flatten().map(|e| e.path().join("root")).next().unwrap();
    let r = shell_quote(&root.to_string_lossy());
    let script = format!("find {r} -perm /6000 ! -type l -printf '%m %p\\n' > {r}.modes && chown -hR {}:{} {r} && while read m p; do chmod $m \"$p\"; done < {r}.modes && rm {r}.modes", me.uid, me.gid);
    as_owner(&["sh", "-c", &script]).ok();
    fs::remove_file(s.home.join("owners")).unwrap();
    forget_layer_marks(&s);
    // A command that migrates, killed with everything it started as soon as it says it migrates.
    let mut c = s.cmd(&["list"]);
    c.process_group(0).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 && !line.contains("owners their images give them") {
        line.clear();
    }
    assert!(line.contains("owners their images give them"), "no migration started: {line}");
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    assert!(!s.home.join("owners").exists(), "the kill landed after the migration finished: nothing was tested");
    let usr_bin = fs::symlink_metadata(root.join("usr/bin")).unwrap().uid();
    let sbin = fs::symlink_metadata(root.join("usr/sbin")).unwrap().uid();
    eprintln!("after the kill: /usr/bin {usr_bin}, /usr/sbin {sbin} on disk");
    // The next command finishes it: every owner as the image gives it, ids unchanged, once.
    let o = s.run("deb", &[], &["stat", "-c", "%U:%G %a", "/usr/bin", "/usr/bin/sudo", "/etc/shadow"]).ok();
    assert!(o.stderr.contains("owners their images give them"), "{o}");
    assert_eq!(o.lines(), ["root:root 755", "root:root 4755", "root:shadow 640"], "{o}");
    s.plyroot(&["verify"]).ok();
    assert!(s.home.join("owners").exists());
    s.run("deb", &[], &["sudo", "-n", "true"]).ok();
}

#[test]
fn an_owner_beyond_the_range_reads_as_nobody_and_its_setuid_is_ignored() {
    let s = need!(Store::with_busybox_env());
    if me().regime != Regime::SubIds {
        return;
    }
    let tar = need!(tool("tar"));
    // A setuid copy of busybox owned by uid 70000, past the 65536 subordinate ids.
    let far = s.path("far");
    fs::create_dir_all(far.join("opt/far")).unwrap();
    fs::copy(s.path("t-rootfs/bin/busybox"), far.join("opt/far/id")).unwrap();
    let archive = s.path("far.tar");
    let o = run_with(
        Command::new(tar).args(["--numeric-owner", "--owner=70000", "--group=70000", "--mode=u+s", "-cf"]).arg(&archive).arg("-C").arg(&far).arg("opt"),
        None,
        TIMEOUT,
    );
    assert_eq!(o.code, 0, "{o}");
    let root = s.path("t-rootfs");
    s.create("far", &[&format!("dir:{}", root.display()), &format!("tar:{}", archive.display())]);
    let o = s.run("far", &[], &["sh", "-c", "stat -c '%u %g %a' /opt/far/id; /opt/far/id -u; touch /opt/far/id 2>/dev/null && echo WROTE; true"]).ok();
    assert_eq!(o.lines(), ["65534 65534 4755".to_string(), me().uid.to_string()], "an owner no id of yours holds is nobody, not you: {o}");
    // The layer still says 70000 (its id, export).
    s.plyroot(&["verify"]).ok();
    let out = s.path("far-export.tar");
    s.plyroot(&["export", "far", "-o", out.to_str().unwrap()]).ok();
    let o = run_with(Command::new("tar").args(["--numeric-owner", "-tvf"]).arg(&out).arg("opt/far/id"), None, TIMEOUT);
    assert!(o.stdout.contains("70000/70000"), "{o}");
}

#[test]
fn dev_is_roots_and_not_yours_to_add_to() {
    let s = need!(Store::with_busybox_env());
    let o = s.run("t", &[], &["sh", "-c", "stat -c '%u %a' /dev /dev/shm; touch /dev/mine 2>/dev/null && echo WROTE; echo x > /dev/shm/ok && echo shm"]).ok();
    let wrote = if me().regime == Regime::SubIds { "" } else { "WROTE\n" };
    assert_eq!(o.stdout, format!("0 755\n0 1777\n{wrote}shm\n"), "{o}");
}
