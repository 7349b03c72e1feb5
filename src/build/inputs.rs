//! The content digest of a step's input: what a step can read of a host path bound into it.
//!
//! The digest covers names, kinds, permission bits, file contents and link targets, in name
//! order: everything a step can copy into its layer but owners and times (a fresh checkout of
//! the same tree by another user, with other mtimes, gives the same key; one with another umask
//! does not, as its files differ to `cp -a`). A socket or fifo is refused: through it a step
//! could talk to whatever host process holds the other end, network or not.
//!
//! Every apply digests every input, so file contents are not read again while a file's device,
//! inode, size, mtime and ctime are those recorded beside its content digest (`known`, as git's
//! index does), except for files changed in the last seconds, whose times may not yet tell a
//! second change from the first.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A file's identity and times: while they stay, so does its content.
type Stamp = (u64, u64, u64, i64, i64);

/// Content digests of an input's files, by name, with the stamp each was read at.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Known {
    files: HashMap<String, (Stamp, String)>,
    #[serde(skip)]
    seen: HashMap<String, (Stamp, String)>,
    #[serde(skip)]
    now: i64,
}

impl Known {
    /// What `path` (a file) recorded, or nothing when it cannot be read.
    pub(crate) fn load(path: &Path) -> Known {
        let mut k: Known = fs::read(path).ok().and_then(|d| serde_json::from_slice(&d).ok()).unwrap_or_default();
        k.now = crate::store::now_secs() as i64;
        k
    }

    /// The files seen by the last digest, to record for the next; None when nothing changed.
    pub(crate) fn updated(&self) -> Option<Vec<u8>> {
        let same = self.seen.len() == self.files.len() && self.seen.iter().all(|(k, v)| self.files.get(k) == Some(v));
        (!same).then(|| serde_json::to_vec(&Known { files: self.seen.clone(), ..Known::default() }).unwrap_or_default())
    }
}

/// Where the digests of the input at `src` are kept in the store's `blobs/inputs/`.
pub(crate) fn known_path(blobs: &Path, src: &Path) -> PathBuf {
    blobs.join("inputs").join(hex::encode(&Sha256::digest(src.as_os_str().as_bytes())[..16]))
}

/// The digest of the input at `src` (a directory, a file, or a symlink to one; the bind follows
/// a symlink at the top, so the digest does too).
#[cfg(test)]
pub(crate) fn digest(src: &Path) -> Result<String> {
    digest_with(src, &mut Known::default())
}

/// [`digest`], reading only the files whose stamp `known` does not hold.
pub(crate) fn digest_with(src: &Path, known: &mut Known) -> Result<String> {
    let m = fs::metadata(src).with_context(|| format!("cannot read the input {} (it must exist when the step is built)", src.display()))?;
    let mut h = Sha256::new();
    if m.is_dir() {
        tree(src, b"", &mut h, known)?;
    } else if m.is_file() {
        h.update(b"f");
        file(src, b"", &m, &mut h, known)?;
    } else {
        bail!("the input {} is neither a file nor a directory", src.display());
    }
    h.update((m.permissions().mode() & 0o7777).to_le_bytes());
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn tree(dir: &Path, rel: &[u8], h: &mut Sha256, known: &mut Known) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir).with_context(|| format!("cannot list the input directory {}", dir.display()))?.collect::<std::io::Result<_>>().with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    for e in entries {
        let path = e.path();
        let m = fs::symlink_metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut name = rel.to_vec();
        if !name.is_empty() {
            name.push(b'/');
        }
        name.extend_from_slice(e.file_name().as_bytes());
        // Length-prefixed: no name can be mistaken for another entry's bytes.
        h.update((name.len() as u64).to_le_bytes());
        h.update(&name);
        let t = m.file_type();
        if t.is_fifo() || t.is_socket() {
            bail!(
                "the input {} holds {} {}: a step could talk through it to a process on the host, network or not; leave it out of the input (bind a directory without it)",
                dir.display(),
                if t.is_fifo() { "the fifo" } else { "the socket" },
                path.display()
            );
        }
        if t.is_dir() {
            h.update(b"d");
            h.update((m.permissions().mode() & 0o7777).to_le_bytes());
            tree(&path, &name, h, known)?;
        } else if t.is_file() {
            h.update(b"f");
            file(&path, &name, &m, h, known)?;
        } else if t.is_symlink() {
            let target = fs::read_link(&path).with_context(|| format!("cannot read the link {}", path.display()))?;
            h.update(b"l");
            h.update((target.as_os_str().len() as u64).to_le_bytes());
            h.update(target.as_os_str().as_bytes());
        } else {
            // A device node in a source tree: its kind and number are what a step sees of it.
            h.update(if t.is_block_device() { b"b" } else { b"c" });
            h.update(std::os::unix::fs::MetadataExt::rdev(&m).to_le_bytes());
        }
    }
    h.update(b"\0end");
    Ok(())
}

fn file(path: &Path, rel: &[u8], m: &fs::Metadata, h: &mut Sha256, known: &mut Known) -> Result<()> {
    h.update((m.permissions().mode() & 0o7777).to_le_bytes());
    let stamp: Stamp = (m.dev(), m.ino(), m.size(), m.mtime() * 1_000_000_000 + m.mtime_nsec(), m.ctime() * 1_000_000_000 + m.ctime_nsec());
    let name = crate::text::escape_bytes(rel);
    if let Some((s, d)) = known.files.get(&name).filter(|(s, _)| *s == stamp) {
        if let Ok(bytes) = hex::decode(d) {
            h.update(&bytes);
            known.seen.insert(name, (*s, d.clone()));
            return Ok(());
        }
    }
    let content = read_digest(path)?;
    h.update(content);
    // A file changed in the last seconds may change again within its mtime's granularity.
    if m.mtime().max(m.ctime()) < known.now - 2 {
        known.seen.insert(name, (stamp, hex::encode(content)));
    }
    Ok(())
}

fn read_digest(path: &Path) -> Result<[u8; 32]> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot read the input file {}", path.display()))?;
    let mut content = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read the input file {}", path.display()))?;
        if n == 0 {
            break;
        }
        content.update(&buf[..n]);
    }
    Ok(content.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_content_modes_and_names_not_times() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("src");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a.c"), "int main(){}").unwrap();
        fs::write(d.join("sub/b"), "b").unwrap();
        std::os::unix::fs::symlink("a.c", d.join("link")).unwrap();
        let first = digest(&d).unwrap();
        // Times are not content.
        fs::write(d.join("sub/b"), "b").unwrap();
        fs::File::open(d.join("sub/b")).unwrap().set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(digest(&d).unwrap(), first);
        // Modes (a step's `cp -a` keeps them), content, names and link targets are.
        fs::set_permissions(d.join("a.c"), fs::Permissions::from_mode(0o600)).unwrap();
        let private = digest(&d).unwrap();
        assert_ne!(private, first);
        fs::set_permissions(d.join("a.c"), fs::Permissions::from_mode(0o755)).unwrap();
        let exec = digest(&d).unwrap();
        assert_ne!(exec, private);
        fs::write(d.join("sub/b"), "c").unwrap();
        let content = digest(&d).unwrap();
        assert_ne!(content, exec);
        fs::rename(d.join("sub/b"), d.join("sub/c")).unwrap();
        let renamed = digest(&d).unwrap();
        assert_ne!(renamed, content);
        fs::remove_file(d.join("link")).unwrap();
        std::os::unix::fs::symlink("sub", d.join("link")).unwrap();
        assert_ne!(digest(&d).unwrap(), renamed);
        // A socket would be a channel to the host: refused, naming it.
        let _l = std::os::unix::net::UnixListener::bind(d.join("sub/agent.sock")).unwrap();
        let e = digest(&d).unwrap_err().to_string();
        assert!(e.contains("the socket") && e.contains("agent.sock"), "{e}");
        fs::remove_file(d.join("sub/agent.sock")).unwrap();
        // Digests kept across runs: a file whose stamp is unchanged is not read again (a record
        // made to lie shows it is used), and one that changed is.
        let mut known = Known { now: i64::MAX, ..Known::default() };
        let real = digest_with(&d, &mut known).unwrap();
        assert_eq!(real, digest(&d).unwrap());
        let mut again = Known { files: known.seen.clone(), now: i64::MAX, ..Known::default() };
        assert_eq!(digest_with(&d, &mut again).unwrap(), real);
        assert!(again.updated().is_none());
        let mut lying = Known { files: known.seen.clone(), now: i64::MAX, ..Known::default() };
        lying.files.get_mut("a.c").unwrap().1 = hex::encode([0u8; 32]);
        assert_ne!(digest_with(&d, &mut lying).unwrap(), real, "the kept digest was not used");
        fs::write(d.join("a.c"), "int main(){return 1;}").unwrap();
        let mut changed = Known { files: known.seen.clone(), now: i64::MAX, ..Known::default() };
        assert_eq!(digest_with(&d, &mut changed).unwrap(), digest(&d).unwrap());
        assert_ne!(digest(&d).unwrap(), real);
        assert!(changed.updated().is_some());
        // A file input; a missing one is an error naming it.
        assert!(digest(&d.join("a.c")).unwrap().starts_with("sha256:"));
        assert!(digest(&d.join("nope")).unwrap_err().to_string().contains("nope"));
    }
}
