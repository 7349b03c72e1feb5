//! Tier 3: launchers (issue 4) — exported host commands that run a program of an environment, and
//! compose with the environment they are started in, to any depth.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A store with a busybox base layer and environments `e1..=n`, each adding /opt/lvl/fN, with a
/// launcher for `sh` of each in `bin/eN/sh`.
fn levels(n: usize) -> Result<(Store, PathBuf), String> {
    userns()?;
    let s = Store::new();
    let root = s.path("base-rootfs");
    busybox_rootfs(&root)?;
    let base = s.import(&format!("dir:{}", root.display())).remove(0);
    for i in 1..=n {
        let d = s.path(&format!("lvl{i}"));
        fs::create_dir_all(d.join("opt/lvl")).unwrap();
        fs::write(d.join(format!("opt/lvl/f{i}")), format!("level {i}\n")).unwrap();
        s.create(&format!("e{i}"), &[&format!("layer:{base}"), &format!("dir:{}", d.display())]);
        let to = s.path(&format!("bin/e{i}"));
        s.plyroot(&["export", &format!("e{i}"), "sh", "--to", to.to_str().unwrap()]).ok();
    }
    let bin = s.path("bin");
    Ok((s, bin))
}

fn launcher(bin: &Path, env: usize) -> Command {
    let mut c = Command::new(bin.join(format!("e{env}/sh")));
    c.env_remove("PLYROOT_HOME");
    c
}

#[test]
fn a_launcher_passes_arguments_stdin_exit_status_and_cwd_through() {
    let (s, bin) = need!(levels(1));
    let mut c = launcher(&bin, 1);
    c.current_dir(s.path("")).args(["-c", "printf '%s|' \"$@\"; cat; pwd; ls /opt/lvl; exit 3", "zero", "a b", "c\"d", "e'f", ""]);
    let o = run_with(&mut c, Some(b"from stdin\n"), Duration::from_secs(60)).code(3);
    let cwd = fs::canonicalize(s.path("")).unwrap();
    assert_eq!(o.stdout, format!("a b|c\"d|e'f||from stdin\n{}\nf1\n", cwd.display()), "{o}");
    // It is not a script: the host command is a link into the store, ending at plyroot itself.
    let link = fs::read_link(bin.join("e1/sh")).unwrap();
    assert!(link.starts_with(&s.home), "{}", link.display());
}

#[test]
fn a_signal_sent_to_a_launcher_reaches_the_program() {
    let (_s, bin) = need!(levels(1));
    let mut c = launcher(&bin, 1);
    c.args(["-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line, "ready\n");
    // SAFETY-free: kill(1) the launcher's pid, which is the program's (plyroot execs it).
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(status_code(st), 42);
}

#[test]
fn launchers_compose_with_the_environment_they_start_in_to_depth_8() {
    let (s, bin) = need!(levels(8));
    let script = s.path("chain.sh");
    // Level n runs launcher e<n>, which runs this script for n+1, until max; the innermost lists
    // what it sees.
    fs::write(
        &script,
        format!(
            "n=$1; max=$2\nif [ \"$n\" -gt \"$max\" ]; then ls /opt/lvl | tr '\\n' ' '; echo \"$PLYROOT_ENV\"; exit 0; fi\nexec {}/e$n/sh {} $((n+1)) $max\n",
            bin.display(),
            script.display()
        ),
    )
    .unwrap();
    for depth in [1usize, 2, 4, 8] {
        let o = run_with(Command::new("sh").arg(&script).arg("1").arg(depth.to_string()), None, Duration::from_secs(120)).ok();
        let want: String = (1..=depth).map(|i| format!("f{i} ")).collect();
        assert_eq!(o.stdout, format!("{want}e{depth}\n"), "depth {depth}: {o}");
    }
    // Writes of a composed program to the root never reach an environment's upper (a composed
    // launch maps only you: a directory of the image's, root's, cannot even be copied up, EOVERFLOW,
    // and where it could, the write is thrown away); the shared /tmp keeps its own.
    let mut c = launcher(&bin, 1);
    c.args(["-c", &format!("{}/e2/sh -c 'echo x > /opt/lvl/new 2>/dev/null; echo y > {}/kept'", bin.display(), s.path("").display())]);
    run_with(&mut c, None, Duration::from_secs(60)).ok();
    assert!(s.path("kept").exists());
    s.run("e1", &[], &["test", "!", "-e", "/opt/lvl/new"]).ok();
    s.run("e2", &[], &["test", "!", "-e", "/opt/lvl/new"]).ok();
}

#[test]
fn which_and_conflicts_name_the_layer_that_wins() {
    need!(userns());
    let s = Store::new();
    let root = s.path("root");
    need!(busybox_rootfs(&root));
    let over = s.path("over");
    fs::create_dir_all(over.join("bin")).unwrap();
    fs::write(over.join("bin/ls"), "#!/bin/sh\necho mine\n").unwrap();
    s.create("ov", &[&format!("dir:{}", root.display()), &format!("dir:{}", over.display())]);
    let w = s.plyroot(&["which", "ov", "/bin/ls"]).ok();
    assert!(w.stdout.contains("dir:") && w.stdout.contains(&over.display().to_string()) && w.stdout.contains("shadows"), "{w}");
    let w = s.plyroot(&["which", "ov", "/bin/cat"]).ok();
    assert!(w.stdout.contains(&root.display().to_string()) && !w.stdout.contains("shadows"), "{w}");
    s.plyroot(&["which", "ov", "/nope"]).plyroot_error(&["/nope"]);
    let c = s.plyroot(&["conflicts", "ov", "--json"]).ok().json();
    let paths: Vec<&str> = c.as_array().unwrap().iter().map(|x| x["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/bin/ls"]);
}

#[test]
fn exports_unexport_and_removing_an_environment_remove_launchers() {
    let (s, bin) = need!(levels(2));
    let list = s.plyroot(&["exports", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    s.plyroot(&["unexport", "sh", "--env", "e1"]).ok();
    assert!(!bin.join("e1/sh").exists());
    s.plyroot(&["rm", "e2"]).ok();
    assert!(fs::symlink_metadata(bin.join("e2/sh")).is_err(), "rm left the launcher behind");
    assert_eq!(s.plyroot(&["exports", "--json"]).ok().json().as_array().unwrap().len(), 0);
    // Refuses to replace a host file that is not a launcher.
    fs::write(s.path("bin/e1/sh"), "mine").unwrap();
    s.plyroot(&["export", "e1", "sh", "--to", s.path("bin/e1").to_str().unwrap()]).plyroot_error(&["not a plyroot launcher"]);
}

#[test]
fn a_launcher_whose_environment_is_gone_says_how_to_fix_it() {
    let (s, bin) = need!(levels(1));
    fs::remove_dir_all(s.home.join("envs/e1")).unwrap();
    let o = run_with(launcher(&bin, 1).arg("-c").arg("true"), None, Duration::from_secs(30)).code(125);
    assert!(o.stderr.contains("e1") && o.stderr.contains("unexport"), "{o}");
}

#[test]
fn base_host_puts_the_host_root_under_the_layers() {
    need!(userns());
    // Each top-level host directory is unioned under the layers' own (one overlay each): host
    // programs show where the layers have nothing, the layers win where they do, and the host
    // is never written.
    let s = Store::new();
    let extra = s.path("extra");
    fs::create_dir_all(extra.join("opt")).unwrap();
    fs::create_dir_all(extra.join("usr/share/plyroot-test")).unwrap();
    fs::write(extra.join("opt/mine"), "env\n").unwrap();
    fs::write(extra.join("usr/share/plyroot-test/f"), "layer\n").unwrap();
    s.plyroot(&["create", "hb", "--base", "host", "--from", &format!("dir:{}", extra.display())]).ok();
    let o = s.run("hb", &[], &["sh", "-c", "cat /opt/mine /usr/share/plyroot-test/f; test -x /usr/bin/env && echo host; test -d /proc/self && echo proc"]).ok();
    assert_eq!(o.stdout, "env\nlayer\nhost\nproc\n", "{o}");
    // Writes into a directory the layers provide land in the upper, not on the host.
    s.run("hb", &["--root"], &["sh", "-c", "echo w > /usr/share/plyroot-test/new"]).ok();
    assert!(!Path::new("/usr/share/plyroot-test").exists(), "the host was written");
    assert_eq!(s.run("hb", &[], &["cat", "/usr/share/plyroot-test/new"]).ok().stdout, "w\n");
    let d = s.plyroot(&["diff", "hb", "/usr/share"]).ok();
    assert!(d.stdout.contains("A /usr/share/plyroot-test/new"), "{d}");
}

#[test]
fn exporting_several_launchers_installs_none_when_one_is_refused() {
    let s = Store::new();
    need!(s.busybox_env("t"));
    let bin = s.path("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(bin.join("ls"), "mine").unwrap();
    let to = bin.to_string_lossy().to_string();
    // `sh` could be installed, `ls` not: neither is.
    s.plyroot(&["export", "t", "sh", "ls", "--to", &to]).plyroot_error(&[&bin.join("ls").to_string_lossy(), "not a plyroot launcher"]);
    // Two programs that would be one launcher.
    s.plyroot(&["export", "t", "cat", "/bin/sh", "/usr/bin/sh", "--to", &to]).plyroot_error(&["/bin/sh", "/usr/bin/sh", "'sh'"]);
    // A launcher of another environment in the way.
    s.plyroot(&["create", "u", "--from", "env:t"]).ok();
    s.plyroot(&["export", "u", "tail", "--to", &to]).ok();
    s.plyroot(&["export", "t", "head", "tail", "--to", &to]).plyroot_error(&["tail", "'u'", "unexport"]);
    let mut names: Vec<String> = fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["ls", "tail"], "a refused export installed launchers");
    assert_eq!(fs::read_to_string(bin.join("ls")).unwrap(), "mine");
    let receipts = s.plyroot(&["exports", "--json"]).ok().json();
    assert_eq!(receipts.as_array().unwrap().len(), 1, "{receipts}");
    // Nothing in the way: all are installed.
    s.plyroot(&["export", "t", "sh", "cat", "--to", &to]).ok();
    assert_eq!(s.plyroot(&["exports", "--json"]).ok().json().as_array().unwrap().len(), 3);
}

#[test]
fn a_program_the_environment_lacks_is_not_exported() {
    let s = need!(Store::with_busybox_env());
    let bin = s.path("bin");
    let bin_s = bin.to_string_lossy().into_owned();
    // A name on the environment's PATH, and a path inside through a symlinked directory, work.
    s.plyroot(&["export", "t", "cat", "--to", &bin_s]).ok();
    // Neither a missing name nor a missing path installs a launcher, nor does the missing one
    // among others.
    s.plyroot(&["export", "t", "no-such-program", "--to", &bin_s]).plyroot_error(&["no-such-program", "not in environment 't'"]);
    s.plyroot(&["export", "t", "/opt/none/prog", "--to", &bin_s]).plyroot_error(&["/opt/none/prog"]);
    s.plyroot(&["export", "t", "true", "no-such-program", "--to", &bin_s]).plyroot_error(&["no-such-program"]);
    assert!(!bin.join("true").exists() && !bin.join("no-such-program").exists(), "a launcher was installed");
    // What a run put in the upper counts.
    s.sh("t", "mkdir -p /opt/mine && printf '#!/bin/sh\\necho mine\\n' > /opt/mine/tool && chmod +x /opt/mine/tool").ok();
    s.plyroot(&["export", "t", "/opt/mine/tool", "--to", &bin_s]).ok();
    let out = run_with(std::process::Command::new(bin.join("tool")).env("PLYROOT_HOME", &s.home), None, TIMEOUT);
    assert_eq!(out.ok().stdout, "mine\n");
}
