//! Tier 3: environments as code (issue 3). The real binary, real user namespaces, a fresh store
//! per test: manifests and `apply` with a lock file, generations with `switch`/`rollback`, the
//! upper's lifecycle (`diff`, `commit`, `reset`, `rebase`, the stale-upper refusal), `gc` (also
//! racing concurrent runs and an import), `kill -9` in the middle of `commit`, `apply` and `gc`,
//! and `verify` finding a corrupted layer.
//!
//! Skips with a printed reason where namespaces are unavailable; `PLYROOT_TEST_REQUIRE_NS=1`
//! turns a skip into a failure. Runs as root and as unprivileged users with and without
//! /etc/subuid ranges (tests/run.sh).

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A store plus a project directory (`proj/`) holding `plyroot.toml`, its sources and its lock.
struct Proj {
    s: Store,
    dir: PathBuf,
}

/// A project whose `proj/base` is the busybox fixture root, or a skip.
fn proj() -> Result<Proj, String> {
    userns()?;
    let s = Store::new();
    let dir = s.path("proj");
    fs::create_dir_all(&dir).unwrap();
    busybox_rootfs(&dir.join("base"))?;
    Ok(Proj { s, dir })
}

impl Proj {
    fn manifest(&self, text: &str) {
        fs::write(self.dir.join("plyroot.toml"), text).unwrap();
    }

    /// `plyroot apply ARGS` started in the project directory.
    fn apply(&self, args: &[&str]) -> Out {
        let mut a = vec!["apply"];
        a.extend_from_slice(args);
        let mut c = self.s.cmd(&a);
        c.current_dir(&self.dir);
        run_with(&mut c, None, TIMEOUT)
    }

    fn lock(&self) -> Option<String> {
        fs::read_to_string(self.dir.join("plyroot.lock")).ok()
    }

    /// The layer ids `plyroot.lock` pins `source` (as written in the manifest) to.
    fn pinned(&self, source: &str) -> Vec<String> {
        let lock = self.lock().expect("no plyroot.lock");
        let v: Value = serde_json::from_str(&lock).unwrap_or_else(|e| panic!("plyroot.lock is not JSON ({e}): {lock}"));
        v["sources"][source]
            .as_array()
            .unwrap_or_else(|| panic!("plyroot.lock pins no {source:?}: {lock}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    }

    /// A directory source `proj/NAME` holding `files` (path → content), fixed mtimes.
    fn dir_source(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let d = self.dir.join(name);
        write_tree(&d, files);
        d
    }
}

fn write_tree(d: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(d).unwrap();
    for (p, content) in files {
        let f = d.join(p);
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(&f, content).unwrap();
    }
    set_mtimes(d, MTIME);
}

/// A one-environment manifest `[env.dev]` with these sources and extra lines.
fn dev_manifest(from: &[&str], extra: &str) -> String {
    let from: Vec<String> = from.iter().map(|f| format!("{f:?}")).collect();
    format!("[env.dev]\nfrom = [{}]\n{extra}", from.join(", "))
}

fn gens(s: &Store, env: &str) -> Vec<Value> {
    let v = s.plyroot(&["generations", env, "--json"]).ok().json();
    v.as_array().unwrap_or_else(|| panic!("generations --json is not an array: {v}")).clone()
}

fn gen_numbers(s: &Store, env: &str) -> Vec<u64> {
    gens(s, env).iter().map(|g| g["number"].as_u64().unwrap()).collect()
}

/// The number of the current generation, checked to be marked exactly once.
fn current(s: &Store, env: &str) -> u64 {
    let g = gens(s, env);
    let cur: Vec<u64> = g.iter().filter(|g| g["current"] == true).map(|g| g["number"].as_u64().unwrap()).collect();
    assert_eq!(cur.len(), 1, "exactly one generation must be current: {g:?}");
    cur[0]
}

/// (letter, path) of each line of `plyroot diff` (`A /etc/new  (4 B)` → ('A', "/etc/new")).
fn diff_lines(out: &Out) -> BTreeSet<(String, String)> {
    out.lines()
        .iter()
        .map(|l| {
            let mut it = l.split_whitespace();
            let letter = it.next().unwrap_or_default().to_string();
            let path = it.next().unwrap_or_default().trim_end_matches('/').to_string();
            (letter, path)
        })
        .collect()
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Everything a user can see of the store's state: the listing, every environment's
/// generations, the layer ids.
fn snapshot(s: &Store) -> String {
    let list = s.plyroot(&["list", "--json"]).ok();
    let mut out = list.stdout.clone();
    for e in list.json().as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        out += &s.plyroot(&["generations", name, "--json"]).ok().stdout;
    }
    out += &format!("{:?}", s.layer_ids());
    out
}

fn verify_ok(s: &Store, context: &str) {
    let out = s.plyroot(&["verify"]);
    assert_eq!(out.code, 0, "{context}: verify must pass: {out}");
    assert!(!out.stdout.contains("CORRUPT"), "{context}: {out}");
}

/// A program running in an environment in the background: it prints `ready`, then waits until
/// the test calls [`Bg::finish`] (a file appearing in a bound host dir) before going on.
struct Bg {
    child: Child,
    go: PathBuf,
    rest: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
    first: String,
}

static BG_N: AtomicU32 = AtomicU32::new(0);

/// Starts `plyroot run OPTS ENV -- sh -c "BEFORE; echo ready; <wait>; AFTER"`. The sync dir is
/// bound on /mnt, which the fixture has (a bind elsewhere leaves its mount point in the upper:
/// see `a_bind_leaves_nothing_in_the_upper`).
fn bg(s: &Store, env: &str, opts: &[&str], before: &str, after: &str) -> Bg {
    let sync = s.path(&format!("sync-{}", BG_N.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&sync).unwrap();
    let bind = format!("{}:/mnt", sync.display());
    let script = format!("{before}; echo ready; while [ ! -e /mnt/go ]; do sleep 0.05; done; {after}");
    let mut args = vec!["run", "--bind", &bind];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[env, "--", "sh", "-c", &script]);
    let mut child = s.cmd(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let rest = std::thread::spawn(move || {
        // Everything up to and including the `ready` line goes to the test at once.
        let mut first = String::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            first += &line;
            if line == "ready\n" {
                break;
            }
        }
        let _ = tx.send(first);
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        rest
    });
    let err = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = stderr.read_to_string(&mut e);
        e
    });
    let first = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    let mut b = Bg { child, go: sync.join("go"), rest: Some(rest), err: Some(err), first };
    if !b.first.ends_with("ready\n") {
        let _ = b.child.kill();
        let out = b.finish();
        panic!("the background program never said `ready`: {out}");
    }
    b
}

impl Bg {
    /// Lets the program go on and waits for it.
    fn finish(mut self) -> Out {
        fs::write(&self.go, "").unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the background program did not end");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = format!("{}{}", self.first, self.rest.take().unwrap().join().unwrap());
        let stderr = self.err.take().unwrap().join().unwrap();
        Out { what: "background run".into(), code: status_code(status), stdout, stderr }
    }
}

impl Drop for Bg {
    /// A test that fails while the program waits must not leave it waiting forever.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = fs::write(&self.go, "");
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a plyroot command in its own process group, so that a `kill -9` takes it and any
/// helper it forked, as a crash or the OOM killer would.
fn spawn_group(s: &Store, args: &[&str], cwd: Option<&Path>) -> Child {
    let mut c = s.cmd(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    c.spawn().unwrap()
}

/// `kill -9` the process group of `child` after `delay` (unless it ended already); returns
/// whether it was still running when killed, and its stderr.
fn kill_after(mut child: Child, delay: Duration) -> (bool, String) {
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    if running {
        let pg = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
    }
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (running, err)
}

/// A small pseudo-random sequence (no rand crate), seeded from the clock; the seed is printed
/// in failure messages through the delays themselves.
fn delays(n: usize, max_ms: u64) -> Vec<Duration> {
    let mut x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Spread over the whole window: slot i of n, plus jitter inside the slot.
            let slot = max_ms / n as u64;
            Duration::from_millis(slot * i as u64 + x % slot.max(1))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The manifest, apply and the lock
// ---------------------------------------------------------------------------------------------

#[test]
fn apply_creates_envs_and_an_unchanged_manifest_creates_nothing() {
    let p = need!(proj());
    p.dir_source("tools", &[("opt/tool", "tool\n")]);
    p.manifest(
        "[env.dev]\nfrom = [\"dir:base\"]\nenv = { FOO = \"bar\" }\n\n[env.other]\nfrom = [\"dir:base\", \"dir:./tools\"]\n",
    );
    // Relative sources resolve against the manifest's directory, not the working directory.
    let out = p.s.plyroot(&["apply", "-f", "proj/plyroot.toml"]).ok();
    assert!(p.s.path("proj/plyroot.lock").is_file(), "no lock file beside the manifest: {out}");
    assert_eq!(gen_numbers(&p.s, "dev"), [1]);
    assert_eq!(gen_numbers(&p.s, "other"), [1]);
    assert_eq!(p.s.run("dev", &[], &["sh", "-c", "echo $FOO; cat /etc/fixture"]).ok().stdout, "bar\nfrom-the-layer\n");
    assert_eq!(p.s.run("other", &[], &["cat", "/opt/tool"]).ok().stdout, "tool\n");

    // The lock pins every source to ids the store has.
    let base = p.pinned("dir:base");
    let tools = p.pinned("dir:./tools");
    assert_eq!((base.len(), tools.len()), (1, 1));
    let ids = p.s.layer_ids();
    assert!(ids.contains(&base[0]) && ids.contains(&tools[0]), "{ids:?}");
    let list = p.s.plyroot(&["list", "--json"]).ok().json();
    let other = list.as_array().unwrap().iter().find(|e| e["name"] == "other").unwrap().clone();
    assert_eq!(other["layers"], serde_json::json!([base[0], tools[0]]), "{other}");

    // Unchanged: nothing new, and apply says so; the lock is not rewritten.
    let before = snapshot(&p.s);
    let lock = p.lock();
    for _ in 0..2 {
        let out = p.apply(&[]).ok();
        assert!(out.stderr.to_lowercase().contains("nothing"), "apply of an unchanged manifest should say nothing changed: {out}");
    }
    assert_eq!(gen_numbers(&p.s, "dev"), [1]);
    assert_eq!(gen_numbers(&p.s, "other"), [1]);
    assert_eq!(snapshot(&p.s), before);
    assert_eq!(p.lock(), lock);
}

#[test]
fn a_changed_setting_or_source_makes_exactly_one_generation() {
    let p = need!(proj());
    p.manifest(&dev_manifest(&["dir:base"], "env = { FOO = \"bar\" }\n"));
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1]);

    // A setting.
    p.manifest(&dev_manifest(&["dir:base"], "env = { FOO = \"baz\" }\n"));
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2]);
    assert_eq!(current(&p.s, "dev"), 2);
    assert_eq!(p.s.run("dev", &[], &["sh", "-c", "echo $FOO"]).ok().stdout, "baz\n");
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2], "re-applying the changed manifest made another generation");

    // A source on top.
    p.dir_source("extra", &[("etc/extra", "extra\n")]);
    p.manifest(&dev_manifest(&["dir:base", "dir:extra"], "env = { FOO = \"baz\" }\n"));
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2, 3]);
    let g = gens(&p.s, "dev");
    assert_eq!(g[2]["added"], serde_json::json!(p.pinned("dir:extra")), "generation 3 adds the new layer: {g:?}");
    assert_eq!(g[2]["layers"], 2);
    assert_eq!(p.s.run("dev", &[], &["cat", "/etc/extra"]).ok().stdout, "extra\n");
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2, 3]);

    // apply ENV applies only that environment.
    p.manifest(&format!(
        "{}\n[env.second]\nfrom = [\"dir:base\"]\n",
        dev_manifest(&["dir:base", "dir:extra"], "env = { FOO = \"qux\" }\n")
    ));
    p.apply(&["second"]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2, 3], "apply second changed dev");
    assert_eq!(gen_numbers(&p.s, "second"), [1]);
    p.apply(&["nosuch"]).plyroot_error(&["nosuch"]);
}

#[test]
fn an_invalid_manifest_is_located_and_changes_nothing() {
    let p = need!(proj());
    p.dir_source("extra", &[("etc/extra", "extra\n")]);
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    let before = snapshot(&p.s);
    let lock = p.lock();
    // Each bad manifest would also change dev (a new source, a new variable) and add an env.
    let good = "[env.dev]\nfrom = [\"dir:base\", \"dir:extra\"]\nenv = { X = \"1\" }\n";
    let cases: &[(String, &str, &[&str])] = &[
        (format!("{good}colour = 1\n\n[env.new]\nfrom = [\"dir:base\"]\n"), "plyroot.toml:4:1", &["colour"]),
        (format!("[env.new]\nfrom = [\"dir:base\"]\n\n{}", good.replace("dir:extra", "zip:extra")), "plyroot.toml:5:21", &["zip:extra", "dir:", "tar:", "oci:"]),
        (format!("{good}no_host = [\"x11\", \"x12\"]\n"), "plyroot.toml:4:19", &["x12", "x11", "proc", "home"]),
    ];
    for (text, at, needles) in cases {
        p.manifest(text);
        let out = p.apply(&[]).plyroot_error(needles);
        assert!(out.stderr.contains(at), "expected {at} (file:line:column) in the error: {out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "one error line: {out}");
        assert_eq!(snapshot(&p.s), before, "an invalid manifest changed the store:\n{text}");
        assert_eq!(p.lock(), lock, "an invalid manifest changed the lock:\n{text}");
    }
    p.s.plyroot(&["run", "new", "--", "true"]).plyroot_error(&["new"]);
    assert_eq!(p.s.run("dev", &[], &["sh", "-c", "test ! -e /etc/extra && echo ${X-unset}"]).ok().stdout, "unset\n");
}

#[test]
fn the_lock_pins_sources_and_update_re_resolves() {
    let p = need!(proj());
    let top = p.dir_source("top", &[("etc/top", "one\n")]);
    p.manifest(&dev_manifest(&["dir:base", "dir:top"], ""));
    p.apply(&[]).ok();
    let pinned = p.pinned("dir:top");
    let lock = p.lock();

    // The source changes under the lock.
    write_tree(&top, &[("etc/top", "two\n")]);
    let before = snapshot(&p.s);
    let out = p.apply(&[]);
    // Pinned means pinned: either apply keeps the pinned layers, or it refuses and says how to
    // move on; it never silently builds the new content.
    if out.code == 0 {
        assert_eq!(snapshot(&p.s), before, "apply moved off the pinned layers without --update: {out}");
        assert_eq!(p.s.run("dev", &[], &["cat", "/etc/top"]).ok().stdout, "one\n");
    } else {
        out.plyroot_error(&["dir:top", "--update"]);
        assert_eq!(snapshot(&p.s), before);
    }
    assert_eq!(p.lock(), lock);

    // Another machine (an empty store) with this lock and the changed source: apply fails,
    // naming the source and --update, and creates nothing.
    let other = Store::new();
    let mut c = other.cmd(&["apply"]);
    c.current_dir(&p.dir);
    let out = run_with(&mut c, None, TIMEOUT).plyroot_error(&["dir:top", "--update"]);
    assert!(out.stderr.contains("plyroot.lock"), "the error should name the lock file: {out}");
    assert_eq!(other.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));
    assert_eq!(p.lock(), lock, "a failed apply rewrote the lock");

    // --update re-resolves: a new generation with the new content, and a new pin.
    let mut c = other.cmd(&["apply", "--update"]);
    c.current_dir(&p.dir);
    run_with(&mut c, None, TIMEOUT).ok();
    assert_eq!(other.run("dev", &[], &["cat", "/etc/top"]).ok().stdout, "two\n");
    assert_ne!(p.pinned("dir:top"), pinned, "--update did not re-pin dir:top");
    assert_eq!(p.pinned("dir:base"), serde_json::from_str::<Value>(lock.as_deref().unwrap()).unwrap()["sources"]["dir:base"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect::<Vec<_>>());
    // And in the first store too.
    p.apply(&["--update"]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2]);
    assert_eq!(p.s.run("dev", &[], &["cat", "/etc/top"]).ok().stdout, "two\n");
    // The lock now pins the new content: a plain apply is unchanged again.
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2]);
}

// ---------------------------------------------------------------------------------------------
// 2. apply → run → diff → commit → rollback → switch
// ---------------------------------------------------------------------------------------------

#[test]
fn the_full_cycle() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "echo new > /etc/new && echo changed > /etc/fixture && rm /usr/bin/hello && mkdir -p /opt/newdir/sub").ok();

    let d = s.plyroot(&["diff", "dev"]).ok();
    assert_eq!(
        diff_lines(&d),
        set(&[("A", "/etc/new"), ("M", "/etc/fixture"), ("D", "/usr/bin/hello"), ("A", "/opt/newdir"), ("A", "/opt/newdir/sub")]),
        "{d}"
    );
    let j = s.plyroot(&["diff", "dev", "--json"]).ok().json();
    let by_path = |path: &str| j.as_array().unwrap().iter().find(|e| e["path"] == path).cloned().unwrap_or_else(|| panic!("{path} not in diff --json: {j}"));
    assert_eq!((by_path("/etc/new")["change"].clone(), by_path("/etc/new")["size"].clone()), ("added".into(), 4.into()), "{j}");
    assert_eq!((by_path("/etc/fixture")["change"].clone(), by_path("/etc/fixture")["size"].clone()), ("modified".into(), 8.into()), "{j}");
    assert_eq!(by_path("/usr/bin/hello")["change"], "deleted", "{j}");
    assert_eq!((by_path("/opt/newdir")["change"].clone(), by_path("/opt/newdir")["type"].clone()), ("added".into(), "d".into()), "{j}");
    assert_eq!(j.as_array().unwrap().len(), 5, "{j}");
    // Path filters.
    assert_eq!(diff_lines(&s.plyroot(&["diff", "dev", "/etc"]).ok()), set(&[("A", "/etc/new"), ("M", "/etc/fixture")]));
    assert_eq!(diff_lines(&s.plyroot(&["diff", "dev", "/usr/bin/hello", "/opt/newdir"]).ok()), set(&[("D", "/usr/bin/hello"), ("A", "/opt/newdir"), ("A", "/opt/newdir/sub")]));
    assert_eq!(s.plyroot(&["diff", "dev", "/var"]).ok().stdout, "");

    // commit: a new layer on top, in a new generation, and a clean upper.
    let layers_before = s.layer_ids();
    let out = s.plyroot(&["commit", "dev", "-m", "first change"]).ok();
    let id = out.line();
    assert_layer_id(&id);
    assert_eq!(gen_numbers(s, "dev"), [1, 2]);
    assert_eq!(current(s, "dev"), 2);
    let g = gens(s, "dev");
    assert!(g[1]["reason"].as_str().unwrap().contains("first change"), "{g:?}");
    assert_eq!(g[1]["added"], serde_json::json!([id]), "{g:?}");
    let layers = s.layers();
    let row = layers.iter().find(|l| l["id"] == id.as_str()).unwrap_or_else(|| panic!("layers does not show the new layer {id}: {layers:?}"));
    assert!(row["used_by"].as_array().unwrap().iter().any(|u| u == "dev"), "{row}");
    assert_eq!(s.layer_ids().len(), layers_before.len() + 1);
    assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "", "the upper is not clean after commit");

    // The next run sees the change, coming from the layer.
    let seen = "cat /etc/new /etc/fixture; test -e /usr/bin/hello && echo hello-present; test -d /opt/newdir/sub && echo dir";
    assert_eq!(s.sh("dev", seen).ok().stdout, "new\nchanged\ndir\n");
    assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "", "reading wrote to the upper");
    verify_ok(s, "after commit");

    // rollback: the change is gone.
    s.plyroot(&["rollback", "dev"]).ok();
    assert_eq!(current(s, "dev"), 1);
    let out = s.sh("dev", "test ! -e /etc/new && cat /etc/fixture && test -e /usr/bin/hello && test ! -e /opt/newdir && echo gone").ok();
    assert_eq!(out.stdout, "from-the-layer\ngone\n", "{out}");
    let text = s.plyroot(&["generations", "dev"]).ok();
    let marked: Vec<&str> = text.stdout.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(marked.len(), 1, "{text}");
    assert_eq!(marked[0].split_whitespace().nth(1), Some("1"), "{text}");
    // Nothing to roll back to from the first generation.
    s.plyroot(&["rollback", "dev"]).plyroot_error(&["dev"]);

    // switch back: visible again.
    s.plyroot(&["switch", "dev", "2"]).ok();
    assert_eq!(current(s, "dev"), 2);
    assert_eq!(s.sh("dev", seen).ok().stdout, "new\nchanged\ndir\n");
    let text = s.plyroot(&["generations", "dev"]).ok();
    let marked: Vec<&str> = text.stdout.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(marked.len(), 1, "{text}");
    assert_eq!(marked[0].split_whitespace().nth(1), Some("2"), "{text}");
    s.plyroot(&["switch", "dev", "9"]).plyroot_error(&["9"]);
    assert_eq!(current(s, "dev"), 2);
    // Committing an empty upper makes nothing.
    s.plyroot(&["commit", "dev"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [1, 2]);
}

// ---------------------------------------------------------------------------------------------
// 3. reset
// ---------------------------------------------------------------------------------------------

#[test]
fn reset_keeps_a_copy_unless_forced() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "echo kept > /etc/new && echo changed > /etc/fixture").ok();
    let out = s.plyroot(&["reset", "dev"]).ok();
    let saved_root = s.home.join("envs/dev/saved");
    // The path it was kept at is on stderr, under the environment's saved/.
    let path = out
        .stderr
        .split_whitespace()
        .map(|w| w.trim_end_matches([',', '.', ';', ')']))
        .find(|w| w.starts_with('/') && Path::new(w).starts_with(&saved_root))
        .unwrap_or_else(|| panic!("reset did not say where it kept the upper (under {}): {out}", saved_root.display()))
        .to_string();
    assert_eq!(fs::read_to_string(Path::new(&path).join("etc/new")).unwrap(), "kept\n");
    assert_eq!(fs::read_to_string(Path::new(&path).join("etc/fixture")).unwrap(), "changed\n");
    assert_eq!(s.sh("dev", "test ! -e /etc/new && cat /etc/fixture").ok().stdout, "from-the-layer\n");
    assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "");
    assert_eq!(gen_numbers(s, "dev"), [1]);

    // --force: no copy.
    s.sh("dev", "echo gone > /etc/new2").ok();
    let saved_before = tree(&saved_root);
    s.plyroot(&["reset", "dev", "--force"]).ok();
    assert_eq!(tree(&saved_root), saved_before, "reset --force kept a copy");
    s.sh("dev", "test ! -e /etc/new2").ok();
    assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "");
    // An empty upper: nothing to do, and still fine.
    s.plyroot(&["reset", "dev"]).ok();
    assert_eq!(tree(&saved_root), saved_before);
}

// ---------------------------------------------------------------------------------------------
// 4. The stale upper and rebase
// ---------------------------------------------------------------------------------------------

/// dev at generation 2 (= 1 + a committed layer holding `/etc/fixture` = "v1" and `/etc/a`),
/// then an upper written on generation 2 by `script`, then `rollback` to 1: the upper is stale.
fn stale(script: &str) -> Result<Proj, String> {
    let p = proj()?;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    p.s.sh("dev", "echo v1 > /etc/fixture && echo a > /etc/a").ok();
    p.s.plyroot(&["commit", "dev", "-m", "v1"]).ok();
    p.s.sh("dev", script).ok();
    p.s.plyroot(&["rollback", "dev"]).ok();
    assert_eq!(current(&p.s, "dev"), 1);
    Ok(p)
}

#[test]
fn a_stale_upper_is_refused_until_the_user_chooses() {
    let p = need!(stale("echo b > /etc/b"));
    let s = &p.s;
    let out = s.run("dev", &[], &["cat", "/etc/b"]).plyroot_error(&["rebase", "reset", "--keep-upper"]);
    assert_eq!(out.stdout, "", "{out}");
    // Other options do not sneak past it either.
    s.run("dev", &["--root"], &["true"]).plyroot_error(&["rebase"]);
    // --keep-upper: the user accepts the risk.
    assert_eq!(s.run("dev", &["--keep-upper"], &["sh", "-c", "cat /etc/b /etc/fixture; test ! -e /etc/a && echo no-a"]).ok().stdout, "b\nfrom-the-layer\nno-a\n");
    // Ephemeral and read-only runs do not use the upper: never refused.
    s.plyroot(&["reset", "dev", "--force"]).ok();
    s.plyroot(&["switch", "dev", "2"]).ok();
    s.sh("dev", "echo c > /etc/c").ok();
    s.plyroot(&["rollback", "dev"]).ok();
    s.run("dev", &["--ephemeral"], &["true"]).ok();
    s.run("dev", &["--read-only"], &["true"]).ok();
    s.run("dev", &[], &["true"]).plyroot_error(&["rebase"]);
    // reset is the third way out.
    s.plyroot(&["reset", "dev", "--force"]).ok();
    s.run("dev", &[], &["test", "!", "-e", "/etc/c"]).ok();
}

#[test]
fn rebase_without_conflicts() {
    let p = need!(stale("echo b > /etc/b && rm /usr/bin/hello"));
    let s = &p.s;
    s.run("dev", &[], &["true"]).plyroot_error(&["rebase"]);
    s.plyroot(&["rebase", "dev"]).ok();
    let out = s.sh("dev", "cat /etc/b /etc/fixture; test ! -e /etc/a && echo no-a; test ! -e /usr/bin/hello && echo no-hello").ok();
    assert_eq!(out.stdout, "b\nfrom-the-layer\nno-a\nno-hello\n", "{out}");
    assert_eq!(diff_lines(&s.plyroot(&["diff", "dev"]).ok()), set(&[("A", "/etc/b"), ("D", "/usr/bin/hello")]));
    // Forward again: also conflict-free, /etc/a comes back from the layer.
    s.plyroot(&["switch", "dev", "2"]).ok();
    s.plyroot(&["rebase", "dev"]).ok();
    assert_eq!(s.sh("dev", "cat /etc/a /etc/b /etc/fixture").ok().stdout, "a\nb\nv1\n");
    // Already rebased: a no-op.
    s.plyroot(&["rebase", "dev"]).ok();
}

/// The upper changed /etc/fixture (and /etc/other) on generation 2; generation 1 has another
/// /etc/fixture: a conflict on /etc/fixture only.
fn conflict() -> Result<Proj, String> {
    stale("echo ours > /etc/fixture && echo other > /etc/other")
}

#[test]
fn rebase_lists_conflicts_and_changes_nothing() {
    let p = need!(conflict());
    let s = &p.s;
    let diff_before = s.plyroot(&["diff", "dev", "--json"]).ok().stdout;
    let snap = snapshot(s);
    let out = s.plyroot(&["rebase", "dev"]);
    assert_ne!(out.code, 0, "rebase with a conflict must fail: {out}");
    let c: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("C ")).collect();
    assert_eq!(c, ["C /etc/fixture"], "{out}");
    assert!(!out.stdout.contains("/etc/other"), "a path only the upper changed is no conflict: {out}");
    assert!(out.stderr.contains("--ours") && out.stderr.contains("--theirs"), "{out}");
    // Nothing changed: the upper, its base, the generations.
    assert_eq!(s.plyroot(&["diff", "dev", "--json"]).ok().stdout, diff_before);
    assert_eq!(snapshot(s), snap);
    s.run("dev", &[], &["true"]).plyroot_error(&["rebase"]);
    // Still listed the second time.
    assert!(s.plyroot(&["rebase", "dev"]).failed().stdout.contains("C /etc/fixture"));
}

#[test]
fn rebase_ours_keeps_the_uppers_version() {
    let p = need!(conflict());
    let s = &p.s;
    s.plyroot(&["rebase", "dev", "--ours"]).ok();
    assert_eq!(s.sh("dev", "cat /etc/fixture /etc/other; test ! -e /etc/a && echo no-a").ok().stdout, "ours\nother\nno-a\n");
    assert_eq!(current(s, "dev"), 1);
}

#[test]
fn rebase_theirs_takes_the_layers_version() {
    let p = need!(conflict());
    let s = &p.s;
    s.plyroot(&["rebase", "dev", "--theirs"]).ok();
    assert_eq!(s.sh("dev", "cat /etc/fixture /etc/other; test ! -e /etc/a && echo no-a").ok().stdout, "from-the-layer\nother\nno-a\n");
    assert_eq!(diff_lines(&s.plyroot(&["diff", "dev"]).ok()), set(&[("A", "/etc/other")]));
    s.plyroot(&["rebase", "dev", "--ours", "--theirs"]).failed();
}

#[test]
fn rebase_sees_no_conflict_where_both_sides_hold_the_same() {
    // The upper (written on generation 2, where /etc/fixture is "v1") set /etc/fixture back to
    // what generation 1 has, and deleted /etc/a, which generation 1 does not have: either choice
    // gives the same, so there is nothing to decide.
    let p = need!(stale("echo from-the-layer > /etc/fixture && rm /etc/a && echo other > /etc/other"));
    let s = &p.s;
    let out = s.plyroot(&["rebase", "dev"]).ok();
    assert!(!out.stdout.contains("C "), "{out}");
    assert_eq!(s.sh("dev", "cat /etc/fixture /etc/other; test ! -e /etc/a && echo no-a").ok().stdout, "from-the-layer\nother\nno-a\n");
    // The same file with other content is still a conflict (the check reads the bytes).
    let p = need!(stale("echo from-the-lay3r > /etc/fixture"));
    let out = p.s.plyroot(&["rebase", "dev"]).failed();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["C /etc/fixture"], "{out}");
}

#[test]
fn rebase_reads_content_where_size_and_mtime_agree() {
    // The reproducible-image case: every mtime clamped. Generation 2 changes /etc/x to bytes of
    // the same size with the same mtime, and rewrites /etc/y identically; the upper, written on
    // generation 2, changes both; the environment goes back to generation 1. /etc/x changed
    // under the upper (a conflict, which a size-and-mtime fingerprint missed, silently keeping
    // the upper's); /etc/y did not (no conflict).
    let p = need!(proj());
    let s = &p.s;
    let base = p.dir.join("base");
    fs::write(base.join("etc/x"), "v1-x\n").unwrap();
    fs::write(base.join("etc/y"), "same\n").unwrap();
    set_mtimes(&base, MTIME);
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "touch -r /etc/x /etc/.r && printf 'v2-x\\n' > /etc/x && printf 'same\\n' > /etc/y && touch -r /etc/.r /etc/x /etc/y && rm /etc/.r").ok();
    s.plyroot(&["commit", "dev", "-m", "v2"]).ok();
    s.sh("dev", "stat -c %Y /etc/x /etc/y && printf 'ours\\n' > /etc/x && printf 'mine\\n' > /etc/y").ok();
    s.plyroot(&["rollback", "dev"]).ok();
    let out = s.plyroot(&["rebase", "dev"]).failed();
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("C ")).collect::<Vec<_>>(), ["C /etc/x"], "{out}");
    s.plyroot(&["rebase", "dev", "--theirs"]).ok();
    assert_eq!(s.sh("dev", "cat /etc/x /etc/y").ok().stdout, "v1-x\nmine\n");
}

#[test]
fn apply_says_at_once_that_the_upper_is_now_stale() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    // An empty upper: a new generation needs no word about it.
    p.dir_source("tools", &[("opt/tool", "tool\n")]);
    p.manifest(&dev_manifest(&["dir:base", "dir:./tools"], ""));
    let out = p.apply(&[]).ok();
    assert!(!out.stderr.contains("other layers"), "{out}");
    // An upper written on generation 2, then a manifest with other layers.
    s.sh("dev", "echo mine > /etc/mine").ok();
    p.manifest(&dev_manifest(&["dir:base"], ""));
    let out = p.apply(&[]).ok();
    for needle in ["other layers", "plyroot rebase dev", "plyroot reset dev", "--keep-upper"] {
        assert!(out.stderr.contains(needle), "apply did not say the upper is stale ({needle:?}): {out}");
    }
    // Which is what the next run says too; rebase is one of the ways out.
    s.run("dev", &[], &["true"]).plyroot_error(&["rebase", "reset", "--keep-upper"]);
    s.plyroot(&["rebase", "dev"]).ok();
    assert_eq!(s.run("dev", &[], &["cat", "/etc/mine"]).ok().stdout, "mine\n");
    // switch says it the same way.
    let out = s.plyroot(&["switch", "dev", "2"]).ok();
    assert!(out.stderr.contains("plyroot rebase dev") && out.stderr.contains("--keep-upper"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// 5. Running programs
// ---------------------------------------------------------------------------------------------

#[test]
fn a_running_program_keeps_its_generation() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "echo v2 > /etc/fixture && echo only-in-2 > /etc/two").ok();
    s.plyroot(&["commit", "dev", "-m", "v2"]).ok();
    s.plyroot(&["rollback", "dev"]).ok();

    let running = bg(s, "dev", &[], "cat /etc/fixture", "cat /etc/fixture; test ! -e /etc/two && echo no-two");
    s.plyroot(&["switch", "dev", "2"]).ok();
    // The upper is mounted once, on generation 1's layers: a run of generation 2 that would mount
    // it again is refused, naming the run that holds it; one without the upper sees generation 2.
    s.sh("dev", "true").plyroot_error(&["generation 1", "pid ", "cat /etc/fixture"]);
    assert_eq!(s.run("dev", &["--ephemeral"], &["sh", "-c", "cat /etc/fixture /etc/two"]).ok().stdout, "v2\nonly-in-2\n");
    let out = running.finish().ok();
    assert_eq!(out.stdout, "from-the-layer\nready\nfrom-the-layer\nno-two\n", "the running program saw the switch: {out}");
}

#[test]
fn a_bind_leaves_nothing_in_the_upper() {
    // A launch creates nothing in the upper (mount points live in the generated skeleton): a
    // bind on a path the layers lack must not show up in diff, be committed, or make the upper
    // stale for the next switch.
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    let data = s.path("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("in"), "bound\n").unwrap();
    let bind = format!("{}:/new/mount/point", data.display());
    assert_eq!(s.run("dev", &["--bind", &bind], &["cat", "/new/mount/point/in"]).ok().stdout, "bound\n");
    let d = s.plyroot(&["diff", "dev"]).ok();
    assert_eq!(d.stdout, "", "a bind's mount point was created in the upper");
}

#[test]
fn commit_and_reset_refuse_while_a_program_runs() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "echo new > /etc/new").ok();
    let running = bg(s, "dev", &[], "true", "cat /etc/new");
    let snap = snapshot(s);
    s.plyroot(&["commit", "dev", "-m", "x"]).plyroot_error(&["dev"]);
    s.plyroot(&["reset", "dev"]).plyroot_error(&["dev"]);
    s.plyroot(&["reset", "dev", "--force"]).plyroot_error(&["dev"]);
    assert_eq!(snapshot(s), snap);
    assert_eq!(running.finish().ok().stdout, "ready\nnew\n");
    // Once it has ended, both work.
    s.plyroot(&["commit", "dev", "-m", "x"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [1, 2]);
    s.sh("dev", "echo more > /etc/more").ok();
    s.plyroot(&["reset", "dev", "--force"]).ok();
    assert_eq!(s.sh("dev", "cat /etc/new; test ! -e /etc/more && echo ok").ok().stdout, "new\nok\n");
}

// ---------------------------------------------------------------------------------------------
// 6. gc
// ---------------------------------------------------------------------------------------------

/// dev with generations 1, 2, 3 = base + x1, base + x2, base + x3 (each xN holds /xN).
fn three_generations() -> Result<Proj, String> {
    let p = proj()?;
    for i in 1..=3 {
        p.dir_source(&format!("x{i}"), &[(&format!("x{i}"), &format!("{i}\n"))]);
        p.manifest(&dev_manifest(&["dir:base", &format!("dir:x{i}")], ""));
        p.apply(&[]).ok();
    }
    assert_eq!(gen_numbers(&p.s, "dev"), [1, 2, 3]);
    Ok(p)
}

#[test]
fn gc_dry_run_deletes_nothing_and_keep_prunes() {
    let p = need!(three_generations());
    let s = &p.s;
    let (base, x1, x2, x3) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:x1")[0].clone(), p.pinned("dir:x2")[0].clone(), p.pinned("dir:x3")[0].clone());
    assert_eq!(s.layer_ids(), [&base, &x1, &x2, &x3].into_iter().cloned().collect());
    // A run on generation 3 (the upper is then based on it; see
    // gc_an_empty_upper_pins_no_old_layers for the case without one).
    s.run("dev", &[], &["true"]).ok();

    let snap = snapshot(s);
    let usage = s.usage();
    let out = s.plyroot(&["gc", "--dry-run", "--keep", "1"]).ok();
    assert!(out.stdout.contains(&x1) && out.stdout.contains(&x2), "dry-run should say what it would delete: {out}");
    assert_eq!(snapshot(s), snap, "gc --dry-run changed something");
    assert_eq!(s.usage(), usage);
    s.plyroot(&["gc", "--dry-run"]).ok();
    assert_eq!(snapshot(s), snap);

    // Keep 2: generation 1 goes, and x1, which only it used.
    let out = s.plyroot(&["gc", "--keep", "2"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [2, 3], "{out}");
    assert_eq!(s.layer_ids(), [&base, &x2, &x3].into_iter().cloned().collect(), "gc --keep 2: {out}");
    // Keep 1: only the current one.
    let out = s.plyroot(&["gc", "--keep", "1"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [3], "{out}");
    assert_eq!(s.layer_ids(), [&base, &x3].into_iter().cloned().collect(), "gc --keep 1: {out}");
    assert_eq!(s.sh("dev", "cat /x3; test ! -e /x2 && echo ok").ok().stdout, "3\nok\n");
    verify_ok(s, "after gc");
    s.plyroot(&["rollback", "dev"]).plyroot_error(&["dev"]);
    // Nothing left to collect.
    let snap = snapshot(s);
    s.plyroot(&["gc", "--keep", "1"]).ok();
    assert_eq!(snapshot(s), snap);
}

#[test]
fn gc_an_empty_upper_pins_no_old_layers() {
    // apply, apply, apply, gc --keep 1 with no run in between: the (empty, never used) upper
    // still records generation 1's layers as its base. An empty upper holds nothing to rebase,
    // so that record must not keep generation 1's layers alive.
    let p = need!(three_generations());
    let s = &p.s;
    let (base, x3) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:x3")[0].clone());
    let out = s.plyroot(&["gc", "--keep", "1"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [3], "{out}");
    assert_eq!(s.layer_ids(), [&base, &x3].into_iter().cloned().collect(), "gc --keep 1 kept a layer only pruned generations used: {out}");
    assert_eq!(s.run("dev", &[], &["cat", "/x3"]).ok().stdout, "3\n");
}

#[test]
fn gc_keeps_the_current_generation_even_when_it_is_old() {
    let p = need!(three_generations());
    let s = &p.s;
    let (base, x1, x3) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:x1")[0].clone(), p.pinned("dir:x3")[0].clone());
    s.plyroot(&["switch", "dev", "1"]).ok();
    s.run("dev", &[], &["true"]).ok();
    s.plyroot(&["gc", "--keep", "1"]).ok();
    // The newest is kept (keep 1), and the current one although it is the oldest.
    assert_eq!(gen_numbers(s, "dev"), [1, 3]);
    assert_eq!(s.layer_ids(), [&base, &x1, &x3].into_iter().cloned().collect());
    assert_eq!(s.run("dev", &[], &["cat", "/x1"]).ok().stdout, "1\n");
    // Generations are dated in whole seconds: make generation 3 older than "now".
    std::thread::sleep(Duration::from_millis(1100));
    s.plyroot(&["gc", "--older-than", "0s"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [1]);
    assert_eq!(s.layer_ids(), [&base, &x1].into_iter().cloned().collect());
    s.plyroot(&["gc", "--older-than", "soon"]).plyroot_error(&["soon"]);
}

#[test]
fn gc_never_deletes_what_a_running_program_uses() {
    let p = need!(three_generations());
    let s = &p.s;
    let (base, x1, x3) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:x1")[0].clone(), p.pinned("dir:x3")[0].clone());
    s.plyroot(&["switch", "dev", "1"]).ok();
    let running = bg(s, "dev", &[], "cat /x1", "cat /x1 /etc/fixture");
    s.plyroot(&["switch", "dev", "3"]).ok();
    s.run("dev", &["--read-only"], &["cat", "/x3"]).ok();
    let out = s.plyroot(&["gc", "--keep", "1"]).ok();
    // Generation 1 is kept (record, layers, skeleton) while its program runs.
    assert_eq!(gen_numbers(s, "dev"), [1, 3], "{out}");
    assert!(s.layer_ids().contains(&x1), "gc deleted a layer a running program uses: {out}");
    let done = running.finish().ok();
    assert_eq!(done.stdout, "1\nready\n1\nfrom-the-layer\n", "{done}");
    // Once the program has ended, its generation and layer are garbage.
    let out = s.plyroot(&["gc", "--keep", "1"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [3], "{out}");
    assert_eq!(s.layer_ids(), [&base, &x3].into_iter().cloned().collect(), "{out}");
    verify_ok(s, "after gc");
}

#[test]
fn gc_racing_twenty_runs_and_an_import_loses_nothing() {
    let p = need!(three_generations());
    let s = &p.s;
    let (base, x1, x2, x3) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:x1")[0].clone(), p.pinned("dir:x2")[0].clone(), p.pinned("dir:x3")[0].clone());
    s.run("dev", &[], &["true"]).ok();
    // An import nothing refers to, and an environment created from a new source (import + use).
    let loose = s.path("loose");
    write_tree(&loose, &[("loose", "loose\n"), ("more/file", "x\n")]);
    let fresh = s.path("fresh");
    write_tree(&fresh, &[("fresh", "fresh\n")]);

    let (runs, import, create, gc) = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..20)
            .map(|i| {
                scope.spawn(move || {
                    // Half of them write to the shared upper too.
                    let w = if i % 2 == 0 { format!("echo {i} > /var/r{i} && ") } else { String::new() };
                    s.sh("dev", &format!("{w}cat /x3 /etc/fixture && sleep 0.3 && cat /x3"))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150));
        let import = scope.spawn(|| s.plyroot(&["import", &format!("dir:{}", loose.display())]));
        let create = scope.spawn(|| s.plyroot(&["create", "fresh", "--from", &format!("layer:{base}"), "--from", &format!("dir:{}", fresh.display())]));
        std::thread::sleep(Duration::from_millis(100));
        let gc = scope.spawn(|| s.plyroot(&["gc", "--keep", "1"]));
        (
            runs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(),
            import.join().unwrap(),
            create.join().unwrap(),
            gc.join().unwrap(),
        )
    });
    for r in runs {
        let r = r.ok();
        assert_eq!(r.stdout, "3\nfrom-the-layer\n3\n", "{r}");
    }
    let gc = gc.ok();
    let import = import.ok();
    create.ok();
    let loose_id = import.line();
    assert_layer_id(&loose_id);

    verify_ok(s, "after gc racing runs");
    let ids = s.layer_ids();
    for keep in [&base, &x3] {
        assert!(ids.contains(keep), "gc deleted {keep}, which the current generation uses: {gc}");
    }
    for gone in [&x1, &x2] {
        assert!(!ids.contains(gone), "gc --keep 1 kept {gone}: {gc}");
    }
    // The unreferenced import may be collected only if gc said so (it ran after the import).
    assert!(ids.contains(&loose_id) || gc.stdout.contains(&loose_id), "the imported layer {loose_id} vanished without gc deleting it: {gc}");
    assert_eq!(s.run("fresh", &[], &["cat", "/fresh", "/etc/fixture"]).ok().stdout, "fresh\nfrom-the-layer\n");
    let out = s.sh("dev", "for i in 0 2 4 6 8 10 12 14 16 18; do cat /var/r$i; done").ok();
    assert_eq!(out.stdout.split_whitespace().collect::<Vec<_>>(), ["0", "2", "4", "6", "8", "10", "12", "14", "16", "18"], "{out}");
    // The same import after gc: present again (or still).
    assert_eq!(s.import(&format!("dir:{}", loose.display())), std::slice::from_ref(&loose_id));
    assert!(s.layer_ids().contains(&loose_id));
}

// ---------------------------------------------------------------------------------------------
// 7. kill -9 in the middle of commit, apply and gc
// ---------------------------------------------------------------------------------------------

/// What an upper of /data with `n` small files and one large file looks like from inside.
const DATA_CHECK: &str = "ls /data | wc -l; cat /data/f7; wc -c < /data/big";

fn fill_upper(s: &Store, n: usize, big_mb: usize) {
    s.sh(
        "dev",
        &format!("mkdir -p /data && cd /data && i=0; while [ $i -lt {n} ]; do echo $i > f$i; i=$((i+1)); done; head -c {}000000 /dev/zero > big", big_mb),
    )
    .ok();
}

#[test]
fn kill_9_during_commit_loses_nothing() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    let (n, big_mb) = (2000, 64);
    let mut commits = 0;
    let mut needs_fill = true;
    let mut filled = 0;
    for (round, delay) in delays(6, 300).into_iter().enumerate() {
        if needs_fill {
            filled = round;
            // Different content each round, so that each commit is a new layer.
            s.sh("dev", "rm -rf /data").ok();
            fill_upper(s, n, big_mb);
            s.sh("dev", &format!("echo {round} > /data/round")).ok();
        }
        let gens_before = gen_numbers(s, "dev");
        let ctx = format!("round {round}, kill after {delay:?}");
        let (killed, err) = kill_after(spawn_group(s, &["commit", "dev", "-m", &format!("round {round}")], None), delay);
        // Right after the crash, before any other plyroot command could repair anything:
        // the environment runs and shows every file.
        let out = s.sh("dev", &format!("{DATA_CHECK}; cat /data/round"));
        assert_eq!(out.stdout, format!("{}\n7\n{big_mb}000000\n{filled}\n", n + 2), "{ctx} (killed: {killed}; commit's stderr: {err}): files lost: {out}");
        verify_ok(s, &ctx);
        let after = gen_numbers(s, "dev");
        let committed = after.len() > gens_before.len();
        if committed {
            assert_eq!(after.len(), gens_before.len() + 1, "{ctx}: more than one generation");
            assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "", "{ctx}: committed, but the upper is not clean");
            commits += 1;
            needs_fill = true;
        } else {
            let d = s.plyroot(&["diff", "dev", "/data", "--json"]).ok().json();
            assert_eq!(d.as_array().unwrap().len(), n + 3, "{ctx}: not committed, and the upper lost files");
            needs_fill = false;
        }
        // `layers` lists only whole layers (verify above checked their content).
        let _ = s.layers();
        eprintln!("kill during commit: {ctx}: killed={killed} committed={committed}");
    }
    // Whatever state the crashes left, the next commit works and everything is in a layer.
    let out = s.plyroot(&["commit", "dev", "-m", "final"]).ok();
    assert_eq!(s.plyroot(&["diff", "dev"]).ok().stdout, "", "{out}");
    let out = s.sh("dev", DATA_CHECK).ok();
    assert_eq!(out.stdout.lines().nth(1), Some("7"), "{out}");
    s.plyroot(&["gc"]).ok();
    verify_ok(s, "after the final commit and gc");
    for l in s.layers() {
        assert!(!l["used_by"].as_array().unwrap().is_empty(), "a layer no generation uses survived gc: {l}");
    }
    eprintln!("kill during commit: {commits} of 6 rounds had committed");
}

#[test]
fn kill_9_while_commit_digests_then_keep_working_loses_nothing() {
    // The crash point that matters most: commit has moved the upper aside and is digesting it.
    // The user then goes on working (a run that writes) and commits again: the first upper's
    // files must still be there, in the environment or set aside where plyroot says.
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    s.sh("dev", "mkdir /data && head -c 300000000 /dev/zero > /data/big && echo precious > /data/note").ok();
    let staged = s.home.join("envs/dev/commit");
    let child = spawn_group(s, &["commit", "dev", "-m", "big"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !staged.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (killed, _) = kill_after(child, Duration::from_millis(20));
    eprintln!("kill while commit digests: staging seen={}, killed={killed}", staged.exists());
    verify_ok(s, "after the crash");
    let out = s.sh("dev", "cat /data/note");
    assert_eq!(out.stdout, "precious\n", "right after the crash, the upper's files are gone: {out}");
    s.sh("dev", "echo later > /etc/later").ok();
    s.plyroot(&["commit", "dev", "-m", "later"]).ok();
    let out = s.sh("dev", "cat /data/note /etc/later");
    assert_eq!(out.stdout, "precious\nlater\n", "the interrupted commit's upper was lost: {out}");
}

#[test]
fn kill_9_during_apply_loses_nothing() {
    let p = need!(proj());
    let s = &p.s;
    // A large-ish tarball: 3000 small files and 96 MB.
    let big = s.path("bigsrc");
    let mut files: Vec<(String, String)> = (0..3000).map(|i| (format!("many/f{i}"), format!("{i}\n"))).collect();
    files.push(("big".into(), "x".repeat(96_000_000)));
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_tree(&big, &refs);
    drop(files);
    need!(make_tar(&big, &p.dir.join("big.tar"), Compression::None));
    fs::remove_dir_all(&big).unwrap();
    p.manifest(&dev_manifest(&["dir:base", "tar:big.tar"], ""));

    for (round, delay) in delays(6, 4500).into_iter().enumerate() {
        let ctx = format!("round {round}, kill after {delay:?}");
        let (killed, err) = kill_after(spawn_group(s, &["apply"], Some(&p.dir)), delay);
        verify_ok(s, &ctx);
        let list = s.plyroot(&["list", "--json"]).ok().json();
        let lock = p.lock();
        match list.as_array().unwrap().len() {
            0 => {}
            1 => {
                assert_eq!(gen_numbers(s, "dev"), [1], "{ctx}");
                let out = s.sh("dev", "ls /many | wc -l; wc -c < /big").ok();
                assert_eq!(out.stdout, "3000\n96000000\n", "{ctx}: a half-built environment: {out}");
            }
            _ => panic!("{ctx}: {list}"),
        }
        if let Some(lock) = lock {
            let v: Value = serde_json::from_str(&lock).unwrap_or_else(|e| panic!("{ctx}: a torn plyroot.lock ({e}): {lock}"));
            assert!(v["sources"].is_object(), "{ctx}: {lock}");
        }
        eprintln!("kill during apply: {ctx}: killed={killed}; stderr: {}", err.trim());
        // Start over for the next round, unless the env exists (then apply must say nothing changed).
        if list.as_array().unwrap().len() == 1 {
            p.apply(&[]).ok();
            assert_eq!(gen_numbers(s, "dev"), [1], "{ctx}: re-apply after a crash made a generation");
            s.plyroot(&["rm", "dev"]).ok();
            let _ = fs::remove_file(p.dir.join("plyroot.lock"));
        }
        // Leftovers of the crash are garbage gc collects; what stays is whole.
        s.plyroot(&["gc"]).ok();
        verify_ok(s, &format!("{ctx}, after gc"));
        let tmp = s.home.join("tmp");
        assert!(tree(&tmp).is_empty(), "{ctx}: gc left crash leftovers in {}: {:?}", tmp.display(), tree(&tmp));
    }
    p.apply(&[]).ok();
    assert_eq!(s.sh("dev", "ls /many | wc -l; cat /etc/fixture").ok().stdout, "3000\nfrom-the-layer\n");
    verify_ok(s, "final");
}

#[test]
fn kill_9_during_gc_loses_nothing() {
    let p = need!(proj());
    let s = &p.s;
    // Six generations, each with its own 3000-file layer: lots for gc to delete.
    let gens_n = 6;
    for i in 1..=gens_n {
        let files: Vec<(String, String)> = (0..3000).map(|j| (format!("g/f{j}"), format!("{i}-{j}\n"))).collect();
        let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        p.dir_source(&format!("g{i}"), &refs);
        p.manifest(&dev_manifest(&["dir:base", &format!("dir:g{i}")], ""));
        p.apply(&[]).ok();
    }
    s.sh("dev", "echo upper > /etc/upper-file").ok();
    let current_layers = [p.pinned("dir:base")[0].clone(), p.pinned(&format!("dir:g{gens_n}"))[0].clone()];
    for (round, delay) in delays(4, 400).into_iter().enumerate() {
        let ctx = format!("round {round}, kill after {delay:?}");
        let (killed, err) = kill_after(spawn_group(s, &["gc", "--keep", &(gens_n - round).to_string()], None), delay);
        verify_ok(s, &ctx);
        let ids = s.layer_ids();
        for l in &current_layers {
            assert!(ids.contains(l), "{ctx}: gc lost a layer of the current generation {l}");
        }
        assert_eq!(current(s, "dev"), gens_n as u64, "{ctx}");
        let out = s.sh("dev", "cat /g/f5 /etc/upper-file").ok();
        assert_eq!(out.stdout, format!("{gens_n}-5\nupper\n"), "{ctx}: {out}");
        // Every generation still listed can still be switched to and run.
        for g in gen_numbers(s, "dev") {
            s.plyroot(&["switch", "dev", &g.to_string()]).ok();
            let out = s.run("dev", &["--ephemeral"], &["cat", "/g/f5"]);
            assert_eq!(out.code, 0, "{ctx}: generation {g} survived gc, but a layer of it did not (gc stderr: {err}): {out}");
        }
        s.plyroot(&["switch", "dev", &gens_n.to_string()]).ok();
        eprintln!("kill during gc: {ctx}: killed={killed}");
    }
    let out = s.plyroot(&["gc", "--keep", "1"]).ok();
    assert_eq!(gen_numbers(s, "dev"), [gens_n as u64], "{out}");
    assert_eq!(s.layer_ids(), current_layers.iter().cloned().collect(), "{out}");
    assert!(tree(&s.home.join("tmp")).is_empty(), "gc left leftovers: {:?}", tree(&s.home.join("tmp")));
    verify_ok(s, "final");
    assert_eq!(s.sh("dev", "cat /g/f5 /etc/upper-file").ok().stdout, format!("{gens_n}-5\nupper\n"));
}

// ---------------------------------------------------------------------------------------------
// 8. verify
// ---------------------------------------------------------------------------------------------

#[test]
fn verify_detects_a_corrupted_layer() {
    let p = need!(proj());
    let s = &p.s;
    p.dir_source("top", &[("etc/top", "top\n")]);
    p.manifest(&dev_manifest(&["dir:base", "dir:top"], ""));
    p.apply(&[]).ok();
    verify_ok(s, "fresh");
    let (base, top) = (p.pinned("dir:base")[0].clone(), p.pinned("dir:top")[0].clone());
    let file = s.home.join("layers").join(base.trim_start_matches("sha256:")).join("root/etc/fixture");
    assert!(file.is_file(), "the store layout changed: no {}", file.display());
    // Files in a layer may be read-only, and with subordinate ids root's: changed as their owner.
    let script = format!("chmod u+w {0} {1} && printf 'tampered!!!!!!\\n' > {0}", shell_quote(&file.to_string_lossy()), shell_quote(&file.parent().unwrap().to_string_lossy()));
    as_owner(&["sh", "-c", &script]).ok();
    let out = s.plyroot(&["verify"]);
    assert_ne!(out.code, 0, "verify missed a modified file: {out}");
    assert_ne!(out.code, 125, "corruption is a finding, not plyroot's own error: {out}");
    let bad: Vec<&str> = out.stdout.lines().filter(|l| l.contains("CORRUPT")).collect();
    assert_eq!(bad.len(), 1, "{out}");
    assert!(bad[0].contains(&base), "verify should name the corrupt layer {base}: {out}");
    assert!(!out.stdout.lines().any(|l| l.contains("CORRUPT") && l.contains(&top)), "{out}");
    let j = s.plyroot(&["verify", "--json"]).failed().json();
    let v: Vec<(String, bool)> = j.as_array().unwrap().iter().map(|v| (v["id"].as_str().unwrap().to_string(), v["ok"].as_bool().unwrap())).collect();
    assert!(v.contains(&(base.clone(), false)) && v.contains(&(top.clone(), true)), "{j}");

    // An added file is corruption too (in another layer).
    let top_file = s.home.join("layers").join(top.trim_start_matches("sha256:")).join("root/etc/extra-file");
    let script = format!("chmod u+w {0} && printf x > {1}", shell_quote(&top_file.parent().unwrap().to_string_lossy()), shell_quote(&top_file.to_string_lossy()));
    as_owner(&["sh", "-c", &script]).ok();
    let out = s.plyroot(&["verify"]);
    assert_ne!(out.code, 0, "verify missed an added file: {out}");
    assert!(out.stdout.lines().any(|l| l.contains("CORRUPT") && l.contains(&top)), "{out}");
}

// ---------------------------------------------------------------------------------------------
// All or nothing: every check before the first change
// ---------------------------------------------------------------------------------------------

/// What `current` of `env` points at, read from the store itself (no plyroot command).
fn current_link(s: &Store, env: &str) -> PathBuf {
    fs::read_link(s.home.join("envs").join(env).join("current")).unwrap()
}

#[test]
fn rm_of_a_running_environment_removes_nothing() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest("[env.dev]\nfrom = [\"dir:base\"]\n\n[env.spare]\nfrom = [\"dir:base\"]\n");
    p.apply(&[]).ok();
    let bin = s.path("bin");
    s.plyroot(&["export", "dev", "sh", "--to", &bin.to_string_lossy()]).ok();
    let running = bg(s, "dev", &[], "true", "echo done");
    let snap = snapshot(s);
    // `spare` comes first and could go; `dev` cannot: neither goes, and dev keeps its launcher.
    s.plyroot(&["rm", "spare", "dev"]).plyroot_error(&["'dev'", "remove"]);
    assert!(fs::symlink_metadata(bin.join("sh")).is_ok(), "rm removed the launcher of an environment it then refused to remove");
    assert_eq!(s.plyroot(&["exports", "--json"]).ok().json().as_array().unwrap().len(), 1);
    assert_eq!(snapshot(s), snap, "a refused rm changed the store");
    assert_eq!(running.finish().ok().stdout, "ready\ndone\n");
    s.plyroot(&["rm", "spare", "dev"]).ok();
    assert!(fs::symlink_metadata(bin.join("sh")).is_err());
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));
}

/// `plyroot apply` in the project directory while that directory cannot be written: read-only
/// in a private mount namespace as root (permissions do not stop root), mode 0555 otherwise.
fn apply_read_only(p: &Proj) -> Out {
    let dir = shell_quote(&p.dir.to_string_lossy());
    let plyroot = shell_quote(&bin().to_string_lossy());
    let mut c = if me().regime == Regime::Root {
        let mut c = Command::new(tool("unshare").unwrap_or_else(|e| panic!("{e}")));
        let script = format!("mount --make-rprivate / && mount --bind {dir} {dir} && mount -o remount,bind,ro {dir} && cd {dir} && exec {plyroot} apply");
        c.args(["-m", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("chmod 555 {dir} && cd {dir} && {plyroot} apply; rc=$?; chmod 755 {dir}; exit $rc")]);
        c
    };
    c.env("PLYROOT_HOME", &p.s.home).env_remove("PLYROOT_STORE");
    run_with(&mut c, None, TIMEOUT)
}

#[test]
fn apply_that_cannot_write_its_lock_file_changes_no_environment() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest(&dev_manifest(&["dir:base"], ""));
    p.apply(&[]).ok();
    // A new source (so the lock must change), a changed environment and a new one.
    p.dir_source("extra", &[("opt/extra", "extra\n")]);
    p.manifest("[env.dev]\nfrom = [\"dir:base\", \"dir:extra\"]\n\n[env.more]\nfrom = [\"dir:base\"]\n");
    let snap = snapshot(s);
    let lock = p.lock();
    let lock_path = p.dir.join("plyroot.lock");
    apply_read_only(&p).plyroot_error(&[&lock_path.to_string_lossy(), "nothing was applied"]);
    assert_eq!(gen_numbers(s, "dev"), [1], "apply changed an environment, then failed");
    let names: Vec<String> = s.plyroot(&["list", "--json"]).ok().json().as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["dev"], "apply created an environment, then failed");
    assert_eq!(p.lock(), lock);
    assert_eq!(fs::read_dir(&p.dir).unwrap().count(), 4, "no probe or temporary file is left beside the manifest");
    // Only the layers it imported are new (gc collects them if they stay unused).
    assert_ne!(snapshot(s), snap);
    // Writable again, the same apply does it all.
    p.apply(&[]).ok();
    assert_eq!(gen_numbers(s, "dev"), [1, 2]);
    assert_eq!(s.run("more", &[], &["cat", "/etc/fixture"]).ok().stdout, "from-the-layer\n");
    assert_eq!(s.run("dev", &[], &["cat", "/opt/extra"]).ok().stdout, "extra\n");
}

#[test]
fn apply_checks_every_environment_before_changing_one() {
    let p = need!(proj());
    let s = &p.s;
    p.manifest("[env.a]\nfrom = [\"dir:base\"]\n\n[env.b]\nfrom = [\"dir:base\"]\n");
    p.apply(&[]).ok();
    // A damaged record in b (one that is not current): b cannot get a new generation.
    let planted = s.home.join("envs/b/generations/2.json");
    fs::write(&planted, "garbage\n").unwrap();
    p.manifest("[env.a]\nfrom = [\"dir:base\"]\nenv = { X = \"1\" }\n\n[env.b]\nfrom = [\"dir:base\"]\nenv = { X = \"1\" }\n");
    p.apply(&[]).plyroot_error(&[&planted.to_string_lossy()]);
    assert_eq!(current_link(s, "a"), Path::new("generations/1.json"), "apply changed a, then failed on b");
    assert!(!s.home.join("envs/a/generations/2.json").exists());
    fs::remove_file(&planted).unwrap();
    p.apply(&[]).ok();
    assert_eq!((gen_numbers(s, "a"), gen_numbers(s, "b")), (vec![1, 2], vec![1, 2]));
}

#[test]
fn switch_checks_before_switching() {
    let p = need!(three_generations());
    let s = &p.s;
    s.sh("dev", "echo mine > /etc/mine").ok();
    // A damaged upper record: the switch is refused, not done and then reported as failed.
    let upper_json = s.home.join("envs/dev/upper.json");
    let saved = fs::read(&upper_json).unwrap();
    fs::write(&upper_json, "[\"sha256:abc\"]").unwrap();
    s.plyroot(&["switch", "dev", "1"]).plyroot_error(&[&upper_json.to_string_lossy()]);
    assert_eq!(current_link(s, "dev"), Path::new("generations/3.json"));
    fs::write(&upper_json, saved).unwrap();
    // A generation whose layer is gone from the store: refused, naming the layer.
    let x1 = p.pinned("dir:x1")[0].clone();
    let layer = s.home.join("layers").join(x1.trim_start_matches("sha256:"));
    fs::rename(&layer, s.path("x1-layer")).unwrap();
    s.plyroot(&["switch", "dev", "1"]).plyroot_error(&[&x1, "not in the store"]);
    assert_eq!(current_link(s, "dev"), Path::new("generations/3.json"));
    fs::rename(s.path("x1-layer"), &layer).unwrap();
    s.plyroot(&["switch", "dev", "2"]).ok();
    assert_eq!(current_link(s, "dev"), Path::new("generations/2.json"));
}

#[test]
fn diff_names_a_nix_store_path_once() {
    let s = need!(Store::with_busybox_env());
    if Path::new("/nix").exists() {
        // The host's /nix is bound inside: what is written there is the host's, not the upper's.
        return skip("the host has a /nix");
    }
    s.sh("t", "mkdir -p /nix/store/aaa-hello/bin /nix/store/aaa-hello/share/doc && printf 1234567 > /nix/store/aaa-hello/bin/hello && printf 123 > /nix/store/aaa-hello/share/doc/README").ok();
    let out = s.plyroot(&["diff", "t"]).ok();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["A /nix/", "A /nix/store/", "A /nix/store/aaa-hello/  (10 B)"], "{out}");
    // Asked for, its files are shown.
    let out = s.plyroot(&["diff", "t", "/nix/store/aaa-hello/bin"]).ok();
    assert!(out.stdout.contains("A /nix/store/aaa-hello/bin/hello  (7 B)"), "{out}");
    // Hidden whole once committed below: one D line.
    s.plyroot(&["commit", "t"]).ok();
    s.sh("t", "rm -rf /nix/store/aaa-hello").ok();
    let out = s.plyroot(&["diff", "t"]).ok();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["D /nix/store/aaa-hello"], "{out}");
}
