//! Reading an upper against layer stacks: what it adds, changes and deletes (`diff`), and which
//! of its paths conflict with a new stack (`rebase`). The decisions are pure functions of the
//! upper's entries, each of which carries what it is in the lowers; [`walk`] reads the upper and
//! the lowers together (names as bytes, any depth).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use serde::{Deserialize, Serialize};

use super::tree::{self, join, kind, resolve, stat_at, Cursor, Found, Lend};

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
    /// Relative to the root, no leading slash; bytes, as on disk.
    pub path: Vec<u8>,
    pub node: Node,
    /// What the path is in each stack of lowers the walk was given (see [`walk`]).
    pub below: Vec<Option<Fingerprint>>,
}

/// What a path is in a stack of lowers, enough to tell whether it changed between two stacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    pub kind: char,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub target: Option<Vec<u8>>,
    /// The walk's tier (one layer's root) that provides it. A layer never changes, so the same
    /// tier is the same content; another tier may hold other bytes behind an equal size and
    /// mtime (a reproducible image clamps every mtime), which [`same_on_both_sides`] then reads.
    pub tier: usize,
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
    /// `/` and the path, as bytes (serialized as a metadata key: compact, and exact).
    #[serde(with = "as_key")]
    pub path: Vec<u8>,
    pub change: Change,
    /// `f` file, `d` directory, `l` symlink, `s` special, `-` deleted.
    #[serde(rename = "type")]
    pub kind: char,
    pub size: u64,
}

/// Bytes as a [`super::meta::key`] string: the diff crosses a pipe from the process that reads
/// the upper, and a deep tree's paths as JSON arrays of numbers would be four times their size.
mod as_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::store::meta::key(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(crate::store::meta::unkey(&String::deserialize(d)?).into_owned())
    }
}

/// What the user can do about an upper written on other layers than the current generation's:
/// the same three choices wherever plyroot notices it (a run refusing, `apply`, `switch`).
pub(crate) fn stale_choices(name: &str) -> String {
    format!("choose `plyroot rebase {name}` to replay them onto it, `plyroot reset {name}` to set them aside, or run with --keep-upper to use them as they are")
}

/// Whether `path` is `filter` or below it, or above it (component-wise); no filters means
/// everything.
fn wanted(path: &[u8], filters: &[Vec<u8>]) -> bool {
    let below = |a: &[u8], b: &[u8]| a.len() > b.len() && a.starts_with(b) && a[b.len()] == b'/';
    filters.is_empty() || filters.iter().any(|f| f.is_empty() || path == f.as_slice() || below(path, f) || below(f, path))
}

/// The Nix store path (`nix/store/NAME`) that `path` is or is in, if any.
fn store_path(path: &[u8]) -> Option<&[u8]> {
    let rest = path.strip_prefix(b"nix/store/")?;
    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    (end > 0).then(|| &path[..b"nix/store/".len() + end])
}

/// The diff of an upper against the lowers it was written on (the first stack its entries were
/// walked with). A Nix store path is one entry, whatever it holds (a store path is added or
/// removed whole; its size is its files'), unless a filter names something inside it. Pure.
pub(crate) fn diff(entries: &[UpperEntry], filters: &[Vec<u8>]) -> Vec<DiffEntry> {
    let mut out: Vec<DiffEntry> = Vec::new();
    // The store path the walk is in, and its entry in `out` (None: filtered out).
    let mut in_store: Option<(Vec<u8>, Option<usize>)> = None;
    for e in entries {
        let sp = store_path(&e.path).filter(|sp| !filters.iter().any(|f| f.len() > sp.len() && f.starts_with(sp) && f[sp.len()] == b'/'));
        if let Some(sp) = sp.filter(|sp| sp.len() < e.path.len()) {
            // Inside a store path: counted in its one entry (made here when the store path
            // itself is a plain merged directory, which shows no entry of its own).
            if in_store.as_ref().is_none_or(|(p, _)| p.as_slice() != sp) {
                let at = wanted(sp, filters).then(|| {
                    out.push(DiffEntry { path: [b"/", sp].concat(), change: Change::Modified, kind: 'd', size: 0 });
                    out.len() - 1
                });
                in_store = Some((sp.to_vec(), at));
            }
            if let (Some((_, Some(at))), Node::File { size }) = (&in_store, &e.node) {
                out[*at].size += size;
            }
            continue;
        }
        let start = out.len();
        let below = e.below.first().and_then(|b| b.as_ref()).map(|fp| fp.kind == 'd');
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
        if wanted(&e.path, filters) {
            out.push(DiffEntry { path: [b"/", e.path.as_slice()].concat(), change, kind, size });
        }
        if sp.is_some() {
            in_store = Some((e.path.clone(), (out.len() > start).then_some(start)));
        }
    }
    out
}

/// Paths whose lower content differs between the stack the upper was written on (the first
/// stack its entries were walked with) and the new one (the second), among the paths the upper
/// itself changed. Plain (non-opaque) directories merge and never conflict by themselves. Pure.
pub(crate) fn conflicts(entries: &[UpperEntry]) -> Vec<Vec<u8>> {
    entries
        .iter()
        .filter(|e| !matches!(e.node, Node::Dir { opaque: false }))
        .filter(|e| e.below.first() != e.below.get(1))
        .map(|e| e.path.clone())
        .collect()
}

/// Whether a path [`conflicts`] found is no conflict after all, because both sides hold the same
/// content: the upper holds what the new lowers hold (or deletes what they do not have), so
/// `--ours` and `--theirs` would give the same; or the old and new lowers hold the same file
/// (only a fingerprint, e.g. an mtime, differs), so the lowers did not really change under it.
/// Content is the kind, the permission bits, the owner and the bytes (a symlink's target).
pub(crate) fn same_on_both_sides(upper: &Path, old: &[PathBuf], new: &[PathBuf], e: &UpperEntry) -> io::Result<bool> {
    let theirs = lookup(new, &e.path);
    let ours = match e.node {
        Node::Whiteout => return Ok(theirs.is_none()),
        Node::File { .. } | Node::Symlink => {
            let p = upper.join(OsStr::from_bytes(&e.path));
            let m = fs::symlink_metadata(&p)?;
            Some((p, m))
        }
        Node::Dir { .. } | Node::Special => None,
    };
    if let (Some(ours), Some(theirs)) = (&ours, &theirs) {
        if same_content(ours, theirs)? {
            return Ok(true);
        }
    }
    match (lookup(old, &e.path), &theirs) {
        (Some(before), Some(theirs)) => same_content(&before, theirs),
        _ => Ok(false),
    }
}

/// Whether two files (path, lstat) have the same kind, permission bits, owner and content.
pub(crate) fn same_content((a, am): &(PathBuf, fs::Metadata), (b, bm): &(PathBuf, fs::Metadata)) -> io::Result<bool> {
    let (at, bt) = (am.file_type(), bm.file_type());
    if am.mode() & 0o7777 != bm.mode() & 0o7777 || (am.uid(), am.gid()) != (bm.uid(), bm.gid()) {
        return Ok(false);
    }
    if at.is_symlink() && bt.is_symlink() {
        return Ok(fs::read_link(a)? == fs::read_link(b)?);
    }
    if !(at.is_file() && bt.is_file()) || am.len() != bm.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        if n != read_full(&mut fb, &mut bb)? || ba[..n] != bb[..n] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match io::Read::read(f, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads an upper into entries, parents before children, names sorted by their bytes, each with
/// what it is in every stack of `stacks` (lower layer roots, top first; overlayfs's rules). The
/// upper and the stacks are walked together, with `*at` calls: any depth, bounded fds, and no
/// lookup of a path from the top per entry.
pub(crate) fn walk(upper: &Path, stacks: &[&[PathBuf]]) -> io::Result<Vec<UpperEntry>> {
    let (roots, per_stack) = tiers(upper, stacks);
    let mut cur = Cursor::new(&roots, Lend::Read)?;
    let mut out = Vec::new();
    let mut rel: Vec<u8> = Vec::new();
    struct Level {
        names: Vec<Vec<u8>>,
        /// Per stack: the lower tiers whose directories merge here, top first.
        lowers: Vec<Vec<usize>>,
        parent_len: usize,
    }
    let names = |cur: &mut Cursor| -> io::Result<Vec<Vec<u8>>> {
        let mut n: Vec<Vec<u8>> = tree::list(cur.dir(0)?)?.into_iter().map(|e| e.0).collect();
        n.sort_by(|a, b| b.cmp(a));
        Ok(n)
    };
    let mut levels = vec![Level { names: names(&mut cur)?, lowers: per_stack, parent_len: 0 }];
    while let Some(level) = levels.last_mut() {
        let Some(name) = level.names.pop() else {
            let parent_len = level.parent_len;
            levels.pop();
            if !levels.is_empty() {
                cur.leave()?;
                rel.truncate(parent_len);
            }
            continue;
        };
        let lowers = level.lowers.clone();
        let path = join(&rel, &name);
        let st = stat_at(cur.dir(0)?, &name)?;
        let node = node_of(&mut cur, &name, &st)?;
        let Under { below, merged, enter } = lowers_of(&mut cur, &lowers, &name, st)?;
        let is_dir = matches!(node, Node::Dir { .. });
        out.push(UpperEntry { path: path.clone(), node, below });
        if is_dir {
            let with: Vec<(usize, &rustix::fs::Stat)> = enter.iter().map(|(t, s)| (*t, s)).collect();
            cur.enter(&name, &with)?;
            let parent_len = rel.len();
            rel = path;
            let names = names(&mut cur)?;
            levels.push(Level { names, lowers: merged, parent_len });
        }
    }
    Ok(out)
}

/// The walk's tiers: the upper is tier 0, and every distinct lower root one more; with, per
/// stack, its lowers' tiers (top first).
fn tiers<'a>(upper: &'a Path, stacks: &[&'a [PathBuf]]) -> (Vec<&'a Path>, Vec<Vec<usize>>) {
    let mut roots: Vec<&Path> = vec![upper];
    let mut per_stack: Vec<Vec<usize>> = Vec::new();
    for stack in stacks {
        let mut tiers = Vec::new();
        for l in stack.iter() {
            let t = match roots.iter().position(|r| *r == l.as_path()) {
                Some(t) => t,
                None => {
                    roots.push(l);
                    roots.len() - 1
                }
            };
            tiers.push(t);
        }
        per_stack.push(tiers);
    }
    (roots, per_stack)
}

/// What the upper's entry `name` (in the cursor's directory; `st` its stat) is.
fn node_of(cur: &mut Cursor, name: &[u8], st: &rustix::fs::Stat) -> io::Result<Node> {
    let t = kind(st);
    Ok(if tree::is_whiteout(st) {
        Node::Whiteout
    } else if t == FileType::Directory {
        Node::Dir { opaque: tree::is_opaque_at(cur.dir(0)?, name)? }
    } else if t == FileType::RegularFile {
        Node::File { size: st.st_size as u64 }
    } else if t == FileType::Symlink {
        Node::Symlink
    } else {
        Node::Special
    })
}

/// What lies below one entry of the upper, seen from each stack.
struct Under {
    /// Per stack: the entry in the top tier that has it.
    below: Vec<Option<Fingerprint>>,
    /// Per stack: the tiers whose directories merge under it, top first.
    merged: Vec<Vec<usize>>,
    /// The directories to enter together if it is one (the upper's first).
    enter: Vec<(usize, rustix::fs::Stat)>,
}

/// [`Under`] the upper's entry `name` (the upper's stat `st`), from each stack's tiers merging
/// here (`lowers`).
fn lowers_of(cur: &mut Cursor, lowers: &[Vec<usize>], name: &[u8], st: rustix::fs::Stat) -> io::Result<Under> {
    let mut below = Vec::with_capacity(lowers.len());
    let mut merged: Vec<Vec<usize>> = Vec::with_capacity(lowers.len());
    let mut enter: Vec<(usize, rustix::fs::Stat)> = vec![(0, st)];
    for tiers in lowers {
        let r = resolve::<()>(cur, tiers, name, |_| None)?;
        below.push(match &r.top {
            Some((tier, Found::Disk(lst))) => Some(fingerprint(cur, *tier, name, lst)?),
            _ => None,
        });
        merged.push(r.dirs.iter().map(|d| d.0).collect());
        for d in r.dirs {
            if !enter.iter().any(|e| e.0 == d.0) {
                enter.push(d);
            }
        }
    }
    Ok(Under { below, merged, enter })
}

fn fingerprint(cur: &mut Cursor, tier: usize, name: &[u8], st: &rustix::fs::Stat) -> io::Result<Fingerprint> {
    let t = kind(st);
    let k = if t == FileType::Directory { 'd' } else if t == FileType::Symlink { 'l' } else if t == FileType::RegularFile { 'f' } else { 's' };
    let target = match t {
        FileType::Symlink => Some(rustix::fs::readlinkat(cur.dir(tier)?, OsStr::from_bytes(name), Vec::new())?.into_bytes()),
        _ => None,
    };
    Ok(Fingerprint {
        kind: k,
        size: if t == FileType::RegularFile { st.st_size as u64 } else { 0 },
        mode: st.st_mode & 0o7777,
        mtime: if t == FileType::Directory { 0 } else { st.st_mtime },
        target,
        tier,
    })
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
/// layers below it. `rel` is bytes (a `&str` will do). For single lookups by name (`which`,
/// launchers); walks resolve as they go instead (see [`walk`]).
pub(crate) fn lookup(lowers: &[PathBuf], rel: impl AsRef<[u8]>) -> Option<(PathBuf, fs::Metadata)> {
    let comps: Vec<&[u8]> = rel.as_ref().split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    let mut candidates: Vec<&PathBuf> = lowers.iter().collect();
    let mut prefix = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        prefix.push(OsStr::from_bytes(c));
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

/// Whether `path` (absolute, inside) names a file that is not a directory in the merged view of
/// `lowers` (top first), following symlinks inside the root as the root would (a merged `/usr`'s
/// `/bin` included).
pub(crate) fn file_inside(lowers: &[PathBuf], path: &Path) -> bool {
    let parts = |p: &Path| p.components().filter_map(|c| match c {
        std::path::Component::Normal(n) => Some(n.to_owned()),
        std::path::Component::ParentDir => Some("..".into()),
        _ => None,
    }).collect::<Vec<std::ffi::OsString>>();
    let mut todo: std::collections::VecDeque<std::ffi::OsString> = parts(path).into();
    let (mut at, mut hops, mut last) = (PathBuf::new(), 0, None);
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&c);
        let Some((real, meta)) = lookup(lowers, next.as_os_str().as_bytes()) else { return false };
        if meta.file_type().is_symlink() {
            hops += 1;
            let Ok(target) = fs::read_link(&real) else { return false };
            if hops > 40 {
                return false;
            }
            if target.is_absolute() {
                at = PathBuf::new();
            }
            for p in parts(&target).into_iter().rev() {
                todo.push_front(p);
            }
            continue;
        }
        at = next;
        last = Some(meta);
    }
    last.is_some_and(|m| !m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(kind: char, size: u64) -> Option<Fingerprint> {
        Some(Fingerprint { kind, size, mode: 0o644, mtime: 1, target: None, tier: 1 })
    }

    fn e(path: impl AsRef<[u8]>, node: Node, below: &[Option<Fingerprint>]) -> UpperEntry {
        UpperEntry { path: path.as_ref().to_vec(), node, below: below.to_vec() }
    }

    #[test]
    fn diff_table() {
        let (dir, file) = (&[fp('d', 0)], &[fp('f', 1)]);
        let entries = vec![
            e("etc", Node::Dir { opaque: false }, dir),
            e("etc/new.conf", Node::File { size: 10 }, &[None]),
            e("etc/passwd", Node::File { size: 900 }, file),
            e("etc/gone", Node::Whiteout, file),
            e("etc/never", Node::Whiteout, &[None]),
            e("opt", Node::Dir { opaque: false }, &[None]),
            e("var/cache", Node::Dir { opaque: true }, dir),
            e("usr/bin/cc", Node::Symlink, &[None]),
            e(b"a\xffb", Node::File { size: 1 }, &[None]),
        ];
        let d: Vec<(Vec<u8>, char)> = diff(&entries, &[]).into_iter().map(|d| (d.path, d.change.letter())).collect();
        let want: Vec<(Vec<u8>, char)> = [("/etc/new.conf", 'A'), ("/etc/passwd", 'M'), ("/etc/gone", 'D'), ("/opt", 'A'), ("/var/cache", 'R'), ("/usr/bin/cc", 'A')]
            .map(|(p, c)| (p.as_bytes().to_vec(), c))
            .into_iter()
            .chain([(b"/a\xffb".to_vec(), 'A')])
            .collect();
        assert_eq!(d, want);
        let only_etc: Vec<Vec<u8>> = diff(&entries, &[b"etc".to_vec()]).into_iter().map(|d| d.path).collect();
        assert_eq!(only_etc, [&b"/etc/new.conf"[..], b"/etc/passwd", b"/etc/gone"]);
    }

    #[test]
    fn a_nix_store_path_is_one_entry_with_its_files_size() {
        let entries = vec![
            e("nix", Node::Dir { opaque: false }, &[None]),
            e("nix/store", Node::Dir { opaque: false }, &[None]),
            e("nix/store/aaa-new", Node::Dir { opaque: false }, &[None]),
            e("nix/store/aaa-new/bin", Node::Dir { opaque: false }, &[None]),
            e("nix/store/aaa-new/bin/hello", Node::File { size: 7 }, &[None]),
            e("nix/store/aaa-new/lib", Node::File { size: 3 }, &[None]),
            e("nix/store/bbb-gone", Node::Whiteout, &[fp('d', 0)]),
            e("nix/store/ccc-kept", Node::Dir { opaque: false }, &[fp('d', 0)]),
            e("nix/store/ccc-kept/f", Node::File { size: 2 }, &[fp('f', 1)]),
            e("nix/var", Node::Dir { opaque: false }, &[None]),
        ];
        let shown = |filters: &[Vec<u8>]| diff(&entries, filters).into_iter().map(|d| (String::from_utf8(d.path).unwrap(), d.change.letter(), d.size)).collect::<Vec<_>>();
        let s = |p: &str, c: char, n: u64| (p.to_owned(), c, n);
        assert_eq!(
            shown(&[]),
            [s("/nix", 'A', 0), s("/nix/store", 'A', 0), s("/nix/store/aaa-new", 'A', 10), s("/nix/store/bbb-gone", 'D', 0), s("/nix/store/ccc-kept", 'M', 2), s("/nix/var", 'A', 0)]
        );
        // A filter inside a store path shows its files.
        assert_eq!(shown(&[b"nix/store/aaa-new/bin".to_vec()]), [s("/nix", 'A', 0), s("/nix/store", 'A', 0), s("/nix/store/aaa-new", 'A', 0), s("/nix/store/aaa-new/bin", 'A', 0), s("/nix/store/aaa-new/bin/hello", 'A', 7)]);
        assert_eq!(shown(&[b"nix/store/ccc-kept".to_vec()]), [s("/nix", 'A', 0), s("/nix/store", 'A', 0), s("/nix/store/ccc-kept", 'M', 2)]);
    }

    #[test]
    fn conflicts_are_upper_paths_whose_lower_changed() {
        let entries = vec![
            e("etc", Node::Dir { opaque: false }, &[fp('d', 0), None]),
            e("etc/a", Node::File { size: 1 }, &[fp('f', 5), fp('f', 5)]),
            e("etc/b", Node::File { size: 1 }, &[fp('f', 5), fp('f', 6)]),
            e("etc/c", Node::Whiteout, &[fp('f', 7), fp('f', 8)]),
            e("etc/d", Node::Dir { opaque: true }, &[None, fp('f', 1)]),
            // Equal size, mode and mtime, from another layer: maybe other bytes (read later).
            e("etc/e", Node::File { size: 1 }, &[fp('f', 5), fp('f', 5).map(|f| Fingerprint { tier: 2, ..f })]),
        ];
        assert_eq!(conflicts(&entries), [&b"etc/b"[..], b"etc/c", b"etc/d", b"etc/e"]);
    }

    #[test]
    fn walk_resolves_every_entry_in_every_stack() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        for d in ["up/etc", "old/etc", "new/etc", "base/etc"] {
            fs::create_dir_all(p(d)).unwrap();
        }
        fs::write(p("up/etc/a"), "mine").unwrap();
        fs::write(p("up/etc/new"), "mine").unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, p("up/etc/b"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
        fs::write(p("base/etc/a"), "base").unwrap();
        fs::write(p("base/etc/b"), "base").unwrap();
        fs::write(p("new/etc/a"), "changed upstream").unwrap();
        std::os::unix::fs::symlink("x", p("old/etc/b")).unwrap();
        let old = vec![p("old"), p("base")];
        let new = vec![p("new"), p("base")];
        let entries = walk(&p("up"), &[&old, &new]).unwrap();
        let paths: Vec<&[u8]> = entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(paths, [&b"etc"[..], b"etc/a", b"etc/b", b"etc/new"]);
        let b = &entries[2];
        assert_eq!(b.node, Node::Whiteout);
        assert_eq!(b.below[0].as_ref().unwrap().target.as_deref(), Some(&b"x"[..]), "the old stack's top is the link");
        assert_eq!(b.below[1].as_ref().unwrap().kind, 'f');
        assert_eq!(entries[1].below[0].as_ref().unwrap().size, 4, "old: base's etc/a");
        assert_eq!(entries[1].below[1].as_ref().unwrap().size, 16, "new: its own etc/a");
        assert_eq!(entries[3].below, [None, None]);
        assert_eq!(conflicts(&entries), [&b"etc/a"[..], b"etc/b"]);
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
        rustix::fs::mknodat(rustix::fs::CWD, top.join("etc/b"), rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0).unwrap();
        fs::create_dir_all(mid.join("opt")).unwrap();
        rustix::fs::lsetxattr(mid.join("opt"), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
        let stack = vec![top.clone(), mid.clone(), bot.clone()];
        assert_eq!(lookup(&stack, "etc/a").unwrap().0, mid.join("etc/a"));
        assert!(lookup(&stack, "etc/b").is_none(), "whited out");
        assert!(lookup(&stack, "opt/x").is_none(), "hidden by an opaque dir");
        assert!(lookup(std::slice::from_ref(&bot), "opt/x").is_some());
        assert!(lookup(&stack, "etc/a/deeper").is_none());
    }
}
