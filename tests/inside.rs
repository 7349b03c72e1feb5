//! Tier 3: you inside, as on your own machine (issue 12, items 7–10): your terminal has its
//! name.

#[macro_use]
mod common;

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

