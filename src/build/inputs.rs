//! The content digest of a step's input: what a step can read of a host path bound into it.
//!
//! The digest covers names, kinds, permission bits, file contents and link targets, in name
//! order: everything a step can copy into its layer but owners and times (a fresh checkout of
//! the same tree by another user, with other mtimes, gives the same key; one with another umask
//! does not, as its files differ to `cp -a`). A socket or fifo is refused: through it a step
//! could talk to whatever host process holds the other end, network or not.
//!
//! Every apply digests every input, so file contents are not read again while a file's stamp
//! (`store::blobs::FileStamp`: device, inode, size, mtime, ctime) is the one recorded beside its
//! content digest (`Known`, as git's index does), except for files changed too shortly before the
//! digest began (`FileStamp::settled`), whose times may not yet tell a second change from the
//! first.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::store::blobs::FileStamp;

/// Content digests of an input's files, by name, with the stamp each was read at.
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Known {
    files: HashMap<String, (FileStamp, String)>,
    #[serde(skip)]
    seen: HashMap<String, (FileStamp, String)>,
    /// When the digest began: only files settled by then are recorded (none without it).
    #[serde(skip)]
    began: Option<SystemTime>,
}

impl Known {
    /// What `path` (a file) recorded, or nothing when it cannot be read.
    pub(crate) fn load(path: &Path) -> Known {
        let mut k: Known = fs::read(path).ok().and_then(|d| serde_json::from_slice(&d).ok()).unwrap_or_default();
        k.began = Some(SystemTime::now());
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
    let stamp = FileStamp::of_metadata(m);
    let name = crate::text::escape_bytes(rel);
    if let Some((s, d)) = known.files.get(&name).filter(|(s, _)| *s == stamp) {
        if let Ok(bytes) = hex::decode(d) {
            h.update(&bytes);
            known.seen.insert(name, (s.clone(), d.clone()));
            return Ok(());
        }
    }
    let content = file_digest(path)?;
    h.update(content);
    if known.began.is_some_and(|t| stamp.settled(t)) {
        known.seen.insert(name, (stamp, hex::encode(content)));
    }
    Ok(())
}

/// The sha256 of a file's content.
pub(crate) fn file_digest(path: &Path) -> Result<[u8; 32]> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut content = Sha256::new();
    std::io::copy(&mut f, &mut content).with_context(|| format!("cannot read {}", path.display()))?;
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
        let mut known = Known { began: Some(SystemTime::now() + std::time::Duration::from_secs(3600)), ..Known::default() };
        let real = digest_with(&d, &mut known).unwrap();
        assert_eq!(real, digest(&d).unwrap());
        let mut again = Known { files: known.seen.clone(), began: Some(SystemTime::now() + std::time::Duration::from_secs(3600)), ..Known::default() };
        assert_eq!(digest_with(&d, &mut again).unwrap(), real);
        assert!(again.updated().is_none());
        let mut lying = Known { files: known.seen.clone(), began: Some(SystemTime::now() + std::time::Duration::from_secs(3600)), ..Known::default() };
        lying.files.get_mut("a.c").unwrap().1 = hex::encode([0u8; 32]);
        assert_ne!(digest_with(&d, &mut lying).unwrap(), real, "the kept digest was not used");
        fs::write(d.join("a.c"), "int main(){return 1;}").unwrap();
        let mut changed = Known { files: known.seen.clone(), began: Some(SystemTime::now() + std::time::Duration::from_secs(3600)), ..Known::default() };
        assert_eq!(digest_with(&d, &mut changed).unwrap(), digest(&d).unwrap());
        assert_ne!(digest(&d).unwrap(), real);
        assert!(changed.updated().is_some());
        // A file input; a missing one is an error naming it.
        assert!(digest(&d.join("a.c")).unwrap().starts_with("sha256:"));
        assert!(digest(&d.join("nope")).unwrap_err().to_string().contains("nope"));
    }
}
