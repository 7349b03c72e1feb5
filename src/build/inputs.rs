//! The content digest of a step's input: what a step can read of a host path bound into it.
//!
//! The digest covers names, kinds, permission bits, file contents and link targets, in name
//! order: everything a step can copy into its layer but owners and times (a fresh checkout of
//! the same tree by another user, with other mtimes, gives the same key; one with another umask
//! does not, as its files differ to `cp -a`). A socket or fifo is refused: through it a step
//! could talk to whatever host process holds the other end, network or not.

use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The digest of the input at `src` (a directory, a file, or a symlink to one; the bind follows
/// a symlink at the top, so the digest does too).
pub(crate) fn digest(src: &Path) -> Result<String> {
    let m = fs::metadata(src).with_context(|| format!("cannot read the input {} (it must exist when the step is built)", src.display()))?;
    let mut h = Sha256::new();
    if m.is_dir() {
        tree(src, b"", &mut h)?;
    } else if m.is_file() {
        h.update(b"f");
        file(src, &m, &mut h)?;
    } else {
        bail!("the input {} is neither a file nor a directory", src.display());
    }
    h.update((m.permissions().mode() & 0o7777).to_le_bytes());
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn tree(dir: &Path, rel: &[u8], h: &mut Sha256) -> Result<()> {
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
            tree(&path, &name, h)?;
        } else if t.is_file() {
            h.update(b"f");
            file(&path, &m, h)?;
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

fn file(path: &Path, m: &fs::Metadata, h: &mut Sha256) -> Result<()> {
    h.update((m.permissions().mode() & 0o7777).to_le_bytes());
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
    h.update(content.finalize());
    Ok(())
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
        // A file input; a missing one is an error naming it.
        assert!(digest(&d.join("a.c")).unwrap().starts_with("sha256:"));
        assert!(digest(&d.join("nope")).unwrap_err().to_string().contains("nope"));
    }
}
