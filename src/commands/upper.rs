//! diff, commit, reset, rebase: the upper's lifecycle.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use super::{out, out_json};
use crate::sandbox::in_image_view;
use crate::store::env::Env;
use crate::store::layer::LayerInfo;
use crate::store::upper::{self, UpperEntry};
use crate::store::journal::Journal;
use crate::store::meta::{key, unkey};
use crate::store::tree::shown;
use crate::store::{nixdb, now_secs, private_dir, upper_dir, Store};
use crate::text::human;

/// Opens an environment for a change of its upper: locked, recovered, and with no live run.
fn open_for_change(store: &Store, name: &str, what: &str) -> Result<(Env, fs::File)> {
    let env = store.env(name)?;
    let lock = env.lock()?;
    env.recover()?;
    env.ensure_idle(what)?;
    Ok((env, lock))
}

pub(crate) fn diff(store: &Store, name: &str, paths: &[PathBuf], json: bool) -> Result<i32> {
    let env = store.env(name)?;
    if env.needs_recovery() {
        let _lock = env.lock()?;
        env.recover()?;
    }
    let base = env.upper_base()?;
    let lowers = store.layer_roots(&base);
    let upper = env.upper();
    let filters: Vec<Vec<u8>> = paths.iter().map(|p| trim_slashes(p.as_os_str().as_bytes()).to_vec()).collect();
    // Runs may have written files only their ids can read: walk where we are root over them.
    let entries = in_image_view(move || {
        let entries = upper::walk(&upper, &[&lowers]).with_context(|| format!("cannot read {}", upper.display()))?;
        Ok(upper::diff(&entries, &filters))
    })?;
    if json {
        let shown: Vec<ShownDiff> = entries.iter().map(ShownDiff::from).collect();
        return out_json(&shown).map(|_| 0);
    }
    let mut s = String::new();
    for e in &entries {
        let size = if e.kind == 'f' || e.size > 0 { format!("  ({})", human(e.size)) } else { String::new() };
        s.push_str(&format!("{} {}{}{}\n", e.change.letter(), shown(&e.path), if e.kind == 'd' { "/" } else { "" }, size));
    }
    out(&s)?;
    if base != env.current()?.layers {
        crate::diag::info!("(against the layers the upper was written on, not generation {}'s: see `plyroot rebase {name}`)", env.current()?.number);
    }
    Ok(0)
}

/// A diff entry as `diff --json` gives it: the path as a string (as is when it is UTF-8; else
/// with the bytes that are not as `\\xNN`, and `path_hex` holding the exact bytes).
#[derive(serde::Serialize)]
struct ShownDiff {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    change: upper::Change,
    #[serde(rename = "type")]
    kind: char,
    size: u64,
}

impl From<&upper::DiffEntry> for ShownDiff {
    fn from(e: &upper::DiffEntry) -> Self {
        let (path, path_hex) = match std::str::from_utf8(&e.path) {
            Ok(p) => (p.to_owned(), None),
            Err(_) => (shown(&e.path), Some(hex::encode(&e.path))),
        };
        ShownDiff { path, path_hex, change: e.change, kind: e.kind, size: e.size }
    }
}

fn trim_slashes(mut p: &[u8]) -> &[u8] {
    while let [b'/', rest @ ..] = p {
        p = rest;
    }
    while let [rest @ .., b'/'] = p {
        p = rest;
    }
    p
}

pub(crate) fn commit(store: &Store, name: &str, message: Option<&str>) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "commit")?;
    let cur = env.current()?;
    if env.upper_base()? != cur.layers && !env.upper_is_empty() {
        bail!("the upper of '{name}' was written on other layers than generation {}: `plyroot rebase {name}` first", cur.number);
    }
    if env.upper_is_empty() {
        crate::diag::info!("nothing to commit: the upper of '{name}' is empty");
        return Ok(0);
    }
    crate::store::limits::check(
        name,
        cur.layers.len() + 1,
        &format!("nothing was committed: `plyroot squash {name}` merges its layers into one (the upper is kept as it is), then commit again"),
    )?;
    let reason = match message {
        Some(m) => format!("commit: {m}"),
        None => "commit".to_owned(),
    };
    let staged = env.commit_dir();
    let mut done = None;
    env.journaled(&Journal::CommitStaging, "commit", || {
        // 1. Move the upper aside and give the environment a clean one (undone on failure).
        private_dir(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
        fs::rename(env.upper(), staged.join("root")).context("cannot move the upper aside")?;
        upper_dir(&env.upper()).context("cannot create a clean upper")?;
        // 2. Digest it where owners read as they do inside (subordinate ids as themselves), and
        // make it durable.
        let source = format!("commit of {name} generation {}: {}", cur.number, message.unwrap_or(""));
        let LayerInfo { id, size, entries, .. } = crate::build::step::digest_into(&staged, source, |root| {
            // plyroot's own sudo rule for the user is the skeleton's, made for this machine: a
            // copy a run wrote into the upper (a chmod of /etc/sudoers.d/*) never goes into a
            // layer, which an export or a push would give to anyone.
            let rule = root.join(crate::sandbox::skel::SUDOERS);
            if fs::symlink_metadata(&rule).is_ok_and(|m| m.is_file()) {
                fs::remove_file(&rule).with_context(|| format!("cannot leave {} out of the commit", rule.display()))?;
            }
            Ok(())
        })?;
        // 3. The commit point: from here on the commit is finished, never undone.
        let mut sources = cur.sources.clone();
        sources.push(format!("layer:{id}"));
        let layers: Vec<String> = cur.layers.iter().chain([&id]).cloned().collect();
        // apply keeps committed layers on top of the declared ones.
        let commits = cur.commits.iter().chain([&id]).cloned().collect();
        let g = env.next_generation(layers, sources, cur.settings.clone(), &reason, commits)?;
        env.begin(&Journal::CommitPublish { layer: id.clone(), from: cur.number, generation: g.clone() })?;
        env.finish_publish(&id, cur.number, g)?;
        done = Some((id, size, entries));
        Ok(())
    })?;
    let n = env.current()?.number;
    match done {
        Some((id, size, entries)) => {
            crate::diag::info!("{name}: committed {} ({entries} entries, {}) as generation {n}; the upper is clean", &id[..19], human(size));
            out(&format!("{id}\n"))?;
        }
        // A step failed past the commit point and recovery finished the commit (it said so).
        None => {
            crate::diag::info!("{name}: committed as generation {n}; the upper is clean");
            if let Some(id) = env.current()?.commits.last() {
                out(&format!("{id}\n"))?;
            }
        }
    }
    Ok(0)
}

pub(crate) fn reset(store: &Store, name: &str, force: bool) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "reset")?;
    let cur = env.current()?;
    if env.upper_is_empty() {
        env.set_upper_base(&cur.layers)?;
        crate::diag::info!("the upper of '{name}' is already empty");
        return Ok(0);
    }
    if force {
        // Into a staging dir: once moved, the old upper is the user's to lose, and if this
        // command dies before deleting it, the store's leftover cleaning does.
        let st = store.staging()?;
        let grave = st.path.join("upper");
        let j = Journal::Reset { base: cur.layers.clone(), saved: None };
        env.journaled(&j, "reset", || {
            fs::rename(env.upper(), &grave).with_context(|| format!("cannot move {} aside", env.upper().display()))?;
            env.finish_reset(&cur.layers)
        })?;
        if let Err(e) = crate::store::remove_tree_mapped(&grave) {
            crate::diag::warn!("{name}: the old upper could not be deleted yet ({e:#}); `plyroot gc` retries");
        }
        drop(st);
        crate::diag::info!("{name}: upper deleted; runs start from generation {} as it is", cur.number);
    } else {
        let dest = env.new_saved_name(&format!("upper-gen{}", cur.number))?;
        let saved = dest.file_name().map(|n| n.to_string_lossy().into_owned());
        let j = Journal::Reset { base: cur.layers.clone(), saved };
        env.journaled(&j, "reset", || {
            fs::rename(env.upper(), &dest).with_context(|| format!("cannot keep the upper at {}", dest.display()))?;
            env.finish_reset(&cur.layers)
        })?;
        crate::diag::info!("{name}: upper set aside at {} (delete it when you no longer need it)", dest.display());
    }
    Ok(0)
}

pub(crate) fn rebase(store: &Store, name: &str, ours: bool, theirs: bool) -> Result<i32> {
    let (env, _lock) = open_for_change(store, name, "rebase")?;
    let cur = env.current()?;
    let base = env.upper_base()?;
    if base == cur.layers {
        crate::diag::info!("the upper of '{name}' is already on generation {}'s layers", cur.number);
        return Ok(0);
    }
    // A merge that an earlier rebase left before its journal named it: never used.
    let staging = nixdb::staging(&env);
    nixdb::remove_staging(&staging)?;
    let (old, new, up) = (store.layer_roots(&base), store.layer_roots(&cur.layers), env.upper());
    // Read only, where the user can read every file their runs wrote.
    let (conflicts, merge_db, profiles) = in_image_view(move || {
        let entries: Vec<UpperEntry> = upper::walk(&up, &[&old, &new]).with_context(|| format!("cannot read {}", up.display()))?;
        let mut real = Vec::new();
        // The conflicts come in the entries' order: one pass finds each.
        let mut rest = entries.iter();
        for path in upper::conflicts(&entries) {
            let e = rest.find(|e| e.path == path).expect("a conflict is one of the entries");
            let rel = shown(&path);
            if upper::same_on_both_sides(&up, &old, &new, e).with_context(|| format!("cannot compare /{rel} in {} with the layers", up.display()))? {
                crate::diag::debug!("/{rel}: the same content on both sides, no conflict");
            } else {
                // As metadata keys across the pipe: compact, and exact for bytes that are not UTF-8.
                real.push(key(&path).into_owned());
            }
        }
        let merge_db = nixdb::needs_merge(&up, &old, &new).with_context(|| format!("cannot compare the Nix database in {} with the layers'", up.display()))?;
        let bytes: Vec<Vec<u8>> = real.iter().map(|c| unkey(c).into_owned()).collect();
        let profiles = nixdb::settle_profiles(&up, &new, &bytes).with_context(|| format!("cannot read the Nix profiles in {}", up.display()))?;
        Ok((real, merge_db, profiles))
    })?;
    let mut conflicts: Vec<Vec<u8>> = conflicts.iter().map(|c| unkey(c).into_owned()).collect();
    // Both sides changed the Nix database: its files are merged, not a conflict (unless merging
    // fails, below).
    let db_files: Vec<Vec<u8>> = if merge_db { conflicts.iter().filter(|c| nixdb::is_db_file(c)).cloned().collect() } else { Vec::new() };
    // Nix profiles' links both sides changed: settled (see `nixdb::Profiles`), not conflicts.
    conflicts.retain(|c| !db_files.contains(c) && !profiles.theirs.contains(c) && !profiles.ours.contains(c));
    let refuse = |conflicts: &[Vec<u8>], why: String| -> Result<i32> {
        let mut s = String::new();
        for c in conflicts {
            s.push_str(&format!("C /{}\n", shown(c)));
        }
        out(&s)?;
        bail!(
            "{} path(s) changed both in the upper of '{name}' and in its layers (listed above){why}; nothing was changed: decide with `plyroot rebase {name} --ours` (keep yours) or `--theirs` (take the layers'), or edit them and rebase again",
            conflicts.len()
        )
    };
    if !conflicts.is_empty() && !ours && !theirs {
        return refuse(&conflicts, String::new());
    }
    let mut merged = None;
    if merge_db {
        let (old, new) = (store.layer_roots(&base), store.layer_roots(&cur.layers));
        match merge_nix_db(store, &env, &old, &new) {
            Ok(m) => merged = Some(m),
            Err(e) => {
                nixdb::remove_staging(&staging)?;
                let db = format!("{}/db.sqlite", nixdb::DB_DIR);
                conflicts.extend(db_files.iter().cloned());
                if !conflicts.iter().any(|c| c.as_slice() == db.as_bytes()) {
                    conflicts.push(db.clone().into_bytes());
                }
                if !ours && !theirs {
                    return refuse(&conflicts, format!(": the Nix databases of both could not be merged ({e:#})"));
                }
                crate::diag::warn!("{name}: the Nix databases of the upper and of the layers could not be merged ({e:#}): /{db} is resolved as the other conflicts are");
            }
        }
    }
    let mut remove: Vec<String> = if theirs && !conflicts.is_empty() {
        // Taking theirs drops the upper's version so the new layers' shows through: the user's
        // explicit choice, journaled so that an interruption finishes it rather than leave the
        // upper half rebased (a directory's conflicting children go with it).
        let mut below: Vec<&[u8]> = Vec::new();
        for c in &conflicts {
            if !below.iter().any(|r| c.starts_with(r) && c.get(r.len()) == Some(&b'/')) {
                below.push(c);
            }
        }
        // The journal holds names as store keys: bytes that are not UTF-8 survive the record.
        below.iter().map(|c| key(c).into_owned()).collect()
    } else {
        Vec::new()
    };
    remove.extend(profiles.theirs.iter().map(|c| key(c).into_owned()));
    let links: Vec<(String, String)> = profiles.links.iter().map(|(p, t)| (key(p).into_owned(), key(t).into_owned())).collect();
    if !remove.is_empty() || merged.is_some() || !links.is_empty() {
        let nixdb = merged.is_some();
        let j = Journal::Rebase { onto: cur.layers.clone(), remove: remove.clone(), nixdb, links: links.clone() };
        env.journaled(&j, "rebase", || env.finish_rebase(&cur.layers, &remove, nixdb, &links))?;
    } else {
        env.set_upper_base(&cur.layers)?;
    }
    for c in &profiles.ours {
        crate::diag::info!("{name}: /{}: your current generation, the newer", shown(c));
    }
    for c in profiles.theirs.iter().filter(|c| !c.ends_with(b"-link")) {
        crate::diag::info!("{name}: /{}: the layers' current generation, the newer", shown(c));
    }
    for (p, t) in &profiles.links {
        if p.ends_with(b"-link") {
            crate::diag::info!("{name}: /{}: your generation (-> {}), renumbered: the layers made one of the same number", shown(p), shown(t));
        }
    }
    if let Some(m) = &merged {
        crate::diag::info!(
            "{name}: merged the Nix databases of the upper and of the layers: {} store path(s) valid{}",
            m.valid.len(),
            if m.dropped.is_empty() { String::new() } else { format!(", {} left out (not in the rebased view, or needing one that is not)", m.dropped.len()) }
        );
        for p in &m.dropped {
            crate::diag::debug!("{p}: not valid after the rebase");
        }
    }
    crate::diag::info!(
        "{name}: upper rebased onto generation {}{}",
        cur.number,
        match (conflicts.len(), ours) {
            (0, _) => String::new(),
            (n, true) => format!(" ({n} conflict(s) kept as yours)"),
            (n, false) => format!(" ({n} conflict(s) resolved with the layers' version)"),
        }
    );
    Ok(0)
}

/// Where the merge's staging is bound inside the runs of `nix-store` that merge.
const MERGE_INSIDE: &str = "/run/plyroot-nixdb";

/// Merges the Nix databases of the upper (as its runs saw it, over the `old` lowers) and of the
/// `new` lowers into `nixdb/` beside the upper (see `store::nixdb`), with the environment's own
/// `nix-store` in runs of its new layers: each side dumped, the registrations merged here, the
/// result loaded into a fresh database and dumped again to check it. Writes nothing of the
/// environment's but the staging; the caller's journaled step moves the result into the upper.
fn merge_nix_db(store: &Store, env: &Env, old: &[PathBuf], new: &[PathBuf]) -> Result<nixdb::Merged> {
    // Outside the store, which is read-only inside every run.
    let tmp = std::env::temp_dir();
    clean_merge_leftovers(&tmp);
    let work = tmp.join(format!("{MERGE_WORK}{}-{}", std::process::id(), now_secs()));
    let result = merge_in(store, env, &work, old, new);
    if let Err(e) = nixdb::remove_staging(&work) {
        crate::diag::warn!("cannot remove {} ({e:#}); remove it by hand (`plyroot unshare -- rm -r` it)", work.display());
    }
    result
}

/// The name of a merge's work directory in the temp directory: `PREFIX<pid>-<secs>`.
const MERGE_WORK: &str = "plyroot-nixdb-";

/// Removes the work of merges whose plyroot is gone (killed mid-merge): this user's directories
/// `plyroot-nixdb-<pid>-…` in `tmp` whose pid runs no more. Best effort.
fn clean_merge_leftovers(tmp: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = fs::read_dir(tmp) else { return };
    let me = rustix::process::geteuid().as_raw();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(MERGE_WORK)).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let mine = e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if mine && pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = nixdb::remove_staging(&e.path());
        }
    }
}

fn merge_in(store: &Store, env: &Env, work: &std::path::Path, old: &[PathBuf], new: &[PathBuf]) -> Result<nixdb::Merged> {
    let (w, up, o, n) = (work.to_owned(), env.upper(), old.to_vec(), new.to_vec());
    private_dir(work).with_context(|| format!("cannot create {}", work.display()))?;
    in_image_view(move || nixdb::stage(&w, &up, &o, &n))?;
    let ours = nixdb::parse_dump(&nix_store(store, env, work, Some("ours"), &["--dump-db"], None)?).context("reading the upper's Nix database")?;
    let theirs = nixdb::parse_dump(&nix_store(store, env, work, Some("theirs"), &["--dump-db"], None)?).context("reading the layers' Nix database")?;
    let (up, n) = (env.upper(), new.to_vec());
    let merged = in_image_view(move || Ok(nixdb::merge(ours, theirs, |p| nixdb::shows(&up, &n, p))))?;
    let dump = work.join("merged.dump");
    fs::write(&dump, nixdb::format_dump(&merged.valid)).with_context(|| format!("cannot write {}", dump.display()))?;
    // Loaded into a store rooted in the work (`local?root=`), whose store directory holds copies of
    // the merged derivations: registering one reads it.
    let (root, up, n) = (work.join("merged"), env.upper(), new.to_vec());
    let drvs: Vec<String> = merged.valid.iter().map(|r| r.path.clone()).filter(|p| p.ends_with(".drv")).collect();
    in_image_view(move || nixdb::copy_derivations(&root, &up, &n, &drvs))?;
    let url = format!("local?root={MERGE_INSIDE}/merged");
    nix_store(store, env, work, None, &["--store", &url, "--load-db"], Some(&dump))?;
    let back = nixdb::parse_dump(&nix_store(store, env, work, None, &["--store", &url, "--dump-db"], None)?).context("reading the merged Nix database back")?;
    let got: std::collections::BTreeSet<&str> = back.iter().map(|r| r.path.as_str()).collect();
    if got.len() != merged.valid.len() || merged.valid.iter().any(|r| !got.contains(r.path.as_str())) {
        bail!("the merged Nix database holds {} store path(s), not the {} loaded into it", got.len(), merged.valid.len());
    }
    let db = work.join("merged").join(nixdb::DB_DIR);
    if !db.join("db.sqlite").is_file() || fs::metadata(db.join("db.sqlite-wal")).is_ok_and(|m| m.len() > 0) {
        bail!("nix-store --load-db left no complete database in {}", db.display());
    }
    nixdb::keep(work, &nixdb::staging(env))?;
    Ok(merged)
}

/// Runs the environment's `nix-store ARGS`, on the database under `WORK/STATE` (its state
/// directory) if given, in a run of its current layers (`--ephemeral`: it writes nowhere but the work,
/// bound in; `--root`: the owner of the layers' store), with `input` as stdin; returns its
/// stdout.
fn nix_store(store: &Store, env: &Env, work: &std::path::Path, state: Option<&str>, args: &[&str], input: Option<&std::path::Path>) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the plyroot binary to run nix-store with")?;
    let mut c = std::process::Command::new(exe);
    c.arg("--store").arg(&store.root);
    c.args(["run", "-q", "--ephemeral", "--root", "--nix", "layers", "--no-host", "home,tmp,runtime-dir,x11,gpu", "--cwd", "/"]);
    c.arg("--bind").arg(format!("{}:{MERGE_INSIDE}", work.display()));
    if let Some(state) = state {
        c.args(["-e", &format!("NIX_STATE_DIR={MERGE_INSIDE}/{state}")]);
    }
    c.args(["-e", "NIX_REMOTE=local"]);
    c.args(["-e", "PATH=/nix/var/nix/profiles/default/bin:/root/.nix-profile/bin:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin"]);
    c.arg(&env.name).arg("--");
    // No build users, and no space reserved for the collector: the state directory is a scratch copy.
    c.args(["nix-store", "--option", "build-users-group", "", "--option", "gc-reserved-space", "0"]).args(args);
    c.stdin(match input {
        Some(p) => std::process::Stdio::from(fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => std::process::Stdio::null(),
    });
    let what = format!("nix-store {} in '{}'", args.join(" "), env.name);
    let o = c.output().with_context(|| format!("cannot run {what}"))?;
    if !o.status.success() {
        bail!("{what} failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    String::from_utf8(o.stdout).with_context(|| format!("{what} wrote something that is not text"))
}
