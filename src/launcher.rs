//! Launchers: host commands that run one program of one environment.
//!
//! ```text
//! ~/.local/bin/gcc ─symlink─▶ <store>/launchers/<env>/gcc ─symlink─▶ <store>/bin/plyroot
//!                             <store>/launchers/<env>/gcc.json   the receipt
//! ```
//! Started as `gcc`, plyroot finds the link it was started through (argv[0], else PATH), reads
//! the one link it points at, and knows the store, the environment and the program from that
//! path alone: no script, no interpreter, one readlink. The receipt records what was installed
//! where, so `unexport` and `rm` remove exactly that.
//!
//! The binary the links end at is a copy kept in the store, not wherever plyroot was installed:
//! the store is visible inside environments (it lives under the shared home), so a launcher
//! started inside one finds it there and can compose.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::store::Store;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Receipt {
    pub env: String,
    /// The launcher's name (the command on the host).
    pub name: String,
    /// What it runs inside: a name looked up in PATH there, or an absolute path.
    pub program: String,
    /// The host command that was installed.
    pub link: PathBuf,
    /// Desktop entries and icons installed with it.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

fn dir(store: &Store, env: &str) -> PathBuf {
    store.root.join("launchers").join(env)
}

/// Every receipt in the store, optionally of one environment.
pub(crate) fn receipts(store: &Store, env: Option<&str>) -> Result<Vec<Receipt>> {
    let mut out = Vec::new();
    let base = store.root.join("launchers");
    let Ok(rd) = fs::read_dir(&base) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if env.is_some_and(|x| x != name) {
            continue;
        }
        for f in fs::read_dir(e.path()).into_iter().flatten().flatten() {
            if f.path().extension().is_some_and(|x| x == "json") {
                let r: Receipt = serde_json::from_slice(&fs::read(f.path())?).with_context(|| format!("{} is corrupt", f.path().display()))?;
                out.push(r);
            }
        }
    }
    out.sort_by(|a, b| (&a.env, &a.name).cmp(&(&b.env, &b.name)));
    Ok(out)
}

fn dirs_index(store: &Store) -> PathBuf {
    store.root.join("launchers").join(".dirs")
}

/// Rewrites the index of the directories launchers are in, from the receipts: a launch reads it
/// (one small file) instead of every receipt.
fn write_dirs_index(store: &Store) -> Result<()> {
    let mut dirs: Vec<PathBuf> = receipts(store, None)?.into_iter().filter_map(|r| r.link.parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    let text: String = dirs.iter().filter_map(|d| d.to_str()).map(|d| format!("{d}\n")).collect();
    fs::create_dir_all(store.root.join("launchers")).with_context(|| format!("cannot create {}", store.root.join("launchers").display()))?;
    crate::store::write_atomic(&dirs_index(store), text.as_bytes())
}

/// The directories that hold launchers, for PATH inside an environment: those of the caller's
/// PATH first, in its order, then the others `export` installed into. A store made before the
/// index existed is read from its receipts.
pub(crate) fn path_dirs(store: &Store, caller_path: Option<&std::ffi::OsStr>) -> Vec<PathBuf> {
    let mut known: Vec<PathBuf> = match fs::read_to_string(dirs_index(store)) {
        Ok(t) => t.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect(),
        Err(_) if store.root.join("launchers").is_dir() => receipts(store, None).unwrap_or_default().into_iter().filter_map(|r| r.link.parent().map(Path::to_path_buf)).collect(),
        Err(_) => return Vec::new(),
    };
    if known.is_empty() {
        return known;
    }
    let mut out = Vec::new();
    for d in caller_path.map(std::env::split_paths).into_iter().flatten() {
        // export records the directory resolved; PATH may name it through a link.
        let real = if known.contains(&d) { Some(d.clone()) } else { fs::canonicalize(&d).ok().filter(|r| known.contains(r)) };
        if let Some(real) = real {
            known.retain(|k| *k != real);
            out.push(d);
        }
    }
    out.extend(known);
    out
}

fn default_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).context("$HOME is not set: pass --to DIR")?;
    Ok(PathBuf::from(home).join(".local/bin"))
}

/// Installs launchers for `programs` of `env` into `to`.
pub(crate) fn export(store: &Store, env: &str, programs: &[String], to: Option<&Path>, desktop: bool) -> Result<Vec<Receipt>> {
    store.env(env)?;
    let to = match to {
        Some(t) => t.to_owned(),
        None => default_dir()?,
    };
    fs::create_dir_all(&to).with_context(|| format!("cannot create {}", to.display()))?;
    let to = fs::canonicalize(&to).with_context(|| format!("cannot resolve {}", to.display()))?;
    let me = store_binary(store)?;
    let d = dir(store, env);
    fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    let mut out = Vec::new();
    for program in programs {
        let name = Path::new(program).file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty() && n != "plyroot");
        let Some(name) = name else { bail!("'{program}' cannot be a launcher name: give a program name or path (and not `plyroot`)") };
        let link = to.join(&name);
        let inner = d.join(&name);
        if let Some(other) = receipts(store, None)?.into_iter().find(|r| r.link == link && r.env != env) {
            bail!("{} already launches '{}' of environment '{}': `plyroot unexport {}` first", link.display(), other.program, other.env, other.name);
        }
        match fs::symlink_metadata(&link) {
            Ok(_) if fs::read_link(&link).ok().as_deref() == Some(inner.as_path()) => {}
            Ok(_) => bail!("{} exists and is not a plyroot launcher: refusing to replace it (use --to DIR, or remove it)", link.display()),
            Err(_) => {}
        }
        replace_symlink(&me, &inner)?;
        let mut r = Receipt { env: env.to_owned(), name: name.clone(), program: program.clone(), link: link.clone(), files: Vec::new() };
        if desktop {
            r.files = install_desktop(store, env, program, &link)?;
        }
        crate::store::write_atomic(&d.join(format!("{name}.json")), &serde_json::to_vec_pretty(&r)?)?;
        replace_symlink(&inner, &link)?;
        out.push(r);
    }
    write_dirs_index(store)?;
    Ok(out)
}

/// The store's copy of the running plyroot binary, refreshed when it differs.
fn store_binary(store: &Store) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the plyroot binary to link launchers to")?;
    let dest = store.root.join("bin/plyroot");
    let same = |a: &Path, b: &Path| -> bool {
        match (fs::metadata(a), fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.len() == y.len() && fs::read(a).ok() == fs::read(b).ok(),
            _ => false,
        }
    };
    if me != dest && !same(&me, &dest) {
        fs::create_dir_all(store.root.join("bin")).with_context(|| format!("cannot create {}", store.root.join("bin").display()))?;
        let tmp = store.root.join(format!("bin/.plyroot.tmp-{}", std::process::id()));
        fs::copy(&me, &tmp).with_context(|| format!("cannot copy {} into the store", me.display()))?;
        // Rename: running launchers keep the old file, new ones start the new one.
        fs::rename(&tmp, &dest).with_context(|| format!("cannot install {}", dest.display()))?;
    }
    Ok(dest)
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = link.with_file_name(format!(".{}.plyroot-tmp", link.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("cannot install {}", link.display()))
}

/// Removes a launcher: its host link (only while it is still ours), desktop files, receipt.
pub(crate) fn remove(store: &Store, r: &Receipt) -> Result<()> {
    let inner = dir(store, &r.env).join(&r.name);
    if fs::read_link(&r.link).ok().as_deref() == Some(inner.as_path()) {
        fs::remove_file(&r.link).with_context(|| format!("cannot remove {}", r.link.display()))?;
    }
    for f in &r.files {
        let _ = fs::remove_file(f);
    }
    let _ = fs::remove_file(&inner);
    fs::remove_file(dir(store, &r.env).join(format!("{}.json", r.name))).with_context(|| format!("cannot remove the receipt of {}", r.name))?;
    let _ = fs::remove_dir(dir(store, &r.env));
    write_dirs_index(store)
}

/// `.desktop` entries of the environment that start `program`, rewritten to start the launcher,
/// and the icons they name. Only regular files inside the stack are read or copied: the stack
/// (an upper included, which programs in the environment write) may hold symlinks to host files
/// such as `icon.png -> /home/me/.ssh/id_ed25519`, and following one would copy a host file into
/// the user's desktop directories. Every path is opened beneath its layer's root with no symlink
/// on the way ([`open_beneath`]).
fn install_desktop(store: &Store, env: &str, program: &str, launcher: &Path) -> Result<Vec<PathBuf>> {
    let e = store.env(env)?;
    let g = e.current()?;
    let mut stack = vec![e.upper()];
    stack.extend(store.layer_roots(&g.layers));
    let home = PathBuf::from(std::env::var_os("HOME").context("$HOME is not set")?);
    let apps = home.join(".local/share/applications");
    let base = Path::new(program).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut installed = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for layer in &stack {
        for (fname, _) in list_beneath(layer, Path::new("usr/share/applications")) {
            let fname = fname.to_string_lossy().into_owned();
            if fname.ends_with(".desktop") && !names.contains(&fname) {
                names.push(fname);
            }
        }
    }
    for fname in names {
        let rel = format!("usr/share/applications/{fname}");
        let Some((abs, _)) = crate::store::upper::lookup(&stack, &rel) else { continue };
        let Some(tier) = stack.iter().find(|t| abs.starts_with(t)) else { continue };
        let Some(text) = read_regular(tier, Path::new(&rel)).and_then(|b| String::from_utf8(b).ok()) else { continue };
        let starts_it = text.lines().any(|l| {
            l.strip_prefix("Exec=").and_then(|x| x.split_whitespace().next()).is_some_and(|cmd| Path::new(cmd).file_name().is_some_and(|n| n.to_string_lossy() == base))
        });
        if !starts_it {
            continue;
        }
        let mut out = String::new();
        let mut icons = Vec::new();
        for l in text.lines() {
            if let Some(x) = l.strip_prefix("Exec=") {
                let rest = x.split_once(char::is_whitespace).map(|(_, r)| format!(" {r}")).unwrap_or_default();
                out.push_str(&format!("Exec={}{rest}\n", launcher.display()));
            } else if l.starts_with("TryExec=") {
                continue;
            } else {
                if let Some(i) = l.strip_prefix("Icon=") {
                    icons.push(i.to_owned());
                }
                out.push_str(l);
                out.push('\n');
            }
        }
        fs::create_dir_all(&apps).with_context(|| format!("cannot create {}", apps.display()))?;
        let dest = apps.join(format!("plyroot-{env}-{fname}"));
        fs::write(&dest, out).with_context(|| format!("cannot write {}", dest.display()))?;
        installed.push(dest);
        for icon in icons.iter().filter(|i| !i.contains('/') && !i.is_empty() && *i != "." && *i != "..") {
            installed.extend(copy_icons(&stack, icon, &home)?);
        }
    }
    if installed.is_empty() {
        crate::diag::warn!("no .desktop entry in environment '{env}' starts '{program}'; only the command was installed");
    }
    Ok(installed)
}

/// Copies the regular files named `icon.*` under `usr/share/icons` of each layer (top first; the
/// first copy of a path wins) to `~/.local/share/icons`.
fn copy_icons(stack: &[PathBuf], icon: &str, home: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    /// Depth of an icon theme (`hicolor/48x48/apps/x.png`) with room to spare; deeper is not an
    /// icon theme, and the bound keeps the walk's open directories few.
    const MAX_DEPTH: usize = 8;
    fn walk(layer: &Path, rel: &Path, icon: &str, depth: usize, found: &mut Vec<PathBuf>) {
        for (name, kind) in list_beneath(layer, rel) {
            let r = rel.join(&name);
            if kind == rustix::fs::FileType::Directory && depth < MAX_DEPTH {
                walk(layer, &r, icon, depth + 1, found);
            } else if kind == rustix::fs::FileType::RegularFile && Path::new(&name).file_stem().is_some_and(|s| s.to_string_lossy() == icon) {
                found.push(r);
            }
        }
    }
    for layer in stack {
        let mut found = Vec::new();
        walk(layer, Path::new("usr/share/icons"), icon, 0, &mut found);
        for rel in found {
            let dest = home.join(".local/share/icons").join(rel.strip_prefix("usr/share/icons").unwrap_or(&rel));
            if fs::symlink_metadata(&dest).is_ok() {
                continue;
            }
            // Read through an fd opened beneath the layer: what was listed as a regular file may
            // have been replaced by a link since (an upper is written by running programs).
            let Some(data) = read_regular(layer, &rel) else { continue };
            if let Some(p) = dest.parent() {
                fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
            }
            // create_new: never write through a link someone put at the destination.
            let written = fs::OpenOptions::new().write(true).create_new(true).open(&dest).and_then(|mut f| std::io::Write::write_all(&mut f, &data));
            if written.is_ok() {
                out.push(dest);
            }
        }
    }
    Ok(out)
}

/// Opens `rel` beneath `root` (a layer's tree or an upper) without following any symlink or
/// leaving `root` (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): what is found is inside the layer.
/// `O_NONBLOCK` so that a FIFO where a file was expected does not hang the export.
fn open_beneath(root: &Path, rel: &Path, flags: rustix::fs::OFlags) -> Option<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    rustix::fs::openat2(&dir, rel, flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty(), how).ok()
}

/// The content of `rel` beneath `root` when it is a regular file there; `None` for anything
/// else (a symlink, a device, a FIFO, a directory, nothing).
fn read_regular(root: &Path, rel: &Path) -> Option<Vec<u8>> {
    let fd = open_beneath(root, rel, rustix::fs::OFlags::RDONLY)?;
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd).ok()?.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut fs::File::from(fd), &mut data).ok()?;
    Some(data)
}

/// The entries of the directory `rel` beneath `root` (opened as [`open_beneath`] does), with
/// their types as `lstat` gives them; empty when it is not a directory inside `root`.
fn list_beneath(root: &Path, rel: &Path) -> Vec<(std::ffi::OsString, rustix::fs::FileType)> {
    use std::os::unix::ffi::OsStrExt;
    let Some(fd) = open_beneath(root, rel, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY) else { return Vec::new() };
    let Ok(dir) = rustix::fs::Dir::read_from(&fd) else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let Ok(st) = rustix::fs::statat(&fd, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else { continue };
        out.push((std::ffi::OsStr::from_bytes(name).to_owned(), rustix::fs::FileType::from_raw_mode(st.st_mode)));
    }
    out
}

/// What a launcher invocation resolves to.
pub(crate) struct Invocation {
    pub store: PathBuf,
    pub env: String,
    pub program: String,
    pub args: Vec<OsString>,
}

/// Recognises a launcher invocation from argv: plyroot started through a name other than its
/// own. Returns None for ordinary `plyroot …` use.
pub(crate) fn invocation(argv: &[OsString]) -> Result<Option<Invocation>> {
    let Some(arg0) = argv.first() else { return Ok(None) };
    let arg0 = Path::new(arg0);
    let Some(name) = arg0.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Ok(None) };
    if name == "plyroot" || name.starts_with("plyroot-") || name.starts_with("plyroot.") {
        return Ok(None);
    }
    // The link we were started through: argv[0] as given when it has a slash, else the first
    // match in PATH (as the shell found it).
    let link = if arg0.components().count() > 1 {
        Some(arg0.to_owned())
    } else {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(&name)).find(|c| fs::symlink_metadata(c).is_ok_and(|m| m.file_type().is_symlink())))
    };
    let Some(link) = link else { return Ok(None) };
    let Ok(inner) = fs::read_link(&link) else { return Ok(None) };
    let inner = if inner.is_absolute() { inner } else { link.parent().unwrap_or(Path::new("/")).join(inner) };
    // <store>/launchers/<env>/<name>
    let (Some(envdir), Some(prog)) = (inner.parent(), inner.file_name()) else { return Ok(None) };
    let (Some(launchers), Some(env)) = (envdir.parent(), envdir.file_name()) else { return Ok(None) };
    if launchers.file_name().is_none_or(|n| n != "launchers") {
        return Ok(None);
    }
    let store = launchers.parent().unwrap_or(Path::new("/")).to_owned();
    let env = env.to_string_lossy().into_owned();
    let receipt = envdir.join(format!("{}.json", prog.to_string_lossy()));
    let r: Receipt = match fs::read(&receipt) {
        Ok(d) => serde_json::from_slice(&d).with_context(|| format!("{} is corrupt", receipt.display()))?,
        Err(_) => bail!("{} is a plyroot launcher whose receipt {} is gone: remove the link, or export it again with `plyroot export {env} {name}`", link.display(), receipt.display()),
    };
    let args = argv[1..].to_vec();
    Ok(Some(Invocation { store, env, program: r.program, args }))
}
