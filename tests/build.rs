//! Tier 3: environments built from their declaration (issue 13). `packages` and `run` steps in
//! a manifest become layers cached by their key: the real binary, real user namespaces, a fresh
//! store per test, on the busybox fixture and on a real Debian root (packages from Debian's
//! mirror).
//!
//! How a test knows whether a step ran: a step that writes random bytes (`/dev/urandom`) makes a
//! new layer id each time it runs, so an unchanged id proves it did not.
//!
//! Skips with a printed reason where namespaces are unavailable; `PLYROOT_TEST_REQUIRE_NS=1`
//! turns a skip into a failure. Runs as root and as unprivileged users with and without
//! /etc/subuid ranges (tests/run.sh).

#[macro_use]
mod common;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A store plus a project directory (`proj/`) with the busybox fixture root at `proj/base`.
struct Proj {
    s: Store,
    dir: PathBuf,
}

fn proj() -> Result<Proj, String> {
    userns()?;
    let s = Store::new();
    let dir = s.path("proj");
    fs::create_dir_all(dir.join("src")).unwrap();
    busybox_rootfs(&dir.join("base"))?;
    Ok(Proj { s, dir })
}

impl Proj {
    fn manifest(&self, text: &str) {
        fs::write(self.dir.join("plyroot.toml"), text).unwrap();
    }

    /// `plyroot ARGS` started in the project directory, with HOME in the scratch dir (exports).
    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = self.s.cmd(args);
        c.current_dir(&self.dir).env("HOME", self.s.path("home"));
        c
    }

    fn plyroot(&self, args: &[&str]) -> Out {
        run_with(&mut self.cmd(args), None, TIMEOUT)
    }

    fn lock(&self) -> Value {
        serde_json::from_str(&fs::read_to_string(self.dir.join("plyroot.lock")).expect("no plyroot.lock")).unwrap()
    }

    /// The layers the lock file pins the steps of `env` to, in order.
    fn step_layers(&self, env: &str) -> Vec<String> {
        let lock = self.lock();
        lock["steps"][env].as_array().unwrap_or_else(|| panic!("the lock pins no steps of {env}: {lock}")).iter().map(|p| p["layer"].as_str().unwrap().to_owned()).collect()
    }

    /// The layers of `env`'s current generation.
    fn env_layers(&self, env: &str) -> Vec<String> {
        let v = self.plyroot(&["list", "--json"]).ok().json();
        let e = v.as_array().unwrap().iter().find(|e| e["name"] == env).unwrap_or_else(|| panic!("no env {env}: {v}"));
        e["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
    }

    fn generation(&self, env: &str) -> u64 {
        let v = self.plyroot(&["list", "--json"]).ok().json();
        v.as_array().unwrap().iter().find(|e| e["name"] == env).map(|e| e["generation"].as_u64().unwrap()).unwrap_or(0)
    }
}

/// A manifest for `dev` on the fixture: a random step, a step reading the input `./src`, and
/// `last` as the third step.
fn three_steps(last: &str) -> String {
    format!(
        "[env.dev]\nfrom = [\"dir:base\"]\nrun = [\n  \"head -c 16 /dev/urandom > /rand\",\n  {{ run = \"cp -r /src /copied\", inputs = [\"./src:/src\"] }},\n  {last:?},\n]\n"
    )
}

#[test]
fn steps_are_cached_by_key_and_only_a_change_and_what_is_above_it_runs_again() {
    let p = need!(proj());
    fs::write(p.dir.join("src/in.txt"), "v1\n").unwrap();
    p.manifest(&three_steps("echo three > /three"));
    let out = p.plyroot(&["apply"]).ok();
    assert!(out.stderr.contains("[1/3] dev: head -c 16 /dev/urandom > /rand\n") && !out.stderr.contains("(cached)"), "{out}");
    let first = p.step_layers("dev");
    assert_eq!(first.len(), 3);
    // The steps' layers are the top of the generation, in order, and the root shows their work.
    let layers = p.env_layers("dev");
    assert_eq!(layers[1..], first[..], "the generation does not end with the steps' layers");
    let out = p.s.run("dev", &[], &["sh", "-c", "cat /copied/in.txt /three; wc -c < /rand"]).ok();
    assert_eq!(out.stdout, "v1\nthree\n16\n");

    // Unchanged: nothing runs (the random step's layer is the same), no generation is made.
    let out = p.plyroot(&["apply"]).ok();
    assert_eq!(out.stderr.matches("(cached)").count(), 3, "{out}");
    assert_eq!(p.step_layers("dev"), first);
    assert_eq!(p.generation("dev"), 1);

    // A changed input: its step and the one above run again, the one below does not.
    fs::write(p.dir.join("src/in.txt"), "v2\n").unwrap();
    p.plyroot(&["apply"]).ok();
    let second = p.step_layers("dev");
    assert_eq!(second[0], first[0], "the step below the changed input ran again");
    assert_ne!(second[1], first[1]);
    assert_eq!(p.s.run("dev", &[], &["cat", "/copied/in.txt"]).ok().stdout, "v2\n");
    assert_eq!(p.generation("dev"), 2);

    // A changed step: only it runs again.
    p.manifest(&three_steps("echo THREE > /three"));
    p.plyroot(&["apply"]).ok();
    let third = p.step_layers("dev");
    assert_eq!(third[..2], second[..2]);
    assert_ne!(third[2], second[2]);
    assert_eq!(p.s.run("dev", &[], &["cat", "/three"]).ok().stdout, "THREE\n");

    // --no-cache runs every step.
    p.plyroot(&["apply", "--no-cache"]).ok();
    assert_ne!(p.step_layers("dev")[0], third[0], "--no-cache did not run the random step");

    // `build` builds without a generation; the layers stay unused until an apply, and gc keeps
    // only what generations use.
    p.manifest(&three_steps("head -c 8 /dev/urandom > /three"));
    let before = p.generation("dev");
    p.plyroot(&["build"]).ok();
    assert_eq!(p.generation("dev"), before, "build made a generation");
    let built = p.step_layers("dev");
    assert!(!p.env_layers("dev").contains(&built[2]));
    // The lock file pins the built layers: gc keeps them although no generation uses them.
    p.plyroot(&["gc", "--keep", "1"]).ok();
    p.plyroot(&["apply"]).ok();
    assert_eq!(p.step_layers("dev"), built, "apply after build ran a step again");
    p.plyroot(&["verify"]).ok();
}

#[test]
fn steps_see_no_host_files_variables_or_home() {
    let p = need!(proj());
    p.manifest(
        "[env.dev]\nfrom = [\"dir:base\"]\nrun = [{ run = \"id -u > /uid; pwd > /pwd; echo $HOME > /home-var; env | sort > /env; ls /tmp | wc -l > /tmp-count; test -e /etc/resolv.conf && cat /etc/resolv.conf > /resolv; grep -c . /etc/passwd > /passwd-lines\", env = { STEP = \"yes\" } }]\n",
    );
    let mut c = p.cmd(&["apply"]);
    c.env("LEAKED_FROM_HOST", "1");
    run_with(&mut c, None, TIMEOUT).ok();
    let out = p.s.run("dev", &["--root"], &["sh", "-c", "cat /uid /pwd /home-var /tmp-count /passwd-lines; cat /resolv 2>/dev/null | wc -c; cat /env"]).ok();
    let lines = out.lines();
    assert_eq!(lines[..6], ["0", "/", "/root", "0", "2", "0"], "{out}");
    let env = &lines[6..];
    assert!(env.contains(&"STEP=yes".to_owned()), "{out}");
    assert!(!env.iter().any(|l| l.starts_with("LEAKED_FROM_HOST") || l.starts_with("PLYROOT_STACK")), "the host's variables reached the step: {out}");
}

#[test]
fn a_step_reaches_the_hosts_loopback_only_with_the_network() {
    let p = need!(proj());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let _ = c.write_all(b"from-the-host\n");
        }
    });
    p.manifest(&format!(
        "[env.off]\nfrom = [\"dir:base\"]\nrun = [\"nc 127.0.0.1 {port} < /dev/null > /got 2>&1; echo $? > /rc\"]\n[env.on]\nfrom = [\"dir:base\"]\nrun = [{{ run = \"nc 127.0.0.1 {port} < /dev/null > /got\", network = true }}]\n"
    ));
    p.plyroot(&["apply"]).ok();
    let off = p.s.run("off", &[], &["sh", "-c", "cat /rc; cat /got"]).ok();
    assert!(!off.stdout.contains("from-the-host") && !off.stdout.starts_with("0\n"), "a step without network reached the host: {off}");
    assert_eq!(p.s.run("on", &[], &["cat", "/got"]).ok().stdout, "from-the-host\n");
}

#[test]
fn a_failed_step_changes_nothing_and_keeps_its_state_for_a_shell() {
    let p = need!(proj());
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\"]\n");
    p.plyroot(&["apply"]).ok();
    let lock = fs::read_to_string(p.dir.join("plyroot.lock")).unwrap();
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\", \"echo made > /made; echo to-stderr >&2; exit 7\", \"echo never > /never\"]\n");
    let out = p.plyroot(&["apply"]).code(125);
    assert!(out.stderr.contains("[2/3] dev: the last lines of its output:\n  | to-stderr\n"), "{out}");
    assert!(out.stderr.contains("failed (exit status 7)") && out.stderr.contains("`plyroot build --shell dev`"), "{out}");
    assert!(!out.stderr.contains("echo never"), "a step after the failed one ran: {out}");
    // Nothing changed: the generation, the lock file.
    assert_eq!(p.generation("dev"), 1);
    assert_eq!(fs::read_to_string(p.dir.join("plyroot.lock")).unwrap(), lock);
    // The shell sees what the failed step wrote, on the layers below it.
    let mut c = p.cmd(&["build", "--shell", "dev"]);
    let out = run_with(&mut c, Some(b"cat /made /one; id -u\n"), TIMEOUT).ok();
    assert_eq!(out.stdout, "made\none\n0\n");
    p.plyroot(&["verify"]).ok();
    // gc removes the kept state; then there is no shell to open.
    p.plyroot(&["gc"]).ok();
    p.plyroot(&["build", "--shell", "dev"]).failed().plyroot_error(&["no failed build step of 'dev'"]);
}

#[test]
fn kill_9_of_a_build_during_a_step_ends_the_step_and_changes_nothing() {
    let p = need!(proj());
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\"]\n");
    p.plyroot(&["apply"]).ok();
    let lock = fs::read_to_string(p.dir.join("plyroot.lock")).unwrap();
    // A sleep no other test run has: it is how the step is found on the host afterwards.
    let nap = 100_000 + std::process::id();
    p.manifest(&format!("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\", \"echo started; echo x > /partial; exec sleep {nap}\"]\n"));
    let mut c = p.cmd(&["apply"]);
    c.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null()).process_group(0);
    let mut child = c.spawn().unwrap();
    // The step is running once its output reached its log.
    let log = p.s.home.join("builds/dev/log");
    let t = Instant::now();
    while !fs::read_to_string(&log).is_ok_and(|l| l.contains("started")) {
        assert!(t.elapsed() < Duration::from_secs(60), "the step never started");
        assert!(child.try_wait().unwrap().is_none(), "apply ended before the step started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cmdline = format!("sleep\0{nap}\0").into_bytes();
    let sleeping = || fs::read_dir("/proc").unwrap().flatten().any(|e| fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline));
    let t = Instant::now();
    while !sleeping() {
        assert!(t.elapsed() < Duration::from_secs(10), "the step's sleep never showed (the test would pass without looking)");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only apply itself: the step must end with it, not with its process group.
    rustix::process::kill_process(rustix::process::Pid::from_raw(child.id() as i32).unwrap(), rustix::process::Signal::KILL).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(status_code(st), 128 + 9, "apply was not killed mid-step");

    let t = Instant::now();
    while sleeping() {
        assert!(t.elapsed() < Duration::from_secs(10), "the step outlived its killed build");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.generation("dev"), 1);
    assert_eq!(fs::read_to_string(p.dir.join("plyroot.lock")).unwrap(), lock);
    assert!(p.s.run("dev", &[], &["cat", "/partial"]).failed().stderr.contains("/partial"));
    p.plyroot(&["verify"]).ok();
    // The next build starts the step afresh (what the killed one left is removed).
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\", \"test ! -e /partial && echo clean > /two\"]\n");
    p.plyroot(&["apply"]).ok();
    assert_eq!(p.s.run("dev", &[], &["cat", "/two"]).ok().stdout, "clean\n");
    p.plyroot(&["gc"]).ok();
    assert!(!p.s.home.join("builds/dev").exists());
    p.plyroot(&["verify"]).ok();
}

#[test]
fn build_check_passes_a_deterministic_step_and_names_the_files_of_one_that_is_not() {
    let p = need!(proj());
    p.manifest("[env.same]\nfrom = [\"dir:base\"]\nrun = [\"mkdir -p /opt; echo fixed > /opt/f; ln -s f /opt/l\"]\n[env.date]\nfrom = [\"dir:base\"]\nrun = [\"echo fixed > /stable; head -c 8 /dev/urandom | od -x > /stamp\"]\n");
    p.plyroot(&["build"]).ok();
    let out = p.plyroot(&["build", "--check", "same"]).ok();
    assert!(out.stderr.contains("reproducible"), "{out}");
    assert_eq!(out.stdout, "");
    let out = p.plyroot(&["build", "--check", "date"]).code(1);
    assert_eq!(out.stdout, "date: /stamp\n", "{out}");
}

#[test]
fn exports_are_installed_and_removed_by_apply() {
    let p = need!(proj());
    let bin = p.s.path("home/.local/bin");
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nexports = [\"hello\", \"cat\"]\n");
    p.plyroot(&["apply"]).ok();
    assert!(bin.join("hello").exists() && bin.join("cat").exists());
    // By hand: stays when the manifest drops others.
    p.plyroot(&["export", "dev", "ls", "--to", &bin.to_string_lossy()]).ok();
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nexports = [\"hello\"]\nenv = { X = \"1\" }\n");
    p.plyroot(&["apply"]).ok();
    assert!(bin.join("hello").exists() && !bin.join("cat").exists() && bin.join("ls").exists());
    let out = run_with(std::process::Command::new(bin.join("hello")).env("PLYROOT_HOME", &p.s.home), None, TIMEOUT).ok();
    assert_eq!(out.stdout, "hello from the fixture\n");
}

#[test]
fn packages_and_an_offline_compile_of_an_input_on_debian() {
    let tarball = need!(debian_rootfs());
    let p = need!(proj());
    fs::write(p.dir.join("src/hi.c"), "#include <stdio.h>\nint main(void) { puts(\"compiled offline\"); return 0; }\n").unwrap();
    fs::write(p.dir.join("src/Makefile"), "/usr/local/bin/hi: hi.c\n\ttcc -o $@ hi.c\n").unwrap();
    p.manifest(&format!(
        "[env.deb]\nfrom = [\"tar:{}\"]\npackages = [\"hello\", \"make\", \"tcc\", \"libc6-dev\"]\nrun = [{{ run = \"make -C /src\", inputs = [\"./src:/src\"] }}]\n",
        tarball.display()
    ));
    p.plyroot(&["apply"]).ok();
    let out = p.s.run("deb", &[], &["sh", "-c", "hello; hi; find /var/cache/apt/archives /var/lib/apt/lists -name '*.deb' -o -name '*Packages*' | wc -l"]).ok();
    assert_eq!(out.stdout, "Hello, world!\ncompiled offline\n0\n", "{out}");
    // --update runs the packages step again and says what changed (nothing, on the same mirror
    // day); a new package is listed as added.
    p.manifest(&format!(
        "[env.deb]\nfrom = [\"tar:{}\"]\npackages = [\"hello\", \"make\", \"tcc\", \"libc6-dev\", \"tree\"]\nrun = [{{ run = \"make -C /src\", inputs = [\"./src:/src\"] }}]\n",
        tarball.display()
    ));
    let out = p.plyroot(&["apply", "--update"]).ok();
    assert!(out.stderr.contains("deb: packages changed:\nplyroot:   +tree "), "{out}");
    p.plyroot(&["verify"]).ok();
}

#[test]
fn a_step_cannot_change_its_inputs_the_hosts_kernel_or_its_ipc() {
    let p = need!(proj());
    fs::write(p.dir.join("src/f"), "host\n").unwrap();
    // Each attempt's outcome goes to /r: the step itself succeeds.
    p.manifest(concat!(
        "[env.dev]\nfrom = [\"dir:base\"]\nrun = [{ run = \"",
        "(mount -o remount,rw,bind /src && echo remounted; echo pwned > /src/f && echo wrote; umount /src && echo unmounted; ",
        "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern && echo sysctl; echo h > /proc/sysrq-trigger && echo sysrq; ",
        "mknod /blk b 8 0 && echo mknod; mount -o remount,rw /proc/sys && echo procsys; hostname stepbox && hostname; ",
        "readlink /proc/self/ns/ipc) > /r 2>/dev/null; true\", inputs = [\"./src:/src\"] }]\n"
    ));
    p.plyroot(&["apply"]).ok();
    let out = p.s.run("dev", &[], &["cat", "/r"]).ok();
    let host_ipc = fs::read_link("/proc/self/ns/ipc").unwrap().to_string_lossy().into_owned();
    let lines = out.lines();
    assert_eq!(lines.len(), 2, "a step changed what it must not (its input, a sysctl, a device, /proc/sys): {out}");
    assert_eq!(lines[0], "stepbox", "{out}");
    assert!(lines[1].starts_with("ipc:[") && lines[1] != host_ipc, "the step shares the host's IPC namespace: {out}");
    assert_eq!(fs::read_to_string(p.dir.join("src/f")).unwrap(), "host\n");
}

#[test]
fn an_input_holding_a_socket_is_refused_and_a_kept_failure_goes_with_the_next_build() {
    let p = need!(proj());
    let _l = std::os::unix::net::UnixListener::bind(p.dir.join("src/agent.sock")).unwrap();
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [{ run = \"ls /src\", inputs = [\"./src:/src\"] }]\n");
    p.plyroot(&["apply"]).code(125).plyroot_error(&["the socket", "agent.sock", "leave it out of the input"]);
    fs::remove_file(p.dir.join("src/agent.sock")).unwrap();
    // A failure's state stays until the next build, even one that runs nothing.
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\", \"echo x > /partial; exit 1\"]\n");
    p.plyroot(&["apply"]).code(125);
    assert!(p.s.home.join("builds/dev").exists());
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo one > /one\"]\n");
    let out = p.plyroot(&["apply"]).ok();
    assert!(out.stderr.contains("(cached)"), "{out}");
    p.plyroot(&["build", "--shell", "dev"]).failed().plyroot_error(&["no failed build step of 'dev'"]);
}

#[test]
fn a_step_on_a_terminal_cannot_reach_it_nor_the_callers_environment_through_pid_1() {
    let p = need!(proj());
    let script = need!(tool("script"));
    p.manifest(concat!(
        "[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"",
        "(echo to-the-terminal > /dev/tty && echo tty; ls /dev/pts | grep -vc ptmx; tr '\\\\0' '\\\\n' < /proc/1/environ | grep -c SECRET_OF_THE_CALLER) > /r 2>/dev/null; true",
        "\"]\n"
    ));
    // apply on a fresh pty of the host, as from an interactive shell, with a variable to keep.
    let mut c = std::process::Command::new(script);
    let cmd = format!("{} apply", shell_quote(&bin().to_string_lossy()));
    c.args(["-qec", &cmd, "/dev/null"]).env("PLYROOT_HOME", &p.s.home).env("SECRET_OF_THE_CALLER", "hunter2").current_dir(&p.dir);
    let out = run_with(&mut c, Some(b""), TIMEOUT);
    assert_eq!(out.code, 0, "{out}");
    // (The progress line shows the command; only a line of its own is the step's write.)
    assert!(!out.stdout.lines().any(|l| l.trim() == "to-the-terminal"), "the step wrote to the caller's terminal: {out}");
    let r = p.s.run("dev", &[], &["cat", "/r"]).ok();
    assert_eq!(r.lines(), ["0", "0"], "the step had the caller's terminal or environment: {r}");
}

#[test]
fn a_step_reads_an_input_only_you_can_read() {
    let p = need!(proj());
    fs::create_dir_all(p.dir.join("src/dir")).unwrap();
    fs::write(p.dir.join("src/dir/private"), "mine\n").unwrap();
    fs::set_permissions(p.dir.join("src/dir/private"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fs::set_permissions(p.dir.join("src/dir"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // Root in a step holds its capabilities over your id too (mapped as yourself): a checkout
    // made with umask 077 builds as any other.
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\nrun = [{ run = \"cat /src/dir/private > /copy\", inputs = [\"./src:/src\"] }]\n");
    p.plyroot(&["apply"]).ok();
    assert_eq!(p.s.run("dev", &[], &["cat", "/copy"]).ok().stdout, "mine\n");
}
