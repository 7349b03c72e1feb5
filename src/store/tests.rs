//! Tier 2: store operations on real directories in temp dirs.

use std::fs;
use std::path::Path;

use super::Store;
use crate::progress::Progress;
use crate::source::Source;

fn tree(root: &Path, marker: &str) {
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("usr/bin/tool"), marker).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
}

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn import(store: &Store, src: &str) -> anyhow::Result<Vec<String>> {
    let s: Source = src.parse()?;
    Ok(store.import(&s, &mut Progress::hidden())?.into_iter().map(|l| l.id).collect())
}

#[test]
fn same_content_twice_is_one_layer_and_staging_is_empty_after() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    tree(&t.path().join("a"), "v1");
    let a = import(&store, &format!("dir:{}", t.path().join("a").display())).unwrap();
    let b = import(&store, &format!("dir:{}", t.path().join("a").display())).unwrap();
    assert_eq!(a, b);
    assert_eq!(entries(&store.layers_dir()).len(), 1);
    assert!(entries(&store.root.join("tmp")).is_empty(), "staging left behind: {:?}", entries(&store.root.join("tmp")));
    tree(&t.path().join("b"), "v2");
    let c = import(&store, &format!("dir:{}", t.path().join("b").display())).unwrap();
    assert_ne!(a, c);
    assert_eq!(store.layers().unwrap().len(), 2);
    assert_eq!(store.resolve_layer(&a[0][..15]).unwrap(), a[0]);
}

#[test]
fn a_failed_import_leaves_the_store_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    tree(&t.path().join("a"), "v1");
    import(&store, &format!("dir:{}", t.path().join("a").display())).unwrap();
    let before = entries(&store.layers_dir());
    // A gzip stream cut in the middle of an entry.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    {
        let mut b = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_ustar();
        h.set_size(100_000);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big", &vec![7u8; 100_000][..]).unwrap();
        b.finish().unwrap();
    }
    let data = gz.finish().unwrap();
    let cut = t.path().join("cut.tar.gz");
    fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let err = import(&store, &format!("tar:{}", cut.display())).unwrap_err();
    assert!(format!("{err:#}").contains("cut.tar.gz"), "{err:#}");
    assert_eq!(entries(&store.layers_dir()), before);
    assert!(entries(&store.root.join("tmp")).is_empty());
}

#[test]
fn leftovers_of_a_crashed_import_are_collected_but_live_staging_is_not() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let live = store.staging().unwrap();
    // What a kill -9 leaves: a staging dir whose process is gone, with a read-only dir inside.
    let dead = store.root.join("tmp/2147483646-0");
    fs::create_dir_all(dead.join("root/ro")).unwrap();
    fs::write(dead.join("root/ro/f"), "x").unwrap();
    fs::set_permissions(dead.join("root/ro"), std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    assert_eq!(store.clean_leftovers().unwrap(), 1);
    assert!(!dead.exists());
    assert!(live.path.exists());
}

#[test]
fn environments_are_created_once_listed_and_removed() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    tree(&t.path().join("a"), "v1");
    let ids = import(&store, &format!("dir:{}", t.path().join("a").display())).unwrap();
    store.create_env("dev", ids.clone(), vec!["dir:a".into()], Default::default(), "test").unwrap();
    let e = store.create_env("dev", ids.clone(), vec![], Default::default(), "test").err().unwrap().to_string();
    assert!(e.contains("already exists") && e.contains("plyroot rm dev"), "{e}");
    for bad in ["", "-x", ".x", "a/b", "a b"] {
        assert!(store.create_env(bad, ids.clone(), vec![], Default::default(), "test").is_err(), "{bad:?} accepted");
    }
    let env = store.env("dev").unwrap();
    assert_eq!(env.current().unwrap().layers, ids);
    assert_eq!(store.layer_users(&ids[0]).unwrap(), vec!["dev"]);
    let e = store.remove_layer(&ids[0]).unwrap_err().to_string();
    assert!(e.contains("used by") && e.contains("dev"), "{e}");
    store.remove_env("dev").unwrap();
    assert!(store.envs().unwrap().is_empty());
    assert!(store.env("dev").unwrap_err().to_string().contains("no environment named 'dev'"));
    store.remove_layer(&ids[0]).unwrap();
    assert!(store.layers().unwrap().is_empty());
}

/// An environment `dev` on one small layer.
fn env_with_layer(t: &Path) -> (Store, super::env::Env) {
    let store = Store::open(&t.join("store")).unwrap();
    tree(&t.join("a"), "v1");
    let ids = import(&store, &format!("dir:{}", t.join("a").display())).unwrap();
    store.create_env("dev", ids, vec![], Default::default(), "test").unwrap();
    let env = store.env("dev").unwrap();
    (store, env)
}

fn put(dir: &Path, file: &str, content: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(file), content).unwrap();
}

/// Every file under saved/ and in the upper, as (where, name, content).
fn kept(env: &super::env::Env) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (place, dir) in [("upper", env.upper())].into_iter().chain(fs::read_dir(env.saved_dir()).into_iter().flatten().flatten().map(|e| ("saved", e.path()))) {
        for f in entries(&dir) {
            out.push((place.to_string(), f.clone(), fs::read_to_string(dir.join(&f)).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

#[test]
fn what_older_versions_left_half_replaced_is_put_back_never_deleted() {
    // The states the pre-journal reset/commit could die in: (upper, upper.old, upper.new), each
    // None (absent) or the one file it holds; and where the user's files must end up.
    type Dirs<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>);
    let cases: &[(Dirs, &[(&str, &str)])] = &[
        ((Some("mine"), None, Some("")), &[("upper", "mine")]),
        ((None, Some("mine"), Some("")), &[("upper", "mine")]),
        ((Some(""), Some("mine"), None), &[("upper", "mine")]),
        ((None, Some("mine"), None), &[("upper", "mine")]),
        ((Some("later"), Some("mine"), None), &[("saved", "mine"), ("upper", "later")]),
        ((Some("mine"), None, Some("stray")), &[("saved", "stray"), ("upper", "mine")]),
    ];
    for ((up, old, new), want) in cases {
        let t = tempfile::tempdir().unwrap();
        let (_store, env) = env_with_layer(t.path());
        fs::remove_dir(env.upper()).unwrap();
        for (dir, content) in [(env.upper(), up), (env.dir.join("upper.old"), old), (env.dir.join("upper.new"), new)] {
            match content {
                Some("") => fs::create_dir(&dir).unwrap(),
                Some(c) => put(&dir, c, c),
                None => {}
            }
        }
        fs::write(env.dir.join("upper.new.json"), "[]").unwrap();
        assert!(env.needs_recovery());
        env.recover().unwrap();
        let got: Vec<(String, String)> = kept(&env).into_iter().map(|(place, name, _)| (place, name)).collect();
        let want: Vec<(String, String)> = want.iter().map(|(p, n)| (p.to_string(), n.to_string())).collect();
        assert_eq!(got, want, "{:?}", (up, old, new));
        assert!(!env.needs_recovery(), "{:?}", (up, old, new));
    }
}

#[test]
fn a_corrupt_journal_stops_recovery_and_names_the_file() {
    let t = tempfile::tempdir().unwrap();
    let (_store, env) = env_with_layer(t.path());
    put(&env.upper(), "f", "mine");
    fs::write(env.journal_path(), "{\"op\": \"reset\", \"ba").unwrap();
    let e = format!("{:#}", env.recover().unwrap_err());
    assert!(e.contains("journal.json") && e.contains("corrupt"), "{e}");
    assert_eq!(kept(&env), [("upper".to_string(), "f".to_string(), "mine".to_string())]);
}

#[test]
fn a_rebase_journal_never_removes_outside_the_upper() {
    let t = tempfile::tempdir().unwrap();
    let (_store, env) = env_with_layer(t.path());
    put(&env.upper(), "f", "mine");
    let victim = env.dir.join("victim");
    fs::write(&victim, "x").unwrap();
    let j = super::journal::Journal::Rebase { onto: vec![], remove: vec!["../victim".into()], nixdb: false, links: vec![] };
    env.begin(&j).unwrap();
    let e = format!("{:#}", env.recover().unwrap_err());
    assert!(e.contains("not a path inside the upper"), "{e}");
    assert!(victim.exists());
}

#[test]
fn an_interrupted_nix_db_rebase_is_finished_from_wherever_it_stopped() {
    let t = tempfile::tempdir().unwrap();
    let (_store, env) = env_with_layer(t.path());
    let onto = env.current().unwrap().layers;
    let db = env.upper().join(super::nixdb::DB_DIR);
    let profiles = env.upper().join(super::nixdb::PROFILES);
    let links = vec![(format!("{}/p", super::nixdb::PROFILES), "p-3-link".to_string())];
    let j = super::journal::Journal::Rebase { onto: onto.clone(), remove: vec![], nixdb: true, links };
    // Stopped: before any step; with the upper's write-ahead log and schema gone; with the
    // database renamed too; with the staging removed (only the journal left).
    for stopped in 0..4 {
        let _ = fs::remove_dir_all(env.upper().join("nix"));
        put(&db, "db.sqlite", "ours");
        put(&db, "db.sqlite-wal", "ours-wal");
        fs::create_dir_all(&profiles).unwrap();
        std::os::unix::fs::symlink("p-2-link", profiles.join("p")).unwrap();
        let staging = super::nixdb::staging(&env);
        put(&staging, "db.sqlite", "merged");
        put(&staging, "schema", "10");
        if stopped >= 1 {
            fs::remove_file(db.join("db.sqlite-wal")).unwrap();
            fs::rename(staging.join("schema"), db.join("schema")).unwrap();
        }
        if stopped >= 2 {
            fs::rename(staging.join("db.sqlite"), db.join("db.sqlite")).unwrap();
        }
        if stopped >= 3 {
            fs::remove_dir_all(&staging).unwrap();
        }
        env.begin(&j).unwrap();
        env.recover().unwrap();
        assert_eq!(fs::read_to_string(db.join("db.sqlite")).unwrap(), "merged", "stopped at {stopped}");
        assert_eq!(fs::read_to_string(db.join("schema")).unwrap(), "10", "stopped at {stopped}");
        assert!(!db.join("db.sqlite-wal").exists(), "the upper's log outlived its database (stopped at {stopped})");
        assert_eq!(fs::read_link(profiles.join("p")).unwrap(), Path::new("p-3-link"));
        assert!(!staging.exists() && env.journal().unwrap().is_none(), "stopped at {stopped}");
        assert_eq!(env.upper_base().unwrap(), onto);
    }
}

#[test]
fn finishing_a_new_generation_twice_writes_it_once() {
    let t = tempfile::tempdir().unwrap();
    let (_store, env) = env_with_layer(t.path());
    let cur = env.current().unwrap();
    let g = env.next_generation(cur.layers.clone(), vec!["again".into()], Default::default(), "test", vec![]).unwrap();
    let j = super::journal::Journal::NewGeneration { from: cur.number, generation: g.clone() };
    // Written and switched, then the command died before clearing its journal: twice over.
    env.begin(&j).unwrap();
    env.roll(&j).unwrap();
    env.roll(&j).unwrap();
    env.recover().unwrap();
    assert_eq!(env.generations().unwrap().iter().map(|g| g.number).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(env.current().unwrap(), g);
    // A record another command wrote under the journaled number is kept; ours takes the next.
    let mut h = env.next_generation(cur.layers.clone(), vec!["mine".into()], Default::default(), "test", vec![]).unwrap();
    let j = super::journal::Journal::NewGeneration { from: 2, generation: h.clone() };
    env.begin(&j).unwrap();
    let mut other = h.clone();
    other.reason = "someone else".into();
    fs::write(env.generation_path(3), serde_json::to_vec(&other).unwrap()).unwrap();
    env.recover().unwrap();
    h.number = 4;
    assert_eq!(env.generation(3).unwrap(), other);
    assert_eq!(env.current().unwrap(), h);
}

#[test]
fn an_older_versions_commit_journal_is_finished_once() {
    let t = tempfile::tempdir().unwrap();
    let (store, env) = env_with_layer(t.path());
    // Its layer published, its generation not yet switched to, when the old plyroot died.
    tree(&t.path().join("b"), "committed");
    let layer = import(&store, &format!("dir:{}", t.path().join("b").display())).unwrap().remove(0);
    let base = env.current().unwrap().layers;
    fs::write(env.dir.join("commit.json"), serde_json::json!({"layer": layer, "base": base, "reason": "commit: old"}).to_string()).unwrap();
    assert_eq!(env.pending_layers().unwrap(), [vec![layer.clone()], base.clone()].concat());
    env.recover().unwrap();
    env.recover().unwrap();
    let cur = env.current().unwrap();
    assert_eq!((cur.number, cur.layers.clone(), cur.reason.as_str()), (2, [base, vec![layer.clone()]].concat(), "commit: old"));
    assert_eq!(cur.commits, [layer]);
    assert_eq!(env.generations().unwrap().len(), 2);
    assert!(!env.dir.join("commit.json").exists() && env.journal().unwrap().is_none());
}
