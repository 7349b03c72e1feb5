//! Registries: `docker://` sources and `plyroot push`, against a real `docker-registry` (the
//! distribution project's registry, Debian package docker-registry) that each test starts on
//! loopback with a temp storage directory, as the test's own user.
//!
//! - an image built by umoci and pushed by skopeo pulls with the ids `import oci:` gives;
//! - a pushed environment pulls back into a fresh store with the same ids, reads in skopeo, and
//!   a second push uploads nothing, a second pull downloads nothing (the registry's access log);
//! - a multi-platform index: the host's platform by default, `--platform`/`PLYROOT_PLATFORM`;
//! - a zstd layer;
//! - a blob corrupted in the registry's storage is refused, and nothing is kept;
//! - a pull killed with SIGKILL half-way through a layer (a stalling proxy in the test holds the
//!   download) keeps the finished layers, leaves no partial one, and a second pull resumes;
//! - `debootstrap:` through mmdebstrap (a tiny `extract` root of busybox-static);
//! - hostile loopback servers (raw sockets, one misbehaviour each, [`Served`] for a hand-made
//!   image): refused uploads, credentials lured elsewhere, redirect schemes, a token with a line
//!   break, escape sequences in what is printed, a Docker-Content-Digest that is no digest, a
//!   registry name that is no host, two Content-Lengths, a body cut short, an image of no layers,
//!   unsettable xattrs, a valid layer that expands past its bound; a server that goes silent,
//!   sends endless trailers or `100 Continue`s (each ends at its deadline, set to seconds), or
//!   puts control characters or spaces in a `Location` or a challenge.
//!
//! Runs as root and as unprivileged users with and without subordinate ids (tests/run.sh). A
//! missing docker-registry, skopeo or umoci is a skip (a failure under PLYROOT_TEST_REQUIRE_NS=1).

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// A registry per test
// ---------------------------------------------------------------------------------------------

struct Registry {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Registry {
    fn start() -> Result<Registry, String> {
        Registry::start_with(None)
    }

    /// A registry that asks for a user and password: `htpasswd` is a line `user:bcrypt-hash`.
    fn start_with(htpasswd: Option<&str>) -> Result<Registry, String> {
        let bin = tool("docker-registry")?;
        let dir = tempdir();
        let auth = match htpasswd {
            Some(line) => {
                let file = dir.path().join("htpasswd");
                fs::write(&file, format!("{line}\n")).unwrap();
                format!("auth:\n  htpasswd:\n    realm: plyroot-test\n    path: {}\n", file.display())
            }
            None => String::new(),
        };
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            );
            fs::write(dir.path().join("config.yml"), config).unwrap();
            let log = fs::File::create(dir.path().join("log")).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("cannot start docker-registry: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if matches!(http(port, "GET", "/v2/", "").0, 200 | 401) {
                    return Ok(Registry { child, port, dir });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last = fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        }
        Err(format!("docker-registry did not come up; its log:\n{last}"))
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/REPO`
    fn image(&self, repo: &str) -> String {
        format!("docker://{}/{repo}", self.host())
    }

    /// How many times the registry served GET for this blob (its access log).
    fn blob_gets(&self, digest: &str) -> usize {
        let log = fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        log.lines().filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} "))).count()
    }

    /// The file the registry keeps a blob's bytes in.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// The manifest of `repo:tag`, as JSON.
    fn manifest(&self, repo: &str, tag: &str) -> serde_json::Value {
        let (status, body) = http(self.port, "GET", &format!("/v2/{repo}/manifests/{tag}"), "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json\r\n");
        assert_eq!(status, 200, "GET manifest {repo}:{tag}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request on loopback; (status, body). Status 0 when nothing answers.
fn http(port: u16, method: &str, path: &str, headers: &str) -> (u16, Vec<u8>) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, Vec::new()) };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Connection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, Vec::new());
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else { return (0, Vec::new()) };
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp[split + 4..].to_vec())
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn skopeo(args: &[&str]) -> Out {
    let bin = tool("skopeo").unwrap();
    run_with(Command::new(bin).arg("--insecure-policy").args(args), None, TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// Hand-written images
// ---------------------------------------------------------------------------------------------

/// A layer tar (ustar, owner 0, fixed mtime) holding `files`.
fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// Writes a blob into an OCI layout; returns its descriptor.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let digest = sha256(data);
    fs::write(layout.join("blobs/sha256").join(&digest[7..]), data).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": digest, "size": data.len() })
}

/// An image of one layer (`tar`, stored as `compressed` of `media_type`) for `arch`; returns its
/// manifest's descriptor, with the platform.
fn image(layout: &Path, arch: &str, tar: &[u8], compressed: &[u8], media_type: &str) -> serde_json::Value {
    let config = serde_json::json!({
        "architecture": arch, "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": [sha256(tar)] },
    });
    let config = blob(layout, "application/vnd.oci.image.config.v1+json", &serde_json::to_vec(&config).unwrap());
    let layer = blob(layout, media_type, compressed);
    let manifest = serde_json::json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": [layer] });
    let mut desc = blob(layout, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&manifest).unwrap());
    desc["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
    desc
}

/// An OCI layout whose tag `t` names `top` (a manifest or an index descriptor).
fn layout(dir: &Path, top: impl FnOnce(&Path) -> serde_json::Value) -> PathBuf {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut desc = top(dir);
    desc.as_object_mut().unwrap().remove("platform");
    desc["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "t" });
    fs::write(dir.join("index.json"), serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [desc] })).unwrap()).unwrap();
    dir.to_owned()
}

/// The id plyroot gives a plain tar, imported into a throwaway store.
fn tar_id(tar: &[u8]) -> String {
    let s = Store::new();
    let f = s.path("layer.tar");
    fs::write(&f, tar).unwrap();
    s.import(&format!("tar:{}", f.display())).remove(0)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An environment `t` of two layers: the busybox root and a tar adding /srv/data (`size` bytes
/// that do not compress). Returns its layer ids.
fn two_layer_env(s: &Store, size: usize) -> Result<Vec<String>, String> {
    let root = s.path("rootfs");
    busybox_rootfs(&root)?;
    let mut data = Vec::with_capacity(size);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let extra = s.path("extra.tar");
    fs::write(&extra, layer_tar(&[("srv/data", &data), ("etc/extra", b"second layer\n")])).unwrap();
    s.create("t", &[&format!("dir:{}", root.display()), &format!("tar:{}", extra.display())]);
    let ids: Vec<String> = s.plyroot(&["list", "--json"]).ok().json()[0]["layers"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 2);
    Ok(ids)
}

fn pull(s: &Store, image: &str, extra: &[&str]) -> Out {
    let mut args = vec!["import", "--insecure"];
    args.extend_from_slice(extra);
    args.push(image);
    s.plyroot(&args)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn pulls_an_image_skopeo_pushed_with_the_ids_of_the_oci_layout() {
    let reg = need!(Registry::start());
    need!(tool("skopeo"));
    need!(tool("umoci"));
    let work = Store::new();
    let oci = need!(oci_image(work.tmp.path()));
    let want = work.import(&format!("oci:{}:t", oci.display()));
    assert_eq!(want.len(), 3);
    skopeo(&["copy", "-q", "--dest-tls-verify=false", &format!("oci:{}:t", oci.display()), &format!("{}:t", reg.image("x/umoci"))]).ok();

    let s = Store::new();
    let out = pull(&s, &format!("{}:t", reg.image("x/umoci")), &[]).ok();
    assert_eq!(out.lines(), want, "the same layers as `import oci:`: {out}");
    assert!(out.stderr.contains("3 downloaded"), "{out}");
    s.plyroot(&["verify"]).ok();
    // By digest too, and through `pull`.
    let digest = skopeo(&["inspect", "--tls-verify=false", &format!("{}:t", reg.image("x/umoci"))]).ok().json()["Digest"].as_str().unwrap().to_owned();
    let s2 = Store::new();
    let out = s2.plyroot(&["pull", "--insecure", &format!("{}/x/umoci@{digest}", reg.host())]).ok();
    assert_eq!(out.lines(), want, "{out}");
    // Without --insecure plyroot speaks TLS, and says what to do.
    Store::new().plyroot(&["import", &format!("{}:t", reg.image("x/umoci"))]).plyroot_error(&["TLS", "--insecure"]);
    // The environment variable does what --insecure does.
    let s3 = Store::new();
    let mut cmd = s3.cmd(&["import", &format!("{}:t", reg.image("x/umoci"))]);
    cmd.env("PLYROOT_INSECURE_REGISTRIES", reg.host());
    assert_eq!(run_with(&mut cmd, None, TIMEOUT).ok().lines(), want);
    // An unknown tag names the reference.
    Store::new().plyroot(&["import", "--insecure", &format!("{}:nope", reg.image("x/umoci"))]).plyroot_error(&["404", "x/umoci:nope"]);
}

#[test]
fn push_pull_round_trip_keeps_ids_and_moves_nothing_twice() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let reg = need!(Registry::start());
    let s = Store::new();
    let ids = need!(two_layer_env(&s, 256 * 1024));
    let target = format!("{}:v1", reg.image("team/env"));
    let out = s.plyroot(&["push", "--insecure", "t", &target]).ok();
    let digest = out.line();
    assert_layer_id(&digest);
    assert!(out.stderr.contains("2 uploaded"), "{out}");

    // The registry holds gzip layers whose diff_ids are the plyroot layer ids.
    let manifest = reg.manifest("team/env", "v1");
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    }
    let blobs: Vec<String> = layers.iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect();

    // skopeo reads it.
    if tool("skopeo").is_ok() {
        let o = skopeo(&["inspect", "--tls-verify=false", &target]).ok();
        assert_eq!(o.json()["Digest"].as_str(), Some(digest.as_str()), "{o}");
        assert_eq!(o.json()["Layers"].as_array().unwrap().len(), 2, "{o}");
        let o = skopeo(&["inspect", "--config", "--tls-verify=false", &target]).ok();
        let diff_ids: Vec<String> = o.json()["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        assert_eq!(diff_ids, ids, "diff_ids are the layer ids: {o}");
    }

    // Pushing again uploads nothing and gives the same manifest (deterministic gzip).
    let out = s.plyroot(&["push", "--insecure", "t", &target]).ok();
    assert_eq!(out.line(), digest);
    assert!(out.stderr.contains("0 uploaded"), "{out}");

    // A fresh store pulls the same ids; a second pull downloads nothing.
    let fresh = Store::new();
    let out = pull(&fresh, &target, &[]).ok();
    assert_eq!(out.lines(), ids, "{out}");
    fresh.plyroot(&["verify"]).ok();
    let gets: Vec<usize> = blobs.iter().map(|b| reg.blob_gets(b)).collect();
    assert_eq!(gets, [1, 1], "each layer downloaded once");
    let out = pull(&fresh, &target, &["-v"]).ok();
    assert_eq!(out.lines(), ids, "{out}");
    assert!(out.stderr.contains("0 downloaded") && out.stderr.contains("2 already in the store"), "{out}");
    assert!(out.stderr.contains("pulled; 1 thread(s)"), "a pull leaves one thread, for the namespaces made after it: {out}");
    assert_eq!(blobs.iter().map(|b| reg.blob_gets(b)).collect::<Vec<_>>(), gets, "the second pull downloaded a layer");
    // `create` takes docker:// sources too, and so does a manifest.
    fresh.plyroot(&["create", "e", "--insecure", "--from", &target]).ok();
    assert_eq!(fresh.plyroot(&["list", "--json"]).ok().json()[0]["layers"], serde_json::json!(ids));
    assert_eq!(blobs.iter().map(|b| reg.blob_gets(b)).collect::<Vec<_>>(), gets);
    let manifest = fresh.path("plyroot.toml");
    fs::write(&manifest, format!("[env.m]\nfrom = [\"{target}\"]\n")).unwrap();
    let mut cmd = fresh.cmd(&["apply", "-f", &manifest.to_string_lossy()]);
    cmd.env("PLYROOT_INSECURE_REGISTRIES", reg.host());
    run_with(&mut cmd, None, TIMEOUT).ok();
    let envs = fresh.plyroot(&["list", "--json"]).ok().json();
    let m = envs.as_array().unwrap().iter().find(|e| e["name"] == "m").unwrap_or_else(|| panic!("no env m: {envs}"));
    assert_eq!(m["layers"], serde_json::json!(ids));
    assert_eq!(blobs.iter().map(|b| reg.blob_gets(b)).collect::<Vec<_>>(), gets);
    // The store that pushed pulls without downloading: its layers are the diff_ids.
    let out = pull(&s, &target, &[]).ok();
    assert!(out.stderr.contains("0 downloaded"), "{out}");

    // Uncommitted changes are not pushed silently.
    fs::write(s.home.join("envs/t/upper/new-file"), "x").unwrap();
    s.plyroot(&["push", "--insecure", "t", &target]).plyroot_error(&["plyroot commit t"]);
}

/// Two platforms in one index (the host's, gzip; another, zstd), copied with `skopeo copy --all`.
fn multi_platform(reg: &Registry, work: &Path) -> (String, String) {
    let other = if host_arch() == "arm64" { "amd64" } else { "arm64" };
    let host_tar = layer_tar(&[("platform", host_arch().as_bytes())]);
    let other_tar = layer_tar(&[("platform", other.as_bytes()), ("zstd", b"compressed with zstd\n")]);
    let dir = layout(&work.join("multi"), |d| {
        let a = image(d, host_arch(), &host_tar, &gzip(&host_tar), "application/vnd.oci.image.layer.v1.tar+gzip");
        let b = image(d, other, &other_tar, &zstd(&other_tar), "application/vnd.oci.image.layer.v1.tar+zstd");
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [b, a] });
        blob(d, "application/vnd.oci.image.index.v1+json", &serde_json::to_vec(&index).unwrap())
    });
    skopeo(&["copy", "-q", "--all", "--dest-tls-verify=false", &format!("oci:{}:t", dir.display()), &format!("{}:t", reg.image("x/multi"))]).ok();
    (tar_id(&host_tar), tar_id(&other_tar))
}

#[test]
fn a_multi_platform_index_gives_the_host_platform_or_the_one_asked_for() {
    let reg = need!(Registry::start());
    need!(tool("skopeo"));
    let work = tempdir();
    let (host_id, other_id) = multi_platform(&reg, work.path());
    let other = if host_arch() == "arm64" { "linux/amd64" } else { "linux/arm64" };
    let image = format!("{}:t", reg.image("x/multi"));
    let index = reg.manifest("x/multi", "t");
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(2), "the registry holds the index: {index}");

    assert_eq!(pull(&Store::new(), &image, &[]).ok().lines(), vec![host_id]);
    assert_eq!(pull(&Store::new(), &image, &["--platform", other]).ok().lines(), vec![other_id.clone()]);
    let s = Store::new();
    let mut cmd = s.cmd(&["import", "--insecure", &image]);
    cmd.env("PLYROOT_PLATFORM", other);
    assert_eq!(run_with(&mut cmd, None, TIMEOUT).ok().lines(), [other_id]);
    pull(&Store::new(), &image, &["--platform", "linux/s390x"]).plyroot_error(&["linux/s390x", &format!("linux/{}", host_arch()), "--platform"]);
    Store::new().plyroot(&["import", "--platform", "s390x", &image]).plyroot_error(&["OS/ARCH"]);
}

#[test]
fn a_zstd_layer_pulls() {
    let reg = need!(Registry::start());
    need!(tool("skopeo"));
    let work = tempdir();
    let tar = layer_tar(&[("etc/zstd", b"a zstd layer\n"), ("usr/share/doc/x", &[7u8; 100_000])]);
    let dir = layout(&work.path().join("z"), |d| image(d, host_arch(), &tar, &zstd(&tar), "application/vnd.oci.image.layer.v1.tar+zstd"));
    skopeo(&["copy", "-q", "--dest-tls-verify=false", &format!("oci:{}:t", dir.display()), &format!("{}:t", reg.image("x/zstd"))]).ok();
    let m = reg.manifest("x/zstd", "t");
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd", "skopeo kept the zstd layer: {m}");
    let s = Store::new();
    assert_eq!(pull(&s, &format!("{}:t", reg.image("x/zstd")), &[]).ok().lines(), [tar_id(&tar)]);
    s.plyroot(&["verify"]).ok();
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_kept() {
    let reg = need!(Registry::start());
    need!(tool("skopeo"));
    let work = tempdir();
    let tar = layer_tar(&[("etc/data", &[42u8; 300_000]), ("etc/more", b"more\n")]);
    let dir = layout(&work.path().join("c"), |d| image(d, host_arch(), &tar, &gzip(&tar), "application/vnd.oci.image.layer.v1.tar+gzip"));
    skopeo(&["copy", "-q", "--dest-tls-verify=false", &format!("oci:{}:t", dir.display()), &format!("{}:t", reg.image("x/bad"))]).ok();
    let layer = reg.manifest("x/bad", "t")["layers"][0]["digest"].as_str().unwrap().to_owned();
    let file = reg.blob_file(&layer);
    let mut data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&file, &data).unwrap();

    let s = Store::new();
    pull(&s, &format!("{}:t", reg.image("x/bad")), &[]).plyroot_error(&[&layer, "corrupt"]);
    assert_eq!(s.layer_dir_entries(), 0, "a corrupt layer is not kept");
    let tmp = s.home.join("tmp");
    assert!(fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0, "no staging leftovers in {}", tmp.display());
}

#[test]
fn a_blob_that_is_not_its_digest_is_refused_before_it_is_unpacked() {
    let reg = need!(Registry::start());
    need!(tool("skopeo"));
    let prlimit = need!(tool("prlimit"));
    let work = tempdir();
    // A layer of 1 MiB that does not compress (so its blob is larger than the bomb below).
    let mut x: u32 = 12345;
    let noise: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let tar = layer_tar(&[("etc/noise", &noise)]);
    let dir = layout(&work.path().join("c"), |d| image(d, host_arch(), &tar, &gzip(&tar), "application/vnd.oci.image.layer.v1.tar+gzip"));
    skopeo(&["copy", "-q", "--dest-tls-verify=false", &format!("oci:{}:t", dir.display()), &format!("{}:t", reg.image("x/bomb"))]).ok();
    let layer = reg.manifest("x/bomb", "t")["layers"][0]["digest"].as_str().unwrap().to_owned();
    // The registry now serves, for that digest, a small gzip that expands to 64 MiB.
    let bomb = gzip(&layer_tar(&[("etc/zeros", &vec![0u8; 64 << 20])]));
    assert!(bomb.len() < 1 << 20);
    fs::write(reg.blob_file(&layer), &bomb).unwrap();
    // With files limited to 8 MiB, unpacking it would fail on the first large write (EFBIG, or
    // SIGXFSZ): the digest must be checked before.
    let s = Store::new();
    let mut c = std::process::Command::new(prlimit);
    c.arg("--fsize=8388608:8388608").arg(bin()).args(["import", "--insecure", &format!("{}:t", reg.image("x/bomb"))]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
    let out = run_with(&mut c, None, TIMEOUT);
    out.plyroot_error(&[&layer, "corrupt"]);
    assert_eq!(s.layer_dir_entries(), 0, "a corrupt layer is not kept");
    let tmp = s.home.join("tmp");
    assert!(fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0, "no staging leftovers in {}", tmp.display());
}

/// A proxy in front of the registry that forwards everything, except that a response whose
/// request line contains `stall` stops after `after` bytes and then hangs. It forwards one
/// request per connection, and asks the registry to close after it (so the client does not
/// reuse the connection).
fn stalling_proxy(registry: u16, stall: String, after: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut client) = conn else { continue };
            let stall = stall.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", registry)) else { return };
                let text = String::from_utf8_lossy(&head[..head.len() - 2]).into_owned();
                let kept: String = text.split_inclusive("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
                upstream.write_all(format!("{kept}Connection: close\r\n\r\n").as_bytes()).unwrap();
                let first = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned();
                let limit = if first.contains(&stall) { after } else { usize::MAX };
                let mut sent = 0;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = upstream.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let n = n.min(limit - sent);
                    if client.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    sent += n;
                    if sent >= limit {
                        std::thread::sleep(Duration::from_secs(600));
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn an_interrupted_pull_keeps_finished_layers_and_resumes() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let reg = need!(Registry::start());
    let s = Store::new();
    let ids = need!(two_layer_env(&s, 4 << 20));
    s.plyroot(&["push", "--insecure", "t", &format!("{}:v1", reg.image("x/big"))]).ok();
    let second = reg.manifest("x/big", "v1")["layers"][1]["digest"].as_str().unwrap().to_owned();
    let proxy = stalling_proxy(reg.port, format!("/blobs/{second}"), 1 << 20);

    // Pull through the proxy: the first layer completes, the second hangs half-way; kill -9.
    let fresh = Store::new();
    let mut cmd = fresh.cmd(&["import", "--insecure", &format!("docker://127.0.0.1:{proxy}/x/big:v1")]);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let tmp = fresh.home.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    // The second blob downloads into an unnamed file in the store's tmp/ before anything of it is
    // unpacked: the pull holds it open (`tmp/#N (deleted)`).
    let pid = child.id();
    let downloading = |dir: &Path| {
        fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|l| l.starts_with(dir) && l.to_string_lossy().ends_with("(deleted)")))).unwrap_or(false)
    };
    while !(fresh.layer_dir_entries() == 1 && downloading(&tmp)) {
        assert!(Instant::now() < deadline, "the pull did not reach the second layer");
        assert!(child.try_wait().unwrap().is_none(), "the pull ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(fresh.layer_ids(), [ids[0].clone()].into_iter().collect(), "the finished layer is kept, the partial one is not a layer");
    fresh.plyroot(&["verify"]).ok();

    // Again, straight from the registry: only the missing layer is downloaded.
    let out = pull(&fresh, &format!("{}:v1", reg.image("x/big")), &[]).ok();
    assert_eq!(out.lines(), ids, "{out}");
    assert!(out.stderr.contains("1 downloaded") && out.stderr.contains("1 already in the store"), "{out}");
    assert_eq!(fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0), 0, "the killed pull's staging directory is gone");
    fresh.plyroot(&["verify"]).ok();
}

#[test]
fn debootstrap_builds_a_root_with_mmdebstrap() {
    need!(tool("mmdebstrap"));
    let s = Store::new();
    let src = "debootstrap:bookworm?variant=extract&include=busybox-static";
    if me().regime == Regime::NoSubIds {
        // mmdebstrap's unshare mode maps a subordinate range: without one, a clear error.
        s.plyroot(&["import", src]).plyroot_error(&["subordinate ids", "/etc/subuid", "mmdebstrap"]);
        assert_eq!(s.layer_dir_entries(), 0);
        return;
    }
    let out = s.plyroot(&["import", src]);
    if out.code != 0 && (out.stderr.contains("Temporary failure resolving") || out.stderr.contains("Could not resolve") || out.stderr.contains("Failed to fetch")) {
        need!(Err::<(), _>(format!("the Debian mirror is unreachable: {out}")));
    }
    let id = out.ok().line();
    assert_layer_id(&id);
    let root = s.home.join("layers").join(id.trim_start_matches("sha256:")).join("root");
    assert!(root.join("bin/busybox").is_file(), "busybox-static is in the root");
    assert!(root.join("var/lib/dpkg").is_dir() || root.join("usr/share/doc/busybox-static").is_dir());
    s.plyroot(&["verify"]).ok();
    // A bad option is named before anything runs.
    s.plyroot(&["import", "debootstrap:bookworm?colour=blue"]).plyroot_error(&["colour"]);
}

#[test]
fn debootstrap_shows_the_tools_progress_and_the_cause_of_a_failure() {
    // A mistyped suite: the mirror answers 404 for its Release file. That line, not only the
    // tool's last one (`E: mmdebstrap failed to run`), must reach the user.
    need!(tool("mmdebstrap"));
    if me().regime == Regime::NoSubIds {
        return; // refused before mmdebstrap runs (debootstrap_builds_a_root_with_mmdebstrap)
    }
    let s = Store::new();
    let src = "debootstrap:bookwrom?variant=minbase";
    let unreachable = |out: &Out| ["Temporary failure resolving", "Could not resolve", "Failed to fetch", "Could not connect"].iter().any(|n| out.stderr.contains(n));
    // Not on a terminal: the tool's output is kept, and its last lines quoted under the error.
    let out = s.plyroot(&["import", src]);
    if unreachable(&out) {
        need!(Err::<(), _>(format!("the Debian mirror is unreachable: {out}")));
    }
    let out = out.plyroot_error(&["bookwrom", "its last lines are above"]);
    assert!(out.stderr.contains("404") || out.stderr.contains("does not have a Release file"), "the cause is not shown: {out}");
    // Quoted (indented) under the error, not passed through as it ran.
    let passed_through = |text: &str| text.lines().any(|l| l.trim_start_matches('\r').starts_with("I: running apt-get update") || l.contains("\x1b[32mI: running"));
    assert!(!passed_through(&out.stderr), "the tool's output was passed through: {out}");
    assert_eq!(s.layer_dir_entries(), 0);
    // -v: the tool's progress as it goes, and the cause.
    let out = s.plyroot(&["-v", "import", src]).plyroot_error(&["bookwrom", "its output is above"]);
    assert!(passed_through(&out.stderr), "no progress with -v: {out}");
    assert!(out.stderr.contains("404") || out.stderr.contains("does not have a Release file"), "{out}");
    // On a terminal (script(1) gives it one): the progress too, without -v.
    let Some(script) = which("script") else { return };
    let cmd = format!("{} import {}", shell_quote(&bin().to_string_lossy()), shell_quote(src));
    let mut c = std::process::Command::new(script);
    c.args(["-qec", &cmd, "/dev/null"]).env("PLYROOT_HOME", &s.home).current_dir(s.tmp.path());
    let out = run_with(&mut c, None, TIMEOUT);
    assert!(passed_through(&out.stdout) && out.stdout.contains("its output is above"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Through a proxy
// ---------------------------------------------------------------------------------------------

/// The registry's name in the proxy tests: it resolves only inside the proxy's own mount
/// namespace (its /etc/hosts), so a request that bypasses the proxy cannot reach the registry.
const PROXIED_NAME: &str = "registry.plyroot.test";

/// A tinyproxy on loopback, per test, in a user and mount namespace of its own whose /etc/hosts
/// names [`PROXIED_NAME`] as 127.0.0.1. Its log records every CONNECT.
struct Tinyproxy {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Tinyproxy {
    fn start() -> Result<Tinyproxy, String> {
        let bin = tool("tinyproxy")?;
        let unshare = tool("unshare")?;
        userns()?;
        let dir = tempdir();
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {PROXIED_NAME}\n")).unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("tinyproxy.conf");
            // No ConnectPort line: CONNECT to any port (the registry's is random).
            let text = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 20\nAllow 127.0.0.1\n",
                dir.path().join("log").display()
            );
            fs::write(&conf, text).unwrap();
            let out = fs::File::create(dir.path().join("out")).unwrap();
            let script = format!("mount --bind {} /etc/hosts && exec {} -d -c {}", hosts.display(), bin.display(), conf.display());
            let mut child = Command::new(&unshare)
                .args(["-rm", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .map_err(|e| format!("cannot start tinyproxy: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Tinyproxy { child, port, dir });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last = fs::read_to_string(dir.path().join("out")).unwrap_or_default();
        }
        Err(format!("tinyproxy did not come up; its output:\n{last}"))
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The tunnels the proxy opened to `host:port`.
    fn connects(&self, host_port: &str) -> usize {
        let log = fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("CONNECT {host_port} HTTP/1.1"))).count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `plyroot ARGS` with no proxy setting but `vars`.
fn with_proxy_env(s: &Store, args: &[&str], vars: &[(&str, &str)]) -> Out {
    let mut cmd = s.cmd(args);
    for v in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(v);
    }
    cmd.envs(vars.iter().copied());
    run_with(&mut cmd, None, TIMEOUT)
}

#[test]
fn pushes_and_pulls_through_a_proxy_and_no_proxy_goes_direct() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let reg = need!(Registry::start());
    let proxy = need!(Tinyproxy::start());
    let s = Store::new();
    let ids = need!(two_layer_env(&s, 64 * 1024));
    let host_port = format!("{PROXIED_NAME}:{}", reg.port);
    let target = format!("docker://{host_port}/x/proxied:v1");

    // Without a proxy the name does not resolve: nothing below can pass by going direct.
    with_proxy_env(&s, &["push", "--insecure", "t", &target], &[]).plyroot_error(&["cannot resolve", PROXIED_NAME]);
    assert_eq!(proxy.connects(&host_port), 0);

    let out = with_proxy_env(&s, &["-v", "push", "--insecure", "t", &target], &[("HTTP_PROXY", &proxy.url())]).ok();
    assert_layer_id(&out.line());
    assert!(out.stderr.contains("2 uploaded"), "{out}");
    assert!(out.stderr.contains("pushed; 1 thread(s)"), "the push left one thread: {out}");
    let pushed = proxy.connects(&host_port);
    assert!(pushed >= 1, "the push went through the proxy");

    // A pull (lower-case variable) goes through it on one connection: manifest, config and both
    // layers on one tunnel.
    let fresh = Store::new();
    let out = with_proxy_env(&fresh, &["-v", "import", "--insecure", &target], &[("http_proxy", &proxy.url())]).ok();
    assert_eq!(out.lines(), ids, "{out}");
    assert!(out.stderr.contains("2 downloaded"), "{out}");
    assert!(out.stderr.contains("pulled; 1 thread(s)"), "the pull left one thread: {out}");
    assert_eq!(proxy.connects(&host_port), pushed + 1, "one tunnel for the whole pull");

    // HTTPS_PROXY is for https:// registries; an http:// one is not sent to it.
    with_proxy_env(&Store::new(), &["import", "--insecure", &target], &[("HTTPS_PROXY", &proxy.url())]).plyroot_error(&["cannot resolve", PROXIED_NAME]);
    // NO_PROXY sends the registry direct, where its name does not resolve.
    for no_proxy in [PROXIED_NAME, ".plyroot.test", &host_port, "*"] {
        with_proxy_env(&Store::new(), &["import", "--insecure", &target], &[("HTTP_PROXY", &proxy.url()), ("NO_PROXY", no_proxy)]).plyroot_error(&["cannot resolve", PROXIED_NAME]);
    }
    // ALL_PROXY is the fallback, and a NO_PROXY entry for another port does not apply.
    let out = with_proxy_env(&Store::new(), &["import", "--insecure", &target], &[("ALL_PROXY", &proxy.url()), ("no_proxy", &format!("{PROXIED_NAME}:1"))]).ok();
    assert_eq!(out.lines(), ids, "{out}");
    assert_eq!(proxy.connects(&host_port), pushed + 2);
    // A proxy that is not there is named, with what to do.
    let dead = format!("http://127.0.0.1:{}", free_port());
    with_proxy_env(&Store::new(), &["import", "--insecure", &target], &[("HTTP_PROXY", &dead)]).plyroot_error(&["proxy", &dead, "HTTP_PROXY", "NO_PROXY"]);
}

// ---------------------------------------------------------------------------------------------
// Credential helpers
// ---------------------------------------------------------------------------------------------

/// The user and password of [`Registry::start_with`] in the helper test (bcrypt, cost 4).
const HELPER_USER: &str = "plyci";
const HELPER_PASSWORD: &str = "plyroot-secret";
const HELPER_HTPASSWD: &str = "plyci:$2b$04$YHZmee5t4EFo1tZthmNOse6KdKGc2J.JK6fMchqh1SJH8HJJu7vh2";

/// A directory for PATH with `docker-credential-NAME` scripts: each logs the server it was asked
/// for to `asked-NAME` and answers the credentials it was given for `server`, else "credentials
/// not found" with status 1, as docker's helpers do.
fn helpers(dir: &Path, helpers: &[(&str, &str, &str, &str)]) -> PathBuf {
    let bin = dir.join("helpers");
    fs::create_dir_all(&bin).unwrap();
    for (name, server, user, secret) in helpers {
        let log = dir.join(format!("asked-{name}"));
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\necho \"$server\" >> {log}\nif [ \"$server\" = \"{server}\" ]; then\n  printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            log = log.display()
        );
        let path = bin.join(format!("docker-credential-{name}"));
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    bin
}

/// `plyroot ARGS` with only `config` (docker's config.json) for credentials and `helpers` first
/// on PATH.
fn with_docker_config(s: &Store, args: &[&str], config: &str, helpers: &Path) -> Out {
    let dir = s.path("docker-config");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), config).unwrap();
    let mut cmd = s.cmd(args);
    for v in ["REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"] {
        cmd.env_remove(v);
    }
    let path = format!("{}:{}", helpers.display(), std::env::var("PATH").unwrap_or_default());
    cmd.env("HOME", s.path("home")).env("DOCKER_CONFIG", &dir).env("PATH", path);
    run_with(&mut cmd, None, TIMEOUT)
}

#[test]
fn credential_helpers_log_in_for_push_and_pull() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let reg = need!(Registry::start_with(Some(HELPER_HTPASSWD)));
    let s = Store::new();
    let ids = need!(two_layer_env(&s, 16 * 1024));
    let work = tempdir();
    let host = reg.host();
    let bin = helpers(work.path(), &[("plystore", &host, HELPER_USER, HELPER_PASSWORD), ("plyhelper", &host, HELPER_USER, HELPER_PASSWORD), ("plywrong", &host, HELPER_USER, "wrong"), ("plyempty", "elsewhere", "x", "y")]);
    let target = format!("{}:v1", reg.image("x/private"));
    let asked = |name: &str| fs::read_to_string(work.path().join(format!("asked-{name}"))).unwrap_or_default();

    // credsStore: the helper is asked for the registry, and its credentials push.
    let out = with_docker_config(&s, &["push", "--insecure", "t", &target], r#"{"credsStore":"plystore"}"#, &bin).ok();
    assert!(out.stderr.contains("2 uploaded"), "{out}");
    assert_eq!(asked("plystore").lines().collect::<Vec<_>>(), [host.as_str()], "asked once, for host:port");

    // credHelpers names the registry's own helper, which wins over credsStore.
    let config = format!(r#"{{"credsStore":"plywrong","credHelpers":{{"{host}":"plyhelper"}}}}"#);
    let fresh = Store::new();
    assert_eq!(with_docker_config(&fresh, &["import", "--insecure", &target], &config, &bin).ok().lines(), ids);
    assert!(asked("plyhelper").contains(&host) && asked("plywrong").is_empty());

    // Credentials the registry refuses, a helper with nothing for it, a helper that is not
    // there: the registry's refusal, with what to do.
    with_docker_config(&Store::new(), &["import", "--insecure", &target], r#"{"credsStore":"plywrong"}"#, &bin).plyroot_error(&[&host, "401", "docker login"]);
    with_docker_config(&Store::new(), &["import", "--insecure", &target], r#"{"credsStore":"plyempty"}"#, &bin).plyroot_error(&[&host, "docker login"]);
    let out = with_docker_config(&Store::new(), &["import", "--insecure", &target], r#"{"credsStore":"plymissing"}"#, &bin);
    assert!(out.stderr.contains("docker-credential-plymissing"), "a missing helper is named: {out}");
    out.plyroot_error(&[&host, "docker login"]);
}

// ---------------------------------------------------------------------------------------------
// A registry that refuses an upload
// ---------------------------------------------------------------------------------------------

/// A registry on loopback that takes a push up to the first blob upload and then refuses it:
/// HEAD of a blob is 404, POST opens an upload session, and the PUT of the blob is answered with
/// `status` and the connection closed. With `read` 0 it answers as soon as it has the headers (a
/// client that sent `Expect: 100-continue` gets the answer before sending the body); otherwise
/// it says `100 Continue`, reads `read` bytes of the body and answers without reading the rest,
/// so the client's write fails. An empty `status` closes without an answer. Returns its port and
/// the request lines it saw.
fn refusing_registry(status: &'static str, read: usize) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    serve(move |head, _, r| {
        let first = head.lines().next().unwrap_or("");
        let header = |name: &str| head.lines().find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned()));
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if first.starts_with("PUT ") && first.contains("/blobs/uploads/") {
            if read > 0 {
                if header("expect").is_some() {
                    let _ = r.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                let mut body = vec![0u8; read.min(len)];
                let _ = r.read_exact(&mut body);
            }
            let text = format!("{{\"errors\":[{{\"code\":\"DENIED\",\"message\":\"refused by the test registry ({status})\"}}]}}");
            if !status.is_empty() {
                let _ = r.get_mut().write_all(format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len()).as_bytes());
            }
            let _ = r.get_mut().shutdown(std::net::Shutdown::Both);
            return false;
        }
        let mut body = vec![0u8; len];
        let _ = r.read_exact(&mut body);
        let answer = if first.starts_with("POST ") && first.contains("/blobs/uploads/") {
            "HTTP/1.1 202 Accepted\r\nLocation: /v2/x/refused/blobs/uploads/u1\r\nContent-Length: 0\r\n\r\n"
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        };
        r.get_mut().write_all(answer.as_bytes()).is_ok()
    })
}

/// A server on loopback that reads each request's head, records it (headers included), and hands
/// it with its own port and the connection to `handle`, which answers as it likes; `false` ends
/// the connection. The one loop under the test servers below.
fn serve(handle: impl Fn(&str, u16, &mut std::io::BufReader<TcpStream>) -> bool + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    serve_on(TcpListener::bind("127.0.0.1:0").unwrap(), handle)
}

/// [`serve`] on a listener the caller made (with socket options of its own).
fn serve_on(l: TcpListener, handle: impl Fn(&str, u16, &mut std::io::BufReader<TcpStream>) -> bool + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let port = l.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let handle = std::sync::Arc::new(handle);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(stream) = conn else { continue };
            let (log, handle) = (log.clone(), handle.clone());
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    log.lock().unwrap().push(head.clone());
                    if !handle(&head, port, &mut r) {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// The other half of the rule: the broken pipe of a stdout whose reader is gone is no error.
#[test]
fn a_closed_stdout_still_ends_quietly() {
    let s = Store::new();
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let out = s.cmd(&["list", "--json"]).stdin(Stdio::null()).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_refused_upload_fails_the_push_with_the_registry_status() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let s = Store::new();
    // Layers larger than socket buffers, so that a write into a closed connection fails.
    need!(two_layer_env(&s, 8 << 20));
    // With the status before the body (Expect: 100-continue), the status is reported; after part
    // of the body, the status if it arrived before the connection was reset, else what happened.
    for (status, read, needles, either) in [
        ("413 Payload Too Large", 0, vec!["413", "DENIED", "uploading the blob"], ["413", "413"]),
        ("401 Unauthorized", 0, vec!["401", "uploading the blob"], ["401", "401"]),
        ("403 Forbidden", 64 * 1024, vec!["uploading the blob"], ["403", "closed the connection"]),
        ("", 64 * 1024, vec!["uploading the blob"], ["closed the connection", "closed the connection"]),
    ] {
        let (port, seen) = refusing_registry(status, read);
        let out = s.plyroot(&["push", "--insecure", "t", &format!("docker://127.0.0.1:{port}/x/refused:v1")]);
        assert_eq!(out.code, 125, "a refused push fails ({status}): {out}");
        assert!(out.stdout.is_empty(), "no digest for a push that did not happen: {out}");
        assert!(!out.stderr.contains("pushed '"), "{out}");
        assert!(either.iter().any(|e| out.stderr.contains(e)), "{either:?}: {out}");
        out.plyroot_error(&needles);
        assert!(seen.lock().unwrap().iter().any(|l| l.starts_with("PUT /v2/x/refused/blobs/uploads/u1?digest=sha256%3A")), "the upload was tried: {:?}", seen.lock().unwrap());
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials stay with their registry
// ---------------------------------------------------------------------------------------------

/// A server on loopback that answers every request with `answer(request head, its own port)`
/// (keeping the connection) and records each request's head, headers included.
fn scripted_server(answer: impl Fn(&str, u16) -> String + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    scripted_server_bytes(move |head, port| answer(head, port).into_bytes())
}

/// [`scripted_server`] whose answers are bytes (binary blobs, raw bytes in headers).
fn scripted_server_bytes(answer: impl Fn(&str, u16) -> Vec<u8> + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    serve(move |head, port, r| {
        let len: usize = head.lines().find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.trim().parse().ok())).unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = r.read_exact(&mut body);
        let reply = answer(head, port);
        if r.get_mut().write_all(&reply).is_err() {
            return false;
        }
        // An answer that says `Connection: close` ends its connection (a body cut short).
        let end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(reply.len());
        if String::from_utf8_lossy(&reply[..end]).to_ascii_lowercase().contains("\r\nconnection: close") {
            let _ = r.get_mut().shutdown(std::net::Shutdown::Both);
            return false;
        }
        true
    })
}

const STORED_AUTH: &str = "dXNlcjpzdG9yZWQtcGFzc3dvcmQ="; // base64("user:stored-password")

/// docker's config.json with the stored password for the registry on `port`.
fn stored_auth(port: u16) -> String {
    format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"{STORED_AUTH}"}}}}}}"#)
}

#[test]
fn a_401_from_where_a_redirect_led_gets_no_credentials() {
    // Where the registry's redirect leads: it asks for a bearer token from a realm on itself.
    let (evil, evil_seen) = scripted_server(|head, port| {
        if head.starts_with("GET /token") {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"token\":\"abc\"}".to_owned()
        } else {
            format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"evil\"\r\nContent-Length: 0\r\n\r\n")
        }
    });
    let (reg, _) = scripted_server(move |_, _| format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{evil}/storage/blob\r\nContent-Length: 0\r\n\r\n"));
    let s = Store::new();
    let out = with_docker_config(&s, &["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/y:t")], &stored_auth(reg), &s.path("no-helpers"));
    out.plyroot_error(&["401"]);
    let seen = evil_seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the redirect was followed");
    for head in &seen {
        assert!(!head.to_ascii_lowercase().contains("authorization"), "no credential reached another origin: {head}");
        assert!(!head.starts_with("GET /token"), "no token was asked of a realm the registry did not name: {head}");
    }
}

#[test]
fn stored_credentials_go_to_a_plain_http_realm_only_on_the_registry_origin() {
    // The registry names a token service on another port, over plain HTTP.
    let (realm, realm_seen) = scripted_server(|_, _| "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"token\":\"anon\"}".to_owned());
    let challenge = move |head: &str, port: u16| {
        if head.to_ascii_lowercase().contains("authorization: bearer") {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
        } else if head.starts_with("GET /token") {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"token\":\"own\"}".to_owned()
        } else {
            let at = if head.contains("/x/own/") { port } else { realm };
            format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{at}/token\",service=\"reg\"\r\nContent-Length: 0\r\n\r\n")
        }
    };
    let (reg, reg_seen) = scripted_server(challenge);
    let s = Store::new();
    let out = with_docker_config(&s, &["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/other:t")], &stored_auth(reg), &s.path("no-helpers"));
    let out = out.plyroot_error(&["404"]);
    assert!(out.stderr.contains("without the stored credentials"), "it says why: {out}");
    let seen = realm_seen.lock().unwrap().clone();
    assert!(seen.len() == 1 && seen[0].starts_with("GET /token"), "a token was asked for: {seen:?}");
    assert!(!seen[0].to_ascii_lowercase().contains("authorization"), "but without the password: {seen:?}");
    // A realm on the registry's own origin gets them.
    let out = with_docker_config(&s, &["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/own:t")], &stored_auth(reg), &s.path("no-helpers"));
    out.plyroot_error(&["404"]);
    let seen = reg_seen.lock().unwrap().clone();
    assert!(seen.iter().any(|h| h.starts_with("GET /token") && h.contains(&format!("uthorization: Basic {STORED_AUTH}"))), "{seen:?}");
}

#[test]
fn redirect_targets_are_urls_with_a_scheme_in_any_case() {
    let (reg, seen) = scripted_server(|head, port| {
        let to = if head.starts_with("GET /v2/x/file/") {
            "file:///etc/passwd".to_owned()
        } else if head.starts_with("GET /v2/x/upper/") {
            format!("HTTP://127.0.0.1:{port}/elsewhere")
        } else {
            return "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned();
        };
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n")
    });
    let s = Store::new();
    s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/file:t")]).plyroot_error(&["file:///etc/passwd", "http:// or https:// only"]);
    s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/upper:t")]).plyroot_error(&["404"]);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|h| h.starts_with("GET /elsewhere ")), "HTTP:// is a scheme, not a relative path: {seen:?}");
    assert!(!seen.iter().any(|h| h.contains("passwd")), "{seen:?}");
}

#[test]
fn a_layer_without_a_size_is_refused_before_any_download() {
    let layer = format!("sha256:{}", "a".repeat(64));
    let config = serde_json::to_vec(&serde_json::json!({ "architecture": host_arch(), "os": "linux", "rootfs": { "type": "layers", "diff_ids": [layer] } })).unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_string(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer }],
    }))
    .unwrap();
    let config_path = format!("GET /v2/x/nosize/blobs/{config_digest} ");
    let (reg, seen) = scripted_server(move |head, _| {
        let (ty, body) = if head.starts_with("GET /v2/x/nosize/manifests/t ") {
            ("application/vnd.oci.image.manifest.v1+json", manifest.clone())
        } else if head.starts_with(&config_path) {
            ("application/octet-stream", String::from_utf8(config.clone()).unwrap())
        } else {
            // The layer: endless, were it asked for.
            return "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n".to_owned() + &"x".repeat(1 << 20);
        };
        format!("HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    });
    let s = Store::new();
    s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/nosize:t")]).plyroot_error(&["no size", "sha256:aaaa"]);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|h| h.contains(&"a".repeat(64))), "the layer was never asked for: {seen:?}");
    assert_eq!(s.layer_dir_entries(), 0);
}

#[test]
fn a_token_with_a_line_break_never_becomes_a_header() {
    let (reg, seen) = scripted_server(|head, port| {
        if head.starts_with("GET /token") {
            let body = r#"{"token":"abc\r\nX-Injected: yes"}"#;
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        } else {
            format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg\"\r\nContent-Length: 0\r\n\r\n")
        }
    });
    let s = Store::new();
    s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/y:t")]).plyroot_error(&["token", "control characters"]);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|h| h.starts_with("GET /token")), "{seen:?}");
    assert!(!seen.iter().any(|h| h.to_ascii_lowercase().contains("x-injected")), "no injected header: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// A registry that serves one hand-made image, and misbehaves on demand
// ---------------------------------------------------------------------------------------------

const MEDIA_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// An image of uncompressed layers (so each blob's digest is its diff_id), as a registry
/// serves it: the manifest's JSON, and every blob by digest.
struct Served {
    manifest: serde_json::Value,
    blobs: Vec<(String, Vec<u8>)>,
}

impl Served {
    fn new(layers: &[Vec<u8>]) -> Served {
        Served::stored(layers, MEDIA_TAR, |l| l.to_vec())
    }

    /// An image whose layers are stored as `compress(tar)`, of `media_type`.
    fn stored(layers: &[Vec<u8>], media_type: &str, compress: impl Fn(&[u8]) -> Vec<u8>) -> Served {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let layers: Vec<Vec<u8>> = layers.iter().map(|l| compress(l)).collect();
        let config = serde_json::to_vec(&serde_json::json!({ "architecture": host_arch(), "os": "linux", "config": {}, "rootfs": { "type": "layers", "diff_ids": diff_ids } })).unwrap();
        let mut blobs = vec![(sha256(&config), config.clone())];
        blobs.extend(layers.iter().map(|l| (sha256(l), l.clone())));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len() },
            "layers": layers.iter().map(|l| serde_json::json!({ "mediaType": media_type, "digest": sha256(l), "size": l.len() })).collect::<Vec<_>>(),
        });
        Served { manifest, blobs }
    }

    /// Serves it as `x/img:t` (any tag), each answer first offered to `tamper(request head,
    /// normal answer)`. Returns the port and the request heads seen.
    fn serve(self, tamper: impl Fn(&str, Vec<u8>) -> Vec<u8> + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let manifest = serde_json::to_vec(&self.manifest).unwrap();
        scripted_server_bytes(move |head, _| {
            let answer = |ty: &str, body: &[u8]| [format!("HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat();
            let normal = if head.starts_with("GET /v2/x/img/manifests/") {
                answer("application/vnd.oci.image.manifest.v1+json", &manifest)
            } else if let Some((_, b)) = self.blobs.iter().find(|(d, _)| head.starts_with(&format!("GET /v2/x/img/blobs/{d} "))) {
                answer("application/octet-stream", b)
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
            };
            tamper(head, normal)
        })
    }
}

/// Everything plyroot printed, checked for raw control characters: a registry's or an
/// archive's text reaches the terminal escaped.
fn no_raw_controls(out: &Out) {
    for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let bad: Vec<char> = text.chars().filter(|c| *c != '\n' && (c.is_control() || *c == '\u{202e}')).collect();
        assert!(bad.is_empty(), "raw control characters {bad:?} on {name}: {out}");
    }
}

#[test]
fn server_text_reaches_the_terminal_escaped() {
    const OSC: &str = "\x1b]0;owned\x07";
    const OSC_SHOWN: &str = "\\x1b]0;owned\\x07";
    let s = Store::new();
    let pull = |port: u16| s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{port}/x/img:t")]);

    // An error body: the registry's own words are shown, escaped (OSC, CSI, C1 CSI, a bidi override).
    let (reg, _) = scripted_server(|_, _| {
        let body = format!("{{\"errors\":[{{\"code\":\"DENIED\",\"message\":\"{OSC}title \x1b[8mhidden\x1b[0m \u{9b}2J \u{202e}desrever\"}}]}}");
        format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    });
    let out = pull(reg).plyroot_error(&["403", "DENIED", OSC_SHOWN, "\\x1b[8mhidden", "\\u{9b}2J", "\\u{202e}desrever"]);
    no_raw_controls(&out);

    // A Docker-Content-Digest with a C1 control (the only kind a header can carry: UTF-8 bytes
    // of the obs-text range): refused, and shown escaped.
    let tar = layer_tar(&[("etc/hello", b"hello\n")]);
    let (reg, _) = Served::new(std::slice::from_ref(&tar)).serve(|head, normal| {
        if head.starts_with("GET /v2/x/img/manifests/") {
            let text = normal.splitn(2, |b| *b == b'\n').collect::<Vec<_>>();
            [text[0], b"\nDocker-Content-Digest: sha256:\xc2\x9b2J\xc2\x9d0;owned\xc2\x9c\r\n", text[1]].concat()
        } else {
            normal
        }
    });
    let out = pull(reg).plyroot_error(&["Docker-Content-Digest", "sha256:\\u{9b}2J\\u{9d}0;owned\\u{9c}"]);
    no_raw_controls(&out);

    // A media type: named in the refusal, escaped.
    let mut served = Served::new(std::slice::from_ref(&tar));
    served.manifest["layers"][0]["mediaType"] = format!("application/x{OSC}").into();
    let (reg, _) = served.serve(|_, normal| normal);
    let out = pull(reg).plyroot_error(&["media type", &format!("application/x{OSC_SHOWN}")]);
    no_raw_controls(&out);

    // An archive entry's name, and its hardlink target's, in an unpack error.
    let bad = RawTar::new().hardlink(&format!("etc/link{OSC}"), "etc/missing\x1b[2J").finish();
    let (reg, _) = Served::new(&[bad]).serve(|_, normal| normal);
    let out = pull(reg).plyroot_error(&[&format!("etc/link{OSC_SHOWN}"), "etc/missing\\x1b[2J"]);
    no_raw_controls(&out);
    assert_eq!(s.layer_dir_entries(), 0);
}

#[test]
fn an_image_without_layers_is_an_error_not_a_silent_nothing() {
    let (reg, _) = Served::new(&[]).serve(|_, normal| normal);
    let s = Store::new();
    let out = s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/img:t")]);
    let out = out.plyroot_error(&["no layers"]);
    assert!(out.stdout.is_empty(), "{out}");
    assert_eq!(s.layer_dir_entries(), 0);
}

#[test]
fn a_registry_name_that_is_not_a_host_and_port_is_refused() {
    let (reg, seen) = Served::new(&[layer_tar(&[("etc/hello", b"hello\n")])]).serve(|_, normal| normal);
    let s = Store::new();
    for bad in [format!("127.0.0.1?:{reg}"), format!("127.0.0.1#:{reg}"), format!("127.0.0.1:{reg}x"), "127.0.0.1:99999".to_owned(), "127.0.0.1:".to_owned(), "-bad.example".to_owned(), "a..b.example".to_owned()] {
        let out = s.plyroot(&["import", "--insecure", &format!("docker://{bad}/x/img:t")]);
        out.plyroot_error(&["invalid image reference", &bad, "registry"]);
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was asked of the registry: {:?}", seen.lock().unwrap());
    // The same registry written properly is reached.
    s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/img:t")]).ok();
    s.plyroot(&["import", "--insecure", &format!("docker://localhost:{reg}/x/img:t")]).ok();
}

#[test]
fn a_repeated_content_length_is_an_error() {
    let tar = layer_tar(&[("etc/hello", b"hello\n")]);
    for second in ["same", "other"] {
        let (reg, _) = Served::new(std::slice::from_ref(&tar)).serve(move |head, normal| {
            if !head.starts_with("GET /v2/x/img/manifests/") {
                return normal;
            }
            let text = String::from_utf8(normal).unwrap();
            let len = text.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().trim().parse::<usize>().unwrap();
            let extra = if second == "same" { len } else { len + 10 };
            text.replacen("\r\n\r\n", &format!("\r\nContent-Length: {extra}\r\n\r\n"), 1).into_bytes()
        });
        let s = Store::new();
        let out = s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/img:t")]).plyroot_error(&["malformed response"]);
        assert!(out.stderr.to_ascii_lowercase().contains("content-length"), "{second}: {out}");
        assert_eq!(s.layer_dir_entries(), 0);
    }
}

#[test]
fn a_body_cut_short_says_how_much_was_missing() {
    let tar = layer_tar(&[("etc/data", &[7u8; 20_000])]);
    let layer = sha256(&tar);
    let (reg, _) = Served::new(std::slice::from_ref(&tar)).serve(move |head, normal| {
        if head.contains(&format!("/blobs/{layer} ")) {
            // The whole head, then all but the last 423 bytes, then the connection closes.
            let split = normal.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            [&normal[..split], b"\r\nConnection: close\r\n\r\n", &normal[split + 4..normal.len() - 423]].concat()
        } else {
            normal
        }
    });
    let s = Store::new();
    let out = s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/img:t")]).plyroot_error(&["423 bytes"]);
    assert!(!out.stderr.contains("1844674407"), "no underflow: {out}");
    assert_eq!(s.layer_dir_entries(), 0);
}

/// A layer tar with one file carrying these pax `SCHILY.xattr.*` records.
fn tar_with_xattrs(xattrs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let records: Vec<(String, &[u8])> = xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
    b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("etc/attrs").unwrap();
    h.set_mode(0o644);
    h.set_size(3);
    h.set_mtime(MTIME as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, &b"abc"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn the_xattr_warning_names_the_attributes_not_set() {
    let tar = tar_with_xattrs(&[("user.overlay.origin", b"x"), ("trusted.plyroot-test", b"1"), ("user.plyroot-kept", b"2")]);
    let (reg, _) = Served::new(&[tar]).serve(|_, normal| normal);
    let s = Store::new();
    let out = s.plyroot(&["import", "--insecure", &format!("docker://127.0.0.1:{reg}/x/img:t")]).ok();
    let warning: Vec<&str> = out.stderr.lines().filter(|l| l.contains("attribute")).collect();
    assert!(!warning.is_empty(), "{out}");
    let warning = warning.join("\n");
    assert!(warning.contains("user.overlay.origin"), "the overlay attribute that was dropped is named: {out}");
    assert!(!warning.contains("security.capability"), "no attribute that was not there: {out}");
    assert!(!warning.contains("user.plyroot-kept"), "nor one that was set: {out}");
    // trusted.* is set by real root, kept in the layer's metadata for everyone else.
    let real_root = me().regime == Regime::Root;
    assert_eq!(warning.contains("trusted.plyroot-test"), !real_root, "{out}");
}

#[test]
fn a_layer_that_expands_past_its_bound_stops_and_leaves_nothing() {
    let prlimit = need!(tool("prlimit"));
    // A valid layer, digests and all, whose 64 MiB of zeros gzip to about 64 KiB.
    let tar = layer_tar(&[("etc/zeros", &vec![0u8; 64 << 20])]);
    let served = Served::stored(std::slice::from_ref(&tar), "application/vnd.oci.image.layer.v1.tar+gzip", gzip);
    let blob_size = served.manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(blob_size < 1 << 20, "{blob_size}");
    let (reg, _) = served.serve(|_, normal| normal);
    let image = format!("docker://127.0.0.1:{reg}/x/img:t");
    // Bounded at 8 MiB, and with files limited to 16 MiB: the bound must stop it before the
    // whole file is written (which would fail with EFBIG or SIGXFSZ instead).
    let s = Store::new();
    let mut c = std::process::Command::new(&prlimit);
    c.arg("--fsize=16777216:16777216").arg(bin()).args(["import", "--insecure", &image]).env("PLYROOT_HOME", &s.home).env("PLYROOT_MAX_LAYER_SIZE", "8M").current_dir(s.tmp.path());
    let out = run_with(&mut c, None, TIMEOUT).plyroot_error(&["layer 1/1", "expands to more than 8.0 MiB", "PLYROOT_MAX_LAYER_SIZE", "nothing of it is kept"]);
    assert_eq!(s.layer_dir_entries(), 0, "{out}");
    let tmp = s.home.join("tmp");
    assert!(fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0, "no staging leftovers in {}", tmp.display());
    // A bound it fits under, and the default (1000 times the blob, at least 1 GiB), let it in.
    let mut c = s.cmd(&["import", "--insecure", &image]);
    c.env("PLYROOT_MAX_LAYER_SIZE", "65M");
    let id = run_with(&mut c, None, TIMEOUT).ok().line();
    assert_eq!(s.plyroot(&["import", "--insecure", &image]).ok().line(), id);
    let s2 = Store::new();
    assert_eq!(s2.plyroot(&["import", "--insecure", &image]).ok().line(), id);
    // A bound that is no size is an error that names the variable.
    let s3 = Store::new();
    let mut c = s3.cmd(&["import", "--insecure", &image]);
    c.env("PLYROOT_MAX_LAYER_SIZE", "lots");
    run_with(&mut c, None, TIMEOUT).plyroot_error(&["PLYROOT_MAX_LAYER_SIZE=lots", "not a size"]);
}

// ---------------------------------------------------------------------------------------------
// Every transfer ends, and says why
// ---------------------------------------------------------------------------------------------

/// A server on loopback that hands each request (its head, and its own port) to `answer`, which
/// writes to the connection as it likes, for as long as it likes; `false` closes the connection.
fn streaming_server(answer: impl Fn(&str, u16, &mut TcpStream) -> bool + Send + Sync + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    serve(move |head, port, r| {
        if !answer(head, port, r.get_mut()) {
            let _ = r.get_mut().shutdown(std::net::Shutdown::Both);
            return false;
        }
        true
    })
}

/// `plyroot import --insecure IMAGE` with the deadlines `vars` set; it must end within a minute
/// (the default deadlines are minutes: a test that waits for them fails here).
fn import_with_deadlines(image: &str, vars: &[(&str, &str)]) -> (Out, Duration) {
    let s = Store::new();
    let mut c = s.cmd(&["import", "--insecure", image]);
    for (k, v) in vars {
        c.env(k, v);
    }
    let start = Instant::now();
    let out = run_with(&mut c, None, Duration::from_secs(60));
    assert_eq!(s.layer_dir_entries(), 0, "{out}");
    (out, start.elapsed())
}

/// Writes `chunk` every 100 ms until the client goes away.
fn babble(s: &mut TcpStream, chunk: &[u8]) -> bool {
    while s.write_all(chunk).is_ok() {
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_silent_registry_ends_within_the_idle_deadline_and_says_so() {
    let layer = layer_tar(&[("etc/silent", &[7u8; 200_000])]);
    let served = Served::new(std::slice::from_ref(&layer));
    let digest = sha256(&layer);
    // Silent before its answer (the manifest), and in the middle of a body (the layer).
    for silent_at in ["manifests", "blobs/sha256"] {
        let (port, seen) = {
            let manifest = serde_json::to_vec(&served.manifest).unwrap();
            let blobs = served.blobs.clone();
            let layer_digest = digest.clone();
            streaming_server(move |head, _, s| {
                let answer = |ty: &str, body: &[u8]| [format!("HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat();
                if head.starts_with("GET /v2/x/img/manifests/") {
                    if silent_at == "manifests" {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    return s.write_all(&answer("application/vnd.oci.image.manifest.v1+json", &manifest)).is_ok();
                }
                let Some((d, b)) = blobs.iter().find(|(d, _)| head.starts_with(&format!("GET /v2/x/img/blobs/{d} "))) else {
                    return s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_ok();
                };
                let whole = answer("application/octet-stream", b);
                if *d == layer_digest {
                    // Headers and half the body, then nothing.
                    let _ = s.write_all(&whole[..whole.len() - b.len() / 2]);
                    std::thread::sleep(Duration::from_secs(3600));
                }
                s.write_all(&whole).is_ok()
            })
        };
        let image = format!("docker://127.0.0.1:{port}/x/img:t");
        let (out, took) = import_with_deadlines(&image, &[("PLYROOT_IDLE_TIMEOUT", "2")]);
        let out = out.plyroot_error(&[&format!("no progress from 127.0.0.1:{port} for 2 s")]);
        assert!(took < Duration::from_secs(20), "{silent_at}: it ended at the deadline, not long after: {took:?} {out}");
        assert!(!out.stderr.contains("os error"), "what happened, not an errno: {out}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().any(|h| h.contains(&digest)), silent_at != "manifests", "{seen:?}");
    }
}

#[test]
fn endless_trailers_extensions_interim_responses_and_trickles_end_at_their_deadlines() {
    let served = Served::new(&[layer_tar(&[("etc/x", b"x\n")])]);
    let manifest = serde_json::to_vec(&served.manifest).unwrap();
    let (port, _) = streaming_server(move |head, _, s| {
        if head.starts_with("GET /v2/x/trailers/manifests/") {
            // The whole manifest in one chunk, its last chunk, then trailer lines forever.
            let start = [format!("HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", manifest.len()).as_bytes(), &manifest, b"\r\n0\r\n"].concat();
            return s.write_all(&start).is_ok() && babble(s, b"X-Trailer: more\r\n");
        }
        if head.starts_with("GET /v2/x/continue/manifests/") {
            return babble(s, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if head.starts_with("GET /v2/x/extension/manifests/") {
            // A chunk-size line that never ends: its extension goes on forever.
            return s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=").is_ok() && babble(s, b"aaaaaaaaaaaaaaaa");
        }
        if head.starts_with("GET /v2/x/trickle/manifests/") {
            // A byte every 100 ms: moving, but far below 1 KiB/s.
            return s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n").is_ok() && babble(s, b"{");
        }
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_ok()
    });
    let (out, took) = import_with_deadlines(&format!("docker://127.0.0.1:{port}/x/trailers:t"), &[("PLYROOT_IDLE_TIMEOUT", "2")]);
    let out = out.plyroot_error(&[&format!("no progress from 127.0.0.1:{port} for 2 s")]);
    assert!(took < Duration::from_secs(20), "{took:?} {out}");
    let (out, took) = import_with_deadlines(&format!("docker://127.0.0.1:{port}/x/extension:t"), &[("PLYROOT_IDLE_TIMEOUT", "2")]);
    let out = out.plyroot_error(&[&format!("no progress from 127.0.0.1:{port} for 2 s")]);
    assert!(took < Duration::from_secs(20), "{took:?} {out}");
    let (out, took) = import_with_deadlines(&format!("docker://127.0.0.1:{port}/x/trickle:t"), &[("PLYROOT_RATE_WINDOW", "2")]);
    let out = out.plyroot_error(&[&format!("127.0.0.1:{port} sent"), "less than 1 KiB/s"]);
    assert!(took < Duration::from_secs(20), "{took:?} {out}");
    let (out, took) = import_with_deadlines(&format!("docker://127.0.0.1:{port}/x/continue:t"), &[("PLYROOT_HEAD_TIMEOUT", "2")]);
    let out = out.plyroot_error(&[&format!("no complete response from 127.0.0.1:{port} within 2 s")]);
    assert!(took < Duration::from_secs(20), "{took:?} {out}");
    // A deadline that is no number of seconds is said, and the default used.
    let (out, _) = import_with_deadlines(&format!("docker://127.0.0.1:{port}/x/none:t"), &[("PLYROOT_IDLE_TIMEOUT", "soon")]);
    let out = out.plyroot_error(&["404"]);
    assert!(out.stderr.contains("PLYROOT_IDLE_TIMEOUT=soon"), "{out}");
}

/// A registry that takes pushes, but reads the body of a blob upload larger than 1 MiB as `read`
/// says (`None`: nothing past the first 16 KiB; `Some(n)`: `n` bytes every 100 ms), through a
/// receive buffer of a few KiB, so that the client's writes block. Returns its port and how
/// many bytes of the large body it read.
fn slow_reading_registry(read: Option<usize>) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::os::fd::AsRawFd;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let small: libc::c_int = 4096;
    // SAFETY: a valid socket, and a c_int the size it is said to be.
    let rc = unsafe { libc::setsockopt(l.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&small as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = got.clone();
    let (port, _) = serve_on(l, move |head, _, r| {
        let first = head.lines().next().unwrap_or("");
        let header = |name: &str| head.lines().find_map(|h| h.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned()));
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if first.starts_with("PUT ") && len > 1 << 20 {
            if header("expect").is_some() {
                let _ = r.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let mut buf = vec![0u8; 16 << 10];
            if r.read_exact(&mut buf).is_err() {
                return false;
            }
            counter.fetch_add(buf.len(), std::sync::atomic::Ordering::SeqCst);
            let Some(step) = read else {
                std::thread::sleep(Duration::from_secs(3600));
                return false;
            };
            let mut buf = vec![0u8; step];
            while r.read_exact(&mut buf).is_ok() {
                counter.fetch_add(step, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            return false;
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return false;
        }
        let answer = if first.starts_with("POST ") && first.contains("/blobs/uploads/") {
            "HTTP/1.1 202 Accepted\r\nLocation: /v2/x/slow/blobs/uploads/u1\r\nContent-Length: 0\r\n\r\n"
        } else if first.starts_with("PUT ") {
            "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        };
        r.get_mut().write_all(answer.as_bytes()).is_ok()
    });
    (port, got)
}

#[test]
fn an_upload_the_registry_stops_reading_or_trickles_ends_at_its_deadline() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let s = Store::new();
    // A layer far larger than the socket buffers on both sides.
    need!(two_layer_env(&s, 8 << 20));
    for (read, vars, needle) in [
        (None, [("PLYROOT_IDLE_TIMEOUT", "2"), ("PLYROOT_RATE_WINDOW", "600")], "read no more of the upload for 2 s (PLYROOT_IDLE_TIMEOUT)"),
        // 64 bytes every 100 ms: moving, but below 1 KiB/s.
        (Some(64), [("PLYROOT_IDLE_TIMEOUT", "600"), ("PLYROOT_RATE_WINDOW", "2")], "less than 1 KiB/s (PLYROOT_RATE_WINDOW)"),
    ] {
        let (port, got) = slow_reading_registry(read);
        let mut c = s.cmd(&["push", "--insecure", "t", &format!("docker://127.0.0.1:{port}/x/slow:v1")]);
        c.envs(vars);
        let start = Instant::now();
        let out = run_with(&mut c, None, Duration::from_secs(120));
        let took = start.elapsed();
        let out = out.plyroot_error(&[&format!("the registry at 127.0.0.1:{port} "), needle, "uploading the blob"]);
        assert!(out.stdout.is_empty(), "no digest for a push that did not happen: {out}");
        assert!(!out.stderr.contains("os error"), "what happened, not an errno: {out}");
        assert!(took < Duration::from_secs(30), "{read:?}: it ended at the deadline, not long after: {took:?} {out}");
        let got = got.load(std::sync::atomic::Ordering::SeqCst);
        assert!(((16 << 10)..(8 << 20)).contains(&got), "{read:?}: the body started and was not all read ({got} bytes): {out}");
        if read.is_some() {
            assert!(got > 16 << 10, "the server went on reading ({got} bytes): {out}");
        }
    }
}

#[test]
fn a_connect_that_never_completes_ends_at_the_connect_deadline() {
    use std::os::fd::AsRawFd;
    // A listener whose accept queue is full: Linux drops further SYNs, and a connect hangs.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: a valid listening socket; listen(2) again only changes its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let addr = l.local_addr().unwrap();
    let mut queued = Vec::new();
    let hangs = (0..8).any(|_| match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(c) => {
            queued.push(c);
            false
        }
        Err(e) => e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock,
    });
    assert!(hangs, "a full accept queue made no connect hang");
    let (out, took) = import_with_deadlines(&format!("docker://{addr}/x/img:t"), &[("PLYROOT_CONNECT_TIMEOUT", "2")]);
    let out = out.plyroot_error(&[&format!("no connection to {addr} within 2 s (PLYROOT_CONNECT_TIMEOUT)")]);
    assert!(!out.stderr.contains("os error"), "what happened, not an errno: {out}");
    assert!(took < Duration::from_secs(30), "{took:?} {out}");
    drop((queued, l));
}

// ---------------------------------------------------------------------------------------------
// Nothing a server chose reaches a request unchecked
// ---------------------------------------------------------------------------------------------

#[test]
fn redirect_locations_with_controls_or_spaces_are_refused_naming_the_server() {
    let (reg, seen) = scripted_server_bytes(|head, _| {
        let to: &[u8] = if head.starts_with("GET /v2/x/ctl/") {
            b"/v2/x/elsewhere/a\x01b"
        } else if head.starts_with("GET /v2/x/csi/") {
            "/v2/x/elsewhere/a\u{9b}2Jb".as_bytes()
        } else if head.starts_with("GET /v2/x/tab/") {
            b"/v2/x/elsewhere/a\tb"
        } else if head.starts_with("GET /v2/x/space/") {
            b"/v2/x/elsewhere/a b HTTP/1.1\r\nX-Injected: yes\r\nX:"
        } else if head.starts_with("GET /v2/x/cr/") {
            b"/v2/x/elsewhere/a\rX-Injected: yes"
        } else {
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec();
        };
        [b"HTTP/1.1 302 Found\r\nLocation: ".as_slice(), to, b"\r\nContent-Length: 0\r\n\r\n"].concat()
    });
    let s = Store::new();
    let host = format!("127.0.0.1:{reg}");
    for (repo, problem) in [("tab", "a control character"), ("csi", "a control character"), ("space", "a space")] {
        let out = s.plyroot(&["import", "--insecure", &format!("docker://{host}/x/{repo}:t")]);
        let out = out.plyroot_error(&[&format!("{host} sent a redirect Location with {problem} in it"), "does not put in a request"]);
        no_raw_controls(&out);
    }
    // A bare CR or an ASCII control breaks the response head itself: refused as malformed.
    for repo in ["cr", "ctl"] {
        let out = s.plyroot(&["import", "--insecure", &format!("docker://{host}/x/{repo}:t")]);
        out.plyroot_error(&[&format!("{host} sent a header holding a control character")]);
    }
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|h| h.contains("elsewhere") || h.to_ascii_lowercase().contains("x-injected")), "no request followed: {seen:?}");
}

#[test]
fn challenges_whose_realm_service_or_scope_hold_controls_are_refused() {
    let (reg, seen) = scripted_server_bytes(|head, port| {
        let challenge = if head.starts_with("GET /token") {
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"token\":\"abc\"}".to_vec();
        } else if head.starts_with("GET /v2/x/realm/") {
            format!("Bearer realm=\"http://127.0.0.1:{port}/token x\",service=\"reg\"").into_bytes()
        } else if head.starts_with("GET /v2/x/service/") {
            format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg\u{9b}2J\"").into_bytes()
        } else {
            format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg\",scope=\"repository:x:pull\tX\"").into_bytes()
        };
        [b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: ".as_slice(), &challenge, b"\r\nContent-Length: 0\r\n\r\n"].concat()
    });
    let s = Store::new();
    let host = format!("127.0.0.1:{reg}");
    for (repo, what) in [("realm", "a realm with a space"), ("service", "a service with a control character"), ("scope", "a scope with a control character")] {
        let out = s.plyroot(&["import", "--insecure", &format!("docker://{host}/x/{repo}:t")]);
        let out = out.plyroot_error(&[&format!("cannot authenticate with {host}"), what, "does not put in a request"]);
        no_raw_controls(&out);
    }
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|h| h.starts_with("GET /token")), "no token was asked for: {seen:?}");
}

#[test]
fn an_upload_location_with_controls_or_spaces_is_refused() {
    if me().regime != Regime::Root {
        need!(userns());
    }
    let s = Store::new();
    need!(two_layer_env(&s, 1024));
    for (location, problem) in [(&b"/v2/x/up/blobs/uploads/u1 HTTP/1.1\r\nX-Injected: yes\r\nX:"[..], "a space"), (b"/v2/x/up/blobs/uploads/u\t1", "a control character")] {
        let location = location.to_vec();
        let (reg, seen) = scripted_server_bytes(move |head, _| {
            if head.starts_with("POST /v2/x/up/blobs/uploads/") {
                [b"HTTP/1.1 202 Accepted\r\nLocation: ".as_slice(), &location, b"\r\nContent-Length: 0\r\n\r\n"].concat()
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
            }
        });
        let host = format!("127.0.0.1:{reg}");
        let out = s.plyroot(&["push", "--insecure", "t", &format!("docker://{host}/x/up:v1")]);
        assert_eq!(out.code, 125, "{out}");
        let out = out.plyroot_error(&["uploading the blob", &format!("{host} sent an upload Location with {problem} in it")]);
        no_raw_controls(&out);
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|h| h.starts_with("POST ")), "{seen:?}");
        assert!(!seen.iter().any(|h| h.starts_with("PUT ") || h.to_ascii_lowercase().contains("x-injected")), "nothing was uploaded: {seen:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The step cache (issue 13): build steps' layers shared through a registry
// ---------------------------------------------------------------------------------------------

#[test]
fn steps_pushed_to_a_cache_are_used_by_a_fresh_store_without_running() {
    need!(userns());
    let reg = need!(Registry::start());
    let cache = reg.image("team/cache");
    let a = Store::new();
    let proj = a.path("proj");
    busybox_rootfs(&proj.join("base")).unwrap();
    fs::create_dir_all(proj.join("src")).unwrap();
    fs::write(proj.join("src/in"), "input\n").unwrap();
    // A random step: a store that ran it would get another layer id.
    fs::write(
        proj.join("plyroot.toml"),
        format!("cache = \"{cache}\"\n[env.dev]\nfrom = [\"dir:base\"]\nrun = [\"head -c 32 /dev/urandom > /rand\", {{ run = \"cp /src/in /in\", inputs = [\"./src:/src\"] }}]\n"),
    )
    .unwrap();
    let apply = |s: &Store, args: &[&str]| {
        let mut c = s.cmd(&[&["apply", "--insecure"], args].concat());
        c.current_dir(&proj);
        run_with(&mut c, None, TIMEOUT)
    };
    let out = apply(&a, &["--cache-to"]).ok();
    assert!(out.stderr.contains("step cache") && out.stderr.contains("2 step(s) pushed"), "{out}");
    let lock: serde_json::Value = serde_json::from_str(&fs::read_to_string(proj.join("plyroot.lock")).unwrap()).unwrap();
    let pins: Vec<String> = lock["steps"]["dev"].as_array().unwrap().iter().map(|p| p["layer"].as_str().unwrap().to_owned()).collect();
    let key = lock["steps"]["dev"][0]["key"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    assert_eq!(reg.manifest("team/cache", &format!("step-{key}"))["layers"].as_array().unwrap().len(), 1);
    // Pushing again sends nothing.
    let out = apply(&a, &["--cache-to"]).ok();
    assert!(out.stderr.contains("0 step(s) pushed") && out.stderr.contains("2 there already"), "{out}");
    // A tag that names another image (here the whole environment) is pushed over.
    a.plyroot(&["push", "--insecure", "dev", &format!("{cache}:step-{key}")]).ok();
    assert_eq!(reg.manifest("team/cache", &format!("step-{key}"))["layers"].as_array().unwrap().len(), 3);
    let out = apply(&a, &["--cache-to"]).ok();
    assert!(out.stderr.contains("1 step(s) pushed") && out.stderr.contains("1 there already"), "{out}");
    assert_eq!(reg.manifest("team/cache", &format!("step-{key}"))["layers"].as_array().unwrap().len(), 1);

    // A fresh store, and no lock file: the manifest's cache gives the same layers, nothing runs.
    fs::remove_file(proj.join("plyroot.lock")).unwrap();
    let b = Store::new();
    let out = apply(&b, &[]).ok();
    assert_eq!(out.stderr.matches("(cached)").count(), 2, "{out}");
    let lock: serde_json::Value = serde_json::from_str(&fs::read_to_string(proj.join("plyroot.lock")).unwrap()).unwrap();
    let got: Vec<String> = lock["steps"]["dev"].as_array().unwrap().iter().map(|p| p["layer"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, pins, "the fresh store ran a step instead of taking it from the cache");
    let out = b.run("dev", &[], &["sh", "-c", "wc -c < /rand; cat /in"]).ok();
    assert_eq!(out.stdout, "32\ninput\n");
    b.plyroot(&["verify"]).ok();

    // A changed input is a new key: not in the cache, so that step runs, and the one below is
    // still taken from it.
    fs::write(proj.join("src/in"), "changed\n").unwrap();
    let c = Store::new();
    let out = apply(&c, &["--cache-from", &cache]).ok();
    assert_eq!(out.stderr.matches("(cached)").count(), 1, "{out}");
    assert_eq!(c.run("dev", &[], &["cat", "/in"]).ok().stdout, "changed\n");
    // A cache that is not there: a warning, and the steps run here.
    let d = Store::new();
    let out = apply(&d, &["--cache-from", "docker://127.0.0.1:1/none"]).ok();
    assert!(out.stderr.contains("could not be read") && !out.stderr.contains("(cached)"), "{out}");
}
