//! `plyroot export ENV -o FILE` and `--oci DIR`: the merged root as a reproducible rootfs tarball
//! and the layers as an OCI image layout, checked with independent readers (the `tar` crate,
//! the `zstd`/`gzip` CLIs, skopeo, umoci) and round-tripped through `plyroot import`.
//!
//! The fixture environment `t` stacks three layers and an upper:
//!  1. the busybox root (a `dir:` source): /etc/fixture, /usr/bin/hello, /usr/lib/link-{a,b}, …
//!  2. a tarball that deletes /etc/fixture (`.wh.`), adds /srv/old{1,2}, two device nodes and a
//!     file owned by 1234:1234 (recorded in the layer's metadata when unprivileged)
//!  3. a tarball that deletes the device /dev/gone
//!  + the upper, from a run: /etc/os-release changed, /usr/bin/hello removed, /srv replaced by a
//!    new directory (overlayfs makes it opaque), and a new hardlink /usr/lib/link-c to link-a.
//!
//! Runs as root and as unprivileged users with and without subordinate ids (tests/run.sh).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use sha2::{Digest, Sha256};

const UPPER_CHANGES: &str = "set -e; echo changed > /etc/os-release; rm /usr/bin/hello; rm -rf /srv; mkdir /srv; \
     echo new > /srv/new; ln /usr/lib/link-a /usr/lib/link-c";

/// One tar entry as read back.
#[derive(Debug, Clone)]
struct Ent {
    kind: u8,
    mode: u32,
    owner: (u64, u64),
    mtime: u64,
    data: Vec<u8>,
    link: Option<String>,
    dev: Option<(u32, u32)>,
    names_empty: bool,
}

/// Every entry of an uncompressed tar, by path (directories without their trailing slash).
fn entries(tar: &[u8]) -> BTreeMap<String, Ent> {
    let mut out = BTreeMap::new();
    for e in tar::Archive::new(tar).entries().expect("a tar") {
        let mut e = e.expect("a tar entry");
        let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
        let kind = h.entry_type().as_byte();
        let dev = matches!(kind, b'3' | b'4').then(|| (h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap()));
        let names_empty = h.username().unwrap_or(None).unwrap_or("").is_empty() && h.groupname().unwrap_or(None).unwrap_or("").is_empty();
        let ent = Ent { kind, mode: h.mode().unwrap(), owner: (h.uid().unwrap(), h.gid().unwrap()), mtime: h.mtime().unwrap(), data, link, dev, names_empty };
        assert!(out.insert(path.clone(), ent).is_none(), "{path} appears twice");
    }
    out
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One entry of a test layer: path, kind, mode, owner (uid = gid), data, device numbers.
type Item<'a> = (&'a str, tar::EntryType, u32, u64, &'a [u8], Option<(u32, u32)>);

/// A ustar layer written with the `tar` crate.
fn layer_tar(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, owner, data, dev) in items {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_path(path).unwrap();
        h.set_mode(*mode);
        h.set_uid(*owner);
        h.set_gid(*owner);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME as u64);
        if let Some((major, minor)) = dev {
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The fixture (see the header): a store with environment `t`, its three layer ids, bottom first.
fn fixture() -> Result<(Store, Vec<String>), String> {
    userns()?;
    let s = Store::new();
    let root = s.path("rootfs");
    busybox_rootfs(&root)?;
    use tar::EntryType::{Char, Directory as Dir, Regular as Reg};
    let l2 = layer_tar(&[
        ("dev/", Dir, 0o755, 0, b"", None),
        ("dev/gone", Char, 0o666, 0, b"", Some((1, 7))),
        ("dev/zero2", Char, 0o666, 0, b"", Some((1, 5))),
        ("etc/", Dir, 0o755, 0, b"", None),
        ("etc/.wh.fixture", Reg, 0o644, 0, b"", None),
        ("opt/", Dir, 0o755, 0, b"", None),
        ("opt/owned", Reg, 0o640, 1234, b"owned by 1234\n", None),
        ("srv/", Dir, 0o755, 0, b"", None),
        ("srv/old1", Reg, 0o644, 0, b"old\n", None),
        ("srv/old2", Reg, 0o644, 0, b"old\n", None),
    ]);
    let l3 = layer_tar(&[("dev/", Dir, 0o755, 0, b"", None), ("dev/.wh.gone", Reg, 0o644, 0, b"", None)]);
    fs::write(s.path("l2.tar"), l2).unwrap();
    fs::write(s.path("l3.tar"), l3).unwrap();
    let mut ids = s.import(&format!("dir:{}", root.display()));
    ids.extend(s.import(&format!("tar:{}", s.path("l2.tar").display())));
    ids.extend(s.import(&format!("tar:{}", s.path("l3.tar").display())));
    assert_eq!(ids.len(), 3);
    let manifest = s.path("plyroot.toml");
    let from: Vec<String> = ids.iter().map(|i| format!("\"layer:{i}\"")).collect();
    fs::write(&manifest, format!("[env.t]\nfrom = [{}]\nenv = {{ GREETING = \"hello there\" }}\n", from.join(", "))).unwrap();
    s.plyroot(&["apply", "-f", &manifest.to_string_lossy()]).ok();
    s.sh("t", UPPER_CHANGES).ok();
    Ok((s, ids))
}

fn export_bytes(s: &Store, args: &[&str], env: &[(&str, &str)]) -> (Out, Vec<u8>) {
    let file = args.iter().position(|a| *a == "-o").map(|i| s.path(args[i + 1]));
    let mut cmd = s.cmd(args);
    cmd.env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with(&mut cmd, None, TIMEOUT).ok();
    let data = file.map(|f| fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))).unwrap_or_default();
    (out, data)
}

fn decompress(tool_name: &str, path: &Path) -> Vec<u8> {
    let t = need_tool(tool_name);
    let out = Command::new(t).arg("-dc").arg(path).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "{tool_name} -dc {} failed", path.display());
    out.stdout
}

fn need_tool(name: &str) -> std::path::PathBuf {
    tool(name).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// The rootfs tarball
// ---------------------------------------------------------------------------------------------

#[test]
fn tarball_is_the_merged_root() {
    let (s, _) = need!(fixture());
    let (out, tar) = export_bytes(&s, &["export", "t", "-o", "root.tar"], &[]);
    let e = entries(&tar);
    assert!(e.keys().all(|k| !k.contains(".wh.")), "no whiteout entries in a flat root: {:?}", e.keys().filter(|k| k.contains(".wh.")).collect::<Vec<_>>());
    for gone in ["etc/fixture", "usr/bin/hello", "dev/gone", "srv/old1", "srv/old2"] {
        assert!(!e.contains_key(gone), "{gone} was deleted, but is in the export");
    }
    assert_eq!(e["etc/os-release"].data, b"changed\n", "the upper's version wins");
    assert_eq!(e["srv/new"].data, b"new\n");
    assert_eq!(e["srv"].kind, b'5');
    assert!(e["etc/passwd"].data.starts_with(b"root:x:0:0:"), "a lower file shows through");
    assert_eq!(e["bin/busybox"].kind, b'0');
    assert_eq!(e["bin/sh"].link.as_deref(), Some("busybox"));
    assert_eq!(e["usr/bin/setuid-file"].mode, 0o4755);
    assert_eq!(e["tmp"].mode, 0o1777);
    assert_eq!((e["dev/zero2"].kind, e["dev/zero2"].dev), (b'3', Some((1, 5))), "a device node of a lower layer");
    assert_eq!((e["opt/owned"].owner, e["opt/owned"].mode), ((1234, 1234), 0o640), "the layer's recorded owner");
    assert_eq!(e["etc/passwd"].owner, (0, 0));
    // link-a was copied up and linked again in the upper; link-b stayed in the layer.
    assert_eq!(e["usr/lib/link-c"].kind, b'1');
    assert_eq!(e["usr/lib/link-c"].link.as_deref(), Some("usr/lib/link-a"));
    assert_eq!(e["usr/lib/link-b"].kind, b'0', "the copy-up broke the lower link");
    assert_eq!(e["usr/lib/link-b"].data, b"two names, one inode\n");
    assert!(e.values().all(|x| x.names_empty), "numeric owners only");
    // The tarball is the canonical tar of the tree it holds: stdout, its sha256 and import agree.
    let id = sha256(&tar);
    assert_eq!(out.line(), id, "export prints the id of what it wrote");
    assert_eq!(s.import(&format!("tar:{}", s.path("root.tar").display())), std::slice::from_ref(&id));
    // …and so does a run of the imported root.
    s.create("back", &[&format!("layer:{id}")]);
    let o = s.sh("back", "cat /etc/os-release /srv/new; test ! -e /etc/fixture && test ! -e /usr/bin/hello && echo gone").ok();
    assert_eq!(o.stdout, "changed\nnew\ngone\n");
}

#[test]
fn one_layer_and_no_upper_exports_as_that_layer() {
    need!(userns());
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    let id = s.import(&format!("dir:{}", root.display())).remove(0);
    s.create("one", &[&format!("layer:{id}")]);
    let (out, tar) = export_bytes(&s, &["export", "one", "-o", "one.tar"], &[]);
    assert_eq!(sha256(&tar), id);
    assert_eq!(out.line(), id);
}

#[test]
fn exports_are_reproducible_in_every_compression() {
    let (s, _) = need!(fixture());
    let (_, plain) = export_bytes(&s, &["export", "t", "-o", "a.tar"], &[]);
    let (_, again) = export_bytes(&s, &["export", "t", "-o", "b.tar"], &[]);
    assert!(plain == again, "two exports of the same content differ");
    for (ext, tool_name, magic) in [("tar.zst", "zstd", &[0x28, 0xb5, 0x2f, 0xfd][..]), ("tar.gz", "gzip", &[0x1f, 0x8b][..]), ("tar.xz", "xz", &b"\xfd7zXZ"[..])] {
        let (a_name, b_name) = (format!("a.{ext}"), format!("b.{ext}"));
        let (_, a) = export_bytes(&s, &["export", "t", "-o", &a_name], &[]);
        let (_, b) = export_bytes(&s, &["export", "t", "-o", &b_name], &[]);
        assert!(a == b, "two .{ext} exports differ");
        assert!(a.starts_with(magic) && a.len() < plain.len() * 4 / 5, ".{ext} is not compressed as its name says ({} vs {} bytes)", a.len(), plain.len());
        if which(tool_name).is_some() {
            assert!(decompress(tool_name, &s.path(&a_name)) == plain, "{tool_name} -dc of the .{ext} export is not the plain export");
        }
        // import decompresses by content and gets the id of the plain tar.
        assert_eq!(s.import(&format!("tar:{}", s.path(&a_name).display())), [sha256(&plain)]);
    }
    // `export --help` names every format written above, so a user can find them.
    let help = s.plyroot(&["export", "--help"]).ok().stdout.replace('\n', " ");
    for ext in [".tar,", ".tar.gz", ".tar.xz", ".tar.zst"] {
        assert!(help.contains(ext), "`export --help` does not list {ext}: {help}");
    }
    let gz = fs::read(s.path("a.tar.gz")).unwrap();
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip header mtime is zero");
    assert_eq!(gz[3] & 0x08, 0, "no file name in the gzip header");
    // `-o -`: the same bytes on stdout.
    let o = s.cmd(&["export", "t", "-o", "-"]).env_remove("SOURCE_DATE_EPOCH").stdin(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert!(o.status.success(), "export -o - failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == plain, "export -o - differs from export -o FILE");
}

#[test]
fn source_date_epoch_clamps_mtimes() {
    let (s, _) = need!(fixture());
    let (_, plain) = export_bytes(&s, &["export", "t", "-o", "plain.tar"], &[]);
    let sde = 1_600_000_000u64;
    assert!((MTIME as u64) > sde);
    let (out, clamped) = export_bytes(&s, &["export", "t", "-o", "clamped.tar"], &[("SOURCE_DATE_EPOCH", &sde.to_string())]);
    let (_, again) = export_bytes(&s, &["export", "t", "-o", "again.tar"], &[("SOURCE_DATE_EPOCH", &sde.to_string())]);
    assert!(clamped == again, "clamped exports differ");
    let (p, c) = (entries(&plain), entries(&clamped));
    assert_eq!(p.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>(), "clamping changes times only");
    for (path, e) in &c {
        assert_eq!(e.mtime, p[path].mtime.min(sde), "{path}: newer than SOURCE_DATE_EPOCH gets it, older keeps its own");
        assert_eq!(e.data, p[path].data);
    }
    assert_eq!(c["etc/passwd"].mtime, sde);
    assert_eq!(c["srv/new"].mtime, sde, "an upper file written now");
    assert_eq!(sha256(&clamped), out.line());
    assert_eq!(s.import(&format!("tar:{}", s.path("clamped.tar").display())), [sha256(&clamped)]);
    // An epoch later than everything changes nothing.
    let (_, late) = export_bytes(&s, &["export", "t", "-o", "late.tar"], &[("SOURCE_DATE_EPOCH", "4000000000")]);
    assert!(late == plain, "SOURCE_DATE_EPOCH later than every mtime must not change the bytes");
    let mut cmd = s.cmd(&["export", "t", "-o", "bad.tar"]);
    cmd.env("SOURCE_DATE_EPOCH", "yesterday");
    run_with(&mut cmd, None, TIMEOUT).plyroot_error(&["SOURCE_DATE_EPOCH"]);
    assert!(!s.path("bad.tar").exists());
}

#[test]
fn upper_files_of_other_ids_are_exported() {
    // What apt does as _apt: files and a directory only another id can read. With subordinate
    // ids (or as root) they belong to id 42 inside, a host id the user cannot read as themselves;
    // with a single id, a mode-000 file of the user's own.
    need!(userns());
    let s = Store::new();
    need!(s.busybox_env("t"));
    let other = me().regime != Regime::NoSubIds;
    let script = if other {
        "set -e; mkdir /var/secret; echo s > /var/secret/f; chown -R 42:42 /var/secret; chmod 700 /var/secret; chmod 600 /var/secret/f"
    } else {
        "set -e; mkdir /var/secret; echo s > /var/secret/f; chmod 000 /var/secret/f"
    };
    s.run("t", &["--root"], &["sh", "-c", script]).ok();
    let (out, tar) = export_bytes(&s, &["export", "t", "-o", "root.tar"], &[]);
    let e = entries(&tar);
    let f = &e["var/secret/f"];
    assert_eq!(f.data, b"s\n");
    if other {
        assert_eq!((f.owner, f.mode, e["var/secret"].owner), ((42, 42), 0o600, (42, 42)));
    } else {
        assert_eq!((f.owner, f.mode), ((0, 0), 0));
    }
    assert_eq!(s.import(&format!("tar:{}", s.path("root.tar").display())), [out.line()]);
    // The OCI export reads the same upper as its own layer.
    let img = s.path("img");
    s.plyroot(&["export", "t", "--oci", &img.to_string_lossy()]).ok();
    let back = s.import(&format!("oci:{}", img.display()));
    assert_eq!(back.len(), 2);
    assert_eq!(back[1], s.plyroot(&["commit", "t"]).ok().line());
}

// ---------------------------------------------------------------------------------------------
// The OCI image layout
// ---------------------------------------------------------------------------------------------

/// All files under `dir`, relative path → bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(dir)
        .into_iter()
        .filter(|p| dir.join(p).is_file())
        .map(|p| {
            let data = fs::read(dir.join(&p)).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn oci_layout_reads_back_in_skopeo_umoci_and_import() {
    let (s, ids) = need!(fixture());
    let skopeo = need!(tool("skopeo"));
    let umoci = need!(tool("umoci"));
    let img = s.path("img");
    let out = s.plyroot(&["export", "t", "--oci", &img.to_string_lossy()]).ok();
    let manifest_digest = out.line();
    for f in ["oci-layout", "index.json"] {
        assert!(img.join(f).is_file(), "{f} missing");
    }
    // Reproducible: a second export is the same files, byte for byte.
    let img2 = s.path("img2");
    s.plyroot(&["export", "t", "--oci", &img2.to_string_lossy()]).ok();
    assert!(files(&img) == files(&img2), "two OCI exports differ");

    // skopeo reads it: the manifest digest, one layer per plyroot layer plus the upper.
    let reference = format!("oci:{}:latest", img.display());
    let o = run_with(Command::new(&skopeo).args(["inspect", &reference]), None, TIMEOUT).ok();
    let inspect = o.json();
    assert_eq!(inspect["Digest"].as_str(), Some(manifest_digest.as_str()), "{o}");
    let layers: Vec<String> = inspect["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect();
    assert_eq!(layers.len(), 4, "three layers and the upper: {o}");
    assert_eq!(layers[..3], ids[..], "uncompressed blobs: a layer's digest is its plyroot id");
    let o = run_with(Command::new(&skopeo).args(["inspect", "--config", &reference]), None, TIMEOUT).ok();
    let config = o.json();
    let env: Vec<&str> = config["config"]["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.iter().any(|v| v.starts_with("PATH=/")), "{o}");
    assert!(env.contains(&"GREETING=hello there"), "the environment's variables: {o}");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(diff_ids, layers.iter().map(String::as_str).collect::<Vec<_>>());

    // umoci unpacks it into the merged root.
    let bundle = s.path("bundle");
    let o = run_with(Command::new(&umoci).args(["unpack", "--rootless", "--image", &format!("{}:latest", img.display())]).arg(&bundle), None, TIMEOUT);
    assert_eq!(o.code, 0, "umoci unpack failed: {o}");
    let r = bundle.join("rootfs");
    assert_eq!(fs::read_to_string(r.join("etc/os-release")).unwrap(), "changed\n");
    assert_eq!(fs::read_to_string(r.join("srv/new")).unwrap(), "new\n");
    assert!(r.join("etc/passwd").is_file() && r.join("bin/busybox").is_file());
    for gone in ["etc/fixture", "usr/bin/hello", "srv/old1", "dev/gone"] {
        assert!(fs::symlink_metadata(r.join(gone)).is_err(), "{gone} should be deleted in umoci's bundle");
    }
    assert_eq!(fs::read_to_string(r.join("opt/owned")).unwrap(), "owned by 1234\n");

    // plyroot import gives back the layer ids, and the upper's id is what commit makes of it.
    let back = s.import(&format!("oci:{}", img.display()));
    assert_eq!(back.len(), 4);
    assert_eq!(back[..3], ids[..]);
    assert_eq!(back[3], layers[3]);
    let committed = s.plyroot(&["commit", "t"]).ok().line();
    assert_eq!(committed, back[3], "the upper's OCI layer is the layer commit makes");
    // After the commit the upper is empty: four layers, no extra one.
    let img3 = s.path("img3");
    s.plyroot(&["export", "t", "--oci", &img3.to_string_lossy()]).ok();
    let o = run_with(Command::new(&skopeo).args(["inspect", &format!("oci:{}:latest", img3.display())]), None, TIMEOUT).ok();
    assert_eq!(o.json()["Layers"].as_array().unwrap().len(), 4, "{o}");
}

#[test]
fn oci_created_follows_source_date_epoch() {
    let (s, _) = need!(fixture());
    let img = s.path("img");
    let mut cmd = s.cmd(&["export", "t", "--oci", &img.to_string_lossy()]);
    cmd.env("SOURCE_DATE_EPOCH", "1700000000");
    run_with(&mut cmd, None, TIMEOUT).ok();
    let index: serde_json::Value = serde_json::from_slice(&fs::read(img.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "latest");
    let blob = |d: &serde_json::Value| fs::read(img.join("blobs/sha256").join(d.as_str().unwrap().trim_start_matches("sha256:"))).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    // Every blob is named by its content.
    for (name, data) in files(&img.join("blobs/sha256")) {
        assert_eq!(sha256(&data), format!("sha256:{name}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn errors_name_the_problem_and_leave_nothing_behind() {
    need!(userns());
    let s = Store::new();
    need!(s.busybox_env("t"));
    let listing = || fs::read_dir(s.tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect::<std::collections::BTreeSet<_>>();

    s.plyroot(&["export", "nosuch", "-o", "x.tar"]).plyroot_error(&["nosuch"]);
    assert!(!s.path("x.tar").exists());
    let missing = s.path("no/such/dir/x.tar");
    s.plyroot(&["export", "t", "-o", &missing.to_string_lossy()]).plyroot_error(&[&missing.to_string_lossy()]);
    s.plyroot(&["export", "t", "-o", "/proc/plyroot-export.tar"]).plyroot_error(&["/proc/plyroot-export.tar"]);
    s.plyroot(&["export", "t", "-o", "x.tar.bz2"]).plyroot_error(&["x.tar.bz2"]);
    s.plyroot(&["export", "t"]).plyroot_error(&["-o FILE"]);

    // A non-empty directory is not overwritten by an image layout.
    let full = s.path("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("mine"), "keep").unwrap();
    s.plyroot(&["export", "t", "--oci", &full.to_string_lossy()]).plyroot_error(&[&full.to_string_lossy(), "not empty"]);
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);

    // A good export first, then one that fails: the old file stays as it was, no temp file stays.
    let (_, good) = export_bytes(&s, &["export", "t", "-o", "root.tar"], &[]);
    let before = listing();
    let id = sha256(&good);
    let layer_root = s.home.join("layers").join(id.trim_start_matches("sha256:")).join("root");
    assert!(layer_root.is_dir(), "the one layer of t is the export: {}", layer_root.display());
    // A layer changed behind plyroot's back: its OCI blob would not match its id. The export
    // fails after writing blobs, and leaves no directory.
    as_owner(&["sh", "-c", &format!("echo tampered > {}", layer_root.join("etc/fixture").display())]).ok();
    let img = s.path("img");
    s.plyroot(&["export", "t", "--oci", &img.to_string_lossy()]).plyroot_error(&[&id, "plyroot verify"]);
    assert!(!img.exists(), "a failed OCI export leaves no directory");
    // A layer that vanished: the tarball export fails, the earlier export is untouched.
    as_owner(&["mv", layer_root.to_str().unwrap(), s.home.join("gone-root").to_str().unwrap()]).ok();
    s.plyroot(&["export", "t", "-o", "root.tar"]).plyroot_error(&[&id]);
    assert!(fs::read(s.path("root.tar")).unwrap() == good, "a failed export changed the existing file");
    assert_eq!(listing(), before, "a failed export leaves no temporary file");
}

// ---------------------------------------------------------------------------------------------
// Where `-o` writes: through devices and FIFOs, never replacing them; links refused
// ---------------------------------------------------------------------------------------------

/// A store with the busybox environment `t`, its export as a file, and the id that export printed.
fn simple() -> Result<(Store, Vec<u8>, String), String> {
    userns()?;
    let s = Store::new();
    s.busybox_env("t")?;
    let out = s.plyroot(&["export", "t", "-o", "ref.tar"]).ok();
    let data = fs::read(s.path("ref.tar")).unwrap();
    assert_eq!(out.line(), sha256(&data), "the id printed is the digest of the tarball");
    Ok((s, data, out.line()))
}

fn listing(dir: &Path) -> std::collections::BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// (kind, rdev) of a path, not following a link: what must not change.
fn node(p: &Path) -> (String, u64) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let t = m.file_type();
    let kind = if t.is_char_device() { "char" } else if t.is_fifo() { "fifo" } else if t.is_symlink() { "link" } else if t.is_file() { "file" } else { "other" };
    (kind.to_string(), m.rdev())
}

const NULL_DEV: u64 = (1 << 8) | 3;

#[test]
fn export_to_a_char_device_writes_through_it() {
    let (s, _, id) = need!(simple());
    if me().regime == Regime::Root {
        // A null device of our own: as root, replacing it would have been possible.
        let dev = s.path("null");
        sh(&format!("mknod {} c 1 3", shell_quote(&dev.to_string_lossy()))).ok();
        let before = listing(s.tmp.path());
        let out = s.plyroot(&["export", "t", "-o", &dev.to_string_lossy()]).ok();
        assert_eq!(out.line(), id, "the whole tarball went through the device: {out}");
        assert_eq!(node(&dev), ("char".to_string(), NULL_DEV), "the device was replaced");
        assert_eq!(listing(s.tmp.path()), before, "an export through a device leaves no file beside it");
        // The real /dev/null, with /dev read-only in a private mount namespace: writing through
        // the device works there, creating or renaming anything in /dev cannot (and so cannot
        // harm this machine if this ever regresses).
        let script = format!(
            "mount --make-rprivate / && mount --bind /dev /dev && mount -o remount,bind,ro /dev && exec {} export t -o /dev/null",
            shell_quote(&bin().to_string_lossy())
        );
        let unshare = need!(tool("unshare"));
        let mut c = Command::new(unshare);
        c.args(["-m", "sh", "-c", &script]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
        let out = run_with(&mut c, None, TIMEOUT).ok();
        assert_eq!(out.line(), id, "{out}");
    } else {
        // Unprivileged, /dev is not writable: the export must not need to create anything there.
        let out = s.plyroot(&["export", "t", "-o", "/dev/null"]).ok();
        assert_eq!(out.line(), id, "{out}");
    }
    assert_eq!(node(Path::new("/dev/null")), ("char".to_string(), NULL_DEV));
}

#[test]
fn export_to_a_fifo_or_a_link_to_one_feeds_its_reader() {
    let (s, reference, id) = need!(simple());
    let fifo = s.path("fifo");
    sh(&format!("mkfifo {}", shell_quote(&fifo.to_string_lossy()))).ok();
    std::os::unix::fs::symlink("fifo", s.path("to-fifo")).unwrap();
    for target in ["fifo", "to-fifo"] {
        let before = listing(s.tmp.path());
        // The reader opens the FIFO in a thread: it blocks until plyroot opens the other end.
        let path = fifo.clone();
        let reader = std::thread::spawn(move || fs::read(path).unwrap());
        let out = s.plyroot(&["export", "t", "-o", target]);
        assert_eq!(node(&fifo).0, "fifo", "-o {target}: the FIFO was replaced: {out}");
        assert_eq!(node(&s.path("to-fifo")).0, "link", "-o {target}: the link was replaced: {out}");
        let out = out.ok();
        assert_eq!(out.line(), id);
        let got = reader.join().unwrap();
        assert!(got == reference, "-o {target}: the reader got {} bytes, not the {} of the file export", got.len(), reference.len());
        assert_eq!(listing(s.tmp.path()), before, "-o {target} left a file beside the FIFO");
    }
    // Stdout by name (`-o /dev/stdout` resolves to this): the tarball alone, no id after it.
    let out = s.cmd(&["export", "t", "-o", "/proc/self/fd/1"]).stdin(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == reference, "-o /proc/self/fd/1 wrote {} bytes, not the {} of the file export", out.stdout.len(), reference.len());
    // Stdout redirected to a file and named by a link (`-o /dev/stdout > FILE`): written through
    // stdout, the file the shell opened is not replaced.
    let redirected = s.path("redirected.tar");
    let file = fs::File::create(&redirected).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap());
    let out = s.cmd(&["export", "t", "-o", "/proc/self/fd/1"]).stdin(Stdio::null()).stdout(file).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&fs::metadata(&redirected).unwrap()), inode, "the redirected file was replaced");
    assert!(fs::read(&redirected).unwrap() == reference, "the redirected file is not the tarball");
}

#[test]
fn export_refuses_a_link_and_leaves_it_and_its_target_as_they_were() {
    let (s, _, _) = need!(simple());
    fs::write(s.path("mine.tar"), "mine").unwrap();
    fs::create_dir(s.path("emptydir")).unwrap();
    std::os::unix::fs::symlink("mine.tar", s.path("to-file")).unwrap();
    std::os::unix::fs::symlink("nowhere.tar", s.path("dangling")).unwrap();
    std::os::unix::fs::symlink("emptydir", s.path("to-dir")).unwrap();
    let before = listing(s.tmp.path());
    for link in ["to-file", "dangling", "to-dir"] {
        s.plyroot(&["export", "t", "-o", link]).plyroot_error(&[link, "symbolic link"]);
        s.plyroot(&["export", "t", "--oci", link]).plyroot_error(&[link, "symbolic link"]);
    }
    assert_eq!(listing(s.tmp.path()), before, "a refused export left something behind");
    assert_eq!(fs::read_link(s.path("to-file")).unwrap(), Path::new("mine.tar"));
    assert_eq!(fs::read_link(s.path("dangling")).unwrap(), Path::new("nowhere.tar"));
    assert_eq!(fs::read_link(s.path("to-dir")).unwrap(), Path::new("emptydir"));
    assert_eq!(fs::read_to_string(s.path("mine.tar")).unwrap(), "mine");
    assert!(fs::read_dir(s.path("emptydir")).unwrap().next().is_none(), "the link's target directory was written");
    // An image layout never replaces a file or a device either.
    s.plyroot(&["export", "t", "--oci", "mine.tar"]).plyroot_error(&["mine.tar", "not a directory"]);
    s.plyroot(&["export", "t", "--oci", "/dev/null"]).plyroot_error(&["/dev/null", "not a directory"]);
    assert_eq!(fs::read_to_string(s.path("mine.tar")).unwrap(), "mine");
    assert_eq!(node(Path::new("/dev/null")), ("char".to_string(), NULL_DEV));
    assert_eq!(listing(s.tmp.path()), before);
}

#[test]
fn an_export_failing_mid_write_leaves_no_temporary_file() {
    let (s, reference, _) = need!(simple());
    fs::write(s.path("old.tar"), "old").unwrap();
    let before = listing(s.tmp.path());
    // A file size limit far below the tarball's size: the write fails half way (EFBIG, with
    // SIGXFSZ ignored so that it is an error, not a kill).
    for target in ["new.tar", "old.tar"] {
        let script = format!("trap '' XFSZ; ulimit -f 64; exec {} export t -o {target}", shell_quote(&bin().to_string_lossy()));
        let mut c = Command::new("sh");
        c.args(["-c", &script]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
        run_with(&mut c, None, TIMEOUT).plyroot_error(&[target, "nothing was written"]);
        assert_eq!(listing(s.tmp.path()), before, "-o {target}: a failed export left a file behind");
        assert_eq!(fs::read_to_string(s.path("old.tar")).unwrap(), "old");
    }
    assert!(reference.len() > 64 * 1024, "the limit must cut the tarball");
}

#[test]
fn a_failed_write_names_the_file_and_its_cause_once() {
    // The merged root is written in a helper process where the user is root inside; its error
    // crosses a pipe as text, which used to repeat the OS's words (`…: No space left on device
    // (os error 28): No space left on device (os error 28)`).
    let (s, _) = need!(fixture());
    let out = s.plyroot(&["export", "t", "-o", "/dev/full"]).plyroot_error(&["/dev/full", "No space left on device"]);
    assert_eq!(out.stderr.matches("No space left on device").count(), 1, "{out}");
}
