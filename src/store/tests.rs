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
