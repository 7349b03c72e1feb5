//! The command line itself: help, completions, man pages, doctor, listings of an empty store, and
//! plyroot's own errors (exit 125, one `plyroot: error:` line naming the culprit). Nothing here
//! needs namespaces.

#[macro_use]
mod common;

use common::*;
use serde_json::json;

/// The subcommands a `--help` text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn help_on_every_command() {
    // Walks the command tree as `--help` shows it, so new commands are covered as they appear.
    let s = Store::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = s.plyroot(&args).ok();
        assert!(out.stdout.contains("Usage:"), "no usage text: {out}");
        assert!(out.stderr.is_empty(), "help wrote to stderr: {out}");
        for sub in subcommands(&out.stdout) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        seen.push(path.join(" "));
    }
    for want in ["import", "layers", "layer", "layer rm", "create", "run", "enter", "list", "rm", "doctor", "completions", "manpages"] {
        assert!(seen.iter().any(|c| c == want), "`{want}` is not in the help tree: {seen:?}");
    }
    // The commands the issue asks to show examples do.
    for cmd in ["import", "layers", "create", "run", "enter"] {
        let out = s.plyroot(&[cmd, "--help"]).ok();
        assert!(out.stdout.contains("Examples:"), "`{cmd} --help` has no examples: {out}");
    }
}

#[test]
fn readme_install_steps_work_on_a_fresh_machine() {
    // The install block as a new user runs it top to bottom: the repository is cloned before
    // anything builds in it, ~/.local/bin (where plyroot and its launchers go) is put on PATH,
    // and a directory is created before a file is written into it.
    let readme = include_str!("../README.md");
    let install = readme.split("## Install").nth(1).and_then(|r| r.split("\n## ").next()).expect("README has an Install section");
    let at = |needle: &str| install.find(needle).unwrap_or_else(|| panic!("the Install section lacks {needle:?}"));
    assert!(at("git clone") < at("cargo install"), "clone first, then build");
    assert!(at("cd plyroot") < at("cargo install"));
    at("export PATH=\"$HOME/.local/bin:$PATH\"");
    assert!(install.contains("~/.profile"), "say why ~/.local/bin may be missing from PATH");
    assert!(at("mkdir -p ~/.local/share/bash-completion/completions") < at("completions bash >"));
    // The quick start builds in the clone the Install section made.
    let quick = readme.split("## Quick start").nth(1).unwrap_or("");
    assert!(quick.find("Install").is_some_and(|i| i < quick.find("cargo install").unwrap_or(0)), "the quick start says where it runs");
    // What it says of booted environments is what boot does (tests/boot.rs checks the hostname).
    assert!(readme.contains("its hostname is the environment's name"));
    assert!(!readme.contains("its own hostname"));
}

#[test]
fn errors_name_the_path_they_are_about() {
    // A relative --store in a directory that was removed: the OS says only `No such file or
    // directory`; plyroot names what it was resolving.
    let s = Store::new();
    let gone = s.path("gone");
    std::fs::create_dir(&gone).unwrap();
    let script = format!("cd {0} && rmdir {0} && exec {1} --store st list", shell_quote(&gone.to_string_lossy()), shell_quote(&bin().to_string_lossy()));
    sh(&script).plyroot_error(&["store directory st", "current directory"]);
    // An environment that cannot be read is not "no environment": the error names its path.
    let root = s.path("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/f"), "x\n").unwrap();
    s.create("e", &[&format!("dir:{}", root.display())]);
    let dir = s.home.join("envs/e");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let out = s.plyroot(&["generations", "e"]);
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    if me().regime != Regime::Root {
        // (Real root reads it anyway.)
        out.plyroot_error(&[&dir.join("current").to_string_lossy(), "Permission denied"]);
    } else {
        out.ok();
    }
}

#[test]
fn version() {
    let out = Store::new().plyroot(&["--version"]).ok();
    assert!(out.stdout.starts_with("plyroot "), "{out}");
}

#[test]
fn completions_bash() {
    let out = Store::new().plyroot(&["completions", "bash"]).ok();
    assert!(out.stdout.contains("complete") && out.stdout.contains("plyroot"), "{out}");
    // bash can load it.
    if which("bash").is_some() {
        let s = Store::new();
        let f = s.path("plyroot.bash");
        std::fs::write(&f, &out.stdout).unwrap();
        sh(&format!("bash -n {}", f.display())).ok();
    }
}

#[test]
fn manpages() {
    let s = Store::new();
    let dir = s.path("man");
    std::fs::create_dir_all(&dir).unwrap();
    s.plyroot(&["manpages", &dir.to_string_lossy()]).ok();
    // A place that cannot hold them is named (a directory under a file: for root too).
    std::fs::write(s.path("file"), "").unwrap();
    let bad = s.path("file").join("man");
    s.plyroot(&["manpages", &bad.to_string_lossy()]).plyroot_error(&[&bad.to_string_lossy()]);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "plyroot.1"), "no plyroot.1 in {names:?}");
    for sub in ["import", "run", "create"] {
        assert!(
            names.iter().any(|n| n.starts_with("plyroot-") && n.contains(sub)),
            "no man page for {sub} in {names:?}"
        );
    }
    let page = std::fs::read_to_string(dir.join("plyroot.1")).unwrap();
    assert!(page.contains(".TH"), "plyroot.1 is not roff");
}

#[test]
fn doctor_reports() {
    let s = Store::new();
    let out = s.plyroot(&["doctor"]);
    assert!(out.code == 0 || out.code == 125 || out.code == 1, "{out}");
    assert!(!out.stdout.trim().is_empty(), "doctor printed nothing: {out}");
    let json = s.plyroot(&["doctor", "--json"]);
    let v = json.json();
    assert!(v.is_object() || v.is_array(), "doctor --json: {json}");
}

#[test]
fn empty_store_listings() {
    let s = Store::new();
    assert_eq!(s.plyroot(&["layers", "--json"]).ok().json(), serde_json::json!([]));
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));
    s.plyroot(&["layers"]).ok();
    s.plyroot(&["list"]).ok();
}

#[test]
fn store_flag_and_env_agree() {
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let src = format!("dir:{}", root.display());
    let other = s.path("other-store");
    // --store wins over PLYROOT_HOME.
    let out = run_with(
        &mut s.cmd(&["--store", &other.to_string_lossy(), "import", &src]),
        None,
        TIMEOUT,
    )
    .ok();
    assert_layer_id(&out.line());
    assert!(other.is_dir(), "--store did not create the store at {}", other.display());
    let in_other = run_with(
        &mut s.cmd(&["--store", &other.to_string_lossy(), "layers", "--json"]),
        None,
        TIMEOUT,
    )
    .ok()
    .json();
    assert_eq!(in_other.as_array().unwrap().len(), 1);
    assert!(s.layer_ids().is_empty(), "the import went to PLYROOT_HOME, not --store");
    let _ = std::process::Command::new("chmod").args(["-R", "u+rwX"]).arg(&other).status();
}

#[test]
fn bad_source_kind_is_named() {
    let s = Store::new();
    s.plyroot(&["import", "ftp:somewhere"]).plyroot_error(&["ftp"]);
    s.plyroot(&["import", "no-kind-at-all"]).plyroot_error(&["no-kind-at-all"]);
    s.plyroot(&["create", "e", "--from", "bogus:x"]).plyroot_error(&["bogus"]);
    assert!(s.layer_ids().is_empty());
}

#[test]
fn missing_source_is_named() {
    let s = Store::new();
    let missing = s.path("does-not-exist.tar");
    let m = missing.to_string_lossy().to_string();
    s.plyroot(&["import", &format!("tar:{m}")]).plyroot_error(&[&m]);
    s.plyroot(&["import", &format!("dir:{m}")]).plyroot_error(&[&m]);
    s.plyroot(&["import", &format!("oci:{m}")]).plyroot_error(&[&m]);
    s.plyroot(&["import", &format!("docker-archive:{m}")]).plyroot_error(&[&m]);
    let unknown = format!("layer:sha256:{}", "0".repeat(64));
    s.plyroot(&["import", &unknown]).plyroot_error(&["0000000000"]);
}

#[test]
fn missing_env_is_named() {
    let s = Store::new();
    s.plyroot(&["run", "no-such-env", "--", "true"]).plyroot_error(&["no-such-env"]);
    s.plyroot(&["enter", "no-such-env"]).plyroot_error(&["no-such-env"]);
    s.plyroot(&["rm", "no-such-env"]).plyroot_error(&["no-such-env"]);
}

#[test]
fn error_is_one_line() {
    let s = Store::new();
    let out = s.plyroot(&["run", "no-such-env", "--", "true"]).plyroot_error(&[]);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {out}");
    assert!(lines[0].starts_with("plyroot: error: "), "{out}");
}

#[test]
fn a_usage_error_is_one_line_and_a_forgotten_double_dash_is_named() {
    let s = Store::new();
    let one_line = |args: &[&str], needles: &[&str]| {
        let out = s.plyroot(args).plyroot_error(needles);
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected exactly one line on stderr: {out}");
    };
    one_line(&["run", "dev", "ls", "/src"], &["unexpected argument 'ls'", "`plyroot run dev -- ls /src`"]);
    one_line(&["run", "-e", "A=1", "--root", "dev", "make", "-j2"], &["`plyroot run -e A=1 --root dev -- make -j2`"]);
    one_line(&["enter", "dev", "ls"], &["`plyroot run dev -- ls`"]);
    one_line(&["run", "--bogus", "dev"], &["'--bogus'", "`plyroot run --help`"]);
    one_line(&["frobnicate"], &["'frobnicate'", "`plyroot --help`"]);
    one_line(&["create"], &["--from", "<NAME>", "`plyroot create --help`"]);
    one_line(&["run", "--no-host", "bogus", "dev", "--", "true"], &["'bogus'", "possible values", "home"]);
}

#[test]
fn bad_env_names_are_refused() {
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let src = format!("dir:{}", root.display());
    for bad in ["../escape", "a/b", "", ".", ".."] {
        let out = s.plyroot(&["create", bad, "--from", &src]);
        assert_ne!(out.code, 0, "env name {bad:?} was accepted: {out}");
    }
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));
}

#[test]
fn create_list_rm() {
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let src = format!("dir:{}", root.display());
    s.create("one", &[&src]);
    s.create("two", &[&src]);
    let list = s.plyroot(&["list", "--json"]).ok().json();
    let envs = list.as_array().expect("list --json is an array");
    let names: Vec<&str> = envs.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{list}");
    assert!(names.contains(&"one") && names.contains(&"two"), "{list}");
    for e in envs {
        assert!(e["layers"].is_array(), "env without a layers array: {e}");
    }
    let human = s.plyroot(&["list"]).ok();
    assert!(human.stdout.contains("one") && human.stdout.contains("two"), "{human}");
    // Creating an existing name again is an error, not a silent overwrite.
    s.plyroot(&["create", "one", "--from", &src]).plyroot_error(&["one"]);
    s.plyroot(&["rm", "one", "two"]).ok();
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json(), serde_json::json!([]));
}

// ---------------------------------------------------------------------------------------------
// Damaged records: a clear error naming the file, never a panic
// ---------------------------------------------------------------------------------------------

/// A store with environment `t` applied from `proj/plyroot.toml` (so a lock file pins its one
/// layer), a file in its upper, and a launcher of `sh` in `bin/`. Needs no namespaces.
fn records() -> Result<(Store, std::path::PathBuf, String), String> {
    let s = Store::new();
    let proj = s.path("proj");
    busybox_rootfs(&proj.join("rootfs"))?;
    std::fs::write(proj.join("plyroot.toml"), "[env.t]\nfrom = [\"dir:rootfs\"]\n").unwrap();
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    run_with(&mut c, None, TIMEOUT).ok();
    std::fs::write(s.home.join("envs/t/upper/made-in-a-run"), "x\n").unwrap();
    s.plyroot(&["export", "t", "sh", "--to", &s.path("bin").to_string_lossy()]).ok();
    let id = s.layer_ids().into_iter().next().unwrap();
    Ok((s, proj, id))
}

/// Writes each of `contents` into `file` in turn and runs each command (in `cwd`): every one must
/// fail with plyroot's own status and exactly one `plyroot: error:` line that names the file.
/// The file's content is restored after.
fn refused_naming(s: &Store, cwd: &std::path::Path, file: &std::path::Path, contents: &[String], commands: &[&[&str]]) {
    let saved = std::fs::read(file).ok();
    let shown = file.display().to_string();
    for content in contents {
        std::fs::write(file, content).unwrap();
        for args in commands {
            let mut c = s.cmd(args);
            c.current_dir(cwd);
            let out = run_with(&mut c, None, TIMEOUT);
            assert!(!out.stderr.contains("panicked"), "plyroot panicked on a damaged {shown} holding {content:?}: {out}");
            assert_eq!(out.code, 125, "a damaged {shown} holding {content:?}: {out}");
            // (A once-per-store note may come first, e.g. about identity.)
            let errors: Vec<&str> = out.stderr.lines().filter(|l| l.contains("error")).collect();
            assert_eq!(errors.len(), 1, "expected one error line on stderr for {shown} holding {content:?}: {out}");
            assert!(errors[0].starts_with("plyroot: error: ") && errors[0].contains(&shown), "the error must name {shown} (holding {content:?}): {out}");
            assert_eq!(out.stderr.trim_end().lines().last(), Some(errors[0]), "the error is the last word: {out}");
        }
    }
    match saved {
        Some(d) => std::fs::write(file, d).unwrap(),
        None => std::fs::remove_file(file).unwrap(),
    }
}

/// A JSON record with `key` set to `value`.
fn with(record: &serde_json::Value, key: &str, value: serde_json::Value) -> String {
    let mut r = record.clone();
    r[key] = value;
    r.to_string()
}

#[test]
fn damaged_generation_records_are_named_never_a_panic() {
    let (s, proj, id) = need!(records());
    let file = s.home.join("envs/t/generations/1.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let damaged = [
        with(&g, "layers", json!(["sha256:abc"])),
        with(&g, "layers", json!(["abc"])),
        with(&g, "layers", json!([""])),
        with(&g, "layers", json!(["sha256:../../../../../../tmp"])),
        with(&g, "layers", json!([id.to_uppercase()])),
        with(&g, "layers", json!(id)),
        with(&g, "layers", json!([5])),
        with(&g, "commits", json!(["sha256:abc"])),
        with(&g, "number", json!(7)),
        with(&g, "number", json!("one")),
        "not json\n".to_string(),
        String::new(),
    ];
    let current: &[&[&str]] = &[
        &["generations", "t"],
        &["generations", "t", "--json"],
        &["list"],
        &["layers"],
        &["gc", "--dry-run"],
        &["run", "t", "--", "true"],
        &["apply"],
        &["export", "t", "-o", "x.tar"],
        &["rollback", "t"],
        &["switch", "t", "1"],
        &["diff", "t"],
    ];
    refused_naming(&s, &proj, &file, &damaged, current);
    // A record that is not the current one: everything that reads every generation.
    let other = s.home.join("envs/t/generations/2.json");
    let damaged2: Vec<String> = damaged.iter().map(|d| d.replace("\"number\":1", "\"number\":2")).collect();
    refused_naming(&s, &proj, &other, &damaged2, &[&["generations", "t"], &["layers"], &["gc", "--dry-run"]]);
    // Restored, everything works again and nothing was lost.
    assert!(!proj.join("x.tar").exists());
    s.plyroot(&["generations", "t"]).ok();
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json()[0]["layers"], json!([id]));
}

#[test]
fn a_damaged_upper_record_is_named() {
    let (s, proj, id) = need!(records());
    let file = s.home.join("envs/t/upper.json");
    let damaged = ["[\"sha256:abc\"]".to_string(), format!("[\"{}\"]", &id[..20]), "[\"sha256:../../x\"]".into(), format!("\"{id}\""), "{}".into(), "[1]".into(), "garbage".into()];
    refused_naming(&s, &proj, &file, &damaged, &[&["run", "t", "--", "true"], &["export", "t", "-o", "x.tar"], &["gc", "--dry-run"], &["switch", "t", "1"], &["diff", "t"]]);
    assert!(!proj.join("x.tar").exists());
    // The error says how to fix it: without the file, the upper counts as written on the
    // current generation.
    std::fs::write(&file, "garbage").unwrap();
    let out = s.plyroot(&["gc", "--dry-run"]).plyroot_error(&["upper.json", "delete it"]);
    assert!(out.stderr.contains("current generation"), "{out}");
    std::fs::remove_file(&file).unwrap();
    s.plyroot(&["gc", "--dry-run"]).ok();
}

#[test]
fn a_damaged_lock_file_is_named() {
    let (s, proj, id) = need!(records());
    let file = proj.join("plyroot.lock");
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let damaged = [
        with(&lock, "sources", json!({"dir:rootfs": ["sha256:abc"]})),
        with(&lock, "sources", json!({"dir:rootfs": ["sha256:../../../x"]})),
        with(&lock, "sources", json!({"dir:rootfs": id})),
        with(&lock, "sources", json!([])),
        "{".to_string(),
    ];
    refused_naming(&s, &proj, &file, &damaged, &[&["apply"], &["apply", "--update"]]);
    let mut c = s.cmd(&["apply"]);
    c.current_dir(&proj);
    run_with(&mut c, None, TIMEOUT).ok();
}

#[test]
fn a_damaged_layer_record_is_named() {
    let (s, proj, id) = need!(records());
    let hex = id.trim_start_matches("sha256:");
    let file = s.home.join("layers").join(hex).join("layer.json");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let damaged = [
        with(&info, "id", json!("sha256:abc")),
        with(&info, "id", json!("")),
        with(&info, "id", json!(format!("sha256:{}", "e".repeat(64)))),
        with(&info, "id", json!("sha256:../../../../x")),
        with(&info, "id", json!(5)),
        with(&info, "size", json!("big")),
        "[]".to_string(),
        "\u{0}\u{1}".to_string(),
    ];
    let prefix = &id[..19];
    let layer_src = format!("layer:{id}");
    refused_naming(&s, &proj, &file, &damaged, &[&["layers"], &["layers", "--json"], &["gc", "--dry-run"], &["verify"], &["layer", "rm", prefix], &["import", &layer_src], &["create", "u", "--from", &layer_src]]);
    assert_eq!(s.layer_ids().into_iter().collect::<Vec<_>>(), std::slice::from_ref(&id));
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json().as_array().unwrap().len(), 1, "no environment was created or removed");
}

#[test]
fn a_damaged_launcher_receipt_is_named() {
    let (s, proj, _) = need!(records());
    let file = s.home.join("launchers/t/sh.json");
    assert!(file.is_file(), "the receipt lives at {}", file.display());
    let damaged = ["garbage".to_string(), "{\"env\": 5}".into(), "[]".into()];
    refused_naming(&s, &proj, &file, &damaged, &[&["exports"], &["unexport", "--all"], &["rm", "t"]]);
    // `rm` refused before removing anything: the environment and its launcher are still there.
    assert_eq!(s.plyroot(&["list", "--json"]).ok().json().as_array().unwrap().len(), 1);
    assert!(std::fs::symlink_metadata(s.path("bin/sh")).is_ok());
    s.plyroot(&["rm", "t"]).ok();
    assert!(std::fs::symlink_metadata(s.path("bin/sh")).is_err());
}
