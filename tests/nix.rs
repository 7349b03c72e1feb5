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
use std::time::Duration;

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
    host_nix_exec(s, fake, &bin(), args)
}

/// `PROG ARGS` on a host whose /nix is `fake` (see `with_host_nix`).
fn host_nix_exec(s: &Store, fake: &Path, prog: &Path, args: &[&str]) -> Command {
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
        bin = q(prog),
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

// ---------------------------------------------------------------------------------------------
// Real Nix: Debian's nix-bin inside a Debian root (.ci/run caches it), offline, without nixpkgs.
// ---------------------------------------------------------------------------------------------

/// An offline Nix: no build users, no sandbox, no substituters.
const NIX_CONF: &str = "build-users-group =\nsandbox = false\nsubstituters =\n";

/// Writes the offline nix.conf, then adds the root's busybox as the store path `busybox` (a
/// directory holding it); prints that path.
fn busybox_store_path_script() -> String {
    format!("mkdir -p /etc/nix && printf '{NIX_CONF}' > /etc/nix/nix.conf && d=$(mktemp -d /var/tmp/bb.XXXXXX) && mkdir $d/busybox && cp /bin/busybox $d/busybox/ && nix-store --add $d/busybox && rm -r $d")
}

/// `nix-store --add` of a directory `NAME` holding `f` (made in /var/tmp inside, not in the host's
/// /tmp that runs share); prints the store path.
fn add_script(name: &str) -> String {
    format!("d=$(mktemp -d /var/tmp/add.XXXXXX) && mkdir $d/{name} && echo {name} > $d/{name}/f && nix-store --add $d/{name} && rm -r $d")
}

/// Builds a derivation whose builder is the store's busybox `bb`: a directory `NAME` with `f`
/// and `sh`, a link to busybox (so it references `bb`); prints the output path.
fn build_script(name: &str, bb: &str) -> String {
    format!(
        r#"nix-build --no-out-link -E 'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "${{builtins.storePath {bb}}}/busybox"; args = [ "sh" "-c" "mkdir $out && echo {name} > $out/f && ln -s {bb}/busybox $out/sh" ]; }}'"#
    )
}

/// Issue 14's scenario, up to the rebase: `img` is Debian with nix-bin, whose committed layer
/// holds the store path X (busybox) and the profile `p` at generation 1 (X); `dev` (a manifest:
/// `env:img` and `extra`, the layers' /nix) adds Y (`nix-store --add`) and builds W (a
/// derivation of X, referencing it) in its upper, and sets `p` to W (its generation 2); then
/// `img` gains Z, sets `p` to Z (its own generation 2) and commits, and `apply --update` puts dev
/// on those layers: its upper is stale, and both sides changed the store's database and `p`.
struct NixScene {
    s: Store,
    manifest: PathBuf,
    x: String,
    y: String,
    w: String,
    z: String,
}

fn nix_scene(extra: &[&str]) -> Result<NixScene, String> {
    userns()?;
    let tarball = debian_nix_rootfs()?;
    let s = Store::new();
    s.create("img", &[&format!("tar:{}", tarball.display())]);
    let x = nix_in(&s, "img", &busybox_store_path_script());
    set_profile(&s, "img", &x);
    s.plyroot(&["commit", "img", "-m", "X"]).ok();
    let manifest = s.path("plyroot.toml");
    let from: Vec<String> = ["env:img"].iter().chain(extra).map(|f| format!("{f:?}")).collect();
    fs::write(&manifest, format!("[env.dev]\nfrom = [{}]\nnix = \"layers\"\n", from.join(", "))).unwrap();
    s.plyroot(&["apply", "-f", &manifest.to_string_lossy()]).ok();
    let y = nix_in(&s, "dev", &add_script("y"));
    let w = nix_in(&s, "dev", &build_script("w", &x));
    set_profile(&s, "dev", &w);
    let z = nix_in(&s, "img", &add_script("z"));
    // The layers' switch is the newer one, in the whole seconds layers keep.
    std::thread::sleep(Duration::from_millis(1100));
    set_profile(&s, "img", &z);
    s.plyroot(&["commit", "img", "-m", "Z"]).ok();
    s.plyroot(&["apply", "-f", &manifest.to_string_lossy(), "--update"]).ok();
    s.run("dev", &[], &["true"]).plyroot_error(&["rebase"]);
    Ok(NixScene { s, manifest, x, y, w, z })
}

/// The profile the scenario switches.
const PROFILE: &str = "/nix/var/nix/profiles/p";

/// `nix-env --set` of the profile [`PROFILE`] in `env`: a new generation holding `path`.
fn set_profile(s: &Store, env: &str, path: &str) {
    s.run(env, &["--root", "--nix", "layers"], &["nix-env", "-p", PROFILE, "--set", path]).ok();
}

/// Runs `script` as root inside `env` with the layers' /nix; returns the last line it printed
/// (a store path).
fn nix_in(s: &Store, env: &str, script: &str) -> String {
    let out = s.run(env, &["--root", "--nix", "layers"], &["sh", "-c", &format!("set -e; {script}")]).ok();
    let last = out.stdout.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("/nix/store/"), "no store path printed: {out}");
    last
}

/// Whether every path is valid in `env` (`nix-store --verify-path`, which also checks contents).
fn verify_paths(s: &Store, env: &str, paths: &[&str]) -> Out {
    let mut cmd = vec!["nix-store", "--verify-path"];
    cmd.extend_from_slice(paths);
    s.run(env, &["--root"], &cmd)
}

#[test]
fn nix_stores_rebase_as_databases_and_collect_garbage_only_in_the_upper() {
    let n = need!(nix_scene(&[]));
    let (s, x, y, w, z) = (&n.s, n.x.as_str(), n.y.as_str(), n.w.as_str(), n.z.as_str());
    // Before the rebase: Z is on disk in the new layers, the upper's database does not know it.
    let out = s.plyroot(&["rebase", "dev"]).ok();
    assert!(!out.stdout.contains("C "), "a conflict was reported: {out}");
    assert!(out.stderr.contains("merged the Nix databases") && out.stderr.contains("5 store path(s) valid"), "{out}");
    // Every path either side registered is valid, with its references and deriver.
    verify_paths(s, "dev", &[x, y, w, z]).ok();
    let refs = s.run("dev", &["--root"], &["nix-store", "-q", "--references", w]).ok();
    assert_eq!(refs.lines(), [x.to_owned()], "{refs}");
    let drv = s.run("dev", &["--root"], &["nix-store", "-q", "--deriver", w]).ok().line();
    assert!(drv.ends_with("-w.drv"), "{drv}");
    verify_paths(s, "dev", &[&drv]).ok();
    // The profile keeps both sides' generations: the layers' generation 2 (Z) keeps its number,
    // the upper's (W) is renumbered to 3; the current one is the newer switch, the layers'.
    let links = s.run("dev", &[], &["sh", "-c", "cd /nix/var/nix/profiles && for l in p p-1-link p-2-link p-3-link; do echo $l $(readlink $l); done"]).ok();
    assert_eq!(links.stdout, format!("p p-2-link\np-1-link {x}\np-2-link {z}\np-3-link {w}\n"), "{links}");
    assert!(out.stderr.contains("p-3-link"), "the renumbering is not reported: {out}");
    let gens = s.run("dev", &["--root"], &["nix-env", "-p", PROFILE, "--list-generations"]).ok();
    assert_eq!(gens.lines().len(), 3, "{gens}");
    assert!(gens.lines()[1].contains("(current)"), "{gens}");
    // Nix keeps working on the merged database, and the next rebase has nothing to merge.
    let v = nix_in(s, "dev", &add_script("v"));
    verify_paths(s, "dev", &[&v, z]).ok();
    s.plyroot(&["rebase", "dev"]).ok();
    // Garbage collection inside, once only the current generation roots anything (Z): every
    // other path goes; the layers' X only as a whiteout in the upper, shown by diff as a whole
    // store path; the layers are unchanged.
    s.run("dev", &["--root"], &["nix-env", "-p", PROFILE, "--delete-generations", "old"]).ok();
    s.run("dev", &["--root"], &["nix-collect-garbage"]).ok();
    let gone = s.run("dev", &[], &["sh", "-c", &format!("for p in {x} {y} {w} {v} {drv}; do test -e $p && echo $p; done; true")]).ok();
    assert_eq!(gone.stdout, "", "collected paths still there: {gone}");
    verify_paths(s, "dev", &[z]).ok();
    let diff = s.plyroot(&["diff", "dev"]).ok();
    let store_lines: Vec<String> = diff.lines().into_iter().filter(|l| l.contains(" /nix/store/")).collect();
    assert_eq!(store_lines, [format!("D {x}")], "{diff}");
    s.plyroot(&["verify"]).ok();
}

/// The paths in `dir` whose names start with the merge's work prefix.
fn merge_work(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("plyroot-nixdb-")).collect()).unwrap_or_default()
}

/// What an interrupted or failed merge must leave as it was: the upper's diff, its database's
/// bytes, the layers it is written on, and no journal or staging.
fn upper_state(s: &Store) -> (String, Vec<u8>, Vec<u8>) {
    let env = s.home.join("envs/dev");
    assert!(!env.join("journal.json").exists() && !env.join("nixdb").exists(), "a journal or a staged database was left");
    let diff = s.plyroot(&["diff", "dev", "--json"]).ok().stdout;
    (diff, fs::read(env.join("upper/nix/var/nix/db/db.sqlite")).unwrap(), fs::read(env.join("upper.json")).unwrap())
}

#[test]
fn an_interrupted_or_failed_nix_db_merge_leaves_the_upper_as_it_was() {
    // A nix-store that the merge finds first on its PATH (the default profile's), which stalls,
    // then fails, when it loads the merged database: the rebase is killed there, or fails.
    let wrap = tempdir();
    let bin_dir = wrap.path().join("nix/var/nix/profiles/default/bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let nix_store = bin_dir.join("nix-store");
    fs::write(&nix_store, "#!/bin/sh\ncase \" $* \" in *\" --load-db \"*) sleep 3; exit 1;; esac\nexec /usr/bin/nix-store \"$@\"\n").unwrap();
    fs::set_permissions(&nix_store, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let n = need!(nix_scene(&[&format!("dir:{}", wrap.path().display())]));
    let s = &n.s;
    let before = upper_state(s);
    let tmp = s.path("tmp");
    fs::create_dir_all(&tmp).unwrap();
    // kill -9 once the merged registrations are written for nix-store to load (it stalls there).
    let mut child = s.cmd(&["rebase", "dev"]).env("TMPDIR", &tmp).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let loading = loop {
        if let Some(p) = merge_work(&tmp).into_iter().map(|w| w.join("merged.dump")).find(|p| p.exists()) {
            break p;
        }
        assert!(child.try_wait().unwrap().is_none(), "the rebase ended before it loaded the merged database");
        assert!(std::time::Instant::now() < deadline, "the merge never loaded its database");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(child.try_wait().unwrap().is_none(), "the rebase ended before it was killed");
    child.kill().unwrap();
    let st = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9), "the kill did not land mid-merge");
    assert!(loading.exists(), "the kill was not mid-merge");
    assert_eq!(upper_state(s), before, "a killed merge changed the upper");
    // The stalled nix-store fails: the rebase lists the database as a conflict and changes
    // nothing; the killed merge's work is cleaned up.
    std::thread::sleep(Duration::from_secs(3));
    let out = run_with(s.cmd(&["rebase", "dev"]).env("TMPDIR", &tmp), None, TIMEOUT).plyroot_error(&["could not be merged", "--ours"]);
    assert!(out.stdout.contains("C /nix/var/nix/db/db.sqlite"), "{out}");
    assert_eq!(upper_state(s), before, "a failed merge changed the upper");
    assert_eq!(merge_work(&tmp), Vec::<PathBuf>::new(), "the merges' work was left in {}", tmp.display());
    // Without that nix-store (a new generation without its layer), the merge goes through.
    fs::write(&n.manifest, "[env.dev]\nfrom = [\"env:img\"]\nnix = \"layers\"\n").unwrap();
    s.plyroot(&["apply", "-f", &n.manifest.to_string_lossy()]).ok();
    s.plyroot(&["rebase", "dev"]).ok();
    verify_paths(s, "dev", &[&n.x, &n.y, &n.w, &n.z]).ok();
}

#[test]
fn an_overlay_environment_builds_with_real_nix_and_the_host_store_stays_byte_identical() {
    need!(userns());
    let tarball = need!(debian_nix_rootfs());
    let host_nix_store = need!(tool("nix-store"));
    if !host_side() {
        return;
    }
    let s = Store::new();
    // The host's store, made with the host's nix-store as root (of a user namespace, for a user)
    // on the host /nix `with_host_nix` fakes: busybox under the name busybox.
    let host = s.path("host-nix");
    fs::create_dir_all(&host).unwrap();
    let conf = s.path("nix-conf");
    fs::create_dir_all(&conf).unwrap();
    fs::write(conf.join("nix.conf"), NIX_CONF).unwrap();
    let bb = s.path("bb/busybox");
    fs::create_dir_all(&bb).unwrap();
    fs::copy(need!(busybox()), bb.join("busybox")).unwrap();
    let mut add = host_nix_exec(&s, &host, &host_nix_store, &["--add", &bb.to_string_lossy()]);
    add.env("NIX_CONF_DIR", &conf).env_remove("PLYROOT_HOME");
    let x = run_with(&mut add, None, TIMEOUT).ok().line();
    assert!(x.starts_with("/nix/store/") && x.ends_with("-busybox"), "{x}");
    assert!(host.join("var/nix/db/db.sqlite").is_file());
    s.create("o", &[&format!("tar:{}", tarball.display())]);
    let before = snapshot(&host);
    // Inside: the host's path is valid (the environment's copy of the host's database), and a
    // derivation of it builds into the environment's upper.
    let script = format!("set -e; mkdir -p /etc/nix && printf '{NIX_CONF}' > /etc/nix/nix.conf; nix-store --verify-path {x}; {}", build_script("built", &x));
    let out = with_host_nix(&s, &host, &run_args("o", &["--nix", "overlay", "--root"], &script)).ok();
    let built = out.stdout.lines().last().unwrap_or_default().to_owned();
    assert!(built.starts_with("/nix/store/") && built.ends_with("-built"), "{out}");
    assert_eq!(snapshot(&host), before, "the host's store or database changed");
    assert!(!host.join(built.trim_start_matches("/nix/")).exists());
    // The built path persists in the environment, valid, referencing the host's busybox.
    let out = with_host_nix(&s, &host, &run_args("o", &["--nix", "overlay", "--root"], &format!("nix-store --verify-path {built} && nix-store -q --references {built}"))).ok();
    assert_eq!(out.stdout, format!("{x}\n"), "{out}");
    assert_eq!(snapshot(&host), before, "the host's store or database changed");
}
