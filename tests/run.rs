//! Tier 3: the real binary runs real programs in real environments (user + mount namespaces,
//! overlayfs) built from a busybox-static fixture. Skips with a printed reason where namespaces are
//! unavailable; `PLYROOT_TEST_REQUIRE_NS=1` turns a skip into a failure.
//!
//! Runs as root and as unprivileged users with and without /etc/subuid ranges; the identity tests
//! check what each of those three regimes promises.

#[macro_use]
mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A store with one busybox environment `t` (from a `dir:` source), or a skip.
fn env() -> Result<Store, String> {
    Store::with_busybox_env()
}

fn src(kind: &str, p: &Path) -> String {
    format!("{kind}:{}", p.display())
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

#[test]
fn every_source_kind_runs() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let mut sources = vec![("dir", src("dir", &root))];
    for (name, c) in [
        ("tar", Compression::None),
        ("gz", Compression::Gzip),
        ("xz", Compression::Xz),
        ("zst", Compression::Zstd),
    ] {
        let f = s.path(&format!("rootfs.{name}"));
        need!(make_tar(&root, &f, c));
        sources.push((name, src("tar", &f)));
    }
    let layout = need!(oci_image(&s.path("oci-work")));
    let archive = s.path("docker.tar");
    need!(docker_archive(&layout, &archive));
    sources.push(("oci", src("oci", &layout)));
    sources.push(("docker", src("docker-archive", &archive)));
    let id = s.import(&src("dir", &root)).remove(0);
    sources.push(("layer", format!("layer:{id}")));

    for (name, source) in &sources {
        let env = format!("from-{name}");
        s.create(&env, &[source]);
        let out = s.run(&env, &[], &["sh", "-c", "cat /etc/fixture; hello"]).ok();
        assert_eq!(out.stdout, "from-the-layer\nhello from the fixture\n", "{source}: {out}");
    }
}

#[test]
fn create_imports_stdin_source() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let f = s.path("rootfs.tar.zst");
    need!(make_tar(&root, &f, Compression::Zstd));
    s.plyroot_stdin(&["create", "piped", "--from", "tar:-"], &fs::read(&f).unwrap()).ok();
    s.run("piped", &[], &["cat", "/etc/fixture"]).ok();
}

// ---------------------------------------------------------------------------------------------
// Whiteouts, opaque dirs, stacking
// ---------------------------------------------------------------------------------------------

const WHITEOUT_CHECK: &str = "test ! -e /etc/deleteme || { echo deleteme still there; exit 1; }; \
     test ! -e /opq/a -a ! -e /opq/b || { echo opaque dir leaks; ls -la /opq; exit 1; }; \
     cat /opq/c /keep /etc/fixture";

#[test]
fn whiteouts_and_opaque_dirs_from_oci() {
    need!(userns());
    let s = Store::new();
    let layout = need!(oci_image(&s.path("oci-work")));
    s.create("oci", &[&src("oci", &layout)]);
    let out = s.sh("oci", WHITEOUT_CHECK).ok();
    assert_eq!(out.stdout, "c\nkept\nfrom-the-layer\n", "{out}");
    assert_eq!(s.sh("oci", "ls /opq").ok().stdout, "c\n");
}

#[test]
fn whiteouts_and_opaque_dirs_from_docker_archive() {
    need!(userns());
    let s = Store::new();
    let layout = need!(oci_image(&s.path("oci-work")));
    let archive = s.path("docker.tar");
    need!(docker_archive(&layout, &archive));
    s.create("docker", &[&src("docker-archive", &archive)]);
    let out = s.sh("docker", WHITEOUT_CHECK).ok();
    assert_eq!(out.stdout, "c\nkept\nfrom-the-layer\n", "{out}");
}

#[test]
fn whiteouts_from_stacked_tar_sources() {
    // A plain tar layer in OCI form stacked on a dir: `.wh.` entries delete, `.wh..wh..opq` hides.
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let top = RawTar::new()
        .dir("etc/")
        .file("etc/.wh.fixture", b"")
        .dir("usr/")
        .dir("usr/lib/")
        .file("usr/lib/.wh..wh..opq", b"")
        .file("usr/lib/only-this", b"top\n")
        .finish();
    let top_path = s.path("top.tar");
    fs::write(&top_path, top).unwrap();
    s.create("stacked", &[&src("dir", &root), &src("tar", &top_path)]);
    let out = s
        .sh("stacked", "test ! -e /etc/fixture && ls /usr/lib && cat /usr/lib/only-this && hello")
        .ok();
    assert_eq!(out.stdout, "only-this\ntop\nhello from the fixture\n", "{out}");
}

#[test]
fn upper_layers_win_and_order_is_bottom_to_top() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let (a, b) = (s.path("a"), s.path("b"));
    for (d, text) in [(&a, "a"), (&b, "b")] {
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::write(d.join("etc/fixture"), format!("{text}\n")).unwrap();
        fs::write(d.join(format!("only-{text}")), "x\n").unwrap();
    }
    s.create("ab", &[&src("dir", &root), &src("dir", &a), &src("dir", &b)]);
    s.create("ba", &[&src("dir", &root), &src("dir", &b), &src("dir", &a)]);
    assert_eq!(s.run("ab", &[], &["cat", "/etc/fixture"]).ok().stdout, "b\n");
    assert_eq!(s.run("ba", &[], &["cat", "/etc/fixture"]).ok().stdout, "a\n");
    s.sh("ab", "test -e /only-a && test -e /only-b").ok();
    let list = s.plyroot(&["list", "--json"]).ok().json();
    let ab = list.as_array().unwrap().iter().find(|e| e["name"] == "ab").unwrap().clone();
    assert_eq!(ab["layers"].as_array().unwrap().len(), 3, "{ab}");
}

#[test]
fn a_hundred_layers() {
    // Past the ~40 paths a classic mount option page holds: needs the new mount API.
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let mut froms = vec![src("dir", &root)];
    for i in 0..100 {
        let d = s.path(&format!("l{i}"));
        fs::create_dir_all(d.join("layers")).unwrap();
        fs::write(d.join(format!("layers/{i}")), format!("{i}\n")).unwrap();
        fs::write(d.join("layers/top"), format!("{i}\n")).unwrap();
        froms.push(src("dir", &d));
    }
    let refs: Vec<&str> = froms.iter().map(String::as_str).collect();
    s.create("many", &refs);
    let out = s.sh("many", "ls /layers | wc -l; cat /layers/top /layers/0 /layers/99").ok();
    assert_eq!(out.stdout.split_whitespace().collect::<Vec<_>>(), ["101", "99", "0", "99"], "{out}");
}

#[test]
fn modes_and_hardlinks_survive() {
    let s = need!(env());
    let out = s
        .sh("t", "stat -c %a /usr/bin/setuid-file; [ /usr/lib/link-a -ef /usr/lib/link-b ] && echo linked; stat -c %Y /etc/fixture /usr/bin /bin/sh")
        .ok();
    assert_eq!(out.stdout, format!("4755\nlinked\n{MTIME}\n{MTIME}\n{MTIME}\n"), "modes, links, mtimes: {out}");
    let tarball = s.path("rootfs.tar.xz");
    need!(make_tar(&s.path("t-rootfs"), &tarball, Compression::Xz));
    s.create("x", &[&src("tar", &tarball)]);
    let out = s
        .sh("x", "stat -c %a /usr/bin/setuid-file; stat -c %a /var/tmp; [ /usr/lib/link-a -ef /usr/lib/link-b ] && echo linked")
        .ok();
    assert_eq!(out.stdout, "4755\n1777\nlinked\n", "{out}");
}

// ---------------------------------------------------------------------------------------------
// The upper: persistence, ephemeral, read-only
// ---------------------------------------------------------------------------------------------

#[test]
fn writes_persist_between_runs() {
    let s = need!(env());
    let root = s.path("t-rootfs");
    let id_before = s.import(&src("dir", &root));
    s.sh("t", "echo new > /etc/new && echo changed > /etc/fixture && rm /usr/bin/hello && mkdir -p /opt/deep/dir && echo d > /opt/deep/dir/f").ok();
    let out = s
        .sh("t", "cat /etc/new /etc/fixture /opt/deep/dir/f; test ! -e /usr/bin/hello && echo gone")
        .ok();
    assert_eq!(out.stdout, "new\nchanged\nd\ngone\n", "{out}");
    // The layer and its source are untouched.
    assert_eq!(fs::read_to_string(root.join("etc/fixture")).unwrap(), "from-the-layer\n");
    assert_eq!(s.import(&src("dir", &root)), id_before);
    assert_eq!(s.layer_ids().len(), 1);
    // Another env on the same layer does not see t's upper.
    s.create("u", &[&format!("layer:{}", id_before[0])]);
    assert_eq!(s.run("u", &[], &["cat", "/etc/fixture"]).ok().stdout, "from-the-layer\n");
    s.run("u", &[], &["test", "!", "-e", "/etc/new"]).ok();
}

#[test]
fn rm_discards_the_upper() {
    let s = need!(env());
    s.sh("t", "echo x > /etc/new").ok();
    s.plyroot(&["rm", "t"]).ok();
    s.plyroot(&["run", "t", "--", "true"]).plyroot_error(&["t"]);
    s.create("t", &[&src("dir", &s.path("t-rootfs"))]);
    s.run("t", &[], &["test", "!", "-e", "/etc/new"]).ok();
}

#[test]
fn ephemeral_throws_writes_away() {
    let s = need!(env());
    let out = s.run("t", &["--ephemeral", "--root"], &["sh", "-c", "echo e > /eph && cat /eph && rm /etc/fixture"]).ok();
    assert_eq!(out.stdout, "e\n");
    s.run("t", &[], &["sh", "-c", "test ! -e /eph && cat /etc/fixture"]).ok();
    s.run("t", &["--ephemeral"], &["test", "!", "-e", "/eph"]).ok();
}

#[test]
fn read_only_refuses_writes() {
    let s = need!(env());
    let out = s.run("t", &["--read-only"], &["sh", "-c", "echo x > /ro-test"]);
    assert_ne!(out.code, 0, "wrote to a read-only root: {out}");
    assert!(out.stderr.contains("Read-only file system"), "expected EROFS: {out}");
    let out = s.run("t", &["--read-only"], &["mkdir", "/etc/ro-dir"]);
    assert!(out.code != 0 && out.stderr.contains("Read-only"), "{out}");
    assert_eq!(s.run("t", &["--read-only"], &["cat", "/etc/fixture"]).ok().stdout, "from-the-layer\n");
    s.run("t", &[], &["test", "!", "-e", "/ro-test"]).ok();
    // The two conflict: a usage error, never a run.
    s.plyroot(&["run", "--read-only", "--ephemeral", "t", "--", "touch", "/both"]).failed();
    s.run("t", &[], &["test", "!", "-e", "/both"]).ok();
}

// ---------------------------------------------------------------------------------------------
// Exit status and signals
// ---------------------------------------------------------------------------------------------

#[test]
fn exit_status_passes_through() {
    let s = need!(env());
    for (script, code) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
        ("kill -INT $$", 130),
        ("kill -SEGV $$", 139),
    ] {
        s.sh("t", script).code(code);
    }
    s.run("t", &[], &["false"]).code(1);
}

#[test]
fn exit_status_passes_through_with_pid_namespace() {
    let s = need!(env());
    for (script, code) in [("exit 7", 7), ("kill -TERM $$", 143), ("kill -KILL $$", 137)] {
        s.run("t", &["--pid"], &["sh", "-c", script]).code(code);
    }
}

#[test]
fn not_found_and_not_executable() {
    let s = need!(env());
    let out = s.run("t", &[], &["/no/such/program"]).code(127);
    assert!(out.stderr.contains("/no/such/program"), "{out}");
    let out = s.run("t", &[], &["no-such-command"]).code(127);
    assert!(out.stderr.contains("no-such-command"), "{out}");
    let out = s.run("t", &[], &["/etc/fixture"]).code(126);
    assert!(out.stderr.contains("/etc/fixture"), "{out}");
    s.run("t", &["--pid"], &["/no/such/program"]).code(127);
}

/// Start `plyroot run OPTS t -- sh -c SCRIPT`, wait for it to print `ready`, send `sig` to the
/// plyroot process from outside, and return (exit code, the rest of stdout).
fn signal_from_outside(s: &Store, opts: &[&str], script: &str, sig: rustix::process::Signal) -> (i32, String, String) {
    let mut args = vec!["run"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["t", "--", "sh", "-c", script]);
    let mut child = s
        .cmd(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_line(&mut first);
        tx.send(first.clone()).unwrap();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        rest
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    if line != "ready\n" {
        let _ = child.kill();
        let o = child.wait_with_output().unwrap();
        panic!("never saw `ready` (got {line:?}); stderr: {}", String::from_utf8_lossy(&o.stderr));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
    let mut err = String::new();
    let mut stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the program did not end after the signal");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
    (status_code(status), reader.join().unwrap(), err)
}

const TRAP: &str = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done";

#[test]
fn signals_reach_the_program() {
    use rustix::process::Signal;
    let s = need!(env());
    let (code, rest, err) = signal_from_outside(&s, &[], TRAP, Signal::TERM);
    assert_eq!((code, rest.as_str()), (42, "got TERM\n"), "stderr: {err}");
    // Untrapped: the program dies of it and plyroot reports 128+15.
    let (code, _, err) = signal_from_outside(&s, &[], "echo ready; exec sleep 60", Signal::TERM);
    assert_eq!(code, 143, "stderr: {err}");
    let (code, _, err) = signal_from_outside(&s, &[], "echo ready; exec sleep 60", Signal::INT);
    assert_eq!(code, 130, "stderr: {err}");
}

#[test]
fn signals_reach_the_program_with_pid_namespace() {
    use rustix::process::Signal;
    let s = need!(env());
    let (code, rest, err) = signal_from_outside(&s, &["--pid"], TRAP, Signal::TERM);
    assert_eq!((code, rest.as_str()), (42, "got TERM\n"), "stderr: {err}");
    let (code, _, err) = signal_from_outside(&s, &["--pid"], "echo ready; exec sleep 60", Signal::TERM);
    assert_eq!(code, 143, "stderr: {err}");
}

#[test]
fn stdin_and_stdout_pass_through() {
    let s = need!(env());
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let out = s.plyroot_stdin(&["run", "t", "--", "sha256sum"], &data).ok();
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&data));
    assert!(out.stdout.starts_with(&digest), "stdin did not arrive intact: {out}");
    let out = s.sh("t", "echo to-stderr >&2; echo to-stdout").ok();
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("to-stdout\n", "to-stderr\n"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

#[test]
fn identity_inside() {
    let s = need!(env());
    let me = me();
    let out = s.sh_as_me("t", "id -u; id -g; id -un; echo \"$HOME\"").ok();
    let got: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(got.len(), 4, "{out}");
    let home = me.home.to_string_lossy().into_owned();
    match me.regime {
        Regime::Root => {
            assert_eq!(&got[..3], ["0", "0", "root"], "real root is uid 0 inside: {out}");
        }
        Regime::SubIds => {
            let (uid, gid) = (me.uid.to_string(), me.gid.to_string());
            assert_eq!(&got[..3], [uid.as_str(), gid.as_str(), me.name.as_str()], "with subids you are yourself inside: {out}");
            s.sh("t", &format!("grep -q '^{}:[*]:{}:' /etc/passwd", me.name, me.uid)).ok();
        }
        Regime::NoSubIds => {
            assert_eq!(got[0], "0", "without subids you are uid 0 inside: {out}");
            assert!(!got[2].is_empty(), "uid 0 has no name inside: {out}");
            assert!(!out.stdout.to_lowercase().contains("note"), "the note went to stdout: {out}");
        }
    }
    assert_eq!(got[3], home, "$HOME inside is not the host's: {out}");
    // --root: uid 0 inside, in every regime.
    let out = s.run("t", &["--root"], &["sh", "-c", "id -u; id -un"]).ok();
    assert_eq!(out.stdout, "0\nroot\n", "{out}");
    // The layer's /etc/passwd is untouched by the entry plyroot adds.
    assert_eq!(
        fs::read_to_string(s.path("t-rootfs/etc/passwd")).unwrap().lines().count(),
        2
    );
}

#[test]
fn no_subids_note_is_on_stderr_only() {
    let s = need!(env());
    if me().regime != Regime::NoSubIds {
        return;
    }
    let first = s.run("t", &[], &["echo", "hi"]).ok();
    assert_eq!(first.stdout, "hi\n");
    let second = s.run("t", &[], &["echo", "hi"]).ok();
    assert_eq!(second.stdout, "hi\n");
    assert!(!second.stderr.contains("subordinate"), "the one-time note came twice: {second}");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("NOTE: no-subids stderr, first run: {:?}; second run: {:?}\n", first.stderr, second.stderr).as_bytes(),
    );
}

#[test]
fn files_written_to_home_are_mine() {
    let s = need!(env());
    let me = me();
    if !me.home.is_dir() {
        return skip(&format!("$HOME ({}) does not exist", me.home.display()));
    }
    let name = format!(".plyroot-test-{}-{}", std::process::id(), rand_suffix());
    let host = me.home.join(&name);
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _guard = Rm(host.clone());
    for opts in [&[][..], &["--root"][..]] {
        let _ = fs::remove_file(&host);
        s.run("t", opts, &["sh", "-c", &format!("echo inside > \"$HOME/{name}\"")]).ok();
        let md = fs::metadata(&host).unwrap_or_else(|e| panic!("{opts:?}: not on the host: {e}"));
        // As yourself, yours; `--root` with subordinate ids is the first of them (README: "Who you
        // are inside"), without them root inside is you.
        let want = if !opts.is_empty() && me.regime == Regime::SubIds { first_subids() } else { (me.uid, me.gid) };
        assert_eq!((md.uid(), md.gid()), want, "{opts:?}: owned by someone else");
        assert_eq!(fs::read_to_string(&host).unwrap(), "inside\n");
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

// ---------------------------------------------------------------------------------------------
// Host integration
// ---------------------------------------------------------------------------------------------

#[test]
fn host_integration_defaults() {
    let s = need!(env());
    let script = "test -r /proc/self/status && \
        for d in null zero full random urandom tty; do test -c /dev/$d || { echo no /dev/$d; exit 1; }; done && \
        test -d /dev/pts && test -d /dev/shm && \
        head -c 16 /dev/urandom | wc -c && \
        echo x > /dev/null && \
        test -d /sys/kernel && { ! touch /sys/plyroot-test 2>/dev/null; } && \
        echo ok";
    let out = s.sh("t", script).ok();
    assert_eq!(out.stdout, "16\nok\n", "{out}");
    for f in ["/etc/resolv.conf", "/etc/hosts"] {
        if let Ok(host) = fs::read_to_string(f) {
            let inside = s.run("t", &[], &["cat", f]).ok();
            assert_eq!(inside.stdout, host, "{f} inside differs from the host's: {inside}");
        }
    }
}

#[test]
fn tmp_is_shared_and_cwd_kept() {
    let s = need!(env());
    let scratch = s.tmp.path().to_string_lossy().into_owned();
    if !scratch.starts_with("/tmp/") {
        return skip(&format!("the scratch dir {scratch} is not under /tmp"));
    }
    fs::write(s.path("from-host"), "host\n").unwrap();
    // Store::cmd starts plyroot in the scratch dir: the cwd is kept.
    let out = s.sh_as_me("t", "pwd; cat from-host; echo back > from-inside").ok();
    assert_eq!(out.stdout, format!("{scratch}\nhost\n"), "{out}");
    assert_eq!(fs::read_to_string(s.path("from-inside")).unwrap(), "back\n");
    assert_eq!(s.run("t", &["--cwd", "/etc"], &["pwd"]).ok().stdout, "/etc\n");
    // --no-host tmp: the host's /tmp is not there (nor is the cwd under it: --cwd says where to start).
    let out = s.run("t", &["--no-host", "tmp", "--cwd", "/"], &["sh", "-c", &format!("test ! -e {scratch}/from-host && echo hidden")]).ok();
    assert_eq!(out.stdout, "hidden\n", "{out}");
}

#[test]
fn no_host_turns_things_off() {
    let s = need!(env());
    s.run("t", &["--no-host", "proc"], &["test", "!", "-e", "/proc/self"]).ok();
    let home = me().home.to_string_lossy().into_owned();
    if me().home.is_dir() && home != "/" && !home.starts_with("/tmp") {
        // Some host file in $HOME is visible by default and not with --no-host home.
        s.run("t", &[], &["test", "-d", &home]).ok();
        let out = s.run("t", &["--no-host", "home"], &["sh", "-c", &format!("ls -A {home} 2>/dev/null | wc -l")]).ok();
        assert_eq!(out.line(), "0", "--no-host home still shows the host's home: {out}");
    }
    if Path::new("/etc/resolv.conf").exists() {
        // The fixture has no resolv.conf of its own.
        s.run("t", &["--no-host", "resolv,hosts"], &["sh", "-c", "test ! -s /etc/resolv.conf && test ! -s /etc/hosts"]).ok();
    }
    s.run("t", &["--no-host", "all", "--cwd", "/"], &["cat", "/etc/fixture"]).ok();
    s.plyroot(&["run", "--no-host", "bogus", "t", "--", "true"]).failed();
}

#[test]
fn binds_and_env_vars() {
    let s = need!(env());
    let data = s.path("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("in"), "bound\n").unwrap();
    let d = data.to_string_lossy().into_owned();
    let out = s
        .run("t", &["--bind", &format!("{d}:/mnt")], &["sh", "-c", "cat /mnt/in && echo w > /mnt/out"])
        .ok();
    assert_eq!(out.stdout, "bound\n");
    assert_eq!(fs::read_to_string(data.join("out")).unwrap(), "w\n");
    let out = s.run("t", &["--bind", &format!("{d}:/srv:ro")], &["sh", "-c", "cat /srv/in && echo w > /srv/nope"]);
    assert_ne!(out.code, 0, "wrote through a read-only bind: {out}");
    assert!(!data.join("nope").exists());
    // A destination that does not exist in the layers.
    s.run("t", &["--bind", &format!("{d}:/new/mount/point")], &["cat", "/new/mount/point/in"]).ok();
    // A missing source is plyroot's error, naming it.
    let missing = s.path("missing").to_string_lossy().into_owned();
    s.run("t", &["--bind", &format!("{missing}:/mnt")], &["true"]).plyroot_error(&[&missing]);

    let out = s.run("t", &["-e", "FOO=bar baz", "--env", "EMPTY="], &["sh", "-c", "echo \"$FOO|${EMPTY-unset}|$PATH\""]).ok();
    let line = out.line();
    assert!(line.starts_with("bar baz||"), "{out}");
    assert!(line.contains("/usr/bin") && line.contains("/bin"), "PATH inside: {out}");
}

// ---------------------------------------------------------------------------------------------
// pid namespace, concurrency, enter
// ---------------------------------------------------------------------------------------------

#[test]
fn pid_namespace() {
    let s = need!(env());
    let out = s.run("t", &["--pid"], &["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"]).ok();
    let nums: Vec<u32> = out.stdout.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(nums[0] <= 3, "pid inside a new pid namespace should be small: {out}");
    assert!(nums[1] <= 4, "/proc shows processes beyond the env's: {out}");
    // PID 1 reaps orphans and does not wait for a background child that outlives the program.
    let start = Instant::now();
    s.run("t", &["--pid"], &["sh", "-c", "sleep 30 & exit 3"]).code(3);
    assert!(start.elapsed() < Duration::from_secs(20), "waited for the orphan: {:?}", start.elapsed());
    // Without --pid, the host's processes are visible.
    let out = s.run("t", &[], &["sh", "-c", "ls /proc | grep -c '^[0-9]'"]).ok();
    assert!(out.line().parse::<u32>().unwrap() > 4, "{out}");
    // PID 1 failing before the program starts ends there, with one error: a forked child never
    // goes on in its parent's code path.
    for opts in [&["--pid", "--cwd", "/no/such/dir"][..], &["--cwd", "/no/such/dir"]] {
        let o = s.run("t", opts, &["true"]).plyroot_error(&["--cwd", "/no/such/dir"]);
        assert_eq!(o.stderr.matches("plyroot: error:").count(), 1, "{opts:?}: {o}");
    }
}

#[test]
fn concurrent_runs() {
    let s = need!(env());
    let outs: Vec<Out> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.sh("t", &format!("echo {i} > /var/c{i} && echo {i} > /usr/lib/c{i} && echo {i} > /etc/c{i} && cat /etc/fixture && sleep 0.2"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in outs {
        let o = o.ok();
        assert_eq!(o.stdout, "from-the-layer\n", "{o}");
    }
    // Every run's writes survive: concurrent runs share one persistent upper.
    for dir in ["/var", "/usr/lib", "/etc"] {
        let out = s.sh("t", &format!("cd {dir} && cat c0 c1 c2 c3 c4 c5 c6 c7")).ok();
        assert_eq!(out.stdout, "0\n1\n2\n3\n4\n5\n6\n7\n", "writes lost in {dir}: {out}");
    }
}

#[test]
fn concurrent_runs_in_different_envs_and_imports() {
    let s = need!(env());
    s.create("u", &[&src("dir", &s.path("t-rootfs"))]);
    let extra = s.path("extra");
    fs::create_dir_all(&extra).unwrap();
    fs::write(extra.join("f"), "x").unwrap();
    std::thread::scope(|scope| {
        let a = scope.spawn(|| (0..4).map(|_| s.sh("t", "echo t >> /var/log-t")).collect::<Vec<_>>());
        let b = scope.spawn(|| (0..4).map(|_| s.sh("u", "echo u >> /var/log-u")).collect::<Vec<_>>());
        let c = scope.spawn(|| s.plyroot(&["import", &src("dir", &extra)]));
        for o in a.join().unwrap().into_iter().chain(b.join().unwrap()) {
            o.ok();
        }
        c.join().unwrap().ok();
    });
    assert_eq!(s.run("t", &[], &["cat", "/var/log-t"]).ok().stdout, "t\nt\nt\nt\n");
    s.run("u", &[], &["test", "!", "-e", "/var/log-t"]).ok();
}

#[test]
fn enter_runs_a_login_shell() {
    let s = need!(env());
    let out = s.plyroot_stdin(&["enter", "t"], b"echo entered; cat /etc/fixture; exit 3\n").code(3);
    assert!(out.stdout.contains("entered\nfrom-the-layer\n"), "{out}");
}

#[test]
fn default_command_is_a_shell() {
    let s = need!(env());
    let out = s.plyroot_stdin(&["run", "t"], b"echo from-default-shell\n").ok();
    assert!(out.stdout.contains("from-default-shell"), "{out}");
}

#[test]
fn host_device_nodes_work_but_cannot_be_changed_from_inside() {
    let s = need!(env());
    use std::os::unix::fs::MetadataExt;
    let before = fs::metadata("/dev/null").unwrap();
    // As root inside (real root too): the node is the host's inode, so a chmod would be the
    // host's. It must fail, and writing through it must still work.
    let o = s.run("t", &["--root"], &["sh", "-c", "echo x > /dev/null && echo wrote; chmod 700 /dev/null && echo changed; chown 1:1 /dev/zero && echo changed; true"]).ok();
    assert_eq!(o.stdout, "wrote\n", "{o}");
    let after = fs::metadata("/dev/null").unwrap();
    assert_eq!((after.mode(), after.uid(), after.gid()), (before.mode(), before.uid(), before.gid()), "the host's /dev/null changed");
}

#[test]
fn kill_9_of_a_pid_namespace_run_leaves_nothing() {
    let s = need!(env());
    // The program would outlive its supervisor if PID 1 were not tied to it.
    let marker = format!("{}.{}", 31 + std::process::id() % 1000, rand_suffix() % 1000);
    let mut child = s.cmd(&["run", "--pid", "t", "--", "sleep", &marker]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let find = || -> Vec<u32> {
        fs::read_dir("/proc").unwrap().flatten().filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            (cmd == format!("sleep\0{marker}\0").into_bytes()).then_some(pid)
        }).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while find().is_empty() {
        assert!(Instant::now() < deadline, "the program did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !find().is_empty() {
        assert!(Instant::now() < deadline, "the program outlived its killed supervisor: {:?}", find());
        std::thread::sleep(Duration::from_millis(20));
    }
}
