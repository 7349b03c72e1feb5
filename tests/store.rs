//! Tier 3: the store keeps to itself (issue 9, items 6 and 8). The store, `envs/`, each
//! environment's directory and its upper are private to their owner; staging directories are
//! judged live by a lock, not by a pid (which means nothing in another pid namespace, or after
//! reuse); temp files that crashed writers left are removed by the next command or gc, those
//! still being written are not; atomic writes are fsync'd, and a run calls no fsync at all.
//!
//! Runs as root and as unprivileged users with and without /etc/subuid ranges (tests/run.sh).

#[macro_use]
mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// An environment `dev` from a one-file directory source (no run needed).
fn small_env(s: &Store) {
    let src = s.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/os-release"), "ID=small\n").unwrap();
    set_mtimes(&src, MTIME);
    s.create("dev", &[&format!("dir:{}", src.display())]);
}

#[test]
fn the_store_and_every_upper_are_private() {
    need!(userns());
    let s = Store::new();
    // Only the store's own modes may protect it: the temp dir above it is open to all.
    fs::set_permissions(s.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    need!(s.busybox_env("dev"));
    let (env, up) = (s.home.join("envs/dev"), s.home.join("envs/dev/upper"));
    for p in [&s.home, &s.home.join("envs"), &env] {
        assert_eq!(mode(p), 0o700, "{} is not private", p.display());
    }
    // The upper is the environment's `/`: open inside (services that drop root must enter it),
    // guarded by the environment's directory outside.
    let root_mode = |what: &str| {
        let o = s.run("dev", &[], &["stat", "-c", "%a", "/"]).ok();
        assert_eq!(o.stdout, "755\n", "{what}: / inside the environment: {o}");
        assert_eq!(mode(&up), 0o755, "{what}");
    };
    root_mode("created");
    s.sh("dev", "echo mine > /etc/secret").ok();
    s.plyroot(&["reset", "dev"]).ok();
    assert_eq!(mode(&env.join("saved")), 0o700, "reset keeps uppers where others can read them");
    root_mode("after reset");
    s.sh("dev", "echo mine > /etc/secret2").ok();
    s.plyroot(&["commit", "dev"]).ok();
    root_mode("after commit");
    s.sh("dev", "echo mine > /etc/secret3").ok();

    if me().regime != Regime::Root {
        return;
    }
    // Another local user can neither list the upper nor read a file in it by name.
    let runuser = need!(tool("runuser"));
    let other = ["plyci-nosub", "nobody"].into_iter().find(|u| Command::new("id").arg(u).output().is_ok_and(|o| o.status.success())).expect("no other local user");
    for args in [vec!["ls", up.to_str().unwrap()], vec!["cat", up.join("etc/secret3").to_str().unwrap()], vec!["ls", env.join("saved").to_str().unwrap()]] {
        let o = run_with(Command::new(&runuser).args(["-u", other, "--"]).args(&args), None, TIMEOUT);
        assert_ne!(o.code, 0, "{other} could read another user's environment: {o}");
        assert!(o.stderr.contains("Permission denied"), "{o}");
    }
}

/// What an import (or a crash) leaves under tmp/.
fn staging_dirs(s: &Store) -> Vec<PathBuf> {
    fs::read_dir(s.home.join("tmp")).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[test]
fn a_dead_staging_dir_is_removed_even_when_its_pid_is_alive() {
    let s = Store::new();
    small_env(&s);
    // A crashed import's staging, named after a pid that now belongs to another process (ours).
    let dead = s.home.join(format!("tmp/{}-0", std::process::id()));
    fs::create_dir_all(dead.join("root/ro")).unwrap();
    fs::write(dead.join("root/ro/f"), "x").unwrap();
    fs::set_permissions(dead.join("root/ro"), fs::Permissions::from_mode(0o555)).unwrap();
    let out = s.plyroot(&["gc"]).ok();
    assert!(staging_dirs(&s).is_empty(), "gc kept a dead staging dir because its pid is in use: {:?}{out}", staging_dirs(&s));
}

#[test]
fn a_live_staging_dir_survives_a_cleaner_in_another_pid_namespace() {
    need!(userns());
    let unshare = need!(tool("unshare"));
    let s = Store::new();
    small_env(&s);
    let other = s.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("f"), "other\n").unwrap();
    set_mtimes(&other, MTIME);
    // Import A reads a tarball from stdin: it holds its staging dir while the test holds the rest.
    let tar = RawTar::new().dir("d/").file("d/big", &vec![b'x'; 4 << 20]).file("d/last", b"last\n").finish();
    let mut a = s.cmd(&["import", "tar:-"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = a.stdin.take().unwrap();
    pipe.write_all(&tar[..1 << 20]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while staging_dirs(&s).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let live = staging_dirs(&s);
    assert_eq!(live.len(), 1, "import A never staged: {live:?}");
    // Import B in its own pid namespace, where A's pid means nothing, cleans leftovers first.
    let mut b = Command::new(&unshare);
    if me().regime == Regime::Root {
        b.args(["--pid", "--fork"]);
    } else {
        b.args(["--user", "--map-root-user", "--pid", "--fork"]);
    }
    b.arg(bin()).args(["import", &format!("dir:{}", other.display())]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
    let out = run_with(&mut b, None, TIMEOUT);
    assert_eq!(out.code, 0, "import B failed: {out}");
    assert!(live[0].exists(), "import B removed import A's live staging dir {}{out}", live[0].display());
    pipe.write_all(&tar[1 << 20..]).unwrap();
    drop(pipe);
    let (status, stdout, stderr) = wait_collect(&mut a, TIMEOUT, "import A");
    assert!(status.success(), "import A failed: {stderr}");
    let id = stdout.trim().to_string();
    assert_layer_id(&id);
    let out = s.plyroot(&["verify"]).ok();
    assert!(out.stdout.contains(&format!("ok       {id}")), "{out}");
}

/// A temp file as a writer that is still at work holds it: created, flock'd.
fn held_temp(p: &Path) -> fs::File {
    let f = fs::OpenOptions::new().write(true).create_new(true).open(p).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    f
}

#[test]
fn temp_files_of_dead_writers_are_removed_and_live_ones_kept() {
    let s = Store::new();
    small_env(&s);
    let env = s.home.join("envs/dev");
    // What kill -9 leaves of atomic writes, of `switch`, and of plyroot versions before the lock.
    let dead = |dir: &Path| -> Vec<PathBuf> {
        fs::create_dir_all(dir).unwrap();
        let files = [dir.join(".upper.json.plyroot-999999-0.tmp"), dir.join(".2.json.plyroot-999999-1.tmp"), dir.join("upper.tmp-999999")];
        for f in &files {
            fs::write(f, "torn").unwrap();
        }
        files.to_vec()
    };
    let switch_temp = env.join(".current.plyroot-999999-2.tmp");
    let mut gone = dead(&env);
    gone.extend(dead(&env.join("generations")));
    gone.extend(dead(&s.home.join("blobs")));
    symlink("generations/1.json", &switch_temp).unwrap();
    gone.push(switch_temp);
    // The copy of plyroot that exporting a launcher makes.
    let bin_temp = s.home.join("bin/.plyroot.tmp-999999");
    fs::create_dir_all(bin_temp.parent().unwrap()).unwrap();
    fs::write(&bin_temp, "half a binary").unwrap();
    gone.push(bin_temp);
    // A write in progress (its writer holds the lock), which must stay.
    let live = env.join(format!(".journal.json.plyroot-{}-0.tmp", std::process::id()));
    let lock = held_temp(&live);
    let out = s.plyroot(&["gc"]).ok();
    for g in &gone {
        assert!(fs::symlink_metadata(g).is_err(), "gc left {}{out}", g.display());
    }
    assert!(live.exists(), "gc removed a temp file that is being written{out}");
    drop(lock);

    // The next command on the environment cleans its temp files too (no gc needed).
    let gone = dead(&env);
    symlink("generations/1.json", env.join("current.tmp-999999")).unwrap();
    fs::write(env.join("upper/f"), "x").unwrap();
    let out = s.plyroot(&["reset", "dev"]).ok();
    for g in gone.iter().chain([&env.join("current.tmp-999999")]) {
        assert!(fs::symlink_metadata(g).is_err(), "reset left {}{out}", g.display());
    }
    assert!(!live.exists(), "the temp file whose writer let go was kept{out}");
}

#[test]
fn apply_cleans_the_temp_files_of_its_lock_file() {
    let s = Store::new();
    let proj = s.path("proj");
    let src = proj.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/os-release"), "ID=small\n").unwrap();
    set_mtimes(&src, MTIME);
    fs::write(proj.join("plyroot.toml"), "[env.dev]\nfrom = [\"dir:src\"]\n").unwrap();
    let torn = [proj.join(".plyroot.lock.plyroot-999999-0.tmp"), proj.join("plyroot.tmp-999999")];
    for t in &torn {
        fs::write(t, "{ torn").unwrap();
    }
    let unrelated = proj.join(".notes.plyroot-999999-0.tmp");
    fs::write(&unrelated, "not plyroot.lock's").unwrap();
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    let out = run_with(&mut c, None, TIMEOUT).ok();
    for t in &torn {
        assert!(!t.exists(), "apply left {}{out}", t.display());
    }
    assert!(unrelated.exists(), "apply removed a temp file of another name in the project");
    serde_json::from_str::<serde_json::Value>(&fs::read_to_string(proj.join("plyroot.lock")).unwrap()).unwrap();
}

/// Every syscall strace shows of `plyroot ARGS` (this process only).
fn trace(s: &Store, args: &[&str], syscalls: &str, cwd: Option<&Path>) -> (Out, Vec<String>) {
    let strace = tool("strace").unwrap();
    let file = s.path("trace");
    let mut c = Command::new(strace);
    c.args(["-o", file.to_str().unwrap(), "-qq", "-y", "-s", "0", "-e", &format!("trace={syscalls}")]).arg(bin()).args(args);
    c.env("PLYROOT_HOME", &s.home).current_dir(cwd.unwrap_or(s.tmp.path()));
    let out = run_with(&mut c, None, TIMEOUT);
    (out, fs::read_to_string(&file).unwrap().lines().map(str::to_string).collect())
}

#[test]
fn atomic_writes_are_durable_and_a_run_calls_no_fsync() {
    need!(tool("strace"));
    need!(userns());
    let s = Store::new();
    need!(s.busybox_env("dev"));
    s.run("dev", &[], &["true"]).ok();
    fs::write(s.home.join("envs/dev/upper/f"), "x").unwrap();
    let (out, lines) = trace(&s, &["commit", "dev"], "openat,write,fsync,fdatasync,rename,renameat,renameat2", None);
    out.ok();
    // Each file written and renamed into place: its fd fsync'd before, its directory after.
    let mut renames = 0;
    for (i, l) in lines.iter().enumerate() {
        let Some(args) = l.strip_prefix("rename(\"") else { continue };
        let tmp = &args[..args.find('"').unwrap()];
        // A regular file this command wrote (`switch` renames a symlink, which the directory's
        // fsync keeps, and commit renames directories).
        if !lines[..i].iter().any(|x| x.starts_with("openat(") && x.contains(&format!("\"{tmp}\"")) && x.contains("O_CREAT")) {
            continue;
        }
        renames += 1;
        let dir = Path::new(tmp).parent().unwrap().display().to_string();
        assert!(lines[..i].iter().any(|x| x.starts_with("fsync(") && x.contains(&format!("<{tmp}>"))), "{tmp} renamed without an fsync:\n{}", lines.join("\n"));
        assert!(
            lines[i + 1..].iter().take(4).any(|x| x.starts_with("fsync(") && x.contains(&format!("<{dir}>"))),
            "{dir} not fsync'd after {tmp} was renamed into it:\n{}",
            lines.join("\n")
        );
    }
    assert!(renames >= 4, "commit wrote {renames} files atomically; expected the journal, layer.json, the generation, upper.json:\n{}", lines.join("\n"));
    // The launch path: not a single fsync.
    let (out, lines) = trace(&s, &["run", "dev", "--", "true"], "fsync,fdatasync,syncfs,sync,msync", None);
    out.ok();
    assert!(lines.iter().all(|l| !l.contains("sync(")), "a run synced:\n{}", lines.join("\n"));
}
