//! `debootstrap:SUITE[?mirror=URL&variant=minbase&include=PKG,PKG&components=C,C&arch=ARCH]`: a
//! Debian (or Ubuntu, …) root built by the host's bootstrapper and imported as one layer.
//!
//! `mmdebstrap` is preferred: it writes a tarball to stdout, which is unpacked as it streams
//! (nothing extra on disk), and it runs unprivileged with `--mode=unshare` when the user has
//! subordinate ids. `debootstrap` needs root; it bootstraps into a temporary directory under the
//! store, which is then copied like a `dir:` source. The mirror defaults to the first `deb` source
//! in the host's apt configuration (one-line `.list` files and deb822 `.sources` files), else
//! deb.debian.org.
//!
//! A bootstrap takes minutes: on a terminal, and with `-v`, the tool's own progress goes straight
//! to stderr (as when the user runs it). Otherwise its output is kept in a file and its last lines
//! are quoted under the error when it fails: they hold the cause (a mistyped suite is apt's
//! `404  Not Found` for its Release file), which the tool's last line (`E: mmdebstrap failed to
//! run`) does not.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::{copy_dir, unpack_tar, LayerSink};
use crate::progress::Progress;
use crate::store::meta::Ownership;

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What the source string asks for.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    suite: String,
    mirror: Option<String>,
    variant: Option<String>,
    include: Vec<String>,
    components: Vec<String>,
    arch: Option<String>,
}

impl Spec {
    /// The options both tools take, but the architecture's, whose flag each names its own way.
    fn options(&self, arch_flag: &str) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(x) = &self.variant {
            v.push(format!("--variant={x}"));
        }
        if !self.include.is_empty() {
            v.push(format!("--include={}", self.include.join(",")));
        }
        if !self.components.is_empty() {
            v.push(format!("--components={}", self.components.join(",")));
        }
        if let Some(a) = &self.arch {
            v.push(format!("{arch_flag}={a}"));
        }
        v
    }
}

fn parse_spec(s: &str) -> Result<Spec> {
    let (suite, query) = s.split_once('?').unwrap_or((s, ""));
    let word = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-+._".contains(&b));
    if !word(suite) {
        bail!("debootstrap:{s}: '{suite}' is not a suite name (e.g. debootstrap:bookworm, debootstrap:trixie?variant=minbase)");
    }
    let mut spec = Spec { suite: suite.to_owned(), mirror: None, variant: None, include: Vec::new(), components: Vec::new(), arch: None };
    for kv in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = kv.split_once('=').with_context(|| format!("debootstrap:{s}: '{kv}' is not KEY=VALUE"))?;
        let list = |v: &str| -> Result<Vec<String>> {
            let items: Vec<String> = v.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect();
            if let Some(bad) = items.iter().find(|p| !word(p)) {
                bail!("debootstrap:{s}: '{bad}' is not a package or component name");
            }
            Ok(items)
        };
        match k {
            "mirror" => {
                if !(v.starts_with("http://") || v.starts_with("https://") || v.starts_with("file:/")) {
                    bail!("debootstrap:{s}: the mirror must be an http://, https:// or file:/ URL");
                }
                spec.mirror = Some(v.to_owned());
            }
            "variant" if word(v) => spec.variant = Some(v.to_owned()),
            "arch" if word(v) => spec.arch = Some(v.to_owned()),
            "include" => spec.include.extend(list(v)?),
            "components" => spec.components.extend(list(v)?),
            "variant" | "arch" => bail!("debootstrap:{s}: '{v}' is not a valid {k}"),
            _ => bail!("debootstrap:{s}: unknown option '{k}' (known: mirror, variant, include, components, arch)"),
        }
    }
    Ok(spec)
}

/// The first `deb` mirror of the host's apt sources that is not a security or updates archive.
fn host_mirror(etc_apt: &Path) -> Option<String> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(rd) = fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else { continue };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => found.extend(deb822_mirrors(&text)),
            Some("list") => found.extend(one_line_mirrors(&text)),
            _ => {}
        }
    }
    let usable = |(uri, suite): &(String, String)| (uri.starts_with("http://") || uri.starts_with("https://")) && !suite.ends_with("-security") && !suite.ends_with("-updates") && !uri.contains("security.");
    found.into_iter().find(usable).map(|(uri, _)| uri.trim_end_matches('/').to_owned())
}

/// `(uri, suite)` of each `deb` line of a one-line-style sources.list.
fn one_line_mirrors(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else { continue };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            let Some(end) = rest.find(']') else { continue };
            rest = rest[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_owned(), suite.to_owned()));
        }
    }
    out
}

/// `(uri, suite)` of each enabled `deb` stanza of a deb822 `.sources` file.
fn deb822_mirrors(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::HashMap::new();
        for line in stanza.lines().filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.starts_with('\t')) {
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let types = fields.get("types").map(String::as_str).unwrap_or("");
        let enabled = !matches!(fields.get("enabled"), Some(e) if e.eq_ignore_ascii_case("no"));
        if !enabled || !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let suite = fields.get("suites").and_then(|s| s.split_whitespace().next()).unwrap_or("").to_owned();
        for uri in fields.get("uris").map(String::as_str).unwrap_or("").split_whitespace() {
            out.push((uri.to_owned(), suite.clone()));
        }
    }
    out
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
}

/// Whether `/etc/subuid` and `/etc/subgid` give the current user a range (what mmdebstrap's
/// unshare mode maps).
fn has_subids() -> bool {
    use crate::userns::{subid_range, HostUser};
    let user = HostUser::current();
    let uid = rustix::process::getuid().as_raw();
    ["/etc/subuid", "/etc/subgid"].iter().all(|f| subid_range(&fs::read_to_string(f).unwrap_or_default(), &user.name, uid).is_some()) && which("newuidmap").is_some()
}

pub(super) fn unpack(spec: &str, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> Result<()> {
    let spec = parse_spec(spec)?;
    let mirror = spec.mirror.clone().or_else(|| host_mirror(Path::new("/etc/apt"))).unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
    let root = rustix::process::geteuid().is_root();
    if let Some(mm) = which("mmdebstrap") {
        if !root && !has_subids() {
            bail!(
                "cannot bootstrap {name} as an unprivileged user without subordinate ids: mmdebstrap's unshare mode maps a range from /etc/subuid and /etc/subgid (and needs newuidmap, package uidmap); ask an administrator for one (e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {}`), run as root, or import a root built elsewhere (tar:FILE, docker://debian:{})",
                crate::userns::HostUser::current().name,
                spec.suite
            );
        }
        return mmdebstrap(&mm, &spec, &mirror, root, name, ownership, progress, sink);
    }
    if let Some(db) = which("debootstrap") {
        if !root {
            bail!("cannot bootstrap {name}: debootstrap needs root; install mmdebstrap (`apt-get install mmdebstrap`), which builds roots unprivileged");
        }
        return debootstrap(&db, &spec, &mirror, name, ownership, progress, sink);
    }
    bail!("cannot bootstrap {name}: neither mmdebstrap nor debootstrap is installed; install one: `apt-get install mmdebstrap` (preferred; works unprivileged) or `apt-get install debootstrap`")
}

#[allow(clippy::too_many_arguments)]
fn mmdebstrap(tool: &Path, spec: &Spec, mirror: &str, root: bool, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> Result<()> {
    let mut cmd = Command::new(tool);
    cmd.arg(format!("--mode={}", if root { "root" } else { "unshare" })).arg("--format=tar");
    // Never --quiet: it also drops the lines that explain a failure.
    if crate::diag::level() >= 3 {
        cmd.arg("--verbose");
    }
    cmd.args(spec.options("--architectures"));
    cmd.arg(&spec.suite).arg("-").arg(mirror);
    if !root {
        // Unshare mode works in a temp dir as a subordinate id, which cannot enter a private
        // $TMPDIR (0700, as per-user temp dirs are).
        let tmp = std::env::temp_dir();
        if !world_traversable(&tmp) {
            crate::diag::debug!("{} is not reachable from mmdebstrap's unshared root: using /tmp", tmp.display());
            cmd.env("TMPDIR", "/tmp");
        }
    }
    crate::diag::info!("bootstrapping {} from {mirror} with {} (this takes a minute or more)", spec.suite, tool.display());
    crate::diag::debug!("running {cmd:?}");
    let log = Log::new()?;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log.stdio()?).spawn().with_context(|| format!("cannot run {}", tool.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stage = sink.stage()?;
    let mut input = progress.counting(stdout);
    let unpacked = unpack_tar(&mut input, name, stage.as_fd(), ownership, progress);
    // Read to the end, so the tool never dies of a closed pipe while we report its real error.
    let _ = std::io::copy(&mut input, &mut std::io::sink());
    let status = child.wait().with_context(|| format!("cannot wait for {}", tool.display()))?;
    if !status.success() {
        let shown = log.show_tail("");
        bail!("{} failed ({status}) bootstrapping {} from {mirror} ({shown})", tool.display(), spec.suite);
    }
    let mut unpacked = unpacked?;
    progress.finish();
    unpacked.description = format!("{name} (mmdebstrap, {mirror})");
    sink.finish(stage, unpacked)
}

fn debootstrap(tool: &Path, spec: &Spec, mirror: &str, name: &str, ownership: Ownership, progress: &mut Progress, sink: &mut dyn LayerSink) -> Result<()> {
    let work = std::env::temp_dir().join(format!("plyroot-debootstrap-{}", std::process::id()));
    let _ = crate::store::remove_tree(&work);
    fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = crate::store::remove_tree(&self.0);
        }
    }
    let _cleanup = Cleanup(work.clone());
    let target = work.join("root");
    let mut cmd = Command::new(tool);
    cmd.args(spec.options("--arch"));
    cmd.arg(&spec.suite).arg(&target).arg(mirror);
    crate::diag::info!("bootstrapping {} from {mirror} with {} (this takes a few minutes)", spec.suite, tool.display());
    // Its progress is on stdout, its errors on stderr: both are the log (plyroot's stdout is
    // for data).
    let log = Log::new()?;
    let status = cmd.stdin(Stdio::null()).stdout(log.stdio()?).stderr(log.stdio()?).status().with_context(|| format!("cannot run {}", tool.display()))?;
    if !status.success() {
        let more = fs::read_to_string(target.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let shown = log.show_tail(&more);
        bail!("{} failed ({status}) bootstrapping {} from {mirror} ({shown})", tool.display(), spec.suite);
    }
    let stage = sink.stage()?;
    let mut unpacked = copy_dir(&target, stage.as_fd(), ownership, progress)?;
    progress.finish();
    unpacked.description = format!("{name} (debootstrap, {mirror})");
    sink.finish(stage, unpacked)
}

/// Whether every directory from `/` to `dir` lets anyone through (o+x).
fn world_traversable(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors().all(|d| fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Where a bootstrapper's output goes: plyroot's stderr when the user watches it (a terminal, or
/// `-v`; not with `-q`), else a file that is read after the tool exits (no second reader thread:
/// plyroot stays single-threaded for its namespaces).
enum Log {
    Shown,
    /// An unnamed file (O_TMPFILE where the filesystem has it), gone when plyroot exits.
    Kept(fs::File),
}

impl Log {
    fn new() -> Result<Log> {
        let level = crate::diag::level();
        if level >= 2 || (level >= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr())) {
            return Ok(Log::Shown);
        }
        let dir = std::env::temp_dir();
        let file = match tempfile_in(&dir) {
            Ok(f) => f,
            Err(e) => return Err(e).with_context(|| format!("cannot create a temporary file in {} for the bootstrapper's log", dir.display())),
        };
        Ok(Log::Kept(file))
    }

    /// One more handle for a child's stdout or stderr.
    fn stdio(&self) -> Result<Stdio> {
        Ok(match self {
            Log::Shown => std::io::stderr().as_fd().try_clone_to_owned().context("cannot duplicate stderr")?.into(),
            Log::Kept(f) => f.try_clone().context("cannot duplicate the bootstrapper's log")?.into(),
        })
    }

    /// After a failure: quotes the log's last lines (with `more`, a log the tool left) unless the
    /// user saw them; returns where the error's reader finds them.
    fn show_tail(self, more: &str) -> &'static str {
        match self {
            Log::Shown => {
                crate::diag::quote(&tail(more));
                "its output is above"
            }
            Log::Kept(mut f) => {
                use std::io::{Read, Seek};
                let mut text = Vec::new();
                let _ = f.rewind().and_then(|_| f.read_to_end(&mut text));
                let mut text = String::from_utf8_lossy(&text).into_owned();
                text.push_str(more);
                crate::diag::quote(&tail(&text));
                "its last lines are above"
            }
        }
    }
}

/// A temporary file in `dir` that no name points at.
fn tempfile_in(dir: &Path) -> std::io::Result<fs::File> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::from_raw_mode(0o600)) {
        Ok(fd) => Ok(fd.into()),
        // No O_TMPFILE here: a named file, unlinked at once.
        Err(_) => {
            let p = dir.join(format!("plyroot-bootstrap-{}.log", std::process::id()));
            let f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p)?;
            let _ = fs::remove_file(&p);
            Ok(f)
        }
    }
}

/// The last 15 non-empty lines of a tool's log (errors print them above a one-line message).
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = parse_spec("bookworm?mirror=http://m.example/debian&variant=minbase&include=curl,ca-certificates&arch=arm64").unwrap();
        assert_eq!(s.suite, "bookworm");
        assert_eq!(s.mirror.as_deref(), Some("http://m.example/debian"));
        assert_eq!(s.variant.as_deref(), Some("minbase"));
        assert_eq!(s.include, ["curl", "ca-certificates"]);
        assert_eq!(s.arch.as_deref(), Some("arm64"));
        assert_eq!(parse_spec("trixie").unwrap().include, Vec::<String>::new());
        for bad in ["", "bookworm?x=1", "bookworm?mirror=ftp://x", "bookworm?include=a;rm", "../x", "bookworm?variant"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_host_mirrors() {
        let t = tempfile::tempdir().unwrap();
        let apt = t.path();
        fs::create_dir(apt.join("sources.list.d")).unwrap();
        // Debian 12's default: an empty sources.list and a deb822 file.
        fs::write(apt.join("sources.list"), "# nothing\n").unwrap();
        fs::write(
            apt.join("sources.list.d/debian.sources"),
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://security.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n",
        )
        .unwrap();
        assert_eq!(host_mirror(apt).as_deref(), Some("http://mirror.example/debian"));
        fs::write(apt.join("sources.list"), "deb [arch=amd64 signed-by=/x.gpg] https://one.example/debian bookworm main # c\n").unwrap();
        assert_eq!(host_mirror(apt).as_deref(), Some("https://one.example/debian"), "sources.list comes first");
        assert_eq!(host_mirror(&apt.join("none")), None);
    }
}
