//! Tier 3: which `/nix` an environment sees. The default is the layers' `/nix` when they have one,
//! else the host's; `nix = "host" | "layers"` in a manifest and `run --nix` choose.
//!
//! The host side needs a host `/nix`. A test must not create one on the machine, so it makes a
//! private root for one plyroot command: a tmpfs with the host's top-level entries bound into it
//! and a scratch directory at `/nix`, pivoted into in a private mount namespace (`with_host_nix`;
//! for a user, inside a user namespace of their own).
//!
//! Runs as root and as unprivileged users with and without /etc/subuid ranges.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// A store with a busybox environment `t` (no /nix) and `withnix` (busybox, then a layer with
/// `/nix/store/aaa-layers/f`), and the host's fake /nix (`/nix/store/bbb-host/f`) beside it.
fn setup() -> Result<(Store, PathBuf), String> {
    let s = Store::with_busybox_env()?;
    let root = s.path("t-rootfs");
    let layer = s.path("nixlayer");
    fs::create_dir_all(layer.join("nix/store/aaa-layers")).unwrap();
    fs::write(layer.join("nix/store/aaa-layers/f"), "layers\n").unwrap();
    s.create("withnix", &[&format!("dir:{}", root.display()), &format!("dir:{}", layer.display())]);
    let host = s.path("host-nix");
    fs::create_dir_all(host.join("store/bbb-host")).unwrap();
    fs::write(host.join("store/bbb-host/f"), "host\n").unwrap();
    Ok((s, host))
}

/// `plyroot ARGS` on a host whose /nix is `fake`: in a private mount namespace, a new root (a
/// tmpfs) with every top-level entry of the host's bound or copied into it and `fake` bound at
/// /nix. Nothing changes outside that namespace. Real root needs only the mount namespace; a user
/// makes it in a user namespace of their own (`unshare -Urm`), where plyroot then runs as that
/// namespace's root, unprivileged on the host: the kernel's checks for users apply.
fn with_host_nix(s: &Store, fake: &Path, args: &[&str]) -> Out {
    run_with(&mut host_nix_cmd(s, fake, args), None, TIMEOUT)
}

/// The command `with_host_nix` runs.
fn host_nix_cmd(s: &Store, fake: &Path, args: &[&str]) -> Command {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let new = s.path("host-root");
    fs::create_dir_all(&new).unwrap();
    let script = format!(
        "set -e; mount --make-rprivate /; R={r}; mount -t tmpfs tmpfs $R; \
         for e in /*; do n=${{e#/}}; \
           if [ -L \"$e\" ]; then cp -P \"$e\" \"$R/$n\"; \
           elif [ -d \"$e\" ]; then mkdir \"$R/$n\"; mount --rbind \"$e\" \"$R/$n\"; fi; done; \
         mkdir $R/nix; mount --bind {fake} $R/nix; mkdir $R/.old; cd $R; pivot_root . .old; umount -l /.old; \
         cd {cwd}; exec {bin} \"$@\"",
        r = q(&new),
        fake = q(fake),
        cwd = q(s.tmp.path()),
        bin = q(&bin()),
    );
    let mut c = Command::new(tool("unshare").unwrap_or_else(|e| panic!("{e}")));
    let ns = if me().regime == Regime::Root { "-m" } else { "-Urm" };
    c.args([ns, "sh", "-c", &script, "sh"]).args(args);
    c.env("PLYROOT_HOME", &s.home).env_remove("PLYROOT_STORE").current_dir(s.tmp.path());
    c
}

/// Whether this user can have a host /nix made for plyroot (`with_host_nix`): not with
/// subordinate ids, where plyroot as root of a user namespace would map root's ranges from
/// /etc/subuid, which newuidmap refuses there. Those users check the layers' side.
fn host_side() -> bool {
    me().regime != Regime::SubIds
}

fn run_args<'a>(env: &'a str, opts: &[&'a str], script: &'a str) -> Vec<&'a str> {
    let mut a = vec!["run"];
    a.extend_from_slice(opts);
    a.extend_from_slice(&[env, "--", "sh", "-c", script]);
    a
}

#[test]
fn the_layers_nix_by_default_else_the_hosts() {
    let (s, host) = need!(setup());
    // The layers' /nix, with no host /nix (every user), and the upper keeps what is written there.
    let out = s.sh("withnix", "cat /nix/store/aaa-layers/f; echo mine > /nix/store/ccc-mine").ok();
    assert_eq!(out.stdout, "layers\n", "{out}");
    assert_eq!(s.run("withnix", &[], &["cat", "/nix/store/ccc-mine"]).ok().stdout, "mine\n");
    if !host_side() {
        return;
    }
    // A host /nix does not hide the layers' /nix, nor is it written to.
    let out = with_host_nix(&s, &host, &run_args("withnix", &[], "cat /nix/store/aaa-layers/f /nix/store/ccc-mine; test ! -e /nix/store/bbb-host && echo no-host")).ok();
    assert_eq!(out.stdout, "layers\nmine\nno-host\n", "{out}");
    // Layers without /nix: the host's, shared read-write as before.
    let out = with_host_nix(&s, &host, &run_args("t", &[], "cat /nix/store/bbb-host/f; echo w > /nix/store/from-inside")).ok();
    assert_eq!(out.stdout, "host\n", "{out}");
    assert_eq!(fs::read_to_string(host.join("store/from-inside")).unwrap(), "w\n");
    // A layer that deletes /nix (a whiteout) has none: the host's again.
    let tar = s.path("delnix.tar");
    fs::write(&tar, RawTar::new().file(".wh.nix", b"").finish()).unwrap();
    s.create("nonix", &[&format!("dir:{}", s.path("t-rootfs").display()), &format!("dir:{}", s.path("nixlayer").display()), &format!("tar:{}", tar.display())]);
    let out = with_host_nix(&s, &host, &run_args("nonix", &[], "cat /nix/store/bbb-host/f")).ok();
    assert_eq!(out.stdout, "host\n", "{out}");
}

#[test]
fn run_nix_chooses_host_or_layers() {
    let (s, host) = need!(setup());
    let out = s.run("withnix", &["--nix", "layers"], &["cat", "/nix/store/aaa-layers/f"]).ok();
    assert_eq!(out.stdout, "layers\n", "{out}");
    let out = s.run("withnix", &["--nix", "both"], &["true"]).failed();
    assert!(out.stderr.contains("host") && out.stderr.contains("layers"), "the error names the choices: {out}");
    if !host_side() {
        return;
    }
    let out = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "host"], "cat /nix/store/bbb-host/f; test ! -e /nix/store/aaa-layers && echo hidden")).ok();
    assert_eq!(out.stdout, "host\nhidden\n", "{out}");
    // The layers' only: an environment without /nix has none, though the host has one.
    let out = with_host_nix(&s, &host, &run_args("t", &["--nix", "layers", "--cwd", "/"], "test ! -e /nix && echo none")).ok();
    assert_eq!(out.stdout, "none\n", "{out}");
}

#[test]
fn the_manifest_chooses_and_run_nix_overrides_it() {
    let (s, host) = need!(setup());
    let m = s.path("plyroot.toml");
    let from = format!("from = [\"dir:{}\", \"dir:{}\"]\n", s.path("t-rootfs").display(), s.path("nixlayer").display());
    fs::write(&m, format!("[env.bad]\n{from}nix = \"both\"\n")).unwrap();
    let out = s.plyroot(&["apply", "-f", &m.to_string_lossy()]).failed();
    assert!(out.stderr.contains(":3:7:") && out.stderr.contains("accepted: host, layers"), "{out}");
    fs::write(&m, format!("[env.m]\n{from}nix = \"host\"\n\n[env.l]\n{from}nix = \"layers\"\n")).unwrap();
    s.plyroot(&["apply", "-f", &m.to_string_lossy()]).ok();
    // No host /nix: nothing to bind, the layers' shows.
    assert_eq!(s.run("l", &[], &["cat", "/nix/store/aaa-layers/f"]).ok().stdout, "layers\n");
    if !host_side() {
        return;
    }
    let out = with_host_nix(&s, &host, &run_args("m", &[], "cat /nix/store/bbb-host/f")).ok();
    assert_eq!(out.stdout, "host\n", "{out}");
    let out = with_host_nix(&s, &host, &run_args("m", &["--nix", "layers"], "cat /nix/store/aaa-layers/f")).ok();
    assert_eq!(out.stdout, "layers\n", "{out}");
    let out = with_host_nix(&s, &host, &run_args("l", &[], "cat /nix/store/aaa-layers/f; test ! -e /nix/store/bbb-host && echo no-host")).ok();
    assert_eq!(out.stdout, "layers\nno-host\n", "{out}");
}

/// Every path under `dir` with its kind and content, to compare a host store before and after.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for p in tree(dir) {
        let full = dir.join(&p);
        let content = if full.is_file() { fs::read(&full).unwrap() } else { Vec::new() };
        out.push((p, content));
    }
    out
}

#[test]
fn overlay_puts_the_hosts_store_under_the_environments_writes() {
    let (s, host) = need!(setup());
    fs::create_dir_all(host.join("var/nix/db")).unwrap();
    fs::write(host.join("var/nix/db/db.sqlite"), "host-db\n").unwrap();
    fs::create_dir_all(host.join("var/nix/daemon-socket")).unwrap();
    // Every user: the choice is known (no host /nix here: the layers' shows).
    assert_eq!(s.run("withnix", &["--nix", "overlay"], &["cat", "/nix/store/aaa-layers/f"]).ok().stdout, "layers\n");
    if !host_side() {
        return;
    }
    let before = snapshot(&host);
    let script = "cat /nix/store/bbb-host/f /nix/store/aaa-layers/f /nix/var/nix/db/db.sqlite; \
        test ! -e /nix/var/nix/daemon-socket && echo no-daemon; \
        echo built > /nix/store/ddd-built && echo env-db >> /nix/var/nix/db/db.sqlite && rm -r /nix/store/bbb-host";
    let out = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "overlay"], script)).ok();
    assert_eq!(out.stdout, "host\nlayers\nhost-db\nno-daemon\n", "{out}");
    assert_eq!(snapshot(&host), before, "the host's /nix changed");
    // The host's store gains a path; the environment sees it, and keeps its own database.
    fs::create_dir_all(host.join("store/eee-later")).unwrap();
    fs::write(host.join("store/eee-later/f"), "later\n").unwrap();
    fs::write(host.join("var/nix/db/db.sqlite"), "host-db-2\n").unwrap();
    let out = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "overlay"], "cat /nix/store/ddd-built /nix/store/eee-later/f /nix/var/nix/db/db.sqlite; test ! -e /nix/store/bbb-host && echo deleted")).ok();
    assert_eq!(out.stdout, "built\nlater\nhost-db\nenv-db\ndeleted\n", "{out}");
    // A manifest chooses it too; --ephemeral writes go nowhere.
    let m = s.path("plyroot.toml");
    fs::write(&m, format!("[env.o]\nfrom = [\"dir:{}\"]\nnix = \"overlay\"\n", s.path("t-rootfs").display())).unwrap();
    s.plyroot(&["apply", "-f", &m.to_string_lossy()]).ok();
    let before = snapshot(&host);
    let out = with_host_nix(&s, &host, &run_args("o", &["--ephemeral"], "cat /nix/store/bbb-host/f && echo x > /nix/store/fff-gone && echo ok")).ok();
    assert_eq!(out.stdout, "host\nok\n", "{out}");
    let out = with_host_nix(&s, &host, &run_args("o", &[], "test ! -e /nix/store/fff-gone && cat /nix/var/nix/db/db.sqlite")).ok();
    assert_eq!(out.stdout, "host-db-2\n", "{out}");
    // --no-host nix keeps the host's store out of it too.
    let out = with_host_nix(&s, &host, &run_args("o", &["--no-host", "nix", "--ephemeral"], "test ! -e /nix/store/bbb-host && echo none")).ok();
    assert_eq!(out.stdout, "none\n", "{out}");
    assert_eq!(snapshot(&host), before, "the host's /nix changed");
}

#[test]
fn a_run_that_joins_a_live_one_gets_the_nix_it_asks_for_or_is_refused() {
    let (s, host) = need!(setup());
    // As root only: a user's `with_host_nix` runs are in sibling user namespaces, which cannot see
    // each other's runs as a user's runs on one host do.
    if me().regime != Regime::Root {
        return;
    }
    // A live run of `withnix` with the layers' /nix (the default), then one that wants the host's
    // store under it: it cannot have it in that mount, and says so rather than run without.
    let go = s.path("go");
    let script = format!("echo ready; while [ ! -e {} ]; do sleep 0.05; done", go.display());
    let mut live = host_nix_cmd(&s, &host, &run_args("withnix", &[], &script)).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(live.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let out = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "overlay"], "cat /nix/store/bbb-host/f"));
    fs::write(&go, "").unwrap();
    assert!(live.wait().unwrap().success());
    out.plyroot_error(&["/nix/store", "--nix"]);
    // Alone again, it runs as asked.
    end_keepers(&s.home);
    let out = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "overlay"], "cat /nix/store/bbb-host/f")).ok();
    assert_eq!(out.stdout, "host\n", "{out}");
    // The other way round, a run that joins the overlay's live mount sees what it asked for.
    let _ = fs::remove_file(&go);
    let mut live = host_nix_cmd(&s, &host, &run_args("withnix", &["--nix", "overlay"], &script)).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(live.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let layers = with_host_nix(&s, &host, &run_args("withnix", &[], "cat /nix/store/aaa-layers/f; test ! -e /nix/store/bbb-host && echo no-host"));
    let hosts = with_host_nix(&s, &host, &run_args("withnix", &["--nix", "host"], "cat /nix/store/bbb-host/f"));
    fs::write(&go, "").unwrap();
    assert!(live.wait().unwrap().success());
    assert_eq!(layers.ok().stdout, "layers\nno-host\n");
    assert_eq!(hosts.ok().stdout, "host\n");
}
