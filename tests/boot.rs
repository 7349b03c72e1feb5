//! Tier 3: booted environments (issue 5) — an init as PID 1 in the background, joined by run.

#[macro_use]
mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

/// A busybox environment whose /sbin/init is busybox init, starting one respawned service that
/// records its pid, and a marker written at sysinit.
/// `marker` is the service's `sleep` argument, unique per test (tests run in parallel).
fn svc(marker: u32) -> Result<Booted, String> {
    userns()?;
    let s = Store::new();
    let root = s.path("root");
    busybox_rootfs(&root)?;
    let extra = s.path("init");
    fs::create_dir_all(extra.join("sbin")).unwrap();
    fs::create_dir_all(extra.join("etc")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", extra.join("sbin/init")).unwrap();
    fs::write(
        extra.join("etc/inittab"),
        format!("::sysinit:/bin/sh -c 'echo booted > /run/booted'\n::respawn:/bin/sh -c 'echo $$ > /run/svc.pid; exec sleep {marker}'\n"),
    )
    .unwrap();
    s.create("svc", &[&format!("dir:{}", root.display()), &format!("dir:{}", extra.display())]);
    Ok(Booted(s, "svc"))
}

/// Stops the environment when the test ends, passed or not.
struct Booted(Store, &'static str);

impl std::ops::Deref for Booted {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.0
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let _ = self.0.plyroot(&["stop", self.1, "--timeout", "5"]);
    }
}

/// Host pids whose command line is exactly `sleep MARKER` (the service), owned by us.
fn service_pids(marker: u32) -> Vec<u32> {
    let want = format!("sleep\0{marker}\0").into_bytes();
    let me = me().uid;
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else { continue };
        if cmd == want {
            use std::os::unix::fs::MetadataExt;
            // Owned by us, or by one of our subordinate ids: anything this test started.
            if fs::metadata(e.path()).map(|m| m.uid() == me || m.uid() >= 100_000).unwrap_or(false) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn boot_join_see_the_service_and_stop_leaves_nothing() {
    let s = need!(svc(4242));
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
    let st = s.plyroot(&["status", "--json"]).ok().json();
    assert_eq!(st[0]["name"], "svc", "{st}");
    // run joins the booted namespaces: init is PID 1, the service runs, the hostname is the env's.
    let o = s.run("svc", &["--cwd", "/"], &["sh", "-c", "cat /run/booted; hostname; cat /proc/1/comm; test -d /proc/$(cat /run/svc.pid) && echo svc-up"]).ok();
    assert_eq!(o.stdout, "booted\nsvc\ninit\nsvc-up\n", "{o}");
    assert_eq!(fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), hostname, "the host's hostname changed");
    // The program's status passes through the join; --root makes you root there.
    s.run("svc", &["--cwd", "/"], &["sh", "-c", "exit 7"]).code(7);
    assert_eq!(s.run("svc", &["--root", "--cwd", "/"], &["id", "-u"]).ok().stdout, "0\n");
    // The booted system has its own /tmp, and takes no binds: from a directory it does not show,
    // a run refuses, naming it (booted runs above start with --cwd).
    let scratch = s.tmp.path().to_string_lossy().into_owned();
    if scratch.starts_with("/tmp/") {
        s.sh("svc", "pwd").plyroot_error(&[&scratch, "booted", "--cwd"]);
    }
    assert!(!service_pids(4242).is_empty(), "the service is not visible from the host");
    // Booting again is a no-op while it is up.
    s.plyroot(&["boot", "svc"]).ok();
    s.plyroot(&["stop", "svc", "--timeout", "10"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(service_pids(4242), Vec::<u32>::new(), "processes left after stop");
    assert_eq!(s.plyroot(&["status", "--json"]).ok().json(), serde_json::json!([]));
    // After stop, run starts its own root again.
    assert_eq!(s.run("svc", &["--cwd", "/"], &["sh", "-c", "test -e /proc/1 && cat /run/booted"]).ok().stdout, "booted\n");
}

#[test]
fn a_boot_that_is_not_ready_in_time_says_so_and_stop_still_works() {
    let s = need!(svc(4243));
    let o = s.plyroot(&["boot", "svc", "--ready", "test -e /never", "--timeout", "2"]).failed();
    assert!(o.stderr.contains("/never") && o.stderr.contains("2s"), "{o}");
    s.plyroot(&["stop", "svc", "--timeout", "10"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(service_pids(4243), Vec::<u32>::new());
}

#[test]
fn a_missing_init_is_an_error_naming_it() {
    need!(userns());
    let s = Store::new();
    let root = s.path("root");
    need!(busybox_rootfs(&root));
    s.create("noinit", &[&format!("dir:{}", root.display())]);
    // Said before anything starts: no "init is PID 1" line first.
    let o = s.plyroot(&["boot", "noinit", "--timeout", "5"]).plyroot_error(&["no /sbin/init", "noinit"]);
    assert!(!o.stderr.contains("PID 1"), "{o}");
    assert!(Path::new(&s.home.join("envs/noinit")).exists());
}

fn systemd_rootfs() -> Result<std::path::PathBuf, String> {
    debian_rootfs()
}

#[test]
fn systemd_boots_to_running_and_stops_cleanly() {
    need!(userns());
    let tarball = need!(systemd_rootfs());
    let s = Store::new();
    // Its own name: other tests boot environments named svc at the same time, and the cgroups
    // checked below are named after the environment.
    s.create("sd", &[&format!("tar:{}", tarball.display())]);
    let s = Booted(s, "sd");
    let real_root = me().uid == 0 && fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]);
    let o = s.plyroot(&["boot", "sd", "--timeout", "90"]);
    if !real_root && o.code != 0 {
        // Rootless systemd needs a cgroup subtree delegated to the user; the error says so.
        assert!(o.stderr.contains("cgroup of its own"), "{o}");
        return;
    }
    let o = o.ok();
    assert!(o.stderr.contains("systemd is running") || o.stderr.contains("systemd is degraded"), "{o}");
    let state = s.run("sd", &["--cwd", "/"], &["systemctl", "is-system-running"]).stdout;
    assert!(state == "running\n" || state == "degraded\n", "{state}");
    let j = s.run("sd", &["--cwd", "/"], &["journalctl", "--no-pager", "-q", "-n", "50"]).ok();
    assert!(j.stdout.contains("Startup finished"), "{j}");
    s.plyroot(&["stop", "sd", "--timeout", "30"]).ok();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.plyroot(&["status", "--json"]).ok().json(), serde_json::json!([]));
    let cgroups: Vec<_> = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("plyroot-sd-"))
        .map(|e| e.path())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

#[test]
fn stop_returns_when_everything_is_gone_so_boot_right_after_boots() {
    let s = need!(svc(4244));
    for round in 0..3 {
        s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
        let o = s.run("svc", &["--cwd", "/"], &["sh", "-c", "cat /run/booted; cat /proc/1/comm"]).ok();
        assert_eq!(o.stdout, "booted\ninit\n", "round {round}: {o}");
        s.plyroot(&["stop", "svc", "--timeout", "10"]).ok();
        // No pause: stop waited for init and its supervisor.
        assert_eq!(s.plyroot(&["status", "--json"]).ok().json(), serde_json::json!([]), "round {round}");
        assert_eq!(service_pids(4244), Vec::<u32>::new(), "round {round}");
    }
}

#[test]
fn an_init_that_dies_is_never_ready() {
    need!(userns());
    let s = Store::new();
    let root = s.path("root");
    need!(busybox_rootfs(&root));
    let extra = s.path("init");
    fs::create_dir_all(extra.join("sbin")).unwrap();
    fs::write(extra.join("sbin/init"), "#!/bin/sh\nsleep 0.5\nexit 3\n").unwrap();
    fs::set_permissions(extra.join("sbin/init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.create("dies", &[&format!("dir:{}", root.display()), &format!("dir:{}", extra.display())]);
    // The readiness check outlives init: it must not count, nor may a check run in a fresh root.
    let o = s.plyroot(&["boot", "dies", "--ready", "sleep 1", "--timeout", "10"]).plyroot_error(&["init exited", "boot.log"]);
    assert!(!o.stderr.contains("did not succeed within"), "init's death was not noticed first: {o}");
    assert_eq!(s.plyroot(&["status", "--json"]).ok().json(), serde_json::json!([]));
    // A missing init with a readiness check that would succeed anywhere.
    let bare = Store::new();
    let root = bare.path("root");
    need!(busybox_rootfs(&root));
    bare.create("noinit", &[&format!("dir:{}", root.display())]);
    bare.plyroot(&["boot", "noinit", "--ready", "true", "--timeout", "10"]).failed();
    assert_eq!(bare.plyroot(&["status", "--json"]).ok().json(), serde_json::json!([]));
}

#[test]
fn a_run_that_fails_to_start_in_a_booted_environment_is_one_error() {
    let s = need!(svc(4245));
    s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
    // The program's child fails before exec: it must end there, not go on as a second supervisor.
    let o = s.run("svc", &["--cwd", "/no/such/dir"], &["true"]).plyroot_error(&["--cwd", "/no/such/dir"]);
    assert_eq!(o.stderr.matches("plyroot: error:").count(), 1, "{o}");
    assert_eq!(s.run("svc", &["--cwd", "/"], &["sh", "-c", "echo still-up"]).ok().stdout, "still-up\n");
}

#[test]
fn runs_without_the_upper_do_not_join_and_another_generation_is_refused() {
    let s = need!(svc(4246));
    s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
    // --ephemeral and --read-only runs have no upper: they must not write the booted system's.
    s.run("svc", &["--ephemeral"], &["sh", "-c", "echo x > /ephemeral-write"]).ok();
    s.run("svc", &["--read-only"], &["sh", "-c", "echo x > /readonly-write 2>/dev/null; true"]).ok();
    let d = s.plyroot(&["diff", "svc"]).ok();
    assert!(!d.stdout.contains("ephemeral-write") && !d.stdout.contains("readonly-write"), "{d}");
    // Booted on generation 1: a run of generation 2 is refused, naming init.
    s.plyroot(&["stop", "svc", "--timeout", "10"]).ok();
    s.sh("svc", "echo two > /two").ok();
    s.plyroot(&["commit", "svc", "-m", "two"]).ok();
    s.plyroot(&["switch", "svc", "1"]).ok();
    s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
    s.plyroot(&["switch", "svc", "2"]).ok();
    s.sh("svc", "cat /two").plyroot_error(&["booted on generation 1", "plyroot stop svc"]);
}

#[test]
fn login_and_runs_in_a_booted_environment_have_a_named_terminal_and_start_in_the_home() {
    let s = need!(svc(4247));
    let script = need!(tool("script"));
    s.plyroot(&["boot", "svc", "--ready", "test -s /run/svc.pid", "--timeout", "30"]).ok();
    // Its mounts are init's: the program gets a pty of the environment's own, relayed to ours.
    let p = shell_quote(&bin().to_string_lossy());
    let on_a_terminal = |cmd: String, stdin: &[u8]| {
        let mut c = std::process::Command::new(&script);
        c.args(["-qec", &cmd, "/dev/null"]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
        run_with(&mut c, Some(stdin), Duration::from_secs(60))
    };
    let o = on_a_terminal(format!("{p} login svc"), b"tty; pwd; test -t 0 && echo is-a-tty; exit 3\n").code(3);
    let home = me().home.to_string_lossy().into_owned();
    // `script` answers the end of its stdin with the terminal's EOF character, which a raw
    // terminal can make a NUL that the pty echoes: not the program's output.
    let clean = |l: &str| l.trim_matches(|c: char| c.is_whitespace() || c == '\0').to_owned();
    let lines: Vec<String> = o.stdout.lines().map(clean).collect();
    let out: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert!(out.iter().any(|l| l.starts_with("/dev/pts/")) && out.contains(&home.as_str()) && out.contains(&"is-a-tty"), "{o}");
    let o = on_a_terminal(format!("{p} run --cwd / svc -- sh -c 'tty; exit 4'"), b"").code(4);
    assert!(o.stdout.lines().any(|l| clean(l).starts_with("/dev/pts/")), "{o}");
    // Not on a terminal: no pty, as before.
    assert_eq!(s.run("svc", &["--cwd", "/"], &["sh", "-c", "tty || true"]).ok().line(), "not a tty");
}
