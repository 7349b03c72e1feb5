//! What is alive in an environment, and one overlay per upper (issue "lose nothing").
//!
//! - A run stays alive for as long as anything is in it, whatever it does with its fds: a daemon
//!   that leaves its session and closes every fd keeps `commit`, `reset`, `rebase` and `rm`
//!   refusing (naming it), keeps `gc` away from its layers, and later runs join its mount.
//! - Runs of one environment share one overlay mount over its upper whatever their flags: the
//!   common pair `enter` (you) + `run --root` sees each other's writes at once, and the root has
//!   one device number (one overlay superblock) in every run.
//! - The store is read-only inside every run.
//!
//! Runs as root and as unprivileged users with and without /etc/subuid ranges.

#[macro_use]
mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A store with one busybox environment `t`, or a skip.
fn env() -> Result<Store, String> {
    Store::with_busybox_env()
}

/// A run in the background that prints `ready` once it started, then waits for `/tmp/<go>` (the
/// shared /tmp: the test creates it) before running `after`.
struct Bg {
    child: Child,
    out: std::sync::mpsc::Receiver<String>,
    go: PathBuf,
}

fn bg(s: &Store, args: &[&str], before: &str, after: &str) -> Bg {
    let go = s.path(&format!("go-{}", std::process::id()));
    let _ = fs::remove_file(&go);
    let script = format!("{before}; echo ready; while [ ! -e {} ]; do sleep 0.05; done; {after}", go.display());
    let mut full: Vec<&str> = args.to_vec();
    full.extend_from_slice(&["--", "sh", "-c", &script]);
    let mut child = s.cmd(&full).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let b = Bg { child, out: rx, go };
    b.expect("ready");
    b
}

impl Drop for Bg {
    /// A test that fails halfway must not leave the run waiting forever.
    fn drop(&mut self) {
        let _ = fs::write(&self.go, b"");
        if matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(300));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Bg {
    fn expect(&self, line: &str) {
        let got = self.out.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("the background run did not print {line:?}"));
        assert_eq!(got, line);
    }

    /// Lets it go on and returns the rest of its output and its status.
    fn finish(mut self) -> (Vec<String>, i32) {
        fs::write(&self.go, b"").unwrap();
        let st = self.child.wait().unwrap();
        let _ = fs::remove_file(&self.go);
        // The reader thread ends with the pipe: take every line it still has.
        let mut rest = Vec::new();
        while let Ok(line) = self.out.recv_timeout(Duration::from_secs(10)) {
            rest.push(line);
        }
        (rest, status_code(st))
    }
}

/// The device number of the root in a run: one per overlay superblock.
fn root_dev(s: &Store, opts: &[&str]) -> String {
    s.run("t", opts, &["stat", "-c", "%d", "/"]).ok().line()
}

// ---------------------------------------------------------------------------------------------
// One overlay per upper
// ---------------------------------------------------------------------------------------------

#[test]
fn enter_and_run_root_share_one_mount_and_see_each_others_writes() {
    let s = need!(env());
    // Terminal 1: an interactive shell as you (whatever you are in this regime), fed on stdin.
    let go = s.path("go-enter");
    struct Kill(Child, PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = fs::write(&self.1, b"");
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut enter = Kill(s.cmd(&["enter", "t"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), go.clone());
    let mut stdin = enter.0.stdin.take().unwrap();
    writeln!(stdin, "echo from-enter > /from-enter; stat -c %d / > {}; echo ready", s.path("dev-enter").display()).unwrap();
    let mut out = BufReader::new(enter.0.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while line.trim() != "ready" {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0 && Instant::now() < deadline, "enter did not start");
    }
    // Terminal 2, while the shell is open: root, with other flags than the shell's.
    let o = s.run("t", &["--root"], &["sh", "-c", "cat /from-enter; echo from-root > /from-root; id -u; stat -c %d /"]).ok();
    let lines = o.lines();
    assert_eq!(lines[..2], ["from-enter", "0"], "run --root does not see the shell's write: {o}");
    let dev_enter = {
        writeln!(stdin, "while [ ! -e {} ]; do sleep 0.05; done; cat /from-root; exit", go.display()).unwrap();
        fs::read_to_string(s.path("dev-enter")).unwrap().trim().to_string()
    };
    assert_eq!(lines[2], dev_enter, "run --root mounted a second overlay over the upper: {o}");
    // Other flags join the same mount too.
    for opts in [&["--pid"][..], &["--no-host", "tmp", "--cwd", "/"], &["--bind", "/etc:/hostetc:ro"], &["-e", "X=1", "--root", "--pid"]] {
        assert_eq!(root_dev(&s, opts), dev_enter, "{opts:?} mounted a second overlay over the upper");
    }
    fs::write(&go, b"").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let st = enter.0.wait().unwrap();
    assert_eq!(status_code(st), 0);
    assert_eq!(rest.trim(), "from-root", "the shell does not see run --root's write");
    // Nothing runs now: the next run mounts afresh (a new superblock), and sees everything.
    assert_eq!(s.sh("t", "cat /from-enter /from-root").ok().stdout, "from-enter\nfrom-root\n");
}

#[test]
fn a_run_of_another_generation_is_refused_while_the_upper_is_mounted() {
    let s = need!(env());
    s.sh("t", "echo two > /two").ok();
    s.plyroot(&["commit", "t", "-m", "two"]).ok();
    s.plyroot(&["switch", "t", "1"]).ok();
    let running = bg(&s, &["run", "t"], "true", "test ! -e /two && echo gen1");
    s.plyroot(&["switch", "t", "2"]).ok();
    s.sh("t", "true").plyroot_error(&["generation 1", "pid ", "--ephemeral"]);
    // Without the upper it runs, on the new generation.
    assert_eq!(s.run("t", &["--read-only"], &["cat", "/two"]).ok().stdout, "two\n");
    let (rest, code) = running.finish();
    assert_eq!((rest, code), (vec!["gen1".to_string()], 0));
    assert_eq!(s.sh("t", "cat /two").ok().stdout, "two\n");
}

// ---------------------------------------------------------------------------------------------
// A daemon that closes its fds
// ---------------------------------------------------------------------------------------------

/// Starts a daemon inside `t` the way start-stop-daemon would: a new session, every fd closed,
/// the run that started it gone. It appends to /daemon.log every 50 ms until /tmp/<stop> exists.
/// Returns the device number of the daemon's root (its overlay).
fn daemon(s: &Store, stop: &std::path::Path) -> String {
    let dev = s.path("daemon-dev");
    let script = format!(
        "setsid sh -c 'stat -c %d / > {}; exec 0<&- 1>&- 2>&-; for fd in 3 4 5 6 7 8 9; do eval \"exec $fd>&-\"; done; while [ ! -e {} ]; do echo x >> /daemon.log; sleep 0.05; done' & sleep 0.3; echo started",
        dev.display(),
        stop.display()
    );
    assert_eq!(s.sh("t", &script).ok().stdout, "started\n");
    fs::read_to_string(dev).unwrap().trim().to_string()
}

/// The pid a plyroot error names (`pid N`).
fn named_pid(stderr: &str) -> i32 {
    let at = stderr.find("pid ").unwrap_or_else(|| panic!("no pid named: {stderr}"));
    stderr[at + 4..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn a_daemon_that_closes_its_fds_keeps_the_environment_in_use() {
    let s = need!(env());
    let stop = s.path("stop-daemon");
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = fs::write(&self.0, b"");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _stop = Stop(stop.clone());
    let dev = daemon(&s, &stop);
    // A later run joins the daemon's mount (one overlay, so its workdir slot is not reused)...
    assert_eq!(root_dev(&s, &[]), dev, "a run mounted a second overlay over the upper while the daemon runs");
    // ...and sees it still writing, though the run that started it has ended.
    let grows = |s: &Store| {
        let a = s.sh("t", "wc -c < /daemon.log").ok().line();
        std::thread::sleep(Duration::from_millis(300));
        let b = s.sh("t", "wc -c < /daemon.log").ok().line();
        (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
    };
    let (a, b) = grows(&s);
    assert!(b > a, "a later run does not see the daemon's writes (a second overlay?): {a} then {b}");
    // Every command that would change the upper under it refuses, naming it.
    let c = s.plyroot(&["commit", "t"]).plyroot_error(&["in use", "pid ", "sh -c"]);
    let pid = named_pid(&c.stderr);
    assert!(fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap().contains("daemon.log"), "the named pid is not the daemon: {c}");
    // (The keeper's command line is that of the run that mounted: it must not be the one named.)
    assert_ne!(fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().trim(), "plyroot-keeper", "the keeper is named, not the daemon: {c}");
    s.plyroot(&["reset", "t", "--force"]).plyroot_error(&["in use", &format!("pid {pid}")]);
    s.plyroot(&["rm", "t"]).plyroot_error(&["in use", &format!("pid {pid}")]);
    s.plyroot(&["rebase", "t"]).plyroot_error(&["in use", &format!("pid {pid}")]);
    let layers = s.layer_ids();
    s.plyroot(&["gc"]).ok();
    assert_eq!(s.layer_ids(), layers, "gc deleted layers a daemon uses");
    assert_eq!(s.plyroot(&["list"]).ok().stdout.lines().filter(|l| l.starts_with("t ")).count(), 1);
    // Stopped, the environment is free again: commit takes what it wrote, and verify is clean.
    fs::write(&stop, b"").unwrap();
    // (A zombie holds nothing: whoever reaps orphans here may take its time.)
    assert!(wait_gone(pid, Duration::from_secs(10)), "the daemon did not stop: {:?} {:?}", fs::read_to_string(format!("/proc/{pid}/stat")), sh(&format!("ps -o pid,ppid,stat,wchan:30,args --ppid {pid} -p {pid}")).stdout);
    s.plyroot(&["commit", "t", "-m", "daemon"]).ok();
    assert!(s.sh("t", "test -s /daemon.log && echo kept").ok().stdout == "kept\n");
    let v = s.plyroot(&["verify"]).ok();
    assert!(!v.stdout.contains("CORRUPT"), "{v}");
}

// ---------------------------------------------------------------------------------------------
// The store inside
// ---------------------------------------------------------------------------------------------

#[test]
fn the_store_is_read_only_inside_every_run() {
    let s = need!(env());
    let id = s.layer_ids().into_iter().next().unwrap();
    let layer_file = s.home.join("layers").join(id.trim_start_matches("sha256:")).join("root/etc/passwd");
    assert!(layer_file.is_file(), "fixture: {} missing", layer_file.display());
    let record = s.home.join("envs/t/generations/1.json");
    let before = (fs::read(&layer_file).unwrap(), fs::read(&record).unwrap());
    for opts in [&[][..], &["--root"], &["--ephemeral"], &["--pid"], &["--read-only"]] {
        let script = format!(
            "test -r {l} || exit 3; echo x >> {l} && exit 4; echo x >> {r} && exit 5; mkdir {h}/intruder && exit 6; echo refused",
            l = layer_file.display(),
            r = record.display(),
            h = s.home.display()
        );
        let o = s.run("t", opts, &["sh", "-c", &script]);
        assert_eq!((o.code, o.stdout.trim()), (0, "refused"), "{opts:?}: the store is writable inside: {o}");
    }
    // Whichever way the store is reached: a bind of a directory in it, of the live upper, of a
    // symlink to it; and root inside cannot unmount its way to the writable store beneath (real
    // root, with no user namespace, can: a known limit).
    let link = s.path("link-to-store");
    std::os::unix::fs::symlink(&s.home, &link).unwrap();
    let binds = [
        format!("{}:/L", s.home.join("layers").display()),
        format!("{}:/U", s.home.join("envs/t/upper").display()),
        format!("{}:/S", link.display()),
    ];
    let unmount = if me().regime == Regime::Root { String::new() } else { format!("umount {h} 2>/dev/null; umount {h} 2>/dev/null; umount -l {h} 2>/dev/null; ", h = s.home.display()) };
    let script = format!(
        "{unmount}for p in /L/intruder /U/intruder /S/intruder {h}/intruder {l}.x; do mkdir $p 2>/dev/null && echo wrote $p; done; echo done",
        h = s.home.display(),
        l = layer_file.display()
    );
    let o = s.run("t", &["--root", "--bind", &binds[0], "--bind", &binds[1], "--bind", &binds[2]], &["sh", "-c", &script]).ok();
    assert_eq!(o.stdout, "done\n", "the store is writable inside: {o}");
    assert_eq!((fs::read(&layer_file).unwrap(), fs::read(&record).unwrap()), before);
    assert!(!s.home.join("intruder").exists() && !s.home.join("layers/intruder").exists() && !s.home.join("envs/t/upper/intruder").exists());
    let v = s.plyroot(&["verify"]).ok();
    assert!(!v.stdout.contains("CORRUPT"), "{v}");
}

/// Starts, as root inside `t`, a daemon that leaves the run's mount namespace: `unshare -m` into a
/// namespace of its own, and with `pivot` also onto a tmpfs root, unmounting the environment's
/// root and keeping only an open file on it. It appends to /var/escaped.log through that file
/// until `stop` exists.
fn escaped_daemon(s: &Store, stop: &std::path::Path, pivot: bool) {
    let dir = stop.parent().unwrap().display().to_string();
    let name = stop.file_name().unwrap().to_string_lossy().into_owned();
    let leave = if pivot {
        // The tmpfs root gets busybox (for sleep) and the stop file's directory, bound in.
        format!("mkdir -p /tmp/esc && mount -t tmpfs esc /tmp/esc && cp /bin/busybox /tmp/esc/ && mkdir /tmp/esc/old /tmp/esc/ctl && mount --rbind {dir} /tmp/esc/ctl && cd /tmp/esc && pivot_root . old && umount -l /old && while [ ! -e /ctl/{name} ]; do echo x >&3; /busybox sleep 0.05; done")
    } else {
        format!("while [ ! -e {dir}/{name} ]; do echo x >&3; sleep 0.05; done")
    };
    let script = format!("setsid unshare -m sh -c 'exec 3>>/var/escaped.log 0<&- 1>&- 2>>{dir}/escaped.err; {leave}' & sleep 0.7; echo started");
    assert_eq!(s.run("t", &["--root"], &["sh", "-c", &script]).ok().stdout, "started\n");
}

#[test]
fn a_program_that_leaves_the_runs_mount_namespace_still_holds_the_environment() {
    let s = need!(env());
    let root = me().regime == Regime::Root;
    for pivot in [false, true] {
        if pivot && root {
            // Real root has no user namespace to find such a program by (a known limit).
            continue;
        }
        let stop = s.path(&format!("stop-escaped-{pivot}"));
        let _ = fs::remove_file(&stop);
        struct Stop(PathBuf);
        impl Drop for Stop {
            fn drop(&mut self) {
                let _ = fs::write(&self.0, b"");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        let guard = Stop(stop.clone());
        escaped_daemon(&s, &stop, pivot);
        // It writes on, with nothing left of the run that started it.
        let c = s.plyroot(&["commit", "t", "-m", "no"]);
        assert_eq!(c.code, 125, "{pivot}: commit while the daemon runs: {c}\ndaemon's stderr: {}", fs::read_to_string(s.path("escaped.err")).unwrap_or_default());
        let c = c.plyroot_error(&["pid "]);
        if !root {
            // While the keeper holds the overlay, a new run joins it: one superblock, so it sees
            // what the program writes.
            let grows = s.sh("t", "a=$(wc -c < /var/escaped.log); sleep 0.3; b=$(wc -c < /var/escaped.log); test $b -gt $a && echo grows");
            assert_eq!(grows.ok().stdout, "grows\n", "{pivot}");
            // Without it, a new run would mount a second overlay over the upper the program
            // writes: refused, as reset is.
            end_keepers(&s.home);
            s.sh("t", "true").plyroot_error(&["pid ", "--ephemeral"]);
            s.plyroot(&["reset", "t", "--force"]).plyroot_error(&["pid "]);
        }
        assert!(!c.stderr.is_empty());
        drop(guard);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.plyroot(&["commit", "t", "-m", &format!("escaped {pivot}")]).code != 0 {
            assert!(Instant::now() < deadline, "the environment stayed in use after the daemon stopped");
            std::thread::sleep(Duration::from_millis(200));
        }
        let v = s.plyroot(&["verify"]).ok();
        assert!(!v.stdout.contains("CORRUPT"), "{pivot}: {v}");
        assert!(s.sh("t", "test -s /var/escaped.log && echo kept").ok().stdout == "kept\n");
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper of the shared mount
// ---------------------------------------------------------------------------------------------

/// The live keeper of environment `env` (see src/sandbox/keeper.rs).
fn keeper(s: &Store, env: &str) -> Option<i32> {
    live_keepers(&s.home, Some(env)).first().copied()
}

#[test]
fn a_keeper_holds_the_mount_between_runs_and_never_stands_in_the_way() {
    let s = need!(env());
    s.sh("t", "echo one > /one").ok();
    let k = keeper(&s, "t").expect("the run that mounted the overlay left a keeper");
    // Later runs join it (whatever their identity) instead of mounting anew: one keeper, and the
    // root is its overlay (one device number).
    s.run("t", &["--root"], &["true"]).ok();
    s.sh("t", "cat /one").ok();
    assert_eq!(keeper(&s, "t"), Some(k), "a later run started a second keeper");
    assert_eq!(root_dev(&s, &[]), root_dev(&s, &["--root"]));
    // It holds neither the caller's stdout (a pipe's reader sees its end) nor the store's lock.
    let piped = sh(&format!("PLYROOT_HOME={} {} run t -- echo hi | cat", shell_quote(&s.home.to_string_lossy()), shell_quote(&bin().to_string_lossy())));
    assert_eq!(piped.ok().stdout, "hi\n");
    s.plyroot(&["gc"]).ok();
    // A command that needs the upper unmounted ends it, and does not refuse.
    s.plyroot(&["commit", "t", "-m", "one"]).ok();
    assert!(wait_gone(k, Duration::from_secs(5)), "commit left the keeper {k}");
    // Killed outright, a keeper is a stale record: the next run mounts afresh.
    s.sh("t", "echo two > /two").ok();
    let k2 = keeper(&s, "t").expect("a keeper after commit");
    assert_ne!(k2, k);
    sh(&format!("kill -9 {k2}")).ok();
    assert!(wait_gone(k2, Duration::from_secs(5)));
    assert_eq!(s.sh("t", "cat /one /two").ok().stdout, "one\ntwo\n");
    // A keeper of another generation gives way to a run of the current one.
    s.plyroot(&["commit", "t", "-m", "two"]).ok();
    s.sh("t", "true").ok();
    let k3 = keeper(&s, "t").expect("a keeper after the kill");
    s.plyroot(&["switch", "t", "1"]).ok();
    assert_eq!(s.sh("t", "test ! -e /one && test ! -e /two && echo gen1").ok().stdout, "gen1\n");
    assert!(wait_gone(k3, Duration::from_secs(5)), "the keeper of generation 3 is still there");
    let k4 = keeper(&s, "t").expect("a keeper of generation 1");
    s.plyroot(&["rm", "t"]).ok();
    assert!(wait_gone(k4, Duration::from_secs(5)), "rm left the keeper {k4}");
}

#[test]
fn plyroot_linger_sets_how_long_a_keeper_waits() {
    let s = need!(env());
    let run = |linger: &str| run_with(s.cmd(&["run", "t", "--", "true"]).env("PLYROOT_LINGER", linger), None, Duration::from_secs(60));
    run("0").ok();
    assert_eq!(keeper(&s, "t"), None, "PLYROOT_LINGER=0 left a keeper");
    run("1").ok();
    let k = keeper(&s, "t").expect("PLYROOT_LINGER=1 left no keeper");
    // Each launch puts its end off; with none it ends by itself.
    assert!(wait_gone(k, Duration::from_secs(10)), "the keeper {k} outlived its linger");
    // Removing the store's environment directory ends it at once.
    run("600").ok();
    let k = keeper(&s, "t").expect("no keeper");
    let runs = s.home.join("envs").join("t").join("runs");
    sh(&format!("rm -rf {}", shell_quote(&runs.to_string_lossy()))).ok();
    assert!(wait_gone(k, Duration::from_secs(5)), "the keeper {k} outlived its run slots");
}

#[test]
fn a_keeper_of_a_mount_made_otherwise_gives_way() {
    let s = need!(env());
    s.run("t", &[], &["true"]).ok();
    let k = keeper(&s, "t").expect("a keeper");
    // A bind to a place the layers lack gets its mount point in a skeleton of its own: the
    // keeper's mount (the other skeleton) is ended, not joined, so nothing is made in the upper.
    let src = s.path("bound");
    fs::create_dir_all(&src).unwrap();
    let bind = format!("{}:/newpoint", src.display());
    assert_eq!(s.run("t", &["--bind", &bind], &["sh", "-c", "test -d /newpoint && echo bound"]).ok().stdout, "bound\n");
    assert!(wait_gone(k, Duration::from_secs(5)), "the keeper of the other skeleton was joined");
    let diff = s.plyroot(&["diff", "t"]).ok();
    assert!(!diff.stdout.contains("newpoint"), "the bind's mount point was made in the upper: {diff}");
    assert!(keeper(&s, "t").is_some_and(|k2| k2 != k));
}

#[test]
fn a_keeper_shows_no_command_line_or_environment_of_the_caller() {
    let s = need!(env());
    let out = run_with(s.cmd(&["run", "t", "--", "sh", "-c", "echo my-secret-token >/dev/null"]).env("SECRET_VAR", "hunter2"), None, TIMEOUT);
    out.ok();
    let k = keeper(&s, "t").expect("a keeper");
    let cmdline = fs::read(format!("/proc/{k}/cmdline")).unwrap();
    let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert_eq!(shown.trim(), "plyroot-keeper", "{shown:?}");
    let environ = fs::read(format!("/proc/{k}/environ")).unwrap();
    assert!(environ.iter().all(|&b| b == 0), "the keeper shows an environment: {:?}", String::from_utf8_lossy(&environ));
    // A value that is not a number of seconds is said, not taken silently.
    let odd = run_with(s.cmd(&["run", "--read-only", "t", "--", "true"]).env("PLYROOT_LINGER", "abc"), None, TIMEOUT);
    assert!(odd.ok().stderr.is_empty(), "a run without a keeper to start read PLYROOT_LINGER");
    s.plyroot(&["commit", "t"]).ok();
    let odd = run_with(s.cmd(&["run", "t", "--", "true"]).env("PLYROOT_LINGER", "abc"), None, TIMEOUT).ok();
    assert!(odd.stderr.contains("PLYROOT_LINGER") && odd.stderr.contains("60 s"), "{odd}");
    // Past any timeout the kernel takes: still a keeper.
    s.plyroot(&["commit", "t"]).ok();
    run_with(s.cmd(&["run", "t", "--", "true"]).env("PLYROOT_LINGER", "18446744073709551615"), None, TIMEOUT).ok();
    std::thread::sleep(Duration::from_millis(300));
    assert!(keeper(&s, "t").is_some(), "a huge PLYROOT_LINGER ended the keeper at once");
}

#[test]
fn a_run_that_starts_during_a_commit_runs_on_the_committed_generation() {
    let strace = need!(tool("strace"));
    let s = need!(env());
    s.sh("t", "echo one > /one").ok();
    // The run is held up just before it takes the environment's lock (its first open of it);
    // the commit goes through meanwhile.
    let lock = s.home.join("envs/t/lock");
    let mut slow = std::process::Command::new(strace);
    slow.args(["-qq", "-o", "/dev/null", "-P"])
        .arg(&lock)
        .args(["-e", "trace=openat", "-e", "inject=openat:delay_enter=1500000:when=1"])
        .arg(bin())
        .args(["run", "t", "--", "sh", "-c", "cat /one && echo two > /two"])
        .env("PLYROOT_HOME", &s.home)
        .current_dir(s.tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut slow = slow.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.plyroot(&["commit", "t", "-m", "one"]).ok();
    let (st, out, err) = wait_collect(&mut slow, TIMEOUT, "the held-up run");
    assert!(st.success(), "the held-up run failed: {out}{err}");
    assert_eq!(out, "one\n", "the held-up run did not run on the committed generation: {err}");
    // Its write is on the current layers: the next run takes it as it is.
    assert_eq!(s.sh("t", "cat /one /two").ok().stdout, "one\ntwo\n");
}
