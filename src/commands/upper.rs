//! diff, commit, reset, rebase: the upper's lifecycle.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{human, out, out_json};
use crate::sandbox::as_root_inside;
use crate::store::env::Env;
use crate::store::layer::LayerInfo;
use crate::store::meta::Overrides;
use crate::store::upper::{self, UpperEntry};
use crate::store::{canonical, now_secs, write_atomic, Store};

fn lowers_of(store: &Store, layers: &[String]) -> Vec<PathBuf> {
    layers.iter().rev().map(|l| store.layer_root(l)).collect()
}

/// Opens an environment for a change of its upper: locked, recovered, and with no live run.
fn open_for_change(store: &Store, name: &str, what: &str) -> Result<(Env, fs::File)> {
    let env = store.env(name)?;
    let lock = env.lock()?;
    env.recover(store.remover)?;
    recover_commit(store, &env)?;
    env.ensure_idle(what)?;
    Ok((env, lock))
}

pub(crate) fn diff(store: &Store, name: &str, paths: &[PathBuf], json: bool) -> Result<i32> {
    let env = store.env(name)?;
    if commit_interrupted(&env) {
        let _lock = env.lock()?;
        recover_commit(store, &env)?;
    }
    let base = env.upper_base()?;
    let lowers = lowers_of(store, &base);
    let upper = env.upper();
    let filters: Vec<String> = paths.iter().map(|p| p.to_string_lossy().trim_matches('/').to_owned()).collect();
    // Runs may have written files only their ids can read: walk where we are root over them.
    let entries = as_root_inside(move || {
        let entries = upper::walk(&upper).with_context(|| format!("cannot read {}", upper.display()))?;
        Ok(upper::diff(&entries, |p| upper::lookup(&lowers, p).map(|(_, m)| m.is_dir()), &filters))
    })?;
    if json {
        return out_json(&entries).map(|_| 0);
    }
    let mut s = String::new();
    for e in &entries {
        let size = if e.kind == 'f' { format!("  ({})", human(e.size)) } else { String::new() };
        s.push_str(&format!("{} {}{}{}\n", e.change.letter(), e.path, if e.kind == 'd' { "/" } else { "" }, size));
    }
    out(&s)?;
    if base != env.current()?.layers {
        crate::diag::info(&format!("(against the layers the upper was written on, not generation {}'s: see `plyroot rebase {name}`)", env.current()?.number));
    }
    Ok(0)
}

/// The journal of a commit between publishing its layer and switching to its generation.
#[derive(Serialize, Deserialize)]
struct CommitJournal {
    layer: String,
    base: Vec<String>,
    reason: String,
}

fn journal_path(env: &Env) -> PathBuf {
    env.dir.join("commit.json")
}

fn staging_dir(env: &Env) -> PathBuf {
    env.dir.join("commit")
}

/// Whether a commit was interrupted in this environment (cheap: two stats).
pub(crate) fn commit_interrupted(env: &Env) -> bool {
    journal_path(env).exists() || staging_dir(env).exists()
}

/// Finishes a commit that reached its journal, or puts back an upper a crash left half-moved.
/// Never deletes what the user wrote: what cannot be put back is kept under saved/.
pub(crate) fn recover_commit(store: &Store, env: &Env) -> Result<()> {
    let staged = staging_dir(env);
    if let Ok(d) = fs::read(journal_path(env)) {
        let j: CommitJournal = serde_json::from_slice(&d).context("the commit journal is corrupt")?;
        if !store.layer_dir(&j.layer).exists() && staged.exists() {
            fs::rename(&staged, store.layer_dir(&j.layer)).context("cannot publish the committed layer")?;
        }
        if store.layer_dir(&j.layer).exists() {
            let cur = env.current()?;
            let mut want = j.base.clone();
            want.push(j.layer.clone());
            if cur.layers != want {
                // The layer holds the user's changes: record its generation in any case, and
                // make it current when nothing else moved current meanwhile.
                let switch = cur.layers == j.base;
                let n = finish_commit(env, &j, switch)?;
                crate::diag::info(&format!("{}: finished an interrupted commit as generation {n}{}", env.name, if switch { "" } else { " (not made current)" }));
            }
        }
        let _ = fs::remove_file(journal_path(env));
    }
    if staged.join("root").exists() {
        // The upper was moved aside but never became a layer: give it back, or keep it.
        let up = env.upper();
        if fs::read_dir(&up).map(|mut d| d.next().is_none()).unwrap_or(true) {
            let _ = fs::remove_dir(&up);
            fs::rename(staged.join("root"), &up).context("cannot restore the upper from an interrupted commit")?;
        } else {
            fs::create_dir_all(env.saved_dir())?;
            let dest = env.saved_dir().join(format!("interrupted-commit-{}", now_secs()));
            fs::rename(staged.join("root"), &dest).context("cannot keep the upper of an interrupted commit")?;
            crate::diag::warn(&format!("{}: an interrupted commit's changes are kept at {}", env.name, dest.display()));
        }
    }
    if staged.exists() {
        (store.remover)(&staged)?;
    }
    Ok(())
}

fn finish_commit(env: &Env, j: &CommitJournal, make_current: bool) -> Result<u32> {
    let cur = env.current()?;
    let mut layers = j.base.clone();
    layers.push(j.layer.clone());
    let mut sources = cur.sources.clone();
    sources.push(format!("layer:{}", j.layer));
    let mut g = env.write_generation(layers.clone(), sources, cur.settings.clone(), &j.reason)?;
    // apply keeps committed layers on top of the declared ones.
    g.commits = cur.commits.iter().cloned().chain([j.layer.clone()]).collect();
    env.rewrite_generation(&g)?;
    if make_current {
        env.switch(g.number)?;
        env.set_upper_base(&layers)?;
    }
    Ok(g.number)
}

pub(crate) fn commit(store: &Store, name: &str, message: Option<&str>) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "commit")?;
    let cur = env.current()?;
    if env.upper_base()? != cur.layers && !env.upper_is_empty() {
        bail!("the upper of '{name}' was written on other layers than generation {}: `plyroot rebase {name}` first", cur.number);
    }
    if env.upper_is_empty() {
        crate::diag::info(&format!("nothing to commit: the upper of '{name}' is empty"));
        return Ok(0);
    }
    // 1. Move the upper aside and give the environment a clean one. Every step after this is
    //    either journaled or undone by recover_commit.
    let staged = staging_dir(&env);
    fs::create_dir(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
    fs::rename(env.upper(), staged.join("root")).context("cannot move the upper aside")?;
    fs::create_dir(env.upper()).context("cannot create a clean upper")?;
    // 2. Digest it where owners read as they do inside (subordinate ids as themselves).
    let root = staged.join("root");
    let summary = match as_root_inside(move || {
        let ov = Overrides::default();
        let s = canonical::digest(&root, &ov)?;
        Ok((s.id, s.size, s.entries))
    }) {
        Ok(s) => s,
        Err(e) => {
            recover_commit(store, &env)?;
            return Err(e.context(format!("cannot commit '{name}'; its upper is unchanged")));
        }
    };
    let (id, size, entries) = summary;
    let reason = match message {
        Some(m) => format!("commit: {m}"),
        None => "commit".to_owned(),
    };
    let info = LayerInfo { id: id.clone(), size, entries, source: format!("commit of {name} generation {}: {}", cur.number, message.unwrap_or("")), created: now_secs() };
    write_atomic(&staged.join("layer.json"), &serde_json::to_vec_pretty(&info)?)?;
    // 3. Journal, publish, switch (the commit point), clear the journal.
    let j = CommitJournal { layer: id.clone(), base: cur.layers.clone(), reason };
    write_atomic(&journal_path(&env), &serde_json::to_vec(&j)?)?;
    fs::create_dir_all(store.layers_dir())?;
    if store.layer_dir(&id).exists() {
        (store.remover)(&staged)?;
    } else {
        fs::rename(&staged, store.layer_dir(&id)).context("cannot publish the committed layer")?;
    }
    let n = finish_commit(&env, &j, true)?;
    let _ = fs::remove_file(journal_path(&env));
    crate::diag::info(&format!("{name}: committed {} ({entries} entries, {}) as generation {n}; the upper is clean", &id[..19], human(size)));
    out(&format!("{id}\n"))?;
    Ok(0)
}

pub(crate) fn reset(store: &Store, name: &str, force: bool) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "reset")?;
    let cur = env.current()?;
    if env.upper_is_empty() {
        env.set_upper_base(&cur.layers)?;
        crate::diag::info(&format!("the upper of '{name}' is already empty"));
        return Ok(0);
    }
    env.prepare_upper(&cur.layers)?;
    if force {
        env.replace_upper(None, store.remover)?;
        crate::diag::info(&format!("{name}: upper deleted; runs start from generation {} as it is", cur.number));
    } else {
        fs::create_dir_all(env.saved_dir())?;
        let dest = env.saved_dir().join(format!("upper-{}-gen{}", now_secs(), cur.number));
        env.replace_upper(Some(&dest), store.remover)?;
        crate::diag::info(&format!("{name}: upper set aside at {} (delete it when you no longer need it)", dest.display()));
    }
    Ok(0)
}

#[derive(Serialize, Deserialize)]
struct RebaseOutcome {
    conflicts: Vec<String>,
    removed: Vec<String>,
}

pub(crate) fn rebase(store: &Store, name: &str, ours: bool, theirs: bool) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "rebase")?;
    let cur = env.current()?;
    let base = env.upper_base()?;
    if base == cur.layers {
        crate::diag::info(&format!("the upper of '{name}' is already on generation {}'s layers", cur.number));
        return Ok(0);
    }
    let (old, new, up) = (lowers_of(store, &base), lowers_of(store, &cur.layers), env.upper());
    let outcome = as_root_inside(move || {
        let entries: Vec<UpperEntry> = upper::walk(&up)?;
        let conflicts = upper::conflicts(&entries, |p| upper::fingerprint(&old, p), |p| upper::fingerprint(&new, p));
        let mut removed = Vec::new();
        if theirs {
            for c in &conflicts {
                // Taking theirs: drop the upper's version so the new layers' shows through.
                if !removed.iter().any(|r: &String| c.starts_with(&format!("{r}/"))) {
                    let p = up.join(c);
                    match fs::symlink_metadata(&p) {
                        Ok(m) if m.is_dir() => crate::store::remove_tree(&p)?,
                        Ok(_) => fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?,
                        Err(_) => {}
                    }
                    removed.push(c.clone());
                }
            }
        }
        Ok(RebaseOutcome { conflicts, removed })
    })?;
    if !outcome.conflicts.is_empty() && !ours && !theirs {
        let mut s = String::new();
        for c in &outcome.conflicts {
            s.push_str(&format!("C /{c}\n"));
        }
        out(&s)?;
        bail!(
            "{} path(s) changed both in the upper of '{name}' and in its layers (listed above); nothing was changed: decide with `plyroot rebase {name} --ours` (keep yours) or `--theirs` (take the layers'), or edit them and rebase again",
            outcome.conflicts.len()
        );
    }
    env.set_upper_base(&cur.layers)?;
    crate::diag::info(&format!(
        "{name}: upper rebased onto generation {}{}",
        cur.number,
        match (outcome.conflicts.len(), ours) {
            (0, _) => String::new(),
            (n, true) => format!(" ({n} conflict(s) kept as yours)"),
            (n, false) => format!(" ({n} conflict(s) resolved with the layers' version)"),
        }
    ));
    Ok(0)
}
