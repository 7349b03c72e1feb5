//! The fixtures themselves, checked with independent tools and without plyroot, so that a failure
//! elsewhere can be blamed on plyroot rather than on a broken fixture.

#[macro_use]
mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn busybox_rootfs_is_runnable() {
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    assert!(root.join("bin/sh").exists() && root.join("bin/id").exists());
    need!(userns());
    // chroot with the host's own tools, in a user namespace: the fixture works on its own.
    let out = run_with(
        Command::new("unshare").args(["-Ur", "chroot"]).arg(&root).args(["/bin/sh", "-c", "hello; cat /etc/fixture; id -u"]),
        None,
        TIMEOUT,
    )
    .ok();
    assert_eq!(out.stdout, "hello from the fixture\nfrom-the-layer\n0\n");
}

#[test]
fn tarballs_hold_the_tree() {
    let s = Store::new();
    let root = s.path("rootfs");
    need!(busybox_rootfs(&root));
    for (name, c, flag) in [
        ("t.tar", Compression::None, ""),
        ("t.tar.gz", Compression::Gzip, "-z"),
        ("t.tar.xz", Compression::Xz, "-J"),
        ("t.tar.zst", Compression::Zstd, "--zstd"),
    ] {
        let f = s.path(name);
        need!(make_tar(&root, &f, c));
        let out = sh(&format!("tar {flag} -tvf {} | grep -e usr/lib/link- -e setuid-file", f.display())).ok();
        assert!(out.stdout.contains("link to ./usr/lib/link-"), "{out}");
        assert!(out.stdout.contains("-rwsr-xr-x"), "{out}");
    }
}

#[test]
fn oci_image_has_whiteout_and_opaque_layers() {
    let s = Store::new();
    let layout = need!(oci_image(&s.path("work")));
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blob(digest)).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{manifest}");
    let list = |i: usize| {
        let d = layers[i]["digest"].as_str().unwrap();
        let z = if layers[i]["mediaType"].as_str().unwrap().ends_with("gzip") { "-z" } else { "" };
        sh(&format!("tar {z} -tf {}", blob(d).display())).ok().stdout
    };
    assert!(list(0).contains("bin/busybox"));
    assert!(list(1).contains("etc/.wh.deleteme"), "{}", list(1));
    assert!(list(2).contains("opq/.wh..wh..opq"), "{}", list(2));

    let archive = s.path("d.tar");
    need!(docker_archive(&layout, &archive));
    let out = sh(&format!("tar -tf {}", archive.display())).ok();
    assert!(out.stdout.contains("manifest.json"), "{out}");
}

#[test]
fn raw_tar_is_read_by_gnu_tar() {
    let s = Store::new();
    let long = format!("{}x", "d/".repeat(60));
    let a = RawTar::new()
        .dir("d/")
        .file("d/f", b"hello")
        .symlink("d/s", "/abs/target")
        .hardlink("d/h", "d/f")
        .file(&long, b"long")
        .file("/abs/name", b"abs")
        .finish();
    let f = s.path("raw.tar");
    fs::write(&f, a).unwrap();
    let out = sh(&format!("tar -tvf {}", f.display())).ok();
    for want in ["d/f", "d/s -> /abs/target", "d/h link to d/f", &long[..], "/abs/name"] {
        assert!(out.stdout.contains(want), "{want} missing: {out}");
    }
}
