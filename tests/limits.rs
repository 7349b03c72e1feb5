//! Issue 10, items 11, 13 and 14: limits stated up front (at most 435 layers per environment,
//! so that a launch stays under overlayfs's 500 lowers; `squash` to get back under it), outside
//! text shown safely, and small correctness items. Each test runs the real binary, as root and as
//! the CI users (tests/run.sh).

#[macro_use]
mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The most layers an environment may have (500 lowers, less the skeleton, less 64 for
/// launchers composing over it).
const MAX_LAYERS: usize = 435;

/// Imports `n` one-file `dir:` layers in one command and returns their ids, bottom first.
fn tiny_layers(s: &Store, n: usize) -> Vec<String> {
    let mut args = vec!["import".to_string()];
    for i in 0..n {
        let d = s.path(&format!("tiny/{i}"));
        fs::create_dir_all(d.join("opt/tiny")).unwrap();
        fs::write(d.join(format!("opt/tiny/{i}")), format!("{i}\n")).unwrap();
        args.push(format!("dir:{}", d.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ids = s.plyroot(&args).ok().lines();
    assert_eq!(ids.len(), n);
    ids
}

/// `--from layer:ID` for each id.
fn froms(ids: &[String]) -> Vec<String> {
    ids.iter().map(|id| format!("layer:{id}")).collect()
}

fn create_args<'a>(name: &'a str, froms: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["create", name];
    for f in froms {
        args.extend(["--from", f]);
    }
    args
}

/// The layers of `name`'s current generation.
fn env_layers(s: &Store, name: &str) -> Vec<String> {
    let list = s.plyroot(&["list", "--json"]).ok().json();
    let env = list.as_array().unwrap().iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no {name} in {list}"));
    env["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
}

/// `export NAME -o FILE`: the id of the merged root.
fn export_id(s: &Store, name: &str) -> String {
    let out = s.path(&format!("{name}-{}.tar", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    s.plyroot(&["export", name, "-o", out.to_str().unwrap()]).ok().line()
}

/// Four layers that delete, replace and hide each other's files: a directory, two archives with
/// OCI whiteouts and an opaque directory, and a directory again.
fn deleting_stack(s: &Store) -> [String; 4] {
    let l1 = s.path("l1");
    for (p, c) in [("etc/a", "1"), ("etc/b", "1"), ("opt/x/one", "1"), ("srv/s", "1"), ("keep", "1")] {
        fs::create_dir_all(l1.join(p).parent().unwrap()).unwrap();
        fs::write(l1.join(p), c).unwrap();
    }
    set_mtimes(&l1, MTIME);
    let t2 = RawTar::new().dir("etc/").file("etc/.wh.b", b"").dir("opt/").file("opt/.wh..wh..opq", b"").file("opt/y", b"2").finish();
    let t3 = RawTar::new().dir("etc/").file("etc/a", b"3").dir("srv/").file("srv/.wh.s", b"").file("new", b"3").finish();
    fs::write(s.path("t2.tar"), t2).unwrap();
    fs::write(s.path("t3.tar"), t3).unwrap();
    let l4 = s.path("l4");
    fs::create_dir_all(l4.join("etc")).unwrap();
    fs::write(l4.join("etc/c"), "4").unwrap();
    set_mtimes(&l4, MTIME);
    [format!("dir:{}", l1.display()), format!("tar:{}", s.path("t2.tar").display()), format!("tar:{}", s.path("t3.tar").display()), format!("dir:{}", l4.display())]
}

#[test]
fn squash_merges_layers_into_one_and_the_root_stays_the_same() {
    let s = Store::new();
    let stack = deleting_stack(&s);
    let stack: Vec<&str> = stack.iter().map(String::as_str).collect();
    s.create("e", &stack);
    let layers = env_layers(&s, "e");
    assert_eq!(layers.len(), 4);
    let root = export_id(&s, "e");

    // The top three into one: what they delete of the bottom one stays deleted.
    let merged = s.plyroot(&["squash", "e", "--from", "2"]).ok().line();
    assert_layer_id(&merged);
    assert_eq!(env_layers(&s, "e"), [layers[0].clone(), merged.clone()]);
    assert_eq!(export_id(&s, "e"), root, "squash --from 2 changed the root the environment shows");
    let gens = s.plyroot(&["generations", "e", "--json"]).ok().json();
    assert_eq!(gens.as_array().unwrap().len(), 2);
    assert!(gens[1]["reason"].as_str().unwrap().contains("squash"), "{gens}");
    let info = s.layers().into_iter().find(|l| l["id"] == merged.as_str()).unwrap();
    assert!(info["source"].as_str().unwrap().contains("squash of e"), "{info}");

    // Everything into one: the layer `export` gives for the same layers.
    let all = s.plyroot(&["squash", "e"]).ok().line();
    assert_eq!(all, root, "a squash of every layer is the export's layer");
    assert_eq!(env_layers(&s, "e"), std::slice::from_ref(&root));
    assert_eq!(export_id(&s, "e"), root);

    // Nothing left to merge, and a --from past the top, change nothing.
    let o = s.plyroot(&["squash", "e"]).ok();
    assert!(o.stderr.contains("nothing to squash"), "{o}");
    s.plyroot(&["squash", "e", "--from", "2"]).plyroot_error(&["'e' has 1 layer(s)", "--from"]);
    s.plyroot(&["squash", "e", "--from", "0"]).code(125);
    assert_eq!(s.plyroot(&["generations", "e", "--json"]).ok().json().as_array().unwrap().len(), 3);
}

#[test]
fn squash_keeps_the_upper_and_runs_see_the_same_root() {
    need!(userns());
    let s = Store::new();
    let root = s.path("base");
    need!(busybox_rootfs(&root));
    let extra = s.path("extra");
    fs::create_dir_all(extra.join("opt")).unwrap();
    fs::write(extra.join("opt/gone"), "deleted above\n").unwrap();
    fs::write(extra.join("opt/kept"), "kept\n").unwrap();
    let wh = s.path("wh.tar");
    fs::write(&wh, RawTar::new().dir("opt/").file("opt/.wh.gone", b"").file("opt/new", b"new\n").finish()).unwrap();
    s.create("e", &[&format!("dir:{}", root.display()), &format!("dir:{}", extra.display()), &format!("tar:{}", wh.display())]);
    // As root inside: with subordinate ids one is oneself inside, and /etc is root's.
    s.run("e", &["--root"], &["sh", "-c", "echo mine > /etc/note && rm /etc/fixture"]).ok();
    let see = "cat /etc/note /opt/kept /opt/new; test ! -e /opt/gone && test ! -e /etc/fixture && echo same";
    let before = s.sh("e", see).ok();
    assert_eq!(before.stdout, "mine\nkept\nnew\nsame\n", "{before}");

    for from in ["2", "1"] {
        s.plyroot(&["squash", "e", "--from", from]).ok();
        // No rebase asked for: the upper is on the new generation's layers, and holds the same.
        let after = s.sh("e", see).ok();
        assert_eq!(after.stdout, before.stdout, "after squash --from {from}: {after}");
        assert!(!after.stderr.contains("other layers"), "{after}");
        let diff = s.plyroot(&["diff", "e"]).ok();
        assert!(diff.stdout.contains("A /etc/note") && diff.stdout.contains("D /etc/fixture"), "{diff}");
        assert!(!diff.stderr.contains("rebase"), "{diff}");
    }
    assert_eq!(env_layers(&s, "e").len(), 1);
    // And the upper still commits onto it.
    s.plyroot(&["commit", "e"]).ok();
    assert_eq!(s.sh("e", "cat /etc/note").ok().stdout, "mine\n");
}

#[test]
fn create_apply_and_commit_refuse_more_layers_than_a_launch_can_mount() {
    let s = Store::new();
    let ids = tiny_layers(&s, MAX_LAYERS + 1);
    let all = froms(&ids);
    let limit = ["436 layers", "435", "500 lower layers", "squash"];

    s.plyroot(&create_args("big", &all)).plyroot_error(&limit);
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]), "a refused create made an environment");

    let proj = s.path("proj");
    fs::create_dir_all(&proj).unwrap();
    let quoted: Vec<String> = all.iter().map(|f| format!("{f:?}")).collect();
    fs::write(proj.join("plyroot.toml"), format!("[env.big]\nfrom = [{}]\n", quoted.join(", "))).unwrap();
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    run_with(&mut c, None, TIMEOUT).plyroot_error(&limit);
    assert!(!proj.join("plyroot.lock").exists(), "a refused apply wrote the lock file");
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));

    // At the limit: created; a commit would pass it, so it is refused and the upper stays.
    s.plyroot(&create_args("big", &all[..MAX_LAYERS])).ok();
    let upper = s.home.join("envs/big/upper");
    fs::write(upper.join("note"), "mine\n").unwrap();
    s.plyroot(&["commit", "big"]).plyroot_error(&["436 layers", "plyroot squash big"]);
    assert_eq!(fs::read_to_string(upper.join("note")).unwrap(), "mine\n");
    assert_eq!(env_layers(&s, "big").len(), MAX_LAYERS);

    // squash gets it back under, keeping the upper; then the commit goes through.
    s.plyroot(&["squash", "big", "--from", "2"]).ok();
    assert_eq!(env_layers(&s, "big").len(), 2);
    assert_eq!(fs::read_to_string(upper.join("note")).unwrap(), "mine\n");
    s.plyroot(&["commit", "big"]).ok();
    assert_eq!(env_layers(&s, "big").len(), 3);
    let w = s.plyroot(&["which", "big", "/note"]).ok();
    assert!(w.stdout.contains("commit of big"), "{w}");
    // And apply counts the layers committed on top of the declared ones.
    let at: Vec<String> = all[..MAX_LAYERS].iter().map(|f| format!("{f:?}")).collect();
    fs::write(proj.join("plyroot.toml"), format!("[env.big]\nfrom = [{}]\n", at.join(", "))).unwrap();
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    run_with(&mut c, None, TIMEOUT).plyroot_error(&["436 layers", "435 declared, 1 committed"]);
    assert_eq!(env_layers(&s, "big").len(), 3);
}

#[test]
fn a_launcher_composing_past_the_kernels_limit_says_what_to_squash() {
    need!(userns());
    let s = Store::new();
    let root = s.path("base");
    need!(busybox_rootfs(&root));
    let base = s.import(&format!("dir:{}", root.display())).remove(0);
    let ids = tiny_layers(&s, MAX_LAYERS - 1 + 70);
    let mut big = vec![format!("layer:{base}")];
    big.extend(froms(&ids[..MAX_LAYERS - 1]));
    s.plyroot(&create_args("big", &big)).ok();
    let mut tool = vec![format!("layer:{base}")];
    tool.extend(froms(&ids[MAX_LAYERS - 1..]));
    s.plyroot(&create_args("tool", &tool)).ok();
    let bin = s.path("bin");
    s.plyroot(&["export", "tool", "sh", "--to", bin.to_str().unwrap()]).ok();
    let launcher = bin.join("sh");

    // big alone mounts (435 layers and the skeleton); tool's 71 layers over big's upper and 434
    // other layers, with the skeleton, would be 507 lowers.
    s.run("big", &[], &["true"]).ok();
    let o = s.run("big", &[], &[launcher.to_str().unwrap(), "-c", "echo composed"]);
    assert_eq!(o.code, 125, "{o}");
    for needle in ["cannot start 'tool' over the environment it was started in", "its 71 layers", "507 lower layers", "plyroot squash"] {
        assert!(o.stderr.contains(needle), "expected {needle:?}: {o}");
    }
    s.plyroot(&["squash", "tool", "--from", "2"]).ok();
    let o = s.run("big", &[], &[launcher.to_str().unwrap(), "-c", "ls /opt/tiny | wc -l"]).ok();
    assert_eq!(o.line(), (MAX_LAYERS - 1 + 70).to_string(), "{o}");
}

/// `plyroot ARGS` on a terminal (a pty from `script`), stdout and stderr together.
fn on_terminal(s: &Store, args: &[&str]) -> Result<String, String> {
    let script = tool("script")?;
    let cmd = std::iter::once(bin().to_string_lossy().into_owned()).chain(args.iter().map(|a| a.to_string())).map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ");
    let o = run_with(Command::new(script).args(["-q", "-e", "-c", &cmd, "/dev/null"]).env("PLYROOT_HOME", &s.home).current_dir(s.path("")), None, TIMEOUT);
    Ok(o.stdout)
}

#[test]
fn outside_text_reaches_the_terminal_escaped() {
    let s = Store::new();
    let title = "\x1b]0;owned\x07\x1b[2J";
    let shown = "\\x1b]0;owned\\x07\\x1b[2J";
    // An entry name in an error.
    let evil = RawTar::new().dir("etc/").file(&format!("../{title}"), b"x").finish();
    let o = s.plyroot_stdin(&["import", "tar:-"], &evil).plyroot_error(&[shown]);
    assert!(!o.stderr.contains('\x1b') && !o.stderr.contains('\x07'), "raw control characters on stderr: {o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{o}");
    // A source in a manifest error.
    let proj = s.path("proj");
    fs::create_dir_all(&proj).unwrap();
    fs::write(proj.join("plyroot.toml"), "[env.e]\nfrom = [\"zip:\\u001b]0;owned\\u0007\"]\n").unwrap();
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    let o = run_with(&mut c, None, TIMEOUT).plyroot_error(&["zip:\\x1b]0;owned\\x07"]);
    assert!(!o.stderr.contains('\x1b'), "{o:?}");

    // A source in a listing: exact when piped (data), escaped on a terminal.
    let dir = s.path(&format!("src{title}"));
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/x"), "x").unwrap();
    let src = format!("dir:{}", dir.display());
    s.create("e", &[&src]);
    let piped = s.plyroot(&["layers"]).ok();
    assert!(piped.stdout.contains(&src), "piped data must stay exact: {piped:?}");
    let listed = s.plyroot(&["list", "--json"]).ok().json();
    assert_eq!(listed[0]["sources"][0], src.as_str(), "JSON stays exact");
    for args in [&["layers"][..], &["list"][..]] {
        let tty = need!(on_terminal(&s, args));
        assert!(tty.contains(shown) && !tty.contains('\x1b') && !tty.contains('\x07'), "{args:?} on a terminal: {tty:?}");
    }
}

#[test]
fn which_stays_inside_the_environment() {
    let s = Store::new();
    let l = s.path("l");
    fs::create_dir_all(l.join("etc")).unwrap();
    fs::write(l.join("etc/passwd"), "inside\n").unwrap();
    std::os::unix::fs::symlink("/etc", l.join("hostetc")).unwrap();
    s.create("e", &[&format!("dir:{}", l.display())]);
    s.plyroot(&["which", "e", "/etc/passwd"]).ok();
    let deep = "../".repeat(30) + "etc/passwd";
    for p in [deep.as_str(), "/etc/../../../../../../../../../../../../../../../../etc/shadow", "/../etc/passwd"] {
        let o = s.plyroot(&["which", "e", p]).plyroot_error(&["'..'", "environment 'e'"]);
        assert!(o.stdout.is_empty(), "{o}");
    }
    s.plyroot(&["which", "e", "/hostetc/passwd"]).plyroot_error(&["/hostetc is a symbolic link", "/etc"]);
}

#[test]
fn export_desktop_copies_only_regular_files_of_the_layers() {
    let s = Store::new();
    let host = s.path("host-secret");
    fs::write(&host, "host secret\n").unwrap();
    let hostdesk = s.path("host.desktop");
    fs::write(&hostdesk, "[Desktop Entry]\nName=Host\nExec=/usr/bin/app\nIcon=app\n").unwrap();
    let l = s.path("l");
    let icons = l.join("usr/share/icons/hicolor");
    fs::create_dir_all(icons.join("32x32/apps")).unwrap();
    fs::create_dir_all(icons.join("48x48/apps")).unwrap();
    fs::create_dir_all(l.join("usr/share/applications")).unwrap();
    // The program itself (export refuses one the environment lacks).
    fs::create_dir_all(l.join("usr/bin")).unwrap();
    fs::write(l.join("usr/bin/app"), "#!/bin/sh\n").unwrap();
    fs::write(icons.join("32x32/apps/app.png"), "png\n").unwrap();
    std::os::unix::fs::symlink(&host, icons.join("48x48/apps/app.png")).unwrap();
    std::os::unix::fs::symlink(&host, icons.join("48x48/apps/app.svg")).unwrap();
    // A theme directory that is a link out of the layer is not entered either.
    std::os::unix::fs::symlink(s.path("hosticons"), icons.join("64x64")).unwrap();
    fs::create_dir_all(s.path("hosticons/apps")).unwrap();
    fs::write(s.path("hosticons/apps/app.png"), "host icon\n").unwrap();
    fs::write(l.join("usr/share/applications/app.desktop"), "[Desktop Entry]\nName=App\nExec=/usr/bin/app %U\nIcon=app\n").unwrap();
    std::os::unix::fs::symlink(&hostdesk, l.join("usr/share/applications/linked.desktop")).unwrap();
    s.create("e", &[&format!("dir:{}", l.display())]);
    let home = s.path("home");
    fs::create_dir_all(&home).unwrap();
    let mut c = s.cmd(&["export", "e", "app", "--desktop", "--to", s.path("bin").to_str().unwrap()]);
    c.env("HOME", &home);
    run_with(&mut c, None, TIMEOUT).ok();
    let got = tree(&home.join(".local/share"));
    let want: std::collections::BTreeSet<String> = ["applications", "applications/plyroot-e-app.desktop", "icons", "icons/hicolor", "icons/hicolor/32x32", "icons/hicolor/32x32/apps", "icons/hicolor/32x32/apps/app.png"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(got, want, "only the layer's regular files are installed");
    assert_eq!(fs::read_to_string(home.join(".local/share/icons/hicolor/32x32/apps/app.png")).unwrap(), "png\n");
}

#[test]
fn manifest_env_cycles_and_bad_variable_names_are_refused_where_written() {
    let s = Store::new();
    let x = s.path("x");
    fs::create_dir_all(x.join("etc")).unwrap();
    fs::write(x.join("etc/x"), "x").unwrap();
    let x = format!("dir:{}", x.display());
    s.create("a", &[&x]);
    s.create("b", &[&x]);
    let proj = s.path("proj");
    fs::create_dir_all(&proj).unwrap();
    let apply = |toml: &str| {
        fs::write(proj.join("plyroot.toml"), toml).unwrap();
        let mut c = s.cmd(&["apply"]);
        c.current_dir(&proj);
        run_with(&mut c, None, TIMEOUT)
    };
    // Before: every apply stacked a on b and b on a again.
    apply(&format!("[env.a]\nfrom = [\"env:b\", {x:?}]\n[env.b]\nfrom = [\"env:a\"]\n")).plyroot_error(&["plyroot.toml:4:9:", "cycle: a → b → a"]);
    assert_eq!(env_layers(&s, "a").len(), 1);
    assert_eq!(env_layers(&s, "b").len(), 1);
    apply(&format!("[env.a]\nfrom = [{x:?}]\nenv = {{ \"A=B\" = \"1\" }}\n")).plyroot_error(&["plyroot.toml:3:9:", "\"A=B\"", "'='"]);
    apply(&format!("[env.a]\nfrom = [{x:?}]\nenv = {{ \"\" = \"1\" }}\n")).plyroot_error(&["plyroot.toml:3:9:", "non-empty"]);
    assert_eq!(s.plyroot(&["generations", "a", "--json"]).ok().json().as_array().unwrap().len(), 1);
}

#[test]
fn small_items_binds_durations_id_case_and_docker_archives() {
    let s = Store::new();
    let l = s.path("l");
    fs::create_dir_all(l.join("etc")).unwrap();
    fs::write(l.join("etc/x"), "x").unwrap();
    s.create("e", &[&format!("dir:{}", l.display())]);
    // An unknown bind option is refused, not bound as part of the destination.
    s.plyroot(&["run", "--bind", "/tmp:/x:bogus", "e", "--", "true"]).plyroot_error(&["'bogus' is not a bind option"]);
    // A duration that overflows is refused, not wrapped round (or a panic).
    s.plyroot(&["gc", "--dry-run", "--older-than", "30500000000000000w"]).plyroot_error(&["too long"]);
    // Layer ids in capitals, prefix included.
    let other = s.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("o"), "o").unwrap();
    let id = s.import(&format!("dir:{}", other.display())).remove(0);
    let upper = id[..20].to_uppercase();
    assert!(upper.starts_with("SHA256:"));
    s.plyroot(&["create", "f", "--from", &format!("layer:{upper}")]).ok();
    assert_eq!(env_layers(&s, "f"), std::slice::from_ref(&id));
    s.plyroot(&["rm", "f"]).ok();
    s.plyroot(&["layer", "rm", &id[7..20].to_uppercase()]).ok();
    assert!(!s.layer_ids().contains(&id));
    // A tar that is no docker-archive says so.
    let plain = s.path("plain.tar");
    need!(make_tar(&l, &plain, Compression::None));
    s.plyroot(&["import", &format!("docker-archive:{}", plain.display())]).plyroot_error(&["no manifest.json", "docker save", "tar:FILE"]);
}

#[test]
fn an_os_error_is_said_once() {
    let s = Store::new();
    need!(userns());
    need!(s.busybox_env("e"));
    let missing: PathBuf = s.path("no-such-source");
    let o = s.plyroot(&["run", "--bind", &format!("{}:/x", missing.display()), "e", "--", "true"]).plyroot_error(&[&missing.display().to_string()]);
    let os = std::io::Error::from_raw_os_error(2).to_string();
    assert_eq!(o.stderr.matches(&os).count(), 1, "{o}");
}
