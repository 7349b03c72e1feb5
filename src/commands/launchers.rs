//! export (launchers), exports, unexport, which, conflicts.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use super::{out, out_json};
use crate::launcher::{self, Receipt};
use crate::store::Store;
use crate::text::field;

pub(crate) fn export(store: &Store, env: &str, programs: &[String], to: Option<&Path>, desktop: bool) -> Result<i32> {
    let e = store.env(env)?;
    check_free(store, env, programs, to)?;
    check_present(store, &e, programs)?;
    let made = launcher::export(store, env, programs, to, desktop)?;
    let mut s = String::new();
    for r in &made {
        s.push_str(&format!("{}\n", field(&r.link.display().to_string())));
        for f in &r.files {
            crate::diag::debug!("installed {}", f.display());
        }
    }
    out(&s)?;
    if let Some(dir) = made.first().and_then(|r| r.link.parent()) {
        let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == dir));
        if !on_path {
            crate::diag::warn!("{} is not on your PATH: add it to run the launchers by name", dir.display());
        }
    }
    Ok(0)
}

/// Refuses a program the environment does not have (a name: on its `PATH`; a path: there), so
/// that no launcher is installed that can only fail. Looked up in the current generation's
/// layers and the upper, as the root merges them; with `base = "host"`, the host's too.
pub(crate) fn check_present(store: &Store, env: &crate::store::env::Env, programs: &[String]) -> Result<()> {
    let generation = env.current()?;
    let mut stack = vec![env.upper()];
    stack.extend(store.layer_roots(&generation.layers));
    let host = generation.settings.base.as_deref() == Some("host");
    let present = |p: &Path| crate::store::upper::file_inside(&stack, p) || (host && p.is_file());
    for program in programs {
        let found = if program.contains('/') {
            Path::new(program).is_absolute() && present(Path::new(program))
        } else {
            std::env::split_paths(crate::sandbox::PATH).any(|d| present(&d.join(program)))
        };
        if !found {
            bail!(
                "'{program}' is not in environment '{}' (looked for {}): install it there first, or give its path inside; no launcher was installed",
                env.name,
                if program.contains('/') { program.clone() } else { format!("it on PATH={}", crate::sandbox::PATH) }
            );
        }
    }
    Ok(())
}

/// What `launcher::export` refuses for one program, checked for every program before the first
/// launcher is installed, so that a refusal installs none.
pub(crate) fn check_free(store: &Store, env: &str, programs: &[String], to: Option<&Path>) -> Result<()> {
    let dir = match to {
        Some(t) => t.to_owned(),
        None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/bin"),
            None => return Ok(()), // launcher::export says what is missing
        },
    };
    // Receipts record the resolved directory; a directory not there yet holds nothing.
    let dir = fs::canonicalize(&dir).unwrap_or(dir);
    let receipts = launcher::receipts(store, None)?;
    let mut names: BTreeMap<String, &String> = BTreeMap::new();
    for program in programs {
        let name = Path::new(program).file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty() && n != "plyroot");
        let Some(name) = name else { bail!("'{program}' cannot be a launcher name: give a program name or path (and not `plyroot`); no launcher was installed") };
        if let Some(first) = names.insert(name.clone(), program).filter(|first| *first != program) {
            bail!("'{first}' and '{program}' would both be launched as '{name}': export them one at a time, each with its own --to DIR; no launcher was installed");
        }
        let link = dir.join(&name);
        if let Some(other) = receipts.iter().find(|r| r.link == link && r.env != env) {
            bail!("{} already launches '{}' of environment '{}': `plyroot unexport {}` first; no launcher was installed", link.display(), other.program, other.env, other.name);
        }
        let ours = store.root.join("launchers").join(env).join(&name);
        if fs::symlink_metadata(&link).is_ok() && fs::read_link(&link).ok().as_deref() != Some(ours.as_path()) {
            bail!("{} exists and is not a plyroot launcher: refusing to replace it (use --to DIR, or remove it); no launcher was installed", link.display());
        }
    }
    Ok(())
}

pub(crate) fn exports(store: &Store, json: bool) -> Result<i32> {
    let rs = launcher::receipts(store, None)?;
    if json {
        return out_json(&rs).map(|_| 0);
    }
    let mut s = format!("{:<16} {:<16} {:<20} {}\n", "NAME", "ENV", "PROGRAM", "COMMAND");
    for r in &rs {
        let gone = if store.env(&r.env).is_err() { "  (environment gone)" } else { "" };
        s.push_str(&format!("{:<16} {:<16} {:<20} {}{gone}\n", field(&r.name), r.env, field(&r.program), field(&r.link.display().to_string())));
    }
    out(&s).map(|_| 0)
}

pub(crate) fn unexport(store: &Store, names: &[String], env: Option<&str>, all: bool) -> Result<i32> {
    if names.is_empty() && !all {
        bail!("say which launchers: names, or --all (with --env ENV for one environment's)");
    }
    let rs: Vec<Receipt> = launcher::receipts(store, env)?;
    for n in names {
        if !rs.iter().any(|r| &r.name == n) {
            bail!("no launcher named '{n}'{} (see `plyroot exports`)", env.map(|e| format!(" for environment '{e}'")).unwrap_or_default());
        }
    }
    for r in rs.iter().filter(|r| all || names.contains(&r.name)) {
        launcher::remove(store, r)?;
        crate::diag::info!("removed {}", r.link.display());
    }
    Ok(0)
}

/// An environment's stack for lookups, top first, each with a label.
fn stack(store: &Store, names: &[String], with_upper: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for n in names {
        let env = store.env(n)?;
        let g = env.current()?;
        if with_upper {
            out.push((format!("the upper of {n}"), env.upper()));
        }
        for l in g.layers.iter().rev() {
            let src = store.layer_info(l).map(|i| i.source).unwrap_or_default();
            out.push((format!("layer {} of {n} ({src})", crate::store::layer::short_id(l)), store.layer_root(l)));
        }
        if g.settings.base.as_deref() == Some("host") {
            out.push(("the host root (base = \"host\")".into(), PathBuf::from("/")));
        }
    }
    Ok(out)
}

/// The path `which` asks about, relative to the environment's root: `/` and `.` dropped, `..`
/// refused. Lexically, `..` could climb out of a layer into the store or the host (`which dev
/// ../../etc/shadow` answered from the host's file), and inside a root it depends on the symlinks
/// on the way, which `which` does not follow: so it is not guessed at.
fn inside_path(name: &str, path: &Path) -> Result<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            // Names are bytes: a path that is not UTF-8 is looked up as it is, and shown escaped.
            Component::Normal(n) => parts.push(n.as_bytes()),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("'{}' has a '..' component, which could leave the root of environment '{name}': give the path inside it without '..', e.g. /etc/passwd", crate::store::tree::shown(path.as_os_str().as_bytes()))
            }
        }
    }
    Ok(parts.join(&b'/'))
}

pub(crate) fn which(store: &Store, name: &str, path: &Path) -> Result<i32> {
    let rel = inside_path(name, path)?;
    let st = stack(store, &[name.to_owned()], true)?;
    let dirs: Vec<PathBuf> = st.iter().map(|(_, d)| d.clone()).collect();
    let shown = crate::store::tree::shown(&rel);
    let Some((abs, _)) = crate::store::upper::lookup(&dirs, &rel) else {
        // A link on the way is not followed (it may point anywhere on the host as seen from
        // here): say which one, so the user can ask about its target.
        let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
        for i in 1..comps.len() {
            let prefix = comps[..i].join(&b'/');
            if let Some((p, _)) = crate::store::upper::lookup(&dirs, &prefix).filter(|(_, m)| m.file_type().is_symlink()) {
                let target = fs::read_link(&p).map(|t| crate::store::tree::shown(t.as_os_str().as_bytes())).unwrap_or_default();
                bail!("/{} is a symbolic link (to {target}) in environment '{name}': `plyroot which` does not follow links; ask about the path it leads to", crate::store::tree::shown(&prefix));
            }
        }
        bail!("/{shown} does not exist in environment '{name}'");
    };
    let top = st.iter().position(|(_, d)| abs.starts_with(d) && (d != Path::new("/") || st.iter().all(|(_, o)| o == Path::new("/") || !abs.starts_with(o)))).unwrap_or(0);
    let mut s = format!("/{shown}: {}\n", field(&st[top].0));
    for (label, d) in &st[top + 1..] {
        // Looked up in that tier alone, by the same rules (no link followed, a whiteout is none).
        if crate::store::upper::lookup(std::slice::from_ref(d), &rel).is_some() {
            s.push_str(&format!("  shadows {}\n", field(label)));
        }
    }
    out(&s).map(|_| 0)
}

#[derive(Serialize)]
struct Conflict {
    path: String,
    winner: String,
    shadowed: Vec<String>,
}

/// What a file is, for telling whether two layers provide the same thing: mode, size, mtime and
/// a symlink's target.
type Fingerprint = (u32, u64, i64, Option<PathBuf>);

fn fingerprint(m: &fs::Metadata, p: &Path) -> Fingerprint {
    (m.mode(), m.len(), m.mtime(), m.file_type().is_symlink().then(|| fs::read_link(p).ok()).flatten())
}

pub(crate) fn conflicts(store: &Store, names: &[String], json: bool) -> Result<i32> {
    let st = stack(store, names, false)?;
    let mut seen: BTreeMap<String, Vec<(usize, Fingerprint)>> = BTreeMap::new();
    for (i, (_, dir)) in st.iter().enumerate() {
        if dir == Path::new("/") {
            continue; // the host root is not a layer to compare file by file
        }
        walk(dir, "", &mut |rel, m, abs| seen.entry(rel.to_owned()).or_default().push((i, fingerprint(m, abs))));
    }
    let mut found = Vec::new();
    for (path, providers) in seen {
        if providers.len() < 2 {
            continue;
        }
        let first = &providers[0].1;
        let differing: Vec<String> = providers[1..].iter().filter(|p| &p.1 != first).map(|p| st[p.0].0.clone()).collect();
        if !differing.is_empty() {
            found.push(Conflict { path: format!("/{path}"), winner: st[providers[0].0].0.clone(), shadowed: differing });
        }
    }
    if json {
        return out_json(&found).map(|_| 0);
    }
    let mut s = String::new();
    for c in &found {
        let shadowed: Vec<_> = c.shadowed.iter().map(|l| field(l)).collect();
        s.push_str(&format!("{}: {} shadows {}\n", field(&c.path), field(&c.winner), shadowed.join("; ")));
    }
    out(&s)?;
    crate::diag::info!("{} path(s) provided differently by more than one layer", found.len());
    Ok(0)
}

/// Calls `f` for every non-directory, non-whiteout entry below `dir`.
fn walk(dir: &Path, rel: &str, f: &mut dyn FnMut(&str, &fs::Metadata, &Path)) {
    let Ok(rd) = fs::read_dir(dir.join(rel)) else { return };
    for e in rd.flatten() {
        let r = if rel.is_empty() { e.file_name().to_string_lossy().into_owned() } else { format!("{rel}/{}", e.file_name().to_string_lossy()) };
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_dir() {
            walk(dir, &r, f);
        } else if !crate::store::upper::is_whiteout(&m) {
            f(&r, &m, &e.path());
        }
    }
}
