//! Processes as `/proc` shows them: the mount namespace each one is in, the overlay mounts that
//! namespace holds, and a command line to name the process by.
//!
//! This is how plyroot knows what is alive: a run, and whatever it started (a daemon that closed
//! every fd and left its session included), lives exactly as long as some process is in a mount
//! namespace that holds the run's overlay. Processes of other users are not readable and are
//! skipped; they cannot be in our namespaces anyway, except as ids we map, which we can read.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

/// The inode of `/proc/PID/ns/mnt`: which mount namespace `pid` is in (None: gone, a zombie, or
/// not ours to read).
pub(crate) fn mnt_ns(pid: i32) -> Option<u64> {
    ns_link_ino(&fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?.to_string_lossy())
}

/// `mnt:[4026531841]` → 4026531841.
fn ns_link_ino(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// The id of the mount namespace `pid` is in (None: gone, or not ours to read).
pub(crate) fn mnt_ns_id(pid: i32) -> Option<u64> {
    super::ns::mnt_ns_id(&super::ns::open_ns(pid, "mnt").ok()?).ok()
}

/// Every process in a user namespace with one of the ids `bases`, or in one nested in it, with
/// that base's id. Everything a run starts — daemons, and programs that made namespaces of their
/// own or left the run's mount namespace — stays in that tree for as long as it lives.
pub(crate) fn in_user_ns_trees(bases: &[u64]) -> Vec<(i32, u64)> {
    use super::ns;
    let mut out = Vec::new();
    if bases.is_empty() {
        return out;
    }
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let (Ok(ours), Some(own_id)) = (fs::read_link("/proc/self/ns/user"), ns::open_ns(me, "user").ok().and_then(|f| ns::ns_id(&f))) else { return out };
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    let mut pids: Vec<i32> = rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        // Most processes are in our own user namespace: one readlink says so.
        match fs::read_link(format!("/proc/{pid}/ns/user")) {
            Ok(l) if l != ours => {}
            _ => continue,
        }
        let Ok(mut fd) = ns::open_ns(pid, "user") else { continue };
        for _ in 0..32 {
            match ns::ns_id(&fd) {
                Some(id) if bases.contains(&id) => {
                    out.push((pid, id));
                    break;
                }
                Some(id) if id != own_id => {}
                _ => break,
            }
            match ns::parent_userns(&fd) {
                Ok(p) => fd = p,
                Err(_) => break,
            }
        }
    }
    out
}

/// Every mount namespace some readable process is in, with one pid in it (the lowest).
pub(crate) fn mount_namespaces() -> BTreeMap<u64, i32> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    let mut pids: Vec<i32> = rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    pids.sort_unstable();
    for pid in pids {
        if let Some(ino) = mnt_ns(pid) {
            out.entry(ino).or_insert(pid);
        }
    }
    out
}

/// One overlay mount in a mount namespace, with the directories it was made of (as given at mount
/// time: plyroot always passes absolute paths).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Overlay {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
}

impl Overlay {
    /// Every directory the overlay holds on to.
    pub(crate) fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.lowers.iter().chain(&self.upper).chain(&self.work)
    }
}

/// The overlay mounts in the mount namespace of `pid` (empty when it cannot be read).
pub(crate) fn overlays(pid: i32) -> Vec<Overlay> {
    read_proc(pid, "mountinfo").map(|t| parse_overlays(&String::from_utf8_lossy(&t))).unwrap_or_default()
}

/// Reads `/proc/PID/NAME`, opened with `openat2` so no symlink is followed on the way. (It also
/// keeps a scan whose length depends on what else runs out of the `openat` calls of the command,
/// whose order the fault-injection tests count on.)
fn read_proc(pid: i32, name: &str) -> Option<Vec<u8>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = rustix::fs::openat2(rustix::fs::CWD, format!("/proc/{pid}/{name}"), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::NO_SYMLINKS).ok()?;
    let mut s = Vec::new();
    std::io::Read::read_to_end(&mut fs::File::from(fd), &mut s).ok()?;
    Some(s)
}

/// The overlay lines of a mountinfo text. Fields: `id parent maj:min root mount-point options
/// [optional…] - fstype source super-options`; overlayfs lists its directories in the super
/// options (`lowerdir+=…,upperdir=…,workdir=…`, or one `lowerdir=a:b` from mount(2)).
pub(crate) fn parse_overlays(mountinfo: &str) -> Vec<Overlay> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((_, tail)) = line.split_once(" - ") else { continue };
        let mut f = tail.splitn(3, ' ');
        if f.next() != Some("overlay") {
            continue;
        }
        let (_source, opts) = (f.next(), f.next().unwrap_or(""));
        let mut o = Overlay::default();
        for opt in split_options(opts) {
            let Some((k, v)) = opt.split_once('=') else { continue };
            let v = unescape(v);
            match k {
                "lowerdir+" => o.lowers.push(PathBuf::from(v)),
                "lowerdir" => o.lowers.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from)),
                "upperdir" => o.upper = Some(PathBuf::from(v)),
                "workdir" => o.work = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        out.push(o);
    }
    out
}

/// Splits super options at commas; overlayfs escapes a comma inside a path as `\,`.
fn split_options(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.last_mut().unwrap().push(c);
                if let Some(n) = chars.next() {
                    out.last_mut().unwrap().push(n);
                }
            }
            ',' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// Undoes mountinfo's escapes: `\040` (octal) for space, tab, newline and backslash, and
/// overlayfs's own `\,` and `\:`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else if b[i] == b'\\' && i + 1 < b.len() && matches!(b[i + 1], b',' | b':' | b'\\') {
            out.push(b[i + 1]);
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A process's command line for messages: arguments joined by spaces, control characters and
/// bytes that are not UTF-8 escaped ([`crate::text::escape_bytes`]), at most 120 characters.
pub(crate) fn cmdline(pid: i32) -> String {
    let raw = read_proc(pid, "cmdline").unwrap_or_default();
    let mut s: String = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(crate::text::escape_bytes)
        .collect::<Vec<_>>()
        .join(" ");
    if s.is_empty() {
        s = read_proc(pid, "comm").map(|c| format!("[{}]", crate::text::escape_bytes(c.trim_ascii()))).unwrap_or_else(|| "?".into());
    }
    if s.chars().count() > 120 {
        s = s.chars().take(117).collect::<String>() + "...";
    }
    s
}

/// Replaces this process's command line (what `ps` shows, read from /proc/PID/cmdline) with
/// `title`, and empties its environment block (/proc/PID/environ): by writing over both in its
/// own memory through /proc/self/mem. Afterwards nothing in this process may read its arguments
/// or environment again.
pub(crate) fn retitle(title: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let stat = fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name: state is field 3; arg_start..env_end are fields 48-51.
    let f: Vec<u64> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect()).unwrap_or_default();
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let (arg_start, arg_end, env_start, env_end) = (field(48), field(49), field(50), field(51));
    if arg_start == 0 || arg_end <= arg_start || env_end < env_start {
        return Err(std::io::Error::other("no argument area in /proc/self/stat"));
    }
    let mem = fs::OpenOptions::new().write(true).open("/proc/self/mem")?;
    let mut args = vec![0u8; (arg_end - arg_start) as usize];
    let n = title.len().min(args.len().saturating_sub(1));
    args[..n].copy_from_slice(&title.as_bytes()[..n]);
    mem.write_all_at(&args, arg_start)?;
    mem.write_all_at(&vec![0u8; (env_end - env_start) as usize], env_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_lines_give_their_directories() {
        let text = "\
66 42 0:39 / / rw,relatime - overlay plyroot rw,lowerdir+=/s/envs/t1/skel/1-0-79,lowerdir+=/s/layers/29d0/root,upperdir=/s/envs/t1/upper,workdir=/s/envs/t1/work/0,redirect_dir=nofollow,uuid=on,userxattr
67 66 0:5 / /proc rw,nosuid - proc proc rw
68 66 0:40 / /usr rw shared:3 - overlay overlay rw,lowerdir=/a\\040b:/c,upperdir=/u\\,v,workdir=/w
";
        let o = parse_overlays(text);
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].lowers, [PathBuf::from("/s/envs/t1/skel/1-0-79"), PathBuf::from("/s/layers/29d0/root")]);
        assert_eq!(o[0].upper.as_deref(), Some(std::path::Path::new("/s/envs/t1/upper")));
        assert_eq!(o[0].work.as_deref(), Some(std::path::Path::new("/s/envs/t1/work/0")));
        assert_eq!(o[1].lowers, [PathBuf::from("/a b"), PathBuf::from("/c")]);
        assert_eq!(o[1].upper.as_deref(), Some(std::path::Path::new("/u,v")));
        assert_eq!(o[1].dirs().count(), 4);
    }

    #[test]
    fn namespace_links_parse_and_this_process_is_seen() {
        assert_eq!(ns_link_ino("mnt:[4026531841]"), Some(4026531841));
        assert_eq!(ns_link_ino("mnt:4026531841"), None);
        let me = std::process::id() as i32;
        let ns = mnt_ns(me).expect("our own mount namespace");
        assert!(mount_namespaces().contains_key(&ns));
        assert!(!cmdline(me).is_empty());
    }
}
