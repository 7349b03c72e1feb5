//! Import through the CLI: every source kind, content-addressed ids and dedup across kinds, the
//! layer listing and removal, failed imports, and hostile archives. Runs without namespaces.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// A busybox rootfs and tarballs of it in every compression, in `s`'s scratch dir.
struct Trees {
    root: PathBuf,
    tar: PathBuf,
    gz: PathBuf,
    xz: PathBuf,
    zst: PathBuf,
}

fn trees(s: &Store) -> Result<Trees, String> {
    let root = s.path("rootfs");
    busybox_rootfs(&root)?;
    // Names that lie about the compression: plyroot must look at the content.
    let t = Trees {
        tar: s.path("plain.tar.gz"),
        gz: s.path("gzip.tar"),
        xz: s.path("xz.tar.zst"),
        zst: s.path("zstd.tgz"),
        root,
    };
    make_tar(&t.root, &t.tar, Compression::None)?;
    make_tar(&t.root, &t.gz, Compression::Gzip)?;
    make_tar(&t.root, &t.xz, Compression::Xz)?;
    make_tar(&t.root, &t.zst, Compression::Zstd)?;
    Ok(t)
}

fn src(kind: &str, p: &Path) -> String {
    format!("{kind}:{}", p.display())
}

#[test]
fn same_tree_same_id_from_every_kind() {
    let s = Store::new();
    let t = need!(trees(&s));
    let first = s.import(&src("dir", &t.root));
    assert_eq!(first.len(), 1, "a dir is one layer: {first:?}");
    let id = &first[0];
    let entries = s.layer_dir_entries();
    let usage = s.usage();
    for source in [src("tar", &t.tar), src("tar", &t.gz), src("tar", &t.xz), src("tar", &t.zst)] {
        let ids = s.import(&source);
        assert_eq!(&ids, &first, "{source} gave a different id than the dir it was made from");
    }
    // tar:- reads stdin.
    let out = s.plyroot_stdin(&["import", "tar:-"], &fs::read(&t.zst).unwrap()).ok();
    assert_eq!(out.lines(), first, "tar:- (zstd on stdin): {out}");
    // layer:ID names an existing layer.
    assert_eq!(s.import(&format!("layer:{id}")), first);
    // The same directory again.
    assert_eq!(s.import(&src("dir", &t.root)), first);

    assert_eq!(s.layer_ids().into_iter().collect::<Vec<_>>(), first, "one layer in the store");
    assert_eq!(s.layer_dir_entries(), entries, "re-imports added entries under store/layers");
    let after = s.usage();
    assert!(
        after.1 == usage.1 && after.0 <= usage.0,
        "re-imports stored something new under store/layers: (bytes, inodes) {usage:?} -> {after:?}"
    );
}

#[test]
fn tar_flavours_same_id() {
    // pax format (atime/ctime records) without the `./` prefix, and the tar crate's own writer:
    // the canonical serialization must not care.
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    need!(tool("tar"));
    let id = s.import(&src("dir", &root));
    let pax = s.path("pax.tar");
    let o = run_with(
        std::process::Command::new("tar")
            .args(["--format=posix", "--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&root)
            .arg("-cf")
            .arg(&pax)
            .arg(".")
            .env("LC_ALL", "C"),
        None,
        TIMEOUT,
    );
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(s.import(&src("tar", &pax)), id, "a pax tar of the same tree");
}

#[test]
fn implicit_parent_dirs_are_deterministic() {
    // Layers often lack entries for parent directories (a whiteout-only OCI layer holds just
    // `etc/.wh.x`). Whatever plyroot invents for `etc/` must not depend on the clock: the same
    // archive imported a second later, into another store, must have the same id.
    let a = RawTar::new().file("etc/.wh.deleteme", b"").file("usr/share/doc/x/file", b"x\n").finish();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let s = Store::new();
        let p = s.path("no-parents.tar");
        fs::write(&p, &a).unwrap();
        ids.push(s.import(&src("tar", &p)));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(ids[0], ids[1], "the same archive got two ids a second apart");
}

#[test]
fn import_json_fields() {
    let s = Store::new();
    let t = need!(trees(&s));
    let out = s.plyroot(&["import", "--json", &src("tar", &t.zst)]).ok();
    let v = out.json();
    let arr = v.as_array().unwrap_or_else(|| panic!("import --json is not an array: {out}"));
    assert_eq!(arr.len(), 1, "{out}");
    let l = &arr[0];
    assert_layer_id(l["id"].as_str().unwrap_or_else(|| panic!("no id: {out}")));
    assert!(l["source"].as_str().is_some_and(|x| x.contains("zstd.tgz")), "source: {out}");
    let size = l["size"].as_u64().unwrap_or_else(|| panic!("no numeric size: {out}"));
    let bb = fs::metadata(busybox().unwrap()).unwrap().len();
    assert!(size >= bb, "size {size} is smaller than busybox ({bb}): {out}");
    let n_applets = fs::read_dir(t.root.join("bin")).unwrap().count() as u64;
    let entries = l["entries"].as_u64().unwrap_or_else(|| panic!("no numeric entries: {out}"));
    assert!(entries > n_applets, "entries {entries} <= {n_applets} files in /bin: {out}");
    // Plain output of the same import: the same id, and nothing else on stdout.
    let plain = s.plyroot(&["import", &src("dir", &t.root)]).ok();
    assert_eq!(plain.lines(), vec![l["id"].as_str().unwrap().to_string()], "{plain}");
}

#[test]
fn several_sources_in_one_import() {
    let s = Store::new();
    let t = need!(trees(&s));
    let extra = s.path("extra");
    fs::create_dir_all(extra.join("opt")).unwrap();
    fs::write(extra.join("opt/extra"), "extra\n").unwrap();
    let out = s.plyroot(&["import", &src("dir", &t.root), &src("dir", &extra)]).ok();
    let ids = out.lines();
    assert_eq!(ids.len(), 2, "{out}");
    assert_ne!(ids[0], ids[1]);
    assert_eq!(s.layer_ids().len(), 2);
}

#[test]
fn oci_and_docker_archive() {
    let s = Store::new();
    let layout = need!(oci_image(&s.path("oci-work")));
    let archive = s.path("image.docker.tar");
    need!(docker_archive(&layout, &archive));
    let oci = s.import(&src("oci", &layout));
    assert_eq!(oci.len(), 3, "the OCI image has three layers, bottom first: {oci:?}");
    let n = s.layer_dir_entries();
    let docker = s.import(&src("docker-archive", &archive));
    assert_eq!(docker, oci, "the docker-archive of the same image must give the same ids, in order");
    assert_eq!(s.layer_ids().len(), 3);
    assert_eq!(s.layer_dir_entries(), n, "the docker-archive stored something new");
    // Bottom first: the first layer is the busybox root, the biggest one.
    let layers = s.layers();
    let size_of = |id: &str| {
        layers.iter().find(|l| l["id"] == id).and_then(|l| l["size"].as_u64()).unwrap()
    };
    assert!(size_of(&oci[0]) > size_of(&oci[1]) && size_of(&oci[0]) > size_of(&oci[2]));
}

#[test]
fn oci_blob_corruption_is_refused() {
    let s = Store::new();
    let layout = need!(oci_image(&s.path("oci-work")));
    // Flip a byte in the biggest blob (the first layer): the digest check must catch it.
    let blobs = layout.join("blobs/sha256");
    let biggest = fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut data = fs::read(&biggest).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&biggest, data).unwrap();
    let name = biggest.file_name().unwrap().to_string_lossy().into_owned();
    s.plyroot(&["import", &src("oci", &layout)]).plyroot_error(&[&name[..12]]);
    assert!(s.layer_ids().is_empty(), "a corrupt image left layers behind");
}

#[test]
fn layers_listing_and_removal() {
    let s = Store::new();
    let t = need!(trees(&s));
    let id = s.import(&src("tar", &t.gz)).remove(0);
    s.create("user-of-layer", &[&format!("layer:{id}")]);
    let layers = s.layers();
    assert_eq!(layers.len(), 1);
    let l = &layers[0];
    assert_eq!(l["id"], id.as_str());
    for field in ["size", "entries", "source", "created", "used_by"] {
        assert!(!l[field].is_null(), "layers --json lacks {field}: {l}");
    }
    assert_eq!(l["used_by"], serde_json::json!(["user-of-layer"]), "{l}");
    let human = s.plyroot(&["layers"]).ok();
    assert!(human.stdout.contains(&id[7..19]), "`layers` does not show the id: {human}");

    // In use: refused, with a non-zero exit that names the environment.
    let refused = s.plyroot(&["layer", "rm", &id]);
    assert_ne!(refused.code, 0, "removed a layer an environment uses: {refused}");
    assert!(refused.stderr.contains("user-of-layer"), "the refusal should name the env: {refused}");
    assert_eq!(s.layer_ids().len(), 1);

    s.plyroot(&["rm", "user-of-layer"]).ok();
    assert_eq!(s.layers()[0]["used_by"], serde_json::json!([]));
    // An unambiguous prefix is enough.
    s.plyroot(&["layer", "rm", &id[..19]]).ok();
    assert!(s.layer_ids().is_empty());
    assert_eq!(s.layer_dir_entries(), 0, "the layer's files are still in store/layers");
    s.plyroot(&["layer", "rm", &id]).plyroot_error(&[&id[7..19]]);
}

#[test]
fn failed_import_changes_nothing() {
    let s = Store::new();
    let t = need!(trees(&s));
    let good = s.import(&src("dir", &t.root));
    let before = s.layer_ids();
    let entries = s.layer_dir_entries();

    // A compressed stream cut in the middle, and one with garbage after a valid start.
    let data = fs::read(&t.zst).unwrap();
    let cut = s.path("cut.tar.zst");
    fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let plain = fs::read(&t.tar).unwrap();
    let garbage = s.path("garbage.tar");
    let mut g = plain[..plain.len() / 2].to_vec();
    g.extend(std::iter::repeat_n(0x5a, 4096));
    fs::write(&garbage, g).unwrap();
    let not_tar = s.path("not-a-tar");
    fs::write(&not_tar, b"this is not an archive\n".repeat(100)).unwrap();

    for bad in [&cut, &garbage, &not_tar] {
        let out = s.plyroot(&["import", &src("tar", bad)]);
        out.plyroot_error(&[&bad.file_name().unwrap().to_string_lossy()]);
        assert_eq!(s.layer_ids(), before, "a failed import of {} changed the layers", bad.display());
        assert_eq!(s.layer_dir_entries(), entries, "a failed import left files in store/layers");
    }
    // Truncated stdin too.
    let out = s.plyroot_stdin(&["import", "tar:-"], &data[..data.len() / 3]);
    out.plyroot_error(&[]);
    assert_eq!(s.layer_ids(), before);
    // The store still works.
    assert_eq!(s.import(&src("tar", &t.zst)), good);
}

// ---------------------------------------------------------------------------------------------
// Hostile archives
// ---------------------------------------------------------------------------------------------

/// A host directory an archive must not reach, with a file in it.
struct Victim {
    dir: PathBuf,
    secret: PathBuf,
}

impl Victim {
    fn new(s: &Store) -> Victim {
        let dir = s.path("victim");
        fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        fs::write(&secret, "untouched\n").unwrap();
        Victim { dir, secret }
    }
    fn path(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }
    /// The tree outside the store, the secret's fingerprint and its content.
    fn state(&self) -> (std::collections::BTreeSet<String>, Option<Fingerprint>, String) {
        (tree(&self.dir), fingerprint(&self.secret), fs::read_to_string(&self.secret).unwrap())
    }
}

/// `../` enough times to climb out of any store to `/`.
fn up() -> String {
    "../".repeat(40)
}

/// Import a hostile archive; assert nothing outside changed and, when refused, a 125 error that
/// names `entry`. Returns whether plyroot refused it.
fn import_hostile(s: &Store, v: &Victim, file: &str, archive: Vec<u8>, entry: &str) -> bool {
    let path = s.path(file);
    fs::write(&path, archive).unwrap();
    let victim_before = v.state();
    let passwd_before = fingerprint(Path::new("/etc/passwd"));
    let layers_before = s.layer_ids();
    let out = s.plyroot(&["import", &src("tar", &path)]);
    assert_eq!(v.state(), victim_before, "the archive reached outside the layer: {out}");
    assert_eq!(
        fingerprint(Path::new("/etc/passwd")),
        passwd_before,
        "/etc/passwd changed or gained a link: {out}"
    );
    if out.code == 0 {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("NOTE: {file}: plyroot accepted it (entry {entry:?} kept inside the layer)\n")
                .as_bytes(),
        );
        false
    } else {
        out.plyroot_error(&[entry, file]);
        assert_eq!(s.layer_ids(), layers_before, "a refused import left a layer");
        true
    }
}

#[test]
fn hostile_absolute_path() {
    let s = Store::new();
    let v = Victim::new(&s);
    let name = format!("{}/abs-pwned", v.path());
    let a = RawTar::new().dir("etc/").file(&name, b"pwned\n").finish();
    import_hostile(&s, &v, "absolute.tar", a, "abs-pwned");
}

#[test]
fn hostile_dotdot() {
    let s = Store::new();
    let v = Victim::new(&s);
    let name = format!("{}{}/dotdot-pwned", up(), v.path().trim_start_matches('/'));
    let a = RawTar::new().dir("etc/").file(&name, b"pwned\n").finish();
    import_hostile(&s, &v, "dotdot.tar", a, "dotdot-pwned");
    // A shallow one that would land in the store itself.
    let a = RawTar::new().dir("etc/").file("../../shallow-pwned", b"pwned\n").finish();
    import_hostile(&s, &v, "dotdot-shallow.tar", a, "shallow-pwned");
    let found = tree(s.tmp.path());
    let leaked: Vec<_> = found.iter().filter(|p| p.ends_with("shallow-pwned")).collect();
    for p in &leaked {
        assert!(p.starts_with("store/layers/"), "`../../shallow-pwned` landed at {p}");
    }
}

#[test]
fn hostile_symlink_write_through() {
    let s = Store::new();
    let v = Victim::new(&s);
    let a = RawTar::new()
        .symlink("esc", &v.path())
        .file("esc/sym-pwned", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "symlink-abs.tar", a, "esc");
    let rel = format!("{}{}", up(), v.path().trim_start_matches('/'));
    let a = RawTar::new()
        .dir("d/")
        .symlink("d/rel", &rel)
        .file("d/rel/rel-pwned", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "symlink-rel.tar", a, "rel");
    // A directory entry through the link, then a file in it.
    let a = RawTar::new()
        .symlink("esc2", &v.path())
        .dir("esc2/sub/")
        .file("esc2/sub/dir-pwned", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "symlink-dir.tar", a, "esc2");
    // A symlink to a host file, then a regular file of the same name: must replace the link,
    // never write through it.
    let a = RawTar::new()
        .symlink("over", &v.secret.to_string_lossy())
        .file("over", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "symlink-replace.tar", a, "over");
}

#[test]
fn hostile_hardlinks_are_refused() {
    let s = Store::new();
    let v = Victim::new(&s);
    for (file, target) in [
        ("hardlink-passwd.tar", "/etc/passwd".to_string()),
        ("hardlink-passwd-rel.tar", format!("{}etc/passwd", up())),
        ("hardlink-victim.tar", v.secret.to_string_lossy().into_owned()),
    ] {
        let a = RawTar::new().dir("etc/").hardlink("etc/hl-pwned", &target).finish();
        let refused = import_hostile(&s, &v, file, a, "hl-pwned");
        assert!(refused, "{file}: a hardlink to {target} outside the archive was accepted");
    }
    // Link, then write a file of the same name: must not truncate the target.
    let a = RawTar::new()
        .hardlink("hl2-pwned", &v.secret.to_string_lossy())
        .file("hl2-pwned", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "hardlink-then-write.tar", a, "hl2-pwned");
}

#[test]
fn hostile_duplicates_stay_inside() {
    let s = Store::new();
    let v = Victim::new(&s);
    let a = RawTar::new()
        .file("dup", b"one\n")
        .file("dup", b"two\n")
        .dir("dup/")
        .file("dup/x", b"x\n")
        .symlink("dup", &v.path())
        .file("dup/dup-pwned", b"pwned\n")
        .finish();
    import_hostile(&s, &v, "duplicates.tar", a, "dup");
}

#[test]
fn device_nodes_never_fail_an_import() {
    // Real root makes them; an unprivileged user cannot, and gets one summary warning.
    let s = Store::new();
    let a = RawTar::new()
        .dir("dev/")
        .chardev("dev/null", 1, 3)
        .chardev("dev/zero", 1, 5)
        .chardev("dev/whiteout-lookalike", 0, 0)
        .file("etc/after-devices", b"x\n")
        .finish();
    let p = s.path("devices.tar");
    fs::write(&p, a).unwrap();
    let out = s.plyroot(&["import", &src("tar", &p)]).ok();
    let warnings = out.stderr.lines().filter(|l| l.to_lowercase().contains("device")).count();
    assert!(warnings <= 1, "expected at most one summary warning about devices: {out}");
    if me().regime != Regime::Root {
        assert_eq!(warnings, 1, "the skipped device nodes went unmentioned: {out}");
    }
    // The same archive again: the same id (what could not be created is still part of the id).
    assert_eq!(s.import(&src("tar", &p)), out.lines());
}

#[test]
fn hardlinks_inside_the_archive_work() {
    // The legitimate case next to the hostile ones: a link to an earlier entry, also with `./`.
    let s = Store::new();
    let a = RawTar::new()
        .dir("./etc/")
        .file("./etc/original", b"content\n")
        .hardlink("./etc/link", "./etc/original")
        .hardlink("etc/link2", "etc/original")
        .finish();
    let p = s.path("good-links.tar");
    fs::write(&p, a).unwrap();
    let ids = s.import(&src("tar", &p));
    assert_eq!(ids.len(), 1);
}

#[test]
fn layer_rm_removes_none_when_one_is_refused() {
    let s = Store::new();
    let t = need!(trees(&s));
    let unused = s.import(&src("tar", &t.gz)).remove(0);
    let other = s.path("other");
    fs::create_dir_all(other.join("etc")).unwrap();
    fs::write(other.join("etc/other"), "another layer\n").unwrap();
    let used = s.import(&format!("dir:{}", other.display())).remove(0);
    assert_ne!(used, unused);
    s.create("user-of-layer", &[&format!("layer:{used}")]);
    let before = s.layer_ids();
    s.plyroot(&["layer", "rm", &unused, &used]).plyroot_error(&[&used, "user-of-layer"]);
    s.plyroot(&["layer", "rm", &unused, "sha256:0000000000"]).plyroot_error(&["sha256:0000000000"]);
    assert_eq!(s.layer_ids(), before, "a refused `layer rm` removed a layer");
    // The same layer twice (id and prefix) is one removal.
    s.plyroot(&["layer", "rm", &unused, &unused[..19]]).ok();
    assert_eq!(s.layer_ids().into_iter().collect::<Vec<_>>(), [used]);
}

#[test]
fn an_unchanged_tar_is_not_read_again() {
    // A second import (or `create --from`) of a file already imported takes its layers from the
    // store's index of local files: no reading, no hashing, and none of the first import's
    // warnings again. A changed file, or a record of a layer since removed, is read again.
    let s = Store::new();
    let a = RawTar::new().dir("dev/").chardev("dev/null", 1, 3).file("etc/hostname", b"cached\n").finish();
    let p = s.path("root.tar");
    fs::write(&p, a).unwrap();
    let tar = src("tar", &p);
    let not_read = "not read again";
    let device_warning = |out: &Out| out.stderr.lines().any(|l| l.contains("warning") && l.contains("device node"));
    let unprivileged = me().regime != Regime::Root;

    // A file changed within the last seconds is read, but its stamp not recorded: a write in the
    // same clock tick would not show in it.
    let out = s.plyroot(&["-v", "import", &tar]).ok();
    let ids = out.lines();
    assert!(!out.stderr.contains(not_read), "{out}");
    let out = s.plyroot(&["-v", "import", &tar]).ok();
    assert!(!out.stderr.contains(not_read), "a file changed just now was not read: {out}");
    assert_eq!(out.lines(), ids);

    // Once it has settled (3 s), one more import records it, and the next ones skip it.
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let first = s.plyroot(&["-v", "import", &tar]).ok();
    assert!(!first.stderr.contains(not_read), "{first}");
    assert_eq!(device_warning(&first), unprivileged, "{first}");
    let again = s.plyroot(&["-v", "import", &tar]).ok();
    assert_eq!(again.lines(), ids);
    assert!(again.stderr.contains(not_read), "the unchanged file was read again: {again}");
    assert!(!device_warning(&again), "the first import's warning came again: {again}");
    let created = s.plyroot(&["-v", "create", "e", "--from", &tar]).ok();
    assert!(created.stderr.contains(not_read) && !device_warning(&created), "{created}");
    s.plyroot(&["-v", "run", "e", "--", "true"]); // the layer is usable (where namespaces work)

    // A record naming a layer that was removed is ignored: the file is read and the layer back.
    s.plyroot(&["rm", "e"]).ok();
    s.plyroot(&["layer", "rm", &ids[0]]).ok();
    let back = s.plyroot(&["-v", "import", &tar]).ok();
    assert!(!back.stderr.contains(not_read), "a record of a removed layer was trusted: {back}");
    assert_eq!(back.lines(), ids);
    assert!(s.layer_ids().contains(&ids[0]), "the layer was not imported again");

    // Any change to the file (here a new mtime and ctime, same content and size) is read again.
    let f = fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    let changed = s.plyroot(&["-v", "import", &tar]).ok();
    assert!(!changed.stderr.contains(not_read), "a changed file was not read: {changed}");
    assert_eq!(device_warning(&changed), unprivileged, "{changed}");

    // Another file with the same content is read: the record is by file, not by name or content.
    let copy = s.path("copy.tar");
    fs::copy(&p, &copy).unwrap();
    let out = s.plyroot(&["-v", "import", &src("tar", &copy)]).ok();
    assert!(!out.stderr.contains(not_read), "{out}");
    assert_eq!(out.lines(), ids);
}
