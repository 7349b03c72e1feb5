//! Tier 3: you inside, as on your own machine (issue 12, items 7–10): your terminal has its
//! name, the program starts in your directory (or plyroot refuses, naming it), launchers of
//! other environments are found by name, and the prompt and completions name environments.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `script -qec CMD /dev/null` (util-linux): CMD on a fresh pty of the host, with `stdin` fed to it.
fn on_a_terminal(s: &Store, cmd: &str, stdin: &[u8]) -> Result<Out, String> {
    let script = tool("script")?;
    let mut c = Command::new(script);
    c.args(["-qec", cmd, "/dev/null"]).env("PLYROOT_HOME", &s.home).current_dir(s.path(""));
    Ok(run_with(&mut c, Some(stdin), Duration::from_secs(60)))
}

#[test]
fn the_callers_terminal_has_its_name_inside() {
    let s = need!(Store::with_busybox_env());
    let p = shell_quote(&bin().to_string_lossy());
    // The same name as on the host: stat of /proc/self/fd/0's name is the terminal.
    let o = need!(on_a_terminal(&s, &format!("tty; {p} run t -- sh -c 'tty; test -t 0 && echo is-a-tty'"), b"")).ok();
    // stderr shares the terminal: plyroot's notes (the one-id note) are not the program's.
    let lines: Vec<&str> = o.stdout.lines().map(str::trim).filter(|l| !l.starts_with("plyroot: ")).collect();
    assert!(lines.len() >= 3 && lines[0].starts_with("/dev/pts/"), "{o}");
    assert_eq!(&lines[1..3], &[lines[0], "is-a-tty"], "the name inside is not the host's: {o}");
    // A login shell of `enter`; new ptys still come from the environment's own devpts.
    let o = need!(on_a_terminal(&s, &format!("{p} enter t"), b"tty; exec 3<>/dev/ptmx && echo new-pty; exit\n")).ok();
    assert!(o.stdout.contains(lines[0]) && o.stdout.contains("new-pty"), "{o}");
    // Without a terminal nothing changes.
    assert_eq!(s.run("t", &[], &["sh", "-c", "tty || true"]).ok().line(), "not a tty");
}

/// A directory no share shows inside (not under /tmp or the home): under /var/tmp.
fn unshared_dir() -> Result<tempfile::TempDir, String> {
    let home = me().home;
    let d = tempfile::Builder::new().prefix("plyroot-cwd.").tempdir_in("/var/tmp").map_err(|e| format!("cannot make a directory in /var/tmp: {e}"))?;
    if d.path().starts_with(&home) {
        return Err("the home is above /var/tmp".into());
    }
    Ok(d)
}

#[test]
fn the_program_starts_in_the_callers_directory_or_plyroot_refuses_naming_it() {
    let s = need!(Store::with_busybox_env());
    let dir = need!(unshared_dir());
    let d = dir.path().to_string_lossy().into_owned();
    fs::write(dir.path().join("hello.c"), "int main(){}\n").unwrap();
    let mut c = s.cmd(&["run", "t", "--", "sh", "-c", "pwd; cat hello.c; echo made > out; stat -c %a /var/tmp"]);
    c.current_dir(dir.path());
    let o = run_with(&mut c, None, TIMEOUT).ok();
    assert_eq!(o.stdout, format!("{d}\nint main(){{}}\n1777\n"), "{o}");
    assert_eq!(fs::read_to_string(dir.path().join("out")).unwrap(), "made\n");
    // Its mount point is no change to the environment, and a read-only root has it too.
    let diff = s.plyroot(&["diff", "t"]).ok();
    assert!(!diff.stdout.contains("var/tmp"), "{diff}");
    let mut c = s.cmd(&["run", "--read-only", "t", "--", "pwd"]);
    c.current_dir(dir.path());
    assert_eq!(run_with(&mut c, None, TIMEOUT).ok().line(), d);
    // A launcher, from the host: the same.
    let bin_dir = s.path("bin");
    s.plyroot(&["export", "t", "sh", "--to", &bin_dir.to_string_lossy()]).ok();
    let mut c = Command::new(bin_dir.join("sh"));
    c.args(["-c", "pwd"]).env("PLYROOT_HOME", &s.home).current_dir(dir.path());
    assert_eq!(run_with(&mut c, None, TIMEOUT).ok().line(), d);
    // Where binding it would hide the environment's own directory, or go against --no-host,
    // plyroot refuses, naming the directory and the way out.
    let mut c = s.cmd(&["run", "t", "--", "pwd"]);
    c.current_dir("/etc");
    run_with(&mut c, None, TIMEOUT).plyroot_error(&["/etc", "--cwd", "--bind"]);
    let scratch = s.tmp.path().to_string_lossy().into_owned();
    if scratch.starts_with("/tmp/") {
        s.run("t", &["--no-host", "tmp"], &["pwd"]).plyroot_error(&[&scratch, "--no-host tmp", "--cwd", "--bind"]);
    }
    assert_eq!(s.run("t", &["--no-host", "tmp", "--cwd", "/etc"], &["pwd"]).ok().line(), "/etc");
}

/// Environments `a`, `b`, `c`, `d` on one busybox base; `b`, `c` and `d` each have a program
/// `step-X` that names where it runs and calls the next by name; `a` has none of them.
fn chain(s: &Store) -> Result<PathBuf, String> {
    userns()?;
    let root = s.path("base-rootfs");
    busybox_rootfs(&root)?;
    let base = s.import(&format!("dir:{}", root.display())).remove(0);
    let bin = s.path("launchers");
    let next = [("b", "step-c"), ("c", "step-d"), ("d", "")];
    s.create("a", &[&format!("layer:{base}")]);
    for (env, then) in next {
        let d = s.path(&format!("layer-{env}"));
        fs::create_dir_all(d.join("usr/local/bin")).unwrap();
        fs::create_dir_all(d.join("opt/lvl")).unwrap();
        fs::write(d.join(format!("opt/lvl/{env}")), "").unwrap();
        let prog = d.join(format!("usr/local/bin/step-{env}"));
        let call = if then.is_empty() { String::new() } else { format!("{then}\n") };
        fs::write(&prog, format!("#!/bin/sh\necho \"{env}: $PLYROOT_ENV sees $(ls /opt/lvl | tr '\\n' ' ')in $(pwd)\"\n{call}")).unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        s.create(env, &[&format!("layer:{base}"), &format!("dir:{}", d.display())]);
        s.plyroot(&["export", env, &format!("step-{env}"), "--to", &bin.to_string_lossy()]).ok();
    }
    Ok(bin)
}

#[test]
fn a_build_in_one_environment_calls_launchers_of_others_by_name_3_deep() {
    let s = Store::new();
    let bin = need!(chain(&s));
    let here = fs::canonicalize(s.path("")).unwrap();
    // A's PATH: its own directories, then the launchers'; the caller's PATH does not have them.
    let o = s.run("a", &[], &["sh", "-c", "echo $PATH; step-b"]).ok();
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], format!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{}", bin.display()), "{o}");
    let h = here.display();
    assert_eq!(&lines[1..], [format!("b: b sees b in {h}"), format!("c: c sees b c in {h}"), format!("d: d sees b c d in {h}")], "{o}");
    // From a directory that needs a bind, all the way down.
    let dir = need!(unshared_dir());
    let mut c = s.cmd(&["run", "a", "--", "step-b"]);
    c.current_dir(dir.path());
    let o = run_with(&mut c, None, TIMEOUT).ok();
    assert!(o.stdout.lines().all(|l| l.ends_with(&format!("in {}", dir.path().display()))), "{o}");
    // A launcher whose program its environment no longer has fails as a missing program does:
    // it never finds itself (or another launcher) on the PATH instead.
    s.sh("d", "printf '#!/bin/sh\\necho vanishing\\n' > /usr/local/bin/vanish && chmod +x /usr/local/bin/vanish").ok();
    s.plyroot(&["export", "d", "vanish", "--to", &bin.to_string_lossy()]).ok();
    s.plyroot(&["reset", "d", "--force"]).ok();
    let mut c = Command::new(bin.join("vanish"));
    c.env("PLYROOT_HOME", &s.home).env("PATH", format!("{}:/usr/bin:/bin", bin.display()));
    let o = run_with(&mut c, None, Duration::from_secs(30)).code(127);
    assert!(o.stderr.contains("'vanish' was not found in environment 'd'"), "{o}");
}

#[test]
fn the_prompt_names_the_environment() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    // A distribution's /etc/profile reads /etc/profile.d, as Debian's does.
    fs::write(root.join("etc/profile"), "PS1='$ '\nfor i in /etc/profile.d/*.sh; do [ -r \"$i\" ] && . \"$i\"; done\n").unwrap();
    s.create("dev", &[&format!("dir:{}", root.display())]);
    let o = s.plyroot_stdin(&["enter", "dev"], b"echo \"[$PS1] $PLYROOT_ENV $(cat /etc/debian_chroot)\"\n").ok();
    assert!(o.stdout.contains("[(dev)$ ] dev dev"), "{o}");
    // No layer changed for it.
    let d = s.plyroot(&["diff", "dev"]).ok();
    assert!(d.stdout.trim().is_empty(), "{d}");
}

#[test]
fn completion_offers_the_environment_names() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    s.create("dev", &[&format!("dir:{}", root.display())]);
    s.create("other", &[&format!("dir:{}", root.display())]);
    assert_eq!(s.plyroot(&["list", "--names"]).ok().stdout, "dev\nother\n");

    let bash = need!(tool("bash"));
    let script = s.path("plyroot.bash");
    fs::write(&script, s.plyroot(&["completions", "bash"]).ok().stdout).unwrap();
    let path_dir = s.path("path");
    fs::create_dir_all(&path_dir).unwrap();
    std::os::unix::fs::symlink(bin(), path_dir.join("plyroot")).unwrap();
    let complete = |words: &str| -> String {
        let check = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); _plyroot plyroot \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            shell_quote(&script.to_string_lossy())
        );
        let mut c = Command::new(&bash);
        c.args(["-c", &check]).env("PLYROOT_HOME", &s.home).env("PATH", format!("{}:/usr/bin:/bin", path_dir.display()));
        run_with(&mut c, None, TIMEOUT).ok().line()
    };
    assert_eq!(complete("plyroot run --root ''"), "dev other");
    assert_eq!(complete("plyroot enter o"), "other");
    assert_eq!(complete("plyroot rm dev ''"), "dev other");
    assert_eq!(complete("plyroot unexport --env ''"), "dev other");
    assert!(!complete("plyroot run -e ''").split(' ').any(|w| w == "dev"), "-e takes KEY=VALUE, not a name");
    assert_eq!(complete(&format!("plyroot --store {} stop ''", shell_quote(&s.home.to_string_lossy()))), "dev other");
    // Not where a command takes something else: a new name, the command after the environment.
    assert_eq!(complete("plyroot create ''").split(' ').find(|w| *w == "dev"), None);
    assert!(complete("plyroot run dev --r").contains("--root"));
    assert_eq!(complete("plyroot ru"), "run");
}
