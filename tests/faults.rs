//! Tier 3: fault injection into every command that changes an environment or the store (issue 9,
//! item 3): `reset`, `reset --force`, `commit`, `rebase --ours`, `rebase --theirs`, `apply`,
//! `squash` and `gc`, each on a fresh copy of a small busybox fixture store whose upper holds a
//! file the user wrote.
//!
//! 1. A clean run under strace lists the injection points: every call of a syscall that changes
//!    the file system (rename*, mkdir*, unlink*, rmdir, symlink*, link*, open/openat with
//!    O_CREAT, write, fsync, fdatasync, syncfs, chmod*, mknodat, truncate) on a path in the store
//!    or the project, each as (syscall, its n-th call).
//! 2. For each point the command runs again under `strace -e inject=SYSCALL:signal=KILL:when=N`,
//!    then in a second pass with `error=ENOSPC`. strace must report the injection at that same
//!    call (compared with the clean run's, digits aside), and the command must die of SIGKILL,
//!    or see the error.
//! 3. An ordinary command follows (`diff` or `run`, alternately: both recover), then the state is
//!    observed from outside: the generations and which is current, the upper (`diff`), whether
//!    it is stale, what a run sees of the user's file, the copies of it under `saved/`. It must be
//!    exactly the state before the command or exactly the state after a clean run (gc: anything
//!    between the two): nothing half done, no orphan generation, the user's file always
//!    reachable (but after a finished `reset --force`). After ENOSPC, a command that failed must
//!    have changed nothing, and one that succeeded must be complete. Then `gc` must leave no
//!    staging directory or temp file, `verify` must pass, and every generation's layers exist.
//! 4. One more run with the injection one call past the last of every syscall: nothing is
//!    injected and the command completes, so the loop reached the end.
//!
//! Covered: every such syscall of the plyroot process. Not covered: the helper process plyroot
//! forks, when unprivileged, to act as root in a user namespace (commit's digest and rebase's
//! conflict walk, both read-only, and a removal that needs it): strace would have to follow it
//! into the setuid `newuidmap`, which ptrace forbids. As root there is no such helper.
//!
//! Runs as root and as unprivileged users with and without /etc/subuid ranges (tests/run.sh).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The syscalls that change the file system. `?`: unknown on this architecture is fine.
const SYSCALLS: &[&str] = &[
    "rename", "renameat", "renameat2", "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "symlink", "symlinkat", "link", "linkat", "open",
    "openat", "creat", "write", "fsync", "fdatasync", "syncfs", "chmod", "fchmod", "fchmodat", "mknodat", "truncate", "ftruncate",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Enospc,
}

/// One call to interrupt: the `nth` call (1-based) of `syscall`, as the clean run's strace showed it.
#[derive(Clone, Debug)]
struct Point {
    syscall: String,
    nth: usize,
    line: String,
}

/// What a user can see of the environment `dev`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    generations: Vec<u64>,
    current: u64,
    /// `plyroot diff dev`, one line per change.
    upper: Vec<String>,
    /// `diff` says the upper was written on other layers than the current generation's.
    stale: bool,
    /// Exit status and output of `run dev -- cat /etc/userfile /etc/fixture`.
    sees: String,
    /// Copies of the user's file under saved/.
    saved: usize,
}

impl State {
    fn user_file_reachable(&self) -> bool {
        self.saved > 0 || self.sees.contains("precious") || self.upper.iter().any(|l| l.contains("/etc/userfile"))
    }
}

struct Op {
    args: &'static [&'static str],
    /// Started in the project directory (apply reads plyroot.toml there).
    in_proj: bool,
    /// gc prunes generation by generation: an interrupted one may have pruned some.
    partial: bool,
    /// `reset --force` deletes the user's file by request.
    deletes: bool,
}

struct Fixture {
    s: Store,
    proj: PathBuf,
    /// Pristine copies of the store and the project, restored before every run.
    tpl: PathBuf,
    strace: PathBuf,
}

impl Fixture {
    fn new() -> Result<Fixture, String> {
        userns()?;
        busybox()?;
        let strace = tool("strace")?;
        let s = Store::new();
        let proj = s.path("proj");
        fs::create_dir_all(&proj).unwrap();
        busybox_rootfs(&proj.join("base"))?;
        let tpl = s.path("tpl");
        Ok(Fixture { s, proj, tpl, strace })
    }

    fn apply(&self, from: &[&str]) {
        let from: Vec<String> = from.iter().map(|f| format!("{f:?}")).collect();
        fs::write(self.proj.join("plyroot.toml"), format!("[env.dev]\nfrom = [{}]\n", from.join(", "))).unwrap();
        let mut c = self.s.cmd(&["apply"]);
        c.current_dir(&self.proj);
        run_with(&mut c, None, TIMEOUT).ok();
    }

    /// A directory source `proj/NAME` with one file.
    fn source(&self, name: &str, file: &str, content: &str) {
        let d = self.proj.join(name);
        fs::create_dir_all(d.join(Path::new(file).parent().unwrap())).unwrap();
        fs::write(d.join(file), content).unwrap();
        set_mtimes(&d, MTIME);
    }

    /// Writes into the upper as a run would (the files are the user's own either way).
    fn write_upper(&self, files: &[(&str, &str)]) {
        // Not under a live overlay of the upper (a keeper's): its caches would not see the files.
        end_keepers(&self.s.home);
        let up = self.s.home.join("envs/dev/upper");
        for (p, content) in files {
            fs::create_dir_all(up.join(p).parent().unwrap()).unwrap();
            fs::write(up.join(p), content).unwrap();
        }
    }

    fn user_files(&self) {
        self.write_upper(&[("etc/userfile", "precious\n"), ("etc/fixture", "ours\n"), ("home/notes/n1", "n1\n")]);
    }

    fn save(&self) {
        end_keepers(&self.s.home);
        // Overlay leaves its workdir's work/ mode 000: cp could not read it.
        own(&self.s.home);
        fs::create_dir_all(&self.tpl).unwrap();
        cp_a(std::slice::from_ref(&self.s.home), &self.tpl.join("store"));
        cp_a(std::slice::from_ref(&self.proj), &self.tpl.join("proj"));
    }

    /// Puts the store and the project back as [`Fixture::save`] found them. Layers are immutable
    /// (and `verify` checks them after every run): only those that came or went are copied, and
    /// the project's source directories stay; everything else is copied afresh.
    fn restore(&self) {
        let (tpl, live) = (self.tpl.join("store"), &self.s.home);
        end_keepers(live);
        let entries = |d: &Path| -> Vec<PathBuf> { fs::read_dir(d).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default() };
        for e in entries(live) {
            if !e.ends_with("layers") {
                wipe(&e);
            }
        }
        let mut copy: Vec<PathBuf> = entries(&tpl).into_iter().filter(|e| !e.ends_with("layers")).collect();
        cp_a(&copy, live);
        for l in entries(&live.join("layers")) {
            if !tpl.join("layers").join(l.file_name().unwrap()).exists() {
                wipe(&l);
            }
        }
        copy = entries(&tpl.join("layers")).into_iter().filter(|l| !live.join("layers").join(l.file_name().unwrap()).exists()).collect();
        cp_a(&copy, &live.join("layers"));
        for e in entries(&self.proj) {
            if !e.is_dir() || e.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".tmp")) {
                wipe(&e);
            }
        }
        copy = entries(&self.tpl.join("proj")).into_iter().filter(|e| !e.is_dir()).collect();
        cp_a(&copy, &self.proj);
    }

    /// Runs the operation under strace: `inject` none (the clean run, tracing every syscall of
    /// [`SYSCALLS`]), one point, or "one past the end" of each syscall's calls.
    fn strace(&self, op: &Op, inject: Inject) -> (Out, String) {
        let trace = self.s.path("trace");
        let _ = fs::remove_file(&trace);
        let mut c = Command::new(&self.strace);
        c.args(["-o", &trace.to_string_lossy(), "-q", "-y", "-s", "8", "-e", "signal=KILL"]);
        match &inject {
            Inject::None => {
                c.arg("-e").arg(format!("trace={}", all_syscalls()));
            }
            Inject::At(p, fault) => {
                let what = match fault {
                    Fault::Kill => "signal=KILL",
                    Fault::Enospc => "error=ENOSPC",
                };
                c.arg("-e").arg(format!("trace={}", p.syscall));
                c.arg("-e").arg(format!("inject={}:{what}:when={}", p.syscall, p.nth));
            }
            Inject::PastEnd(counts) => {
                c.arg("-e").arg(format!("trace={}", all_syscalls()));
                for s in SYSCALLS {
                    let n = counts.get(*s).copied().unwrap_or(0) + 1;
                    c.arg("-e").arg(format!("inject=?{s}:signal=KILL:when={n}"));
                }
            }
        }
        c.arg(bin()).args(op.args).env("PLYROOT_HOME", &self.s.home).env_remove("PLYROOT_STORE");
        c.current_dir(if op.in_proj { &self.proj } else { self.s.tmp.path() });
        let out = run_with(&mut c, None, TIMEOUT);
        (out, fs::read_to_string(&trace).unwrap_or_default())
    }

    /// Observes `dev`, recovering first with `diff` or with `run`.
    fn observe(&self, run_first: bool) -> (State, String) {
        let see = || {
            let o = self.s.run("dev", &[], &["cat", "/etc/userfile", "/etc/fixture"]);
            let sees = format!("{}:{}", o.code, o.stdout);
            (sees, o)
        };
        let mut log = String::new();
        let early = run_first.then(see);
        let diff = self.s.plyroot(&["diff", "dev"]);
        assert_eq!(diff.code, 0, "diff failed: {diff}");
        let (sees, run) = early.unwrap_or_else(see);
        log += &format!("{diff}{run}");
        let gens = self.s.plyroot(&["generations", "dev", "--json"]).ok().json();
        let gens = gens.as_array().unwrap();
        let cur: Vec<u64> = gens.iter().filter(|g| g["current"] == true).map(|g| g["number"].as_u64().unwrap()).collect();
        assert_eq!(cur.len(), 1, "exactly one generation must be current: {gens:?}");
        let saved_dir = self.s.home.join("envs/dev/saved");
        let saved = fs::read_dir(&saved_dir)
            .map(|rd| rd.flatten().filter(|e| fs::read_to_string(e.path().join("etc/userfile")).is_ok_and(|c| c == "precious\n")).count())
            .unwrap_or(0);
        let state = State {
            generations: gens.iter().map(|g| g["number"].as_u64().unwrap()).collect(),
            current: cur[0],
            upper: diff.lines(),
            stale: diff.stderr.contains("against the layers the upper was written on"),
            sees,
            saved,
        };
        (state, log)
    }

    /// gc removes every leftover; what stays verifies, and every generation's layers exist.
    fn collect_and_verify(&self, ctx: &str) {
        let out = self.s.plyroot(&["gc"]);
        assert_eq!(out.code, 0, "{ctx}: gc failed: {out}");
        let left = leftovers(&self.s.home);
        assert!(left.is_empty(), "{ctx}: gc left crash leftovers: {left:?}");
        let out = self.s.plyroot(&["verify"]);
        assert!(out.code == 0 && !out.stdout.contains("CORRUPT"), "{ctx}: verify: {out}");
        let gens = self.s.home.join("envs/dev/generations");
        for e in fs::read_dir(&gens).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "json")) {
            let g: serde_json::Value = serde_json::from_slice(&fs::read(e.path()).unwrap()).unwrap();
            for l in g["layers"].as_array().unwrap() {
                let hex = l.as_str().unwrap().trim_start_matches("sha256:");
                assert!(self.s.home.join("layers").join(hex).join("layer.json").exists(), "{ctx}: {} names layer {l}, which is gone", e.path().display());
            }
        }
    }
}

enum Inject<'a> {
    None,
    At(&'a Point, Fault),
    PastEnd(BTreeMap<String, usize>),
}

fn all_syscalls() -> String {
    SYSCALLS.iter().map(|s| format!("?{s}")).collect::<Vec<_>>().join(",")
}

/// `cp -a FROM… TO`: into TO when several (or TO exists), as TO when one.
fn cp_a(from: &[PathBuf], to: &Path) {
    if from.is_empty() {
        return;
    }
    // With subordinate ids, layers hold files of those ids: copied where they are root's, so that
    // the copy keeps their owners.
    let mut args: Vec<&str> = vec!["cp", "-a"];
    args.extend(from.iter().map(|p| p.to_str().unwrap()));
    args.push(to.to_str().unwrap());
    let o = as_owner(&args);
    assert_eq!(o.code, 0, "copying the fixture failed: {o}");
}

/// Removes a file or a tree that runs left read-only parts in (overlay's mode-000 workdir).
fn wipe(p: &Path) {
    match fs::symlink_metadata(p) {
        Err(_) => return,
        Ok(m) if !m.is_dir() => return fs::remove_file(p).unwrap_or_else(|e| panic!("cannot remove {}: {e}", p.display())),
        Ok(_) => {}
    }
    if fs::remove_dir_all(p).is_ok() {
        return;
    }
    if me().regime == Regime::SubIds {
        as_owner(&["rm", "-rf", p.to_str().unwrap()]).ok();
        return;
    }
    own(p);
    fs::remove_dir_all(p).unwrap_or_else(|e| panic!("cannot remove {}: {e}", p.display()));
}

/// Makes every directory under `p` ours to read and change (0700 where it lacks that).
fn own(p: &Path) {
    if let Ok(m) = fs::symlink_metadata(p) {
        if m.is_dir() {
            if m.permissions().mode() & 0o700 != 0o700 {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
            }
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                own(&e.path());
            }
        }
    }
}

/// Staging directories, temp files and interrupted changes anywhere in the store but inside
/// layers.
fn leftovers(store: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(store.join("tmp")).into_iter().flatten().flatten().map(|e| e.path().display().to_string()).collect();
    fn walk(p: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(p).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.contains(".plyroot-") || name.contains(".tmp") || ["journal.json", "commit", "commit.json", "upper.new", "upper.old"].contains(&name.as_str()) {
                out.push(path.display().to_string());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) && !["layers", "tmp", "upper", "saved", "work", "mnt", "skel"].contains(&name.as_str()) {
                walk(&path, out);
            }
        }
    }
    walk(store, &mut out);
    out
}

/// A strace line without what varies between runs: digits (pids, fds, times) and the result.
fn normalized(line: &str) -> String {
    let call = line.rsplit_once(") = ").map(|(c, _)| c).unwrap_or(line);
    let mut s = String::new();
    for c in call.chars() {
        if c.is_ascii_digit() {
            if !s.ends_with('#') {
                s.push('#');
            }
        } else {
            s.push(c);
        }
    }
    s
}

fn syscall_of(line: &str) -> Option<&str> {
    let name = &line[..line.find('(')?];
    SYSCALLS.contains(&name).then_some(name)
}

/// The injection points of a clean run's trace, and how many calls each syscall made.
fn points(trace: &str, roots: &[&Path]) -> (Vec<Point>, BTreeMap<String, usize>) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some(name) = syscall_of(line) else { continue };
        let n = counts.entry(name.to_string()).or_default();
        *n += 1;
        let ours = roots.iter().any(|r| line.contains(&*r.to_string_lossy()));
        let creates = !matches!(name, "open" | "openat") || line.contains("O_CREAT");
        if ours && creates {
            out.push(Point { syscall: name.to_string(), nth: *n, line: line.to_string() });
        }
    }
    (out, counts)
}

/// Checks that strace injected `fault` at `p`, and that the command felt it.
fn check_injected(p: &Point, fault: Fault, out: &Out, trace: &str, ctx: &str) {
    let lines: Vec<&str> = trace.lines().filter(|l| syscall_of(l) == Some(p.syscall.as_str())).collect();
    let hit = lines.get(p.nth - 1).unwrap_or_else(|| panic!("{ctx}: the command made only {} {} calls; the clean run made at least {}\n{trace}{out}", lines.len(), p.syscall, p.nth));
    assert_eq!(normalized(hit), normalized(&p.line), "{ctx}: the injection hit another call than the clean run's {}-th {}", p.nth, p.syscall);
    match fault {
        Fault::Kill => {
            assert_eq!(out.code, 128 + 9, "{ctx}: not killed by SIGKILL: {out}");
            assert!(hit.ends_with("= ?") && lines.len() == p.nth, "{ctx}: the process went on past the kill:\n{trace}");
            assert!(trace.contains("+++ killed by SIGKILL +++"), "{ctx}: strace saw no kill:\n{trace}");
        }
        Fault::Enospc => assert!(hit.contains("ENOSPC") && hit.contains("(INJECTED)"), "{ctx}: strace reports no injection: {hit}"),
    }
}

fn fault_injection(op: Op, setup: impl Fn(&Fixture)) {
    let f = need!(Fixture::new());
    setup(&f);
    f.save();
    let before = f.observe(false).0;
    assert!(before.user_file_reachable(), "the fixture has no user file: {before:?}");
    f.restore();
    let (out, trace) = f.strace(&op, Inject::None);
    assert_eq!(out.code, 0, "the clean run failed: {out}");
    let (after, log) = f.observe(false);
    assert_ne!(before, after, "{:?} changed nothing that a user sees: this test would prove nothing{log}", op.args);
    assert!(op.deletes || after.user_file_reachable(), "{after:?}");
    f.collect_and_verify("after the clean run");
    let (points, counts) = points(&trace, &[&f.s.home, &f.proj]);
    assert!(points.len() >= 5, "only {} injection points in {:?}:\n{trace}", points.len(), op.args);
    let mut landed = BTreeMap::new();
    for fault in [Fault::Kill, Fault::Enospc] {
        for (i, p) in points.iter().enumerate() {
            let ctx = format!("{:?}, {fault:?} at call {} of {} ({})", op.args, p.nth, p.syscall, p.line);
            f.restore();
            let (out, trace) = f.strace(&op, Inject::At(p, fault));
            check_injected(p, fault, &out, &trace, &ctx);
            let (state, log) = f.observe(i % 2 == 1);
            let ok = if op.partial {
                let mut between = state.clone();
                between.generations = after.generations.clone();
                between == after && after.generations.iter().all(|g| state.generations.contains(g)) && state.generations.iter().all(|g| before.generations.contains(g))
            } else if fault == Fault::Enospc && out.code != 0 {
                state == before
            } else if fault == Fault::Enospc {
                state == after
            } else {
                state == before || state == after
            };
            assert!(
                ok,
                "{ctx}: the state after recovery is neither the one before nor the one after (exit {}):\n  before: {before:?}\n  after:  {after:?}\n  now:    {state:?}{out}{log}",
                out.code
            );
            assert!(op.deletes || state.user_file_reachable(), "{ctx}: the user's file is gone: {state:?}{log}");
            f.collect_and_verify(&ctx);
            *landed.entry((fault, state == after)).or_insert(0) += 1;
        }
    }
    // Past the last call of every syscall nothing is injected, and the command completes.
    f.restore();
    let (out, trace) = f.strace(&op, Inject::PastEnd(counts));
    assert_eq!(out.code, 0, "{:?} with injection past the end: {out}", op.args);
    assert!(!trace.contains("INJECTED") && !trace.contains("killed by"), "{trace}");
    assert_eq!(f.observe(false).0, after);
    eprintln!("{:?}: {} injection points; (fault, finished) → runs: {landed:?}", op.args, points.len());
}

/// `dev` on the busybox root, its skeleton built, and the user's files in its upper.
fn dev(f: &Fixture) {
    f.apply(&["dir:base"]);
    f.s.run("dev", &[], &["true"]).ok();
    f.user_files();
}

/// `dev` at generation 1 with an upper written on generation 2 (= 1 + a commit of /etc/fixture):
/// stale, and /etc/fixture conflicts.
fn stale(f: &Fixture) {
    f.apply(&["dir:base"]);
    f.s.run("dev", &[], &["true"]).ok();
    f.write_upper(&[("etc/fixture", "v1\n")]);
    f.s.plyroot(&["commit", "dev"]).ok();
    f.user_files();
    f.s.plyroot(&["rollback", "dev"]).ok();
}

#[test]
fn faults_in_reset() {
    fault_injection(Op { args: &["reset", "dev"], in_proj: false, partial: false, deletes: false }, dev);
}

#[test]
fn faults_in_reset_force() {
    fault_injection(Op { args: &["reset", "--force", "dev"], in_proj: false, partial: false, deletes: true }, dev);
}

#[test]
fn faults_in_commit() {
    fault_injection(Op { args: &["commit", "dev", "-m", "mine"], in_proj: false, partial: false, deletes: false }, dev);
}

#[test]
fn faults_in_rebase_ours() {
    fault_injection(Op { args: &["rebase", "--ours", "dev"], in_proj: false, partial: false, deletes: false }, stale);
}

#[test]
fn faults_in_rebase_theirs() {
    fault_injection(Op { args: &["rebase", "--theirs", "dev"], in_proj: false, partial: false, deletes: false }, stale);
}

#[test]
fn faults_in_apply() {
    fault_injection(Op { args: &["apply"], in_proj: true, partial: false, deletes: false }, |f| {
        dev(f);
        f.source("extra", "opt/extra", "extra\n");
        fs::write(f.proj.join("plyroot.toml"), "[env.dev]\nfrom = [\"dir:base\", \"dir:extra\"]\n").unwrap();
    });
}

/// apply with a build step: the step runs in a child (not traced), its layer is published, its
/// record and the lock file written, the generation made. Interrupted anywhere, `dev` is as it
/// was or as applied, and gc leaves no build leftover.
#[test]
fn faults_in_apply_with_a_step() {
    fault_injection(Op { args: &["apply"], in_proj: true, partial: false, deletes: false }, |f| {
        dev(f);
        fs::write(f.proj.join("plyroot.toml"), "[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"echo built > /opt/built; touch -d @1700000000 /opt/built /opt\"]\n").unwrap();
    });
}

#[test]
fn faults_in_squash() {
    fault_injection(Op { args: &["squash", "dev", "--from", "2"], in_proj: false, partial: false, deletes: false }, |f| {
        f.source("x1", "opt/x", "one\n");
        f.source("x2", "opt/y", "two\n");
        f.apply(&["dir:base", "dir:x1", "dir:x2"]);
        f.s.run("dev", &[], &["true"]).ok();
        f.user_files();
    });
}

#[test]
fn faults_in_gc() {
    fault_injection(Op { args: &["gc", "--keep", "1"], in_proj: false, partial: true, deletes: false }, |f| {
        f.source("x1", "opt/x", "one\n");
        f.source("x2", "opt/x", "two\n");
        f.apply(&["dir:base"]);
        f.apply(&["dir:base", "dir:x1"]);
        f.apply(&["dir:base", "dir:x2"]);
        f.s.run("dev", &[], &["true"]).ok();
        f.user_files();
    });
}
