//! A layer id names exactly its content (issue 10, items 1-5 and the canonical side of 6, 8 and
//! 12): every xattr, names as bytes, the root opaque marker, mtimes whatever the store's
//! filesystem holds, sparse files, directories nobody may enter, trees deeper than a path can
//! name; and a property test over random archives. Every test runs the real binary.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

// ---------------------------------------------------------------------------------------------
// Archives written byte by byte: names and link targets as bytes, PAX records as needed
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Ent {
    name: Vec<u8>,
    /// b'0' file, b'1' hardlink, b'2' symlink, b'3'/b'4' devices, b'5' dir, b'6' fifo.
    kind: u8,
    mode: u32,
    owner: (u32, u32),
    mtime: i64,
    /// Nanoseconds, written as a PAX `mtime` with a fraction.
    nsec: u32,
    link: Vec<u8>,
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    dev: (u32, u32),
}

impl Ent {
    fn new(name: &[u8], kind: u8) -> Ent {
        Ent { name: name.to_vec(), kind, mode: if kind == b'5' { 0o755 } else { 0o644 }, owner: (0, 0), mtime: MTIME, nsec: 0, link: Vec::new(), data: Vec::new(), xattrs: Vec::new(), dev: (0, 0) }
    }
    fn file(name: &[u8], data: &[u8]) -> Ent {
        Ent { data: data.to_vec(), ..Ent::new(name, b'0') }
    }
    fn dir(name: &[u8]) -> Ent {
        Ent::new(name, b'5')
    }
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
}

#[allow(clippy::too_many_arguments)]
fn header(name: &[u8], kind: u8, mode: u32, owner: (u32, u32), size: u64, mtime: u64, link: &[u8], dev: (u32, u32)) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    put(&mut h, 0, &name[..name.len().min(100)]);
    put(&mut h, 100, format!("{mode:07o}\0").as_bytes());
    put(&mut h, 108, format!("{:07o}\0", owner.0.min(0o7777777)).as_bytes());
    put(&mut h, 116, format!("{:07o}\0", owner.1.min(0o7777777)).as_bytes());
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{:011o}\0", mtime.min(0o77777777777)).as_bytes());
    h[156] = kind;
    put(&mut h, 157, &link[..link.len().min(100)]);
    put(&mut h, 257, b"ustar\x0000");
    put(&mut h, 329, format!("{:07o}\0", dev.0).as_bytes());
    put(&mut h, 337, format!("{:07o}\0", dev.1).as_bytes());
    put(&mut h, 148, b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A PAX tar of `ents`, in order.
fn tar(ents: &[Ent]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in ents {
        let mut pax = Vec::new();
        if e.name.len() > 100 || std::str::from_utf8(&e.name).is_err() {
            pax.extend(pax_record(b"path", &e.name));
        }
        if e.link.len() > 100 || std::str::from_utf8(&e.link).is_err() {
            pax.extend(pax_record(b"linkpath", &e.link));
        }
        if e.mtime < 0 || e.nsec != 0 || e.mtime > 0o77777777777 {
            // A fraction after a negative number counts towards zero; keep the test's times exact.
            let v = if e.nsec == 0 { e.mtime.to_string() } else { format!("{}.{:09}", e.mtime, e.nsec) };
            pax.extend(pax_record(b"mtime", v.as_bytes()));
        }
        for (id, key) in [(e.owner.0, &b"uid"[..]), (e.owner.1, b"gid")] {
            if id > 0o7777777 {
                pax.extend(pax_record(key, id.to_string().as_bytes()));
            }
        }
        for (k, v) in &e.xattrs {
            pax.extend(pax_record(&[b"SCHILY.xattr.", k.as_slice()].concat(), v));
        }
        if !pax.is_empty() {
            out.extend(header(b"PaxHeader", b'x', 0o644, (0, 0), pax.len() as u64, 0, b"", (0, 0)));
            out.extend(&pax);
            pad(&mut out);
        }
        out.extend(header(&e.name, e.kind, e.mode, e.owner, e.data.len() as u64, e.mtime.max(0) as u64, &e.link, e.dev));
        out.extend(&e.data);
        pad(&mut out);
    }
    out.extend([0u8; 1024]);
    out
}

/// Expands every PAX sparse 1.0 member of a tar into a plain member of the bytes it stands for:
/// what any reader that knows the format sees. (The tar importer learns the format in issue 10's
/// conformance work; until then this stands in for it, and shows that a dense copy of a sparse
/// file is the same content.)
fn desparse(tar: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    // The raw PAX header before the current member, and its records.
    type Pax = (Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>);
    let mut pending_pax: Option<Pax> = None;
    let size_of = |h: &[u8]| u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap().trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap();
    while i + 512 <= tar.len() {
        let h = &tar[i..i + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let mut size = size_of(h);
        let body_start = i + 512;
        if h[156] == b'x' {
            let body = &tar[body_start..body_start + size as usize];
            let mut recs = BTreeMap::new();
            let mut r = body;
            while !r.is_empty() {
                let sp = r.iter().position(|&b| b == b' ').unwrap();
                let len: usize = std::str::from_utf8(&r[..sp]).unwrap().parse().unwrap();
                let rec = &r[sp + 1..len - 1];
                let eq = rec.iter().position(|&b| b == b'=').unwrap();
                recs.insert(rec[..eq].to_vec(), rec[eq + 1..].to_vec());
                r = &r[len..];
            }
            pending_pax = Some((tar[i..body_start + (size as usize).div_ceil(512) * 512].to_vec(), recs));
            i = body_start + (size as usize).div_ceil(512) * 512;
            continue;
        }
        if let Some(s) = pending_pax.as_ref().and_then(|p| p.1.get(&b"size"[..])) {
            size = std::str::from_utf8(s).unwrap().parse().unwrap();
        }
        let data = &tar[body_start..body_start + size as usize];
        let next = body_start + (size as usize).div_ceil(512) * 512;
        match pending_pax.take() {
            Some((_, recs)) if recs.get(&b"GNU.sparse.major"[..]).map(Vec::as_slice) == Some(b"1") => {
                let realsize: usize = std::str::from_utf8(&recs[&b"GNU.sparse.realsize"[..]]).unwrap().parse().unwrap();
                let text_end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                let nums: Vec<usize> = std::str::from_utf8(&data[..text_end]).unwrap().lines().map(|l| l.parse().unwrap()).collect();
                let map_len = text_end.div_ceil(512) * 512;
                let mut dense = vec![0u8; realsize];
                let mut at = map_len;
                for pair in nums[1..].chunks(2) {
                    dense[pair[0]..pair[0] + pair[1]].copy_from_slice(&data[at..at + pair[1]]);
                    at += pair[1];
                }
                let mut recs = recs.clone();
                let name = recs.remove(&b"GNU.sparse.name"[..]).unwrap();
                recs.retain(|k, _| !k.starts_with(b"GNU.sparse.") && k != b"size");
                recs.insert(b"path".to_vec(), name.clone());
                let mut pax = Vec::new();
                for (k, v) in &recs {
                    pax.extend(pax_record(k, v));
                }
                out.extend(header(b"PaxHeader", b'x', 0o644, (0, 0), pax.len() as u64, 0, b"", (0, 0)));
                out.extend(&pax);
                pad(&mut out);
                let mut nh: [u8; 512] = h.try_into().unwrap();
                nh[124..136].copy_from_slice(format!("{:011o}\0", dense.len()).as_bytes());
                nh[148..156].copy_from_slice(b"        ");
                let sum: u32 = nh.iter().map(|&b| b as u32).sum();
                nh[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                out.extend(nh);
                out.extend(&dense);
                pad(&mut out);
            }
            other => {
                if let Some((raw, _)) = other {
                    out.extend(raw);
                }
                out.extend(&tar[i..next]);
            }
        }
        i = next;
    }
    out.extend([0u8; 1024]);
    out
}

// ---------------------------------------------------------------------------------------------
// Store helpers
// ---------------------------------------------------------------------------------------------

/// Imports each archive (one invocation for all of them); returns their ids in order.
fn import_all(s: &Store, archives: &[Vec<u8>]) -> Vec<String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut args = vec!["import".to_string()];
    for a in archives {
        let p = s.path(&format!("in-{}.tar", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        fs::write(&p, a).unwrap();
        args.push(format!("tar:{}", p.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = s.plyroot(&args).ok();
    let ids = out.lines();
    assert_eq!(ids.len(), archives.len(), "one id per archive: {out}");
    ids
}

fn import_one(s: &Store, archive: &[u8]) -> String {
    import_all(s, &[archive.to_vec()]).remove(0)
}

/// The canonical export of an environment made of the layers `ids` (bottom first).
fn export(s: &Store, ids: &[&str]) -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let env = format!("x{n}");
    let froms: Vec<String> = ids.iter().map(|id| format!("layer:{id}")).collect();
    let froms: Vec<&str> = froms.iter().map(String::as_str).collect();
    s.create(&env, &froms);
    let out = s.path(&format!("{env}.tar"));
    s.plyroot(&["export", &env, "-o", out.to_str().unwrap()]).ok();
    s.plyroot(&["rm", &env]).ok();
    fs::read(&out).unwrap()
}

fn sha256(data: &[u8]) -> String {
    let out = run_with(Command::new("sha256sum").arg("-"), Some(data), TIMEOUT).ok();
    format!("sha256:{}", out.stdout.split_whitespace().next().unwrap())
}

/// A layer's canonical tar, as `export --oci` writes it (the layer's blob): its sha256 is the id.
fn export_layer(s: &Store, id: &str) -> Vec<u8> {
    export_layers(s, &[id.to_owned()]).remove(0)
}

/// The canonical tars of several layers, through one OCI export of an environment of them all.
fn export_layers(s: &Store, ids: &[String]) -> Vec<Vec<u8>> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let env = format!("o{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let froms: Vec<String> = ids.iter().map(|id| format!("layer:{id}")).collect();
    s.create(&env, &froms.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = s.path(&format!("{env}-oci"));
    s.plyroot(&["export", &env, "--oci", dir.to_str().unwrap()]).ok();
    s.plyroot(&["rm", &env]).ok();
    ids.iter()
        .map(|id| {
            let blob = fs::read(dir.join("blobs/sha256").join(&id[7..])).unwrap();
            assert_eq!(sha256(&blob), *id, "a layer's blob is the canonical tar its id is the digest of");
            blob
        })
        .collect()
}

/// (name, type) of each entry of a tar, as GNU tar lists it: `--quoting-style=escape` shows
/// every byte of a name.
fn gnu_list(tar: &[u8]) -> Vec<String> {
    let out = run_with(Command::new("tar").args(["-tv", "--quoting-style=escape", "--numeric-owner", "-f", "-"]), Some(tar), TIMEOUT).ok();
    out.lines()
}

fn need_userns() -> Result<(), String> {
    if me().regime == Regime::Root {
        Ok(())
    } else {
        userns()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. xattrs of any number and size
// ---------------------------------------------------------------------------------------------

#[test]
fn xattrs_of_any_number_and_size_are_content() {
    let s = Store::new();
    let many = |last: &[u8]| {
        let mut f = Ent::file(b"etc/f", b"x");
        // 40 names of ordinary length: more than 1 KiB of name list.
        f.xattrs = (0..40).map(|i| (format!("user.org.example.attribute.{i:02}").into_bytes(), vec![b'v'; 32])).collect();
        f.xattrs.push((b"user.zz.last".to_vec(), last.to_vec()));
        let mut d = Ent::dir(b"etc");
        d.xattrs = vec![(b"user.big".to_vec(), vec![b'b'; 1500])];
        tar(&[d, f])
    };
    let ids = import_all(&s, &[many(b"one"), many(b"two")]);
    assert_ne!(ids[0], ids[1], "two trees that differ in one xattr value must differ in id");
    let e = export_layer(&s, &ids[0]);
    let text = String::from_utf8_lossy(&e);
    assert_eq!(text.matches("SCHILY.xattr.user.org.example.attribute.").count(), 40, "every xattr is exported");
    assert!(text.contains("SCHILY.xattr.user.zz.last=one") && text.contains(&format!("SCHILY.xattr.user.big={}", "b".repeat(1500))));
    assert_eq!(import_one(&s, &e), ids[0], "export -> import keeps the id");
}

// ---------------------------------------------------------------------------------------------
// 2. names are bytes
// ---------------------------------------------------------------------------------------------

const NAMES: [&[u8]; 3] = [b"etc/a\xff", b"etc/a\xfe", "etc/a\u{FFFD}".as_bytes()];

#[test]
fn names_are_bytes_from_import_to_export() {
    let s = Store::new();
    let single: Vec<Vec<u8>> = NAMES.iter().map(|n| tar(&[Ent::dir(b"etc"), Ent::file(n, n)])).collect();
    let all = tar(&[Ent::dir(b"etc"), Ent::file(NAMES[0], NAMES[0]), Ent::file(NAMES[1], NAMES[1]), Ent::file(NAMES[2], NAMES[2])]);
    let mut ids = import_all(&s, &single);
    let one = ids.clone();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three names, three ids: {one:?}");
    let id = import_one(&s, &all);
    let e = export_layer(&s, &id);
    let listed = gnu_list(&e);
    for want in ["etc/a\\377", "etc/a\\376", "etc/a\u{FFFD}"] {
        assert_eq!(listed.iter().filter(|l| l.ends_with(want)).count(), 1, "{want} once in {listed:?}");
    }
    assert_eq!(import_one(&s, &e), id, "export -> import round-trips to the same id");
    for (n, single_id) in NAMES.iter().zip(&one) {
        let e = export_layer(&s, single_id);
        assert_eq!(import_one(&s, &e), *single_id);
        // GNU tar extracts the exact bytes.
        let dir = s.path(&format!("x-{}", &single_id[7..19]));
        fs::create_dir(&dir).unwrap();
        run_with(Command::new("tar").args(["-x", "-C"]).arg(&dir).args(["-f", "-"]), Some(&e), TIMEOUT).ok();
        assert_eq!(fs::read(dir.join(std::ffi::OsStr::from_bytes(n))).unwrap(), *n);
    }
}

#[test]
fn a_run_sees_the_names_and_diff_shows_them_escaped() {
    need!(need_userns());
    let s = Store::new();
    let rootfs = s.path("rootfs");
    need!(busybox_rootfs(&rootfs));
    let names = import_one(&s, &tar(&[Ent::dir(b"etc"), Ent::file(NAMES[0], b"ff"), Ent::file(NAMES[1], b"fe"), Ent::file(NAMES[2], b"fffd")]));
    s.create("t", &[&format!("dir:{}", rootfs.display()), &format!("layer:{names}")]);
    let root_sh = |script: &str| s.run("t", &["--root"], &["sh", "-c", script]);
    // od shows each byte: \377 and \376 are two files, and the U+FFFD one a third.
    let out = root_sh("cd /etc && for f in a*; do printf '%s' \"$f\" | od -An -c; cat \"$f\"; echo; done").ok();
    let text = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in ["a 377 ff", "a 376 fe", "a 357 277 275 fffd"] {
        assert!(text.contains(want), "{want:?} in {text:?}");
    }
    root_sh("printf x > \"$(printf '/etc/new\\377\\033[2J')\"").ok();
    let diff = s.plyroot(&["diff", "t"]).ok();
    assert!(diff.stdout.contains("A /etc/new\\xff\\x1b[2J"), "escaped: {diff}");
    assert!(!diff.stdout.contains('\x1b'), "no control character reaches the terminal: {diff}");
    let json = s.plyroot(&["diff", "t", "--json"]).ok().json();
    assert_eq!(json[0]["path"], "/etc/new\\xff\\x1b[2J");
    assert_eq!(json[0]["path_hex"], hex(b"/etc/new\xff\x1b[2J"));
    let which = s.plyroot(&["which", "t", "/etc/a\u{FFFD}"]).ok();
    assert!(which.stdout.starts_with("/etc/a\u{FFFD}: "), "{which}");
    // Commit, and the layer holds the bytes: its export lists them once each.
    let id = s.plyroot(&["commit", "t"]).ok().line();
    let listed = gnu_list(&export_layer(&s, &id));
    assert!(listed.iter().any(|l| l.ends_with("etc/new\\377\\033[2J")), "{listed:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// 3. the root opaque marker
// ---------------------------------------------------------------------------------------------

#[test]
fn an_opaque_marker_at_the_root_is_refused_not_ignored() {
    let s = Store::new();
    let plain = import_one(&s, &tar(&[Ent::file(b"f", b"x")]));
    let before = s.layer_ids();
    for name in [&b".wh..wh..opq"[..], b"./.wh..wh..opq"] {
        let p = s.path("opaque-root.tar");
        fs::write(&p, tar(&[Ent::file(name, b""), Ent::file(b"f", b"x")])).unwrap();
        s.plyroot(&["import", &format!("tar:{}", p.display())]).plyroot_error(&[".wh..wh..opq", "root", "opaque"]);
        assert_eq!(s.layer_ids(), before, "a refused import adds no layer");
    }
    // Below the root the marker is what it always was: part of the content.
    let sub = import_one(&s, &tar(&[Ent::dir(b"d"), Ent::file(b"d/.wh..wh..opq", b""), Ent::file(b"f", b"x")]));
    let nosub = import_one(&s, &tar(&[Ent::dir(b"d"), Ent::file(b"f", b"x")]));
    assert_ne!(sub, nosub);
    assert!(gnu_list(&export_layer(&s, &sub)).iter().any(|l| l.ends_with("d/.wh..wh..opq")));
    assert_ne!(plain, sub);
}

// ---------------------------------------------------------------------------------------------
// 4. mtimes, whatever the store's filesystem holds
// ---------------------------------------------------------------------------------------------

/// Times a 32-bit filesystem cannot hold, times before 1970, past the ustar field, and fractions.
fn odd_times() -> Vec<u8> {
    let t = |name: &[u8], mtime: i64, nsec: u32| Ent { mtime, nsec, ..Ent::file(name, name) };
    let mut d = Ent::dir(b"d");
    d.mtime = 4_102_444_800;
    tar(&[
        d,
        t(b"d/y2100", 4_102_444_800, 0),
        t(b"d/y2100ns", 4_102_444_800, 123_456_789),
        t(b"d/y1969", -1, 0),
        t(b"d/y1901", -2_147_483_648, 0),
        t(b"d/y1900", -2_208_988_800, 0),
        t(b"d/y2242", (1 << 33) + 1, 0),
        t(b"d/frac", 1_600_000_000, 500_000_000),
        Ent { mtime: 4_102_444_800, link: b"y2100".to_vec(), ..Ent::new(b"d/link", b'2') },
    ])
}

/// (name, mtime) of every entry of a tar, as GNU tar reads them (`--full-time`, UTC).
fn gnu_times(tar: &[u8]) -> Vec<String> {
    let out = run_with(Command::new("tar").args(["-tv", "--full-time", "--numeric-owner", "-f", "-"]).env("TZ", "UTC"), Some(tar), TIMEOUT).ok();
    out.lines().into_iter().map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" ")).collect()
}

#[test]
fn mtimes_outside_1970_to_2038_survive_export_and_import() {
    let s = Store::new();
    let id = import_one(&s, &odd_times());
    let e = export_layer(&s, &id);
    let times = gnu_times(&e);
    for want in [
        "2100-01-01 00:00:00 d/",
        "2020-09-13 12:26:40 d/frac",
        "1969-12-31 23:59:59 d/y1969",
        "1901-12-13 20:45:52 d/y1901",
        "1900-01-01 00:00:00 d/y1900",
        "2242-03-16 12:56:33 d/y2242",
        "2100-01-01 00:00:00 d/y2100ns",
        "2100-01-01 00:00:00 d/link -> y2100",
    ] {
        assert!(times.iter().any(|t| t == want), "{want:?} in {times:?}");
    }
    assert_eq!(import_one(&s, &e), id, "export -> import keeps the id");
    // Sub-second parts are not content: the same archive without them is the same layer.
    let whole = tar(&[Ent { mtime: 1_600_000_000, ..Ent::file(b"f", b"") }]);
    let frac = tar(&[Ent { mtime: 1_600_000_000, nsec: 999_999_999, ..Ent::file(b"f", b"") }]);
    let earlier = tar(&[Ent { mtime: 1_599_999_999, ..Ent::file(b"f", b"") }]);
    let ids = import_all(&s, &[whole, frac, earlier]);
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
}

/// An ext4 made with 128-byte inodes (mtimes stop at 2038), loop-mounted; unmounted on drop.
struct SmallInodes {
    mnt: PathBuf,
}

impl SmallInodes {
    fn new(dir: &Path) -> Result<SmallInodes, String> {
        let img = dir.join("ext4-128.img");
        let mnt = dir.join("ext4-128");
        fs::create_dir(&mnt).unwrap();
        tool("mkfs.ext4")?;
        sh(&format!("truncate -s 64M {0} && mkfs.ext4 -q -I 128 -F {0}", img.display())).ok();
        let o = sh(&format!("mount -o loop {} {}", img.display(), mnt.display()));
        if o.code != 0 {
            return Err(format!("cannot loop-mount an ext4 image here: {o}"));
        }
        fs::set_permissions(&mnt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Ok(SmallInodes { mnt })
    }
}

impl Drop for SmallInodes {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn ids_do_not_depend_on_the_stores_filesystem() {
    if me().regime != Regime::Root {
        // Loop-mounting a filesystem needs root; the unprivileged runs check the same metadata
        // path through `mtimes_outside_1970_to_2038_survive_export_and_import`.
        return;
    }
    let s = Store::new();
    let small = need!(SmallInodes::new(s.tmp.path()));
    // The image really clamps: what this test is about.
    sh(&format!("touch -d 2100-01-01 {}/probe", small.mnt.display())).ok();
    assert!(fs::metadata(small.mnt.join("probe")).unwrap().mtime() < 2_200_000_000, "ext4 with 128-byte inodes did not clamp");
    let archive = odd_times();
    let here = import_one(&s, &archive);
    let p = s.path("odd.tar");
    fs::write(&p, &archive).unwrap();
    let there = Command::new(bin()).args(["import", &format!("tar:{}", p.display())]).env("PLYROOT_HOME", small.mnt.join("store")).output().unwrap();
    assert!(there.status.success(), "{}", String::from_utf8_lossy(&there.stderr));
    assert_eq!(String::from_utf8_lossy(&there.stdout).trim(), here, "the same archive, another id on a filesystem that clamps mtimes");
    let ov = fs::read_to_string(small.mnt.join("store/layers").join(&here[7..]).join("overrides.json")).unwrap();
    assert!(ov.contains("\"mtime\":4102444800"), "the clamped mtime is kept in the layer's metadata: {ov}");
    // And it is what verify and export read back from there.
    let v = Command::new(bin()).args(["verify"]).env("PLYROOT_HOME", small.mnt.join("store")).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

// ---------------------------------------------------------------------------------------------
// 6. sparse files (the canonical side)
// ---------------------------------------------------------------------------------------------

#[test]
fn files_with_holes_export_sparse_and_gnu_tar_restores_them() {
    let s = Store::new();
    let chunk = 64 * 1024;
    let mut data = vec![0u8; 10 * chunk + 123];
    data[3 * chunk + 5..3 * chunk + 10].copy_from_slice(b"hello");
    data[10 * chunk..10 * chunk + 3].copy_from_slice(b"end");
    let archive = tar(&[Ent::dir(b"var"), Ent::file(b"var/lastlog", &data), Ent::file(b"var/zeros", &vec![0u8; 4 * chunk])]);
    let id = import_one(&s, &archive);
    let e = export_layer(&s, &id);
    assert!(e.len() < 4 * chunk, "the holes are not written ({} bytes)", e.len());
    let text = String::from_utf8_lossy(&e);
    assert!(text.contains("GNU.sparse.major=1") && text.contains("GNU.sparse.realsize=655483"), "PAX sparse 1.0");
    let dir = s.path("restored");
    fs::create_dir(&dir).unwrap();
    run_with(Command::new("tar").args(["-x", "-C"]).arg(&dir).args(["-f", "-"]), Some(&e), TIMEOUT).ok();
    assert_eq!(fs::read(dir.join("var/lastlog")).unwrap(), data, "GNU tar restores the bytes");
    assert_eq!(fs::read(dir.join("var/zeros")).unwrap(), vec![0u8; 4 * chunk]);
    let m = fs::metadata(dir.join("var/lastlog")).unwrap();
    assert!(m.blocks() * 512 < 4 * chunk as u64, "and the holes as holes ({} blocks)", m.blocks());
    // Read by a reader that knows sparse files, the export is the dense archive: same content.
    assert_eq!(import_one(&s, &desparse(&e)), id);
}

// ---------------------------------------------------------------------------------------------
// 8. directories their owner may not enter
// ---------------------------------------------------------------------------------------------

#[test]
fn directories_of_mode_000_0300_0111_read_back_for_every_user() {
    let s = Store::new();
    let d = |name: &[u8], mode| Ent { mode, ..Ent::dir(name) };
    let archive = tar(&[
        d(b"none", 0o000),
        Ent::file(b"none/f", b"0"),
        d(b"none/deeper", 0o000),
        Ent { mode: 0o000, ..Ent::file(b"none/deeper/g", b"00") },
        d(b"wx", 0o300),
        Ent::file(b"wx/f", b"3"),
        d(b"x", 0o111),
        Ent::file(b"x/f", b"1"),
    ]);
    let id = import_one(&s, &archive);
    // Unprivileged, the importer stores such directories with their owner's r-x added and the
    // archive's mode in the layer's metadata; as root, as they are. Reading them back (verify,
    // export) may lend access for a while, but must leave them as they were.
    let disk_modes = || -> Vec<u32> { ["none", "wx", "x"].iter().map(|p| fs::symlink_metadata(s.home.join("layers").join(&id[7..]).join("root").join(p)).unwrap().mode() & 0o7777).collect() };
    let stored = disk_modes();
    if me().uid == 0 {
        assert_eq!(stored, [0o000, 0o300, 0o111], "real root stores the modes as they are");
    }
    s.plyroot(&["verify"]).ok();
    let e = export_layer(&s, &id);
    let listed: Vec<(String, String)> = gnu_list(&e).iter().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[0].to_owned(), f[f.len() - 1].to_owned())
    }).collect();
    for (mode, name) in [("d---------", "none/"), ("----------", "none/deeper/g"), ("d-wx------", "wx/"), ("d--x--x--x", "x/"), ("-rw-r--r--", "x/f")] {
        assert!(listed.contains(&(mode.to_owned(), name.to_owned())), "{mode} {name} in {listed:?}");
    }
    assert_eq!(import_one(&s, &e), id);
    assert_eq!(disk_modes(), stored, "reading lent access and did not give the modes back");
    if need_userns().is_ok() {
        // An upper holding such directories: diff, commit, export, verify.
        let rootfs = s.path("rootfs");
        need!(busybox_rootfs(&rootfs));
        s.create("t", &[&format!("dir:{}", rootfs.display()), &format!("layer:{id}")]);
        s.run("t", &["--root"], &["sh", "-c", "mkdir -m 000 /mine && touch /mine/f && chmod 000 /mine && echo x > /x/new"]).ok();
        let diff = s.plyroot(&["diff", "t"]).ok();
        assert!(diff.stdout.contains("A /mine/f") && diff.stdout.contains("A /x/new"), "{diff}");
        let c = s.plyroot(&["commit", "t"]).ok().line();
        s.plyroot(&["verify"]).ok();
        assert!(gnu_list(&export_layer(&s, &c)).iter().any(|l| l.ends_with("mine/f")));
        s.plyroot(&["rm", "t"]).ok();
    }
    s.plyroot(&["gc"]).ok();
    assert!(s.layer_ids().is_empty(), "gc removed the layers: {:?}", s.layer_ids());
    assert_eq!(fs::read_dir(s.home.join("tmp")).map(|d| d.count()).unwrap_or(0), 0, "nothing left in tmp/");
}

// ---------------------------------------------------------------------------------------------
// 12. trees deeper than a path can name
// ---------------------------------------------------------------------------------------------

#[test]
fn a_2045_level_tree_made_in_a_run_diffs_commits_exports_verifies_and_goes() {
    need!(need_userns());
    let s = Store::new();
    need!(s.busybox_env("deep"));
    // Made bottom-up, what exists moved into new levels (ten at a time), so that no path the
    // shell handles is long.
    let mk = "mkdir /tmp/deep && cd /tmp/deep && mkdir a && echo bottom > a/f && i=1; while [ $i -lt 2045 ]; do \
        if [ $((2045 - i)) -ge 10 ]; then mkdir -p b/a/a/a/a/a/a/a/a/a && mv a b/a/a/a/a/a/a/a/a/a/ && mv b a && i=$((i + 10)); \
        else mkdir b && mv a b/ && mv b a && i=$((i + 1)); fi || exit 1; done";
    let root_sh = |script: String| s.run("deep", &["--root"], &["sh", "-c", &script]);
    root_sh(mk.replace("/tmp", "/opt")).ok();
    let diff = s.plyroot(&["diff", "deep"]).ok();
    assert_eq!(diff.lines().len(), 2047, "/opt/deep, 2045 directories and the file: {}", diff.lines().len());
    let id = s.plyroot(&["commit", "deep"]).ok().line();
    s.plyroot(&["verify"]).ok();
    let out = s.path("deep.tar");
    s.plyroot(&["export", "deep", "-o", out.to_str().unwrap()]).ok();
    let listed = gnu_list(&fs::read(&out).unwrap());
    assert!(listed.iter().any(|l| l.ends_with(&format!("opt/deep/{}f", "a/".repeat(2045)))), "the bottom file is exported");
    let layer = export_layer(&s, &id);
    assert!(!layer.is_empty());
    // Again in the upper, then reset --force, rm and gc: everything goes, nothing is left.
    root_sh(mk.replace("/tmp", "/srv")).ok();
    s.plyroot(&["reset", "--force", "deep"]).ok();
    root_sh(mk.replace("/tmp", "/mnt")).ok();
    s.plyroot(&["rm", "deep"]).ok();
    s.plyroot(&["gc"]).ok();
    assert!(s.layer_ids().is_empty(), "{:?}", s.layer_ids());
    assert_eq!(fs::read_dir(s.home.join("tmp")).map(|d| d.count()).unwrap_or(0), 0, "no temp directory left behind");
    assert!(!s.home.join("envs/deep").exists());
}

// ---------------------------------------------------------------------------------------------
// 5. the property test
// ---------------------------------------------------------------------------------------------

/// xorshift64*: small, seeded, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }
}

/// A byte for a name, a link target or an xattr value: any but NUL and `\n`. (A PAX record may
/// hold a newline, and GNU tar reads it, but the `tar` crate the importer reads with splits
/// records at newlines: see the report of issue 10.)
fn byte(r: &mut Rng) -> u8 {
    loop {
        let b = if r.chance(50) { b'a' + r.below(26) as u8 } else { r.below(256) as u8 };
        if b != 0 && b != b'\n' {
            return b;
        }
    }
}

/// A name component: arbitrary bytes but `/`, not `.`/`..`, not a whiteout, sometimes up to 255
/// bytes long.
fn name(r: &mut Rng) -> Vec<u8> {
    loop {
        let len = if r.chance(10) { 100 + r.below(156) } else { 1 + r.below(12) } as usize;
        let n: Vec<u8> = (0..len)
            .map(|_| loop {
                let b = byte(r);
                if b != b'/' {
                    break b;
                }
            })
            .collect();
        if n != b"." && n != b".." && !n.starts_with(b".wh.") {
            return n;
        }
    }
}

const DIR_MODES: [u32; 7] = [0o755, 0o700, 0o555, 0o1777, 0o000, 0o300, 0o111];
const FILE_MODES: [u32; 8] = [0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1644, 0o000, 0o7777];
const TIMES: [i64; 8] = [MTIME, 0, 1, 4_102_444_800, -1, -2_208_988_800, (1 << 33) + 1, 2_147_483_648];

/// A random tree as a tar: directories (odd modes), files (empty, small, with runs of zeros past
/// the sparse granularity), symlinks with long targets, hardlinks, fifos, devices, owners, many
/// xattrs, extreme mtimes.
fn random_tree(seed: u64) -> Vec<Ent> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ents: Vec<Ent> = Vec::new();
    let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut taken = std::collections::BTreeSet::new();
    let mut opaque = std::collections::BTreeSet::new();
    let n = 8 + r.below(20);
    for _ in 0..n {
        let parent = r.pick(&dirs);
        let leaf = name(&mut r);
        let path = if parent.is_empty() { leaf } else { [parent.as_slice(), b"/", &leaf].concat() };
        if !taken.insert(path.clone()) {
            continue;
        }
        let mut e = match r.below(10) {
            0 | 1 => {
                dirs.push(path.clone());
                Ent { mode: r.pick(&DIR_MODES), ..Ent::dir(&path) }
            }
            2 => {
                let len = if r.chance(30) { 300 + r.below(1500) } else { 1 + r.below(40) } as usize;
                let target: Vec<u8> = (0..len).map(|_| byte(&mut r)).collect();
                Ent { mode: 0o777, link: target, ..Ent::new(&path, b'2') }
            }
            3 if !files.is_empty() => Ent { link: r.pick(&files), ..Ent::new(&path, b'1') },
            4 if r.chance(30) => Ent { mode: 0o640, ..Ent::new(&path, b'6') },
            4 if r.chance(30) => Ent { mode: 0o660, dev: (1 + r.below(200) as u32, r.below(300) as u32), ..Ent::new(&path, if r.chance(50) { b'3' } else { b'4' }) },
            // OCI markers: a whiteout of a name nothing else uses, an opaque directory (never the
            // root, which is refused).
            5 if r.chance(40) => {
                let at = path.len() - path.rsplit(|&b| b == b'/').next().unwrap().len();
                Ent::file(&[&path[..at], b".wh.", &path[at..]].concat(), b"")
            }
            6 if r.chance(40) && !parent.is_empty() && opaque.insert(parent.clone()) => Ent::file(&[parent.as_slice(), b"/.wh..wh..opq"].concat(), b""),
            _ => {
                let data = match r.below(6) {
                    0 => Vec::new(),
                    1 => (0..r.below(3000)).map(|_| r.below(256) as u8).collect(),
                    2 => (0..r.below(200)).map(|_| r.pick(&[0, 0, 0, 7])).collect(),
                    _ => {
                        // Runs of zeros: some whole 64 KiB chunks (sparse in the canonical form).
                        let chunk = 64 * 1024;
                        let mut d = vec![0u8; chunk * (1 + r.below(2) as usize) + r.below(5000) as usize];
                        for _ in 0..r.below(4) {
                            let at = r.below(d.len() as u64) as usize;
                            d[at] = 1 + r.below(255) as u8;
                        }
                        d
                    }
                };
                files.push(path.clone());
                Ent { mode: r.pick(&FILE_MODES), data, ..Ent::file(&path, b"") }
            }
        };
        if e.kind == b'1' {
            e.mode = 0;
        }
        if is_marker(&e) {
            // A marker's own metadata is no content: the importer takes only its name.
            ents.push(e);
            continue;
        }
        e.mtime = r.pick(&TIMES);
        if r.chance(20) {
            e.nsec = r.below(1_000_000_000) as u32;
        }
        if r.chance(30) {
            e.owner = (r.pick(&[0, 1, 1000, 65534, 3_000_000]), r.pick(&[0, 5, 1000, 65534, 4_000_000]));
        }
        if r.chance(25) && e.kind != b'1' {
            let count = if r.chance(30) { 45 } else { 1 + r.below(4) };
            e.xattrs = (0..count).map(|i| (format!("user.x{i:02}.{}", r.below(1000)).into_bytes(), (0..r.below(40)).map(|_| byte(&mut r)).collect())).collect();
            e.xattrs.sort();
            e.xattrs.dedup_by(|a, b| a.0 == b.0);
        }
        ents.push(e);
    }
    ents
}

/// The mutations of a tree that must each change its id: one byte of a name, one mode bit, one
/// second, one xattr byte, one link-target byte, one content byte, a hardlink made a copy, an
/// owner, a moved data byte, one more empty file.
/// Whether an entry is a whiteout or opaque marker (whose mode, owner and mtime are not content).
fn is_marker(e: &Ent) -> bool {
    e.name.rsplit(|&b| b == b'/').next().unwrap().starts_with(b".wh.")
}

fn mutations(ents: &[Ent], seed: u64) -> Vec<(String, Vec<Ent>)> {
    let mut r = Rng(seed ^ 0x5DEE_CE66);
    let mut out = Vec::new();
    let mut with = |what: &str, ents: Vec<Ent>| out.push((what.to_owned(), ents));
    let last_leaf = ents.iter().rposition(|e| e.kind != b'5' && !ents.iter().any(|o| o.kind == b'1' && o.link == e.name));
    if let Some(i) = last_leaf {
        let mut m = ents.to_vec();
        let at = m[i].name.len() - 1;
        m[i].name[at] = if m[i].name[at] == b'z' { b'y' } else { b'z' };
        with("a name byte", m);
    }
    let plain: Vec<usize> = (0..ents.len()).filter(|&i| !is_marker(&ents[i])).collect();
    let i = r.pick(&plain);
    if ents[i].kind != b'1' && ents[i].kind != b'2' {
        let mut m = ents.to_vec();
        m[i].mode ^= 0o001;
        with("a mode bit", m);
    }
    if ents[i].kind != b'1' {
        let mut m = ents.to_vec();
        m[i].mtime += 1;
        with("one second", m);
    }
    if let Some(i) = ents.iter().position(|e| !e.xattrs.is_empty()) {
        let mut m = ents.to_vec();
        m[i].xattrs[0].1.push(b'!');
        with("an xattr value", m);
    }
    if let Some(i) = ents.iter().position(|e| e.kind == b'2') {
        let mut m = ents.to_vec();
        m[i].link.push(b'x');
        with("a link target", m);
    }
    if let Some(i) = ents.iter().position(|e| e.kind == b'0' && !e.data.is_empty()) {
        let mut m = ents.to_vec();
        let at = r.below(m[i].data.len() as u64) as usize;
        m[i].data[at] ^= 0x80;
        with("a content byte", m);
    }
    if let Some(i) = ents.iter().position(|e| e.kind == b'0' && e.data.len() > 64 * 1024) {
        // The same bytes, one of them elsewhere: another sparse map.
        let mut m = ents.to_vec();
        let d = &mut m[i].data;
        let last = d.len() - 1;
        d.swap(0, last);
        if d[0] != d[last] {
            with("where the data is", m);
        }
    }
    if let Some(i) = ents.iter().position(|e| e.kind == b'1') {
        let mut m = ents.to_vec();
        let target = m.iter().find(|e| e.name == m[i].link).cloned().unwrap();
        m[i] = Ent { name: m[i].name.clone(), ..target };
        with("a hardlink made a copy", m);
    }
    if ents[i].kind != b'1' {
        let mut m = ents.to_vec();
        m[i].owner.0 = m[i].owner.0.wrapping_add(7);
        with("an owner", m);
    }
    let mut m = ents.to_vec();
    m.push(Ent::file(b"one-more", b""));
    with("one more file", m);
    out
}

/// Seeds that once failed, kept as regression cases (with what they found). None past the default
/// range so far: 300 seeds pass as root, 150 as each CI user.
const REGRESSIONS: &[u64] = &[];

#[test]
fn property_random_trees_round_trip_and_every_difference_shows() {
    let s = Store::new();
    // PLYROOT_TEST_SEEDS=N widens the search (to find a failing seed worth keeping above).
    let n: u64 = std::env::var("PLYROOT_TEST_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let seeds: Vec<u64> = (1..=n).chain(REGRESSIONS.iter().copied()).collect();
    let archives: Vec<Vec<u8>> = seeds.iter().map(|&seed| tar(&random_tree(seed))).collect();
    let ids = import_all(&s, &archives);
    let exports = export_layers(&s, &ids);
    // Without markers, the rootfs export of one layer is its canonical tar (with them, it drops
    // them: the merged root has no whiteouts).
    let unmarked = seeds.iter().position(|&seed| !random_tree(seed).iter().any(is_marker)).expect("a seed without markers");
    assert_eq!(export(&s, &[ids[unmarked].as_str()]), exports[unmarked], "the rootfs export of one layer is its canonical tar");
    let again: Vec<Vec<u8>> = exports.iter().map(|e| desparse(e)).collect();
    let ids2 = import_all(&s, &again);
    for ((seed, id), id2) in seeds.iter().zip(&ids).zip(&ids2) {
        assert_eq!(id, id2, "seed {seed}: import -> export -> import changed the id");
    }
    for ((seed, e), e2) in seeds.iter().zip(&exports).zip(export_layers(&s, &ids2)) {
        assert_eq!(*e, e2, "seed {seed}: the second export differs from the first");
    }
    // Every single difference changes the id.
    let mut variants: Vec<(u64, String, Vec<u8>)> = Vec::new();
    for &seed in &seeds {
        for (what, m) in mutations(&random_tree(seed), seed) {
            variants.push((seed, what, tar(&m)));
        }
    }
    let vids = import_all(&s, &variants.iter().map(|v| v.2.clone()).collect::<Vec<_>>());
    for ((seed, what, _), vid) in variants.iter().zip(&vids) {
        let base = &ids[seeds.iter().position(|s| s == seed).unwrap()];
        assert_ne!(vid, base, "seed {seed}: {what} did not change the id");
    }
}

/// `SEED=N OUT=FILE cargo test --test ids -- --ignored dump_seed`: writes seed N's archive, to
/// look at a failing seed with other tools.
#[test]
#[ignore]
fn dump_seed() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    fs::write(std::env::var("OUT").unwrap(), tar(&random_tree(seed))).unwrap();
}
