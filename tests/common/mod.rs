//! Shared helpers for plyroot's black-box tests.
//!
//! Every test runs the real binary (`CARGO_BIN_EXE_plyroot`, or `$PLYROOT_BIN` when set — CI copies
//! the binary somewhere an unprivileged user can read it) against a fresh store in a temp dir, with
//! fixtures generated at run time by independent tools: a busybox-static rootfs, tarballs made by
//! the `tar` CLI and the usual compressors, an OCI layout made by `umoci`, a docker-archive made by
//! `skopeo`, and hostile archives written byte by byte.
//!
//! Skips: a test that needs what this machine lacks (user namespaces, busybox-static, umoci, …)
//! prints `SKIP: <test>: <reason>` straight to stderr (past the harness's capture) and returns. With
//! `PLYROOT_TEST_REQUIRE_NS=1` a skip panics instead, so CI cannot pass by skipping.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// How long one plyroot invocation may take before the test kills it and fails.
pub const TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// The binary and skipping
// ---------------------------------------------------------------------------------------------

/// The plyroot binary under test.
pub fn bin() -> PathBuf {
    match std::env::var_os("PLYROOT_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_plyroot")),
    }
}

/// True when skipping is forbidden (CI).
pub fn strict() -> bool {
    matches!(
        std::env::var("PLYROOT_TEST_REQUIRE_NS").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Report a skip. Panics under `PLYROOT_TEST_REQUIRE_NS=1`.
pub fn skip(reason: &str) {
    let name = test_name();
    if strict() {
        panic!("{name}: would skip, but PLYROOT_TEST_REQUIRE_NS=1 forbids it: {reason}");
    }
    // Written to the fd directly so the test harness does not swallow it.
    let _ = writeln!(std::io::stderr(), "SKIP: {name}: {reason}");
}

/// `Ok(())` or the reason a check failed; the `need!` macro turns an `Err` into a skip.
pub type Need = Result<(), String>;

/// `need!(expr)` where `expr: Result<T, String>`: on `Err`, skip (or fail under strict) and return.
/// (Test files say `#[macro_use] mod common;`.)
macro_rules! need {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reason) => {
                crate::common::skip(&reason);
                return;
            }
        }
    };
}

/// Find a program on `$PATH` (and the sbin dirs, which `runuser` environments often lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

pub fn tool(name: &str) -> Result<PathBuf, String> {
    which(name).ok_or_else(|| format!("`{name}` is not installed (see .ci/run for the packages)"))
}

/// Whether this machine lets the current user create namespaces at all; cached per process.
pub fn userns() -> Need {
    static ANSWER: OnceLock<Need> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let unshare = tool("unshare")?;
            let out = Command::new(unshare)
                .args(["-Urm", "true"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run unshare: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "user namespaces are unavailable here (`unshare -Urm true` failed: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .clone()
}

/// A static busybox to build fixture roots from.
pub fn busybox() -> Result<PathBuf, String> {
    static ANSWER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let p = ["/bin/busybox", "/usr/bin/busybox"]
                .map(PathBuf::from)
                .into_iter()
                .find(|p| p.is_file())
                .or_else(|| which("busybox"))
                .ok_or("busybox is not installed (apt-get install busybox-static)")?;
            if elf_has_interp(&p)? {
                return Err(format!(
                    "{} is dynamically linked; install busybox-static",
                    p.display()
                ));
            }
            Ok(p)
        })
        .clone()
}

/// Whether an ELF64 little-endian file has a PT_INTERP program header (= is dynamically linked).
fn elf_has_interp(path: &Path) -> Result<bool, String> {
    let data = fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let bad = || format!("{} is not an ELF64 LE executable", path.display());
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            return Err(bad());
        }
        if u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Who we are
// ---------------------------------------------------------------------------------------------

/// The three identity regimes plyroot distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// Real root: no user namespace needed, uid 0 inside.
    Root,
    /// Unprivileged with /etc/subuid + /etc/subgid ranges and newuidmap/newgidmap: yourself inside.
    SubIds,
    /// Unprivileged with a single id: uid 0 inside (you outside).
    NoSubIds,
}

pub struct Me {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
    pub regime: Regime,
}

pub fn me() -> Me {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map(|f| f[0].to_string())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string());
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into()));
    let has_range = |file: &str| {
        fs::read_to_string(file).unwrap_or_default().lines().any(|l| {
            let who = l.split(':').next().unwrap_or("");
            who == name || who == uid.to_string()
        })
    };
    let regime = if uid == 0 {
        Regime::Root
    } else if has_range("/etc/subuid")
        && has_range("/etc/subgid")
        && which("newuidmap").is_some()
        && which("newgidmap").is_some()
    {
        Regime::SubIds
    } else {
        Regime::NoSubIds
    };
    Me { uid, gid, name, home, regime }
}

// ---------------------------------------------------------------------------------------------
// Running things
// ---------------------------------------------------------------------------------------------

/// What a finished command left behind. `code` is the exit status, or 128+N when killed by
/// signal N (the shell's convention, which plyroot's contract uses too).
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self}");
        self
    }
    pub fn failed(self) -> Self {
        assert_ne!(self.code, 0, "expected a failure: {self}");
        self
    }
    pub fn code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "expected exit status {code}: {self}");
        self
    }
    /// A plyroot error: exit 125 and a `plyroot: error:` line that contains every `needle`.
    pub fn plyroot_error(self, needles: &[&str]) -> Self {
        assert_eq!(self.code, 125, "expected plyroot's own error (125): {self}");
        assert!(
            self.stderr.contains("plyroot: error:"),
            "expected a `plyroot: error:` line on stderr: {self}"
        );
        for n in needles {
            assert!(self.stderr.contains(n), "expected the error to name {n:?}: {self}");
        }
        self
    }
    pub fn line(&self) -> String {
        self.stdout.trim().to_string()
    }
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n  command: {}\n  status:  {}\n  stdout:  {}\n  stderr:  {}",
            self.what,
            self.code,
            self.stdout.trim_end().replace('\n', "\n           "),
            self.stderr.trim_end().replace('\n', "\n           ")
        )
    }
}

pub fn status_code(st: std::process::ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if k == "PLYROOT_HOME" {
            s += &format!("{}={} ", k.to_string_lossy(), v.unwrap_or_default().to_string_lossy());
        }
    }
    s += &shell_quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s += &shell_quote(&a.to_string_lossy());
    }
    s
}

pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Run a command to completion with `stdin` fed in, killing it after `timeout`.
pub fn run_with(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Out {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let (status, stdout, stderr) = wait_collect(&mut child, timeout, &what);
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Out { what, code: status_code(status), stdout, stderr }
}

/// Wait for `child` (stdout/stderr piped), reading both pipes; kill it and panic past `timeout`.
pub fn wait_collect(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> (std::process::ExitStatus, String, String) {
    let reader = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut s);
            }
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

pub fn sh(script: &str) -> Out {
    run_with(Command::new("sh").args(["-c", script]), None, TIMEOUT)
}

/// A fresh temp dir (under `$TMPDIR`).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new().prefix("plyroot-test.").tempdir().expect("make a temp dir")
}

// ---------------------------------------------------------------------------------------------
// A store per test
// ---------------------------------------------------------------------------------------------

/// A fresh, empty store (`PLYROOT_HOME`) and a scratch dir for fixtures, removed at the end.
pub struct Store {
    pub tmp: TempDir,
    pub home: PathBuf,
}

impl Store {
    pub fn new() -> Store {
        let tmp = tempdir();
        let home = tmp.path().join("store");
        Store { tmp, home }
    }

    /// A scratch path beside the store.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `plyroot ARGS` with this store, started in the scratch dir (which exists inside an
    /// environment too, through the shared /tmp, so the working directory is kept).
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .env("PLYROOT_HOME", &self.home)
            .env_remove("PLYROOT_STORE")
            .current_dir(self.tmp.path());
        c
    }

    pub fn plyroot(&self, args: &[&str]) -> Out {
        run_with(&mut self.cmd(args), None, TIMEOUT)
    }

    pub fn plyroot_stdin(&self, args: &[&str], stdin: &[u8]) -> Out {
        run_with(&mut self.cmd(args), Some(stdin), TIMEOUT)
    }

    /// Import one source and return its layer ids (one per line of stdout).
    pub fn import(&self, source: &str) -> Vec<String> {
        let out = self.plyroot(&["import", source]).ok();
        let ids = out.lines();
        assert!(!ids.is_empty(), "import printed no id: {out}");
        for id in &ids {
            assert_layer_id(id);
        }
        ids
    }

    pub fn create(&self, name: &str, froms: &[&str]) -> Out {
        let mut args = vec!["create", name];
        for f in froms {
            args.push("--from");
            args.push(f);
        }
        self.plyroot(&args).ok()
    }

    /// `plyroot run [OPTS] ENV -- CMD…`
    pub fn run(&self, env: &str, opts: &[&str], cmd: &[&str]) -> Out {
        let mut args = vec!["run"];
        args.extend_from_slice(opts);
        args.push(env);
        args.push("--");
        args.extend_from_slice(cmd);
        self.plyroot(&args)
    }

    /// `plyroot run --root ENV -- sh -c SCRIPT`: a script that changes the environment's root (as
    /// on any system, the image's files are root's, not yours, with subordinate ids).
    pub fn sh(&self, env: &str, script: &str) -> Out {
        self.run(env, &["--root"], &["sh", "-c", script])
    }

    /// `plyroot run ENV -- sh -c SCRIPT`: as the default identity (yourself, with subordinate ids).
    pub fn sh_as_me(&self, env: &str, script: &str) -> Out {
        self.run(env, &[], &["sh", "-c", script])
    }

    pub fn layers(&self) -> Vec<serde_json::Value> {
        let v = self.plyroot(&["layers", "--json"]).ok().json();
        v.as_array().unwrap_or_else(|| panic!("layers --json is not an array: {v}")).clone()
    }

    pub fn layer_ids(&self) -> BTreeSet<String> {
        self.layers()
            .iter()
            .map(|l| l["id"].as_str().expect("layer without id").to_string())
            .collect()
    }

    /// Number of entries in `<store>/layers` (0 when absent), to see that dedup stores nothing.
    pub fn layer_dir_entries(&self) -> usize {
        fs::read_dir(self.home.join("layers")).map(|d| d.count()).unwrap_or(0)
    }

    /// Bytes and inodes under the store, by a walk that does not follow symlinks.
    pub fn usage(&self) -> (u64, u64) {
        fn walk(p: &Path, acc: &mut (u64, u64)) {
            let Ok(md) = fs::symlink_metadata(p) else { return };
            acc.0 += md.len();
            acc.1 += 1;
            if md.is_dir() {
                if let Ok(rd) = fs::read_dir(p) {
                    for e in rd.flatten() {
                        walk(&e.path(), acc);
                    }
                }
            }
        }
        let mut acc = (0, 0);
        walk(&self.home.join("layers"), &mut acc);
        acc
    }

    /// A fresh store with one busybox environment `t` (from a `dir:` source), or the reason to skip.
    pub fn with_busybox_env() -> Result<Store, String> {
        userns()?;
        let s = Store::new();
        s.busybox_env("t")?;
        Ok(s)
    }

    /// A busybox env built from a `dir:` source; returns the rootfs path.
    pub fn busybox_env(&self, name: &str) -> Result<PathBuf, String> {
        let root = self.path(&format!("{name}-rootfs"));
        busybox_rootfs(&root)?;
        self.create(name, &[&format!("dir:{}", root.display())]);
        Ok(root)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // With subordinate ids, layers hold files of those ids: remove the tree where they are
        // the user's to remove (what the README tells users to do with a store).
        if me().regime == Regime::SubIds {
            let _ = as_owner(&["rm", "-rf", &self.tmp.path().to_string_lossy()]);
        }
        // Overlay leaves a mode-000 `work/work`; make everything ours removable before TempDir
        // removes the tree. Best effort: a failed test must still show its own failure.
        let _ = Command::new("chmod")
            .args(["-R", "u+rwX"])
            .arg(self.tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The first subordinate uid and gid of the user (from /etc/subuid, /etc/subgid).
pub fn first_subids() -> (u32, u32) {
    let me = me();
    let first = |file: &str| {
        fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() == 3 && (f[0] == me.name || f[0] == me.uid.to_string())).then(|| f[1].parse().unwrap())
            })
            .unwrap()
    };
    (first("/etc/subuid"), first("/etc/subgid"))
}

/// Runs a host command over the store's files as their owner: with subordinate ids through
/// `plyroot unshare` (layers hold files of those ids), otherwise directly. For tests that change
/// the store behind plyroot's back.
pub fn as_owner(args: &[&str]) -> Out {
    let mut c = Command::new(if me().regime == Regime::SubIds { bin() } else { PathBuf::from(args[0]) });
    if me().regime == Regime::SubIds {
        c.args(["unshare", "--"]).args(args);
    } else {
        c.args(&args[1..]);
    }
    run_with(&mut c, None, TIMEOUT)
}

/// Where .ci/run leaves a Debian root with systemd and sudo (mmdebstrap --include=…), cached
/// between runs; PLYROOT_TEST_DEBIAN_ROOTFS names another.
pub fn debian_rootfs() -> Result<PathBuf, String> {
    let p = std::env::var_os("PLYROOT_TEST_DEBIAN_ROOTFS").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/plyroot-debian-sudo.tar.zst".into());
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("no Debian rootfs with systemd and sudo at {} (.ci/run makes it with mmdebstrap)", p.display()))
    }
}

/// Where .ci/run leaves a Debian root with Debian's nix-bin and busybox-static (mmdebstrap
/// --include=…), cached between runs; PLYROOT_TEST_DEBIAN_NIX_ROOTFS names another.
pub fn debian_nix_rootfs() -> Result<PathBuf, String> {
    let p = std::env::var_os("PLYROOT_TEST_DEBIAN_NIX_ROOTFS").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/plyroot-debian-nix.tar.zst".into());
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("no Debian rootfs with nix-bin at {} (.ci/run makes it with mmdebstrap)", p.display()))
    }
}

pub fn assert_layer_id(id: &str) {
    let hex = id.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256: id: {id:?}"));
    assert!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "not a layer id (sha256:<64 lowercase hex>): {id:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// A fixed, whole-second mtime for every fixture file: a tar keeps seconds only, so a directory
/// and a tarball of it describe the same content only when the tree has no sub-second times.
pub const MTIME: i64 = 1_700_000_000;

/// A minimal root: busybox-static and its applets in /bin, /etc/passwd+group, /tmp, /usr/bin…,
/// one hardlink pair and one setuid file (to see modes and links survive).
pub fn busybox_rootfs(root: &Path) -> Result<(), String> {
    let bb = busybox()?;
    let mk = |rel: &str, mode: u32| {
        let p = root.join(rel);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    mk("", 0o755);
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/lib", "etc", "var", "home", "proc",
        "sys", "dev", "run", "opt", "srv", "mnt"]
    {
        mk(d, 0o755);
    }
    mk("tmp", 0o1777);
    mk("var/tmp", 0o1777);
    mk("root", 0o700);
    fs::copy(&bb, root.join("bin/busybox")).map_err(|e| format!("copy busybox: {e}"))?;
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    let list = Command::new(&bb).arg("--list").output().map_err(|e| format!("busybox --list: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = root.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link).unwrap();
        }
    }
    symlink("../../bin/busybox", root.join("usr/bin/env")).unwrap();
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    fs::write(root.join("etc/os-release"), "ID=plyroot-test\nNAME=\"busybox fixture\"\n").unwrap();
    fs::write(root.join("etc/fixture"), "from-the-layer\n").unwrap();
    fs::write(root.join("usr/bin/hello"), "#!/bin/sh\necho hello from the fixture\n").unwrap();
    fs::set_permissions(root.join("usr/bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("usr/lib/link-a"), "two names, one inode\n").unwrap();
    fs::hard_link(root.join("usr/lib/link-a"), root.join("usr/lib/link-b")).unwrap();
    fs::write(root.join("usr/bin/setuid-file"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("usr/bin/setuid-file"), fs::Permissions::from_mode(0o4755))
        .unwrap();
    set_mtimes(root, MTIME);
    Ok(())
}

/// Set the mtime (and atime) of every entry under `root`, symlinks included, to `secs`.
pub fn set_mtimes(root: &Path, secs: i64) {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        out.push(p.to_path_buf());
        if fs::symlink_metadata(p).map(|m| m.is_dir()).unwrap_or(false) {
            for e in fs::read_dir(p).unwrap().flatten() {
                walk(&e.path(), out);
            }
        }
    }
    let mut all = Vec::new();
    walk(root, &mut all);
    // Children first, so that setting a directory's time is not undone by touching its entries.
    all.reverse();
    let t = Timespec { tv_sec: secs, tv_nsec: 0 };
    let ts = Timestamps { last_access: t, last_modification: t };
    for p in all {
        utimensat(CWD, &p, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Compression {
    None,
    Gzip,
    Xz,
    Zstd,
}

/// A tarball of `dir` made by the `tar` CLI (GNU format, `./` names, as mmdebstrap writes them),
/// compressed by the compressor's own CLI. Owners are written as 0:0: that is what a `dir:` import
/// by an unprivileged user records for the user's own files (a tarball that says uid 1000 is
/// different content, with a different id).
pub fn make_tar(dir: &Path, out: &Path, c: Compression) -> Result<(), String> {
    tool("tar")?;
    let compressor = match c {
        Compression::None => "cat",
        Compression::Gzip => "gzip -c",
        Compression::Xz => "xz -c -T1",
        Compression::Zstd => "zstd -q -c",
    };
    if let Some(prog) = compressor.split(' ').next() {
        tool(prog)?;
    }
    let script = format!(
        "set -o pipefail; tar --format=gnu --numeric-owner --owner=0 --group=0 -C {} -cf - . | {} > {}",
        shell_quote(&dir.to_string_lossy()),
        compressor,
        shell_quote(&out.to_string_lossy())
    );
    let o = run_with(Command::new("bash").args(["-c", &script]), None, TIMEOUT);
    if o.code != 0 {
        return Err(format!("making a tarball failed: {o}"));
    }
    Ok(())
}

/// An OCI image layout made by umoci, tag `t`, three layers:
///  1. the busybox root plus /etc/deleteme, /opq/{a,b}, /keep
///  2. umoci's diff after deleting /etc/deleteme (a `.wh.deleteme` whiteout)
///  3. a hand-made layer replacing /opq with an opaque directory holding only `c`
///     (umoci never writes opaque markers itself, so it is added verbatim with `umoci raw add-layer`)
pub fn oci_image(work: &Path) -> Result<PathBuf, String> {
    let umoci = tool("umoci")?;
    let layout = work.join("oci");
    let bundle = work.join("bundle");
    let image = format!("{}:t", layout.display());
    let run = |args: &[&str]| -> Need {
        let o = run_with(Command::new(&umoci).args(args), None, TIMEOUT);
        if o.code != 0 {
            return Err(format!("umoci failed: {o}"));
        }
        Ok(())
    };
    let b = bundle.to_string_lossy().to_string();
    run(&["init", "--layout", &layout.to_string_lossy()])?;
    run(&["new", "--image", &image])?;
    run(&["unpack", "--rootless", "--image", &image, &b])?;
    let rootfs = bundle.join("rootfs");
    busybox_rootfs(&rootfs)?;
    fs::write(rootfs.join("etc/deleteme"), "deleted by layer 2\n").unwrap();
    fs::create_dir_all(rootfs.join("opq")).unwrap();
    fs::write(rootfs.join("opq/a"), "a\n").unwrap();
    fs::write(rootfs.join("opq/b"), "b\n").unwrap();
    fs::write(rootfs.join("keep"), "kept\n").unwrap();
    run(&["repack", "--refresh-bundle", "--image", &image, &b])?;
    fs::remove_file(rootfs.join("etc/deleteme")).unwrap();
    run(&["repack", "--refresh-bundle", "--image", &image, &b])?;

    let mut t = tar::Builder::new(Vec::new());
    let entry = |kind: tar::EntryType, path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(path).unwrap();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        (h, data.to_vec())
    };
    for (h, d) in [
        entry(tar::EntryType::Directory, "opq/", 0o755, b""),
        entry(tar::EntryType::Regular, "opq/.wh..wh..opq", 0o644, b""),
        entry(tar::EntryType::Regular, "opq/c", 0o644, b"c\n"),
    ] {
        t.append(&h, &d[..]).unwrap();
    }
    let opaque = work.join("opaque-layer.tar");
    fs::write(&opaque, t.into_inner().unwrap()).unwrap();
    run(&["raw", "add-layer", "--image", &image, &opaque.to_string_lossy()])?;
    Ok(layout)
}

/// The same image as a docker-archive (`docker save` format), written by skopeo.
pub fn docker_archive(layout: &Path, out: &Path) -> Result<(), String> {
    let skopeo = tool("skopeo")?;
    let o = run_with(
        Command::new(skopeo).args([
            "--insecure-policy",
            "copy",
            "-q",
            &format!("oci:{}:t", layout.display()),
            &format!("docker-archive:{}:plyroot-test:t", out.display()),
        ]),
        None,
        TIMEOUT,
    );
    if o.code != 0 {
        return Err(format!("skopeo failed: {o}"));
    }
    Ok(())
}

/// A tar archive written byte by byte, so that it can say what no well-behaved tool writes:
/// absolute names, `..`, links out of the root.
#[derive(Default)]
pub struct RawTar {
    buf: Vec<u8>,
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    /// One ustar header (+ data). `kind`: b'0' file, b'1' hardlink, b'2' symlink, b'5' dir.
    pub fn entry(mut self, name: &str, kind: u8, mode: u32, link: &str, data: &[u8]) -> Self {
        // Long names and link targets go first in GNU `././@LongLink` records, as GNU tar does.
        if link.len() > 100 {
            let mut z = link.as_bytes().to_vec();
            z.push(0);
            self = self.raw_header("././@LongLink", b'K', 0o644, "", &z);
        }
        if name.len() > 100 {
            let mut z = name.as_bytes().to_vec();
            z.push(0);
            self = self.raw_header("././@LongLink", b'L', 0o644, "", &z);
        }
        let cut = |s: &str| s.as_bytes()[..s.len().min(100)].to_vec();
        let (name, link) = (String::from_utf8_lossy(&cut(name)).into_owned(), String::from_utf8_lossy(&cut(link)).into_owned());
        self.raw_header(&name, kind, mode, &link, data)
    }

    fn raw_header(mut self, name: &str, kind: u8, mode: u32, link: &str, data: &[u8]) -> Self {
        let mut h = [0u8; 512];
        let put = |h: &mut [u8; 512], off: usize, bytes: &[u8]| {
            h[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut h, 0, name.as_bytes());
        put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
        put(&mut h, 108, format!("{:07o}\0", 0).as_bytes());
        put(&mut h, 116, format!("{:07o}\0", 0).as_bytes());
        put(&mut h, 124, format!("{:011o}\0", data.len()).as_bytes());
        put(&mut h, 136, format!("{MTIME:011o}\0").as_bytes());
        put(&mut h, 148, b"        ");
        h[156] = kind;
        put(&mut h, 157, link.as_bytes());
        put(&mut h, 257, b"ustar  \0"); // GNU magic, as GNU tar writes
        put(&mut h, 265, b"root");
        put(&mut h, 297, b"root");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
        self.buf.extend_from_slice(&h);
        self.buf.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0, pad));
        self
    }

    pub fn dir(self, name: &str) -> Self {
        self.entry(name, b'5', 0o755, "", b"")
    }
    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, b'0', 0o644, "", data)
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, b'2', 0o777, target, b"")
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name, b'1', 0o644, target, b"")
    }
    /// A character device node `major:minor`.
    pub fn chardev(mut self, name: &str, major: u32, minor: u32) -> Self {
        self = self.entry(name, b'3', 0o666, "", b"");
        // devmajor/devminor live in the header just written; patch them and redo the checksum.
        let start = self.buf.len() - 512;
        let h = &mut self.buf[start..];
        h[329..337].copy_from_slice(format!("{major:07o}\0").as_bytes());
        h[337..345].copy_from_slice(format!("{minor:07o}\0").as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0, 1024));
        self.buf
    }
}

/// Every path under `dir` (relative), to compare a tree before and after.
pub fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeSet<String>) {
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                let path = e.path();
                out.insert(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(base, &path, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// (size, mtime, nlink, inode) of a path, not following a symlink.
pub type Fingerprint = (u64, i64, u64, u64);

/// The [`Fingerprint`] of a host file, to see that an import did not touch it.
pub fn fingerprint(p: &Path) -> Option<Fingerprint> {
    fs::symlink_metadata(p).ok().map(|m| (m.len(), m.mtime(), m.nlink(), m.ino()))
}

/// The live keepers (src/sandbox/keeper.rs) recorded in the store at `home`, of environment
/// `env` or of all: a recorded pid that is a `plyroot-keeper` and not a zombie.
pub fn live_keepers(home: &Path, env: Option<&str>) -> Vec<i32> {
    let Ok(envs) = fs::read_dir(home.join("envs")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in envs.flatten().filter(|e| env.is_none_or(|n| e.file_name() == n)) {
        let Ok(runs) = fs::read_dir(e.path().join("runs")) else { continue };
        for r in runs.flatten() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&fs::read(r.path()).unwrap_or_default()) else { continue };
            let Some(pid) = v["pid"].as_i64().filter(|_| v["keeper"] == serde_json::Value::Bool(true)) else { continue };
            let pid = pid as i32;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "plyroot-keeper" && !gone(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether process `pid` has ended (a zombie has: it holds nothing).
fn gone(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')
}

/// Waits up to `within` for process `pid` to end; true when it has.
pub fn wait_gone(pid: i32, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if gone(pid) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends every keeper of the environments of the store at `home`, and waits until each has: for
/// fixtures that put a store back by copying files, which must not leave a keeper holding an
/// overlay of the upper they replace.
pub fn end_keepers(home: &Path) {
    for pid in live_keepers(home, None) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        wait_gone(pid, Duration::from_secs(10));
    }
}
