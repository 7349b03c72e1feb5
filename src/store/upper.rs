//! Reading an upper against layer stacks: what it adds, changes and deletes (`diff`), and which
//! of its paths conflict with a new stack (`rebase`). The decisions are pure functions of the
//! upper's entries and a lookup into the lowers; the walks that feed them are thin.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One entry of an upper, as overlayfs wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// A char 0:0 device: the path is deleted.
    Whiteout,
    /// A directory; `opaque` hides everything the lowers have below it.
    Dir { opaque: bool },
    File { size: u64 },
    Symlink,
    /// A fifo, socket or device.
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UpperEntry {
    /// Relative to the root, no leading slash.
    pub path: String,
    pub node: Node,
}

/// What a path is in a stack of lowers, enough to tell whether it changed between two stacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub kind: char,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub target: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
    /// An opaque directory replacing the lowers' directory.
    Replaced,
}

impl Change {
    pub(crate) fn letter(self) -> char {
        match self {
            Change::Added => 'A',
            Change::Modified => 'M',
            Change::Deleted => 'D',
            Change::Replaced => 'R',
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiffEntry {
    pub path: String,
    pub change: Change,
    /// `f` file, `d` directory, `l` symlink, `s` special, `-` deleted.
    #[serde(rename = "type")]
    pub kind: char,
    pub size: u64,
}

/// Whether `path` is `filter` or below it (component-wise); no filters means everything.
fn wanted(path: &str, filters: &[String]) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.is_empty() || path == f || path.starts_with(&format!("{f}/")) || f.starts_with(&format!("{path}/")))
}

/// The diff of an upper against the lowers it was written on. Pure: `lower(path)` says whether
/// the lowers have `path` (and whether it is a directory).
pub(crate) fn diff(entries: &[UpperEntry], lower: impl Fn(&str) -> Option<bool>, filters: &[String]) -> Vec<DiffEntry> {
    let mut out = Vec::new();
    for e in entries {
        let below = lower(&e.path);
        let (change, kind, size) = match (&e.node, below) {
            (Node::Whiteout, Some(_)) => (Change::Deleted, '-', 0),
            // A whiteout over nothing hides nothing: not a change anyone made visible.
            (Node::Whiteout, None) => continue,
            (Node::Dir { opaque: true }, Some(true)) => (Change::Replaced, 'd', 0),
            (Node::Dir { .. }, Some(true)) => continue,
            (Node::Dir { .. }, Some(false)) => (Change::Modified, 'd', 0),
            (Node::Dir { .. }, None) => (Change::Added, 'd', 0),
            (Node::File { size }, b) => (if b.is_some() { Change::Modified } else { Change::Added }, 'f', *size),
            (Node::Symlink, b) => (if b.is_some() { Change::Modified } else { Change::Added }, 'l', 0),
            (Node::Special, b) => (if b.is_some() { Change::Modified } else { Change::Added }, 's', 0),
        };
        // Filters select the paths shown; entries below a shown directory are shown too.
        let shown = format!("/{}", e.path);
        if wanted(&e.path, filters) {
            out.push(DiffEntry { path: shown, change, kind, size });
        }
    }
    out
}

/// Paths whose lower content differs between the stack the upper was written on (`old`) and
/// the new one, among the paths the upper itself changed. Plain (non-opaque) directories merge
/// and never conflict by themselves. Pure, like [`diff`].
pub(crate) fn conflicts(entries: &[UpperEntry], old: impl Fn(&str) -> Option<Fingerprint>, new: impl Fn(&str) -> Option<Fingerprint>) -> Vec<String> {
    entries
        .iter()
        .filter(|e| !matches!(e.node, Node::Dir { opaque: false }))
        .filter(|e| old(&e.path) != new(&e.path))
        .map(|e| e.path.clone())
        .collect()
}

/// Reads an upper into entries, parents before children, names sorted.
pub(crate) fn walk(upper: &Path) -> std::io::Result<Vec<UpperEntry>> {
    fn go(dir: &Path, rel: &str, out: &mut Vec<UpperEntry>) -> std::io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let r = if rel.is_empty() { name.to_string_lossy().into_owned() } else { format!("{rel}/{}", name.to_string_lossy()) };
            let m = fs::symlink_metadata(&p)?;
            let t = m.file_type();
            let node = if is_whiteout(&m) {
                Node::Whiteout
            } else if t.is_dir() {
                Node::Dir { opaque: is_opaque(&p) }
            } else if t.is_file() {
                Node::File { size: m.len() }
            } else if t.is_symlink() {
                Node::Symlink
            } else {
                Node::Special
            };
            let is_dir = t.is_dir();
            out.push(UpperEntry { path: r.clone(), node });
            if is_dir {
                go(&p, &r, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(upper, "", &mut out)?;
    Ok(out)
}

/// Whether an entry is an overlayfs whiteout (a char device 0:0): the path is deleted.
pub(crate) fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Whether a directory is opaque (`user.overlay.opaque=y`): lower layers' contents are hidden.
pub(crate) fn is_opaque(dir: &Path) -> bool {
    let mut b = [0u8; 4];
    rustix::fs::lgetxattr(dir, "user.overlay.opaque", &mut b).map(|n| &b[..n] == b"y").unwrap_or(false)
}

/// Resolves `rel` in a stack of layer trees (top first) the way overlayfs merges them: the
/// top-most entry wins, a whiteout deletes, a non-directory or an opaque directory hides the
/// layers below it.
pub(crate) fn lookup(lowers: &[PathBuf], rel: &str) -> Option<(PathBuf, fs::Metadata)> {
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    let mut candidates: Vec<&PathBuf> = lowers.iter().collect();
    let mut prefix = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        prefix.push(c);
        let mut hits: Vec<(&PathBuf, fs::Metadata)> = Vec::new();
        for l in &candidates {
            let Ok(m) = fs::symlink_metadata(l.join(&prefix)) else { continue };
            if is_whiteout(&m) {
                break;
            }
            let stop = !m.is_dir() || is_opaque(&l.join(&prefix));
            let first_is_dir = hits.first().map(|h| h.1.is_dir()).unwrap_or(true);
            if !first_is_dir || (!hits.is_empty() && !m.is_dir()) {
                break;
            }
            hits.push((l, m));
            if stop {
                break;
            }
        }
        let (top, meta) = hits.first()?;
        if i + 1 == comps.len() {
            return Some((top.join(&prefix), meta.clone()));
        }
        if !meta.is_dir() {
            return None;
        }
        candidates = hits.iter().map(|h| h.0).collect();
    }
    None
}

pub(crate) fn fingerprint(lowers: &[PathBuf], rel: &str) -> Option<Fingerprint> {
    let (abs, m) = lookup(lowers, rel)?;
    let t = m.file_type();
    let kind = if t.is_dir() { 'd' } else if t.is_symlink() { 'l' } else if t.is_file() { 'f' } else { 's' };
    Some(Fingerprint {
        kind,
        size: if t.is_file() { m.len() } else { 0 },
        mode: m.mode() & 0o7777,
        mtime: if t.is_dir() { 0 } else { m.mtime() },
        target: t.is_symlink().then(|| fs::read_link(&abs).ok()).flatten(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, node: Node) -> UpperEntry {
        UpperEntry { path: path.into(), node }
    }

    #[test]
    fn diff_table() {
        let entries = vec![
            e("etc", Node::Dir { opaque: false }),
            e("etc/new.conf", Node::File { size: 10 }),
            e("etc/passwd", Node::File { size: 900 }),
            e("etc/gone", Node::Whiteout),
            e("etc/never", Node::Whiteout),
            e("opt", Node::Dir { opaque: false }),
            e("var/cache", Node::Dir { opaque: true }),
            e("usr/bin/cc", Node::Symlink),
        ];
        let lower = |p: &str| match p {
            "etc" | "var/cache" => Some(true),
            "etc/passwd" | "etc/gone" => Some(false),
            _ => None,
        };
        let d: Vec<(String, char)> = diff(&entries, lower, &[]).into_iter().map(|d| (d.path, d.change.letter())).collect();
        assert_eq!(
            d,
            [("/etc/new.conf", 'A'), ("/etc/passwd", 'M'), ("/etc/gone", 'D'), ("/opt", 'A'), ("/var/cache", 'R'), ("/usr/bin/cc", 'A')]
                .map(|(p, c)| (p.to_string(), c))
        );
        let only_etc: Vec<String> = diff(&entries, lower, &["etc".into()]).into_iter().map(|d| d.path).collect();
        assert_eq!(only_etc, ["/etc/new.conf", "/etc/passwd", "/etc/gone"]);
    }

    #[test]
    fn conflicts_are_upper_paths_whose_lower_changed() {
        let fp = |size| Some(Fingerprint { kind: 'f', size, mode: 0o644, mtime: 1, target: None });
        let entries = vec![
            e("etc", Node::Dir { opaque: false }),
            e("etc/a", Node::File { size: 1 }),
            e("etc/b", Node::File { size: 1 }),
            e("etc/c", Node::Whiteout),
            e("etc/d", Node::Dir { opaque: true }),
        ];
        let old = |p: &str| match p {
            "etc/a" => fp(5),
            "etc/b" => fp(5),
            "etc/c" => fp(7),
            "etc" => Some(Fingerprint { kind: 'd', size: 0, mode: 0o755, mtime: 0, target: None }),
            _ => None,
        };
        let new = |p: &str| match p {
            "etc/a" => fp(5),
            "etc/b" => fp(6),
            "etc/c" => fp(8),
            "etc/d" => fp(1),
            _ => None,
        };
        assert_eq!(conflicts(&entries, old, new), ["etc/b", "etc/c", "etc/d"]);
    }

    #[test]
    fn lookup_follows_overlay_rules_on_real_trees() {
        let t = tempfile::tempdir().unwrap();
        let (top, mid, bot) = (t.path().join("top"), t.path().join("mid"), t.path().join("bot"));
        for d in [&top, &mid, &bot] {
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        fs::write(bot.join("etc/a"), "bottom").unwrap();
        fs::write(bot.join("etc/b"), "bottom").unwrap();
        fs::create_dir_all(bot.join("opt/x")).unwrap();
        fs::write(mid.join("etc/a"), "middle").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, &top.join("etc/b"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
        fs::create_dir_all(mid.join("opt")).unwrap();
        rustix::fs::lsetxattr(&mid.join("opt"), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
        let stack = vec![top.clone(), mid.clone(), bot.clone()];
        assert_eq!(lookup(&stack, "etc/a").unwrap().0, mid.join("etc/a"));
        assert!(lookup(&stack, "etc/b").is_none(), "whited out");
        assert!(lookup(&stack, "opt/x").is_none(), "hidden by an opaque dir");
        assert!(lookup(&[bot.clone()], "opt/x").is_some());
        assert!(lookup(&stack, "etc/a/deeper").is_none());
    }
}
