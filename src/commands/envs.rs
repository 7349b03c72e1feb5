//! create, list, rm, apply, generations, switch, rollback: environments, as code, and their
//! history.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{out, out_json};
use crate::manifest::EnvDecl;
use crate::progress::Progress;
use crate::source::Source;
use crate::store::env::{Env, Generation};
use crate::store::steps::{LockFile, StepPin};
use crate::store::layer::short_id;
use crate::store::{now_secs, write_atomic, Store};
use crate::text::{field, human};

pub(crate) fn create(store: &Store, name: &str, from: &[String], base: Option<&str>) -> Result<i32> {
    crate::names::check_name(name)?;
    if store.remains(name).is_some() {
        anyhow::bail!("what is left of an environment named '{name}' (its files deleted by hand) is in the way: `plyroot rm {name}` removes it");
    }
    if store.envs_dir().join(name).exists() {
        anyhow::bail!("environment '{name}' already exists: use another name, or remove it first with `plyroot rm {name}`");
    }
    let sources = super::layers::parse_sources(from)?;
    let layers = super::layers::import_all(store, &sources)?;
    let ids: Vec<String> = layers.iter().map(|l| l.id.clone()).collect();
    let n = ids.len();
    // After the import: only then is the number known (an image's layers). The layers stay in
    // the store, so the fix below reuses them.
    crate::store::limits::check(
        name,
        n,
        &format!(
            "nothing was created, and the layers are imported: create an environment from the first {} (`--from layer:ID`, see `plyroot layers`), `plyroot squash` it, and create '{name}' from its one layer and the rest",
            crate::store::limits::MAX_LAYERS
        ),
    )?;
    let settings = crate::store::env::Settings { base: base.map(str::to_owned), ..Default::default() };
    store.create_env(name, ids, from.to_vec(), settings, "create")?;
    crate::diag::info!("created environment '{name}' with {n} layer(s); try `plyroot enter {name}`");
    Ok(0)
}

#[derive(Serialize)]
struct EnvRow {
    name: String,
    generation: u32,
    layers: Vec<String>,
    sources: Vec<String>,
    upper_bytes: u64,
}

pub(crate) fn list(store: &Store, json: bool, names: bool) -> Result<i32> {
    if names {
        // No upper walk: completion runs this at every Tab.
        let s: String = store.envs()?.into_iter().map(|e| format!("{}\n", e.name)).collect();
        return out(&s).map(|_| 0);
    }
    let mut rows = Vec::new();
    for env in store.envs()? {
        let g = env.current()?;
        rows.push(EnvRow { upper_bytes: env.upper_size(), name: env.name, generation: g.number, layers: g.layers, sources: g.sources });
    }
    for r in store.all_remains() {
        crate::diag::warn!("'{r}' is what is left of an environment whose files were deleted by hand: `plyroot rm {r}` removes the rest");
    }
    if json {
        return out_json(&rows).map(|_| 0);
    }
    let mut s = format!("{:<20} {:>4} {:>7} {:>10}  {}\n", "NAME", "GEN", "LAYERS", "UPPER", "SOURCES");
    for r in &rows {
        let sources: Vec<_> = r.sources.iter().map(|s| field(s)).collect();
        s.push_str(&format!("{:<20} {:>4} {:>7} {:>10}  {}\n", r.name, r.generation, r.layers.len(), human(r.upper_bytes), sources.join(" ")));
    }
    for r in store.all_remains() {
        s.push_str(&format!("{r:<20} {:>4} {:>7} {:>10}  (what is left of it after a deletion by hand: `plyroot rm {r}`)\n", "-", "-", "-"));
    }
    out(&s).map(|_| 0)
}

pub(crate) fn rm(store: &Store, names: &[String]) -> Result<i32> {
    // Every name is checked (it exists, nothing runs in it, it is not booted, its launchers'
    // receipts read) before anything is removed: a refusal leaves every environment and launcher
    // as it was. `remove_env` checks again, for a run that starts in between.
    let mut plan: Vec<(&String, Vec<crate::launcher::Receipt>)> = Vec::new();
    for n in names {
        if plan.iter().any(|(m, _)| *m == n) {
            continue;
        }
        if store.remains(n).is_some() {
            plan.push((n, crate::launcher::receipts(store, Some(n))?));
            continue;
        }
        let env = store.env(n)?;
        if env.booted().is_some() {
            bail!("'{n}' is booted: `plyroot stop {n}` first; nothing was removed");
        }
        env.ensure_unused("remove")?;
        plan.push((n, crate::launcher::receipts(store, Some(n))?));
    }
    for (n, receipts) in plan {
        for r in receipts {
            crate::launcher::remove(store, &r)?;
            crate::diag::info!("removed launcher {}", r.link.display());
        }
        if store.remains(n).is_some() {
            store.remove_remains(n)?;
            crate::diag::info!("removed what was left of environment '{n}'");
            continue;
        }
        store.remove_env(n)?;
        crate::diag::info!("removed environment '{n}'");
    }
    Ok(0)
}

fn read_lock(path: &Path) -> Result<LockFile> {
    let fix = "fix or delete it and run `plyroot apply --update`";
    match std::fs::read(path) {
        Ok(d) => {
            let lock: LockFile = serde_json::from_slice(&d).with_context(|| format!("{} is not a plyroot lock file: {fix}", path.display()))?;
            crate::store::layer::check_ids(lock.sources.values().flatten(), path, fix)?;
            crate::store::layer::check_ids(lock.steps.values().flatten().flat_map(|p| [&p.key, &p.layer]), path, fix)?;
            Ok(lock)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile { version: 1, ..Default::default() }),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Resolves one source to layer ids: from the lock when it pins layers the store has, else by
/// importing it (and checking it still matches the lock, unless updating).
fn resolve(store: &Store, raw: &str, resolved: &str, pinned: Option<&Vec<String>>, update: bool, lock_path: &Path) -> Result<Vec<String>> {
    let src: Source = resolved.parse()?;
    if let (Some(ids), false) = (pinned, update) {
        if ids.iter().all(|id| store.layer_dir(id).join("layer.json").exists()) {
            return Ok(ids.clone());
        }
    }
    let enabled = crate::diag::level() >= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut p = Progress::new(resolved, None, enabled);
    let ids: Vec<String> = store.import(&src, &mut p)?.into_iter().map(|l| l.id).collect();
    if let (Some(pinned), false) = (pinned, update) {
        if *pinned != ids {
            bail!(
                "source {raw} no longer matches {}: it pins {} but now gives {}; run `plyroot apply --update` to accept the new content",
                lock_path.display(),
                pinned.join(","),
                ids.join(",")
            );
        }
    }
    Ok(ids)
}

/// Each environment to apply, with its declared layers.
type Plans<'m> = Vec<(&'m EnvDecl, Vec<String>)>;

/// What `apply` will do to one declared environment, decided before anything changes.
enum Change<'m> {
    Create { decl: &'m EnvDecl, layers: Vec<String> },
    /// A new generation on top of `cur`; `_lock` keeps commits and other applies out from the
    /// check to the switch.
    Update { decl: &'m EnvDecl, layers: Vec<String>, env: Env, cur: Box<Generation>, _lock: std::fs::File },
}

/// How `apply` and `build` go about it.
#[derive(Clone, Debug, Default)]
pub(crate) struct How {
    /// Re-resolve sources; rerun the steps that use the network.
    pub update: bool,
    /// Run every step.
    pub no_cache: bool,
    /// `build --check`.
    pub check: bool,
    /// `--cache-from`: where to look for step layers (else the manifest's `cache`).
    pub cache_from: Option<String>,
    /// `--cache-to`: where to push step layers (empty: the manifest's `cache`).
    pub cache_to: Option<String>,
}

/// Reads and parses the manifest at `file`; returns it with its absolute path.
fn load(file: &Path, only: &[String]) -> Result<(std::path::PathBuf, crate::manifest::Manifest)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read the manifest {} (create one, or pass -f FILE; see `plyroot apply --help`)", file.display()))?;
    let abs = if file.is_absolute() {
        file.to_owned()
    } else {
        std::env::current_dir().with_context(|| format!("cannot resolve the manifest {}: the current directory is gone or unreadable (give an absolute path)", file.display()))?.join(file)
    };
    let manifest = crate::manifest::parse(&text, &abs)?;
    for o in only {
        if !manifest.envs.iter().any(|e| &e.name == o) {
            bail!("{} declares no environment '{o}' (it declares: {})", file.display(), manifest.envs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "));
        }
    }
    Ok((abs, manifest))
}

/// Resolves the sources and builds the steps of the environments to apply (all, or `only`), and
/// writes the lock file. Returns each environment's declared layers.
fn resolve_and_build<'m>(store: &Store, abs: &Path, manifest: &'m crate::manifest::Manifest, how: &How, only: &[String]) -> Result<(Plans<'m>, usize)> {
    let lock_path = abs.with_file_name("plyroot.lock");
    let old_lock = read_lock(&lock_path)?;
    // Resolve, build and check everything before changing anything: an error leaves every
    // environment and the lock file as they were (imports and steps only add layers, which gc
    // collects if unused).
    let wanted = manifest.envs.iter().filter(|e| only.is_empty() || only.contains(&e.name));
    let cache_from = how.cache_from.clone().or_else(|| manifest.cache.clone());
    // The caches named, checked before any work: a bad one is an error now, not after the steps.
    let cache_to = match &how.cache_to {
        Some(to) if to.is_empty() => Some(manifest.cache.clone().context("--cache-to without a repository pushes to the manifest's `cache`, which it does not set: give one (--cache-to docker://HOST/REPOSITORY); nothing was built")?),
        to => to.clone(),
    };
    for c in cache_from.iter().chain(&cache_to) {
        crate::build::cache::repository(c).context("nothing was built")?;
    }
    let (mut new_lock, mut plans) = resolve_all(store, wanted, &old_lock, how.update, &lock_path)?;
    // Each stack with its steps' layers must fit under the limit: known before any step runs
    // (resolve_all checked the stacks of sources alone; a step's layer never adds more than one).
    for (decl, layers) in plans.iter().filter(|(d, _)| !d.steps.is_empty()) {
        let commits = store.env(&decl.name).and_then(|e| e.current()).map(|g| g.commits).unwrap_or_default();
        let n = layers.len() + decl.steps.len() + commits.iter().filter(|c| !layers.contains(c)).count();
        crate::store::limits::check(
            &decl.name,
            n,
            &format!("nothing was built: {} layer(s) from its sources and {} step(s); merge steps (one `run` can hold several commands) or squash the sources into one layer", layers.len(), decl.steps.len()),
        )?;
    }
    let mut ran = 0;
    let opts = crate::build::Options { no_cache: how.no_cache, update: how.update, pins: old_lock.step_pins(), cache_from };
    for (decl, layers) in &mut plans {
        if decl.steps.is_empty() {
            new_lock.steps.remove(&decl.name);
            continue;
        }
        let built = crate::build::build(store, decl, layers, &opts)?;
        ran += built.ran;
        layers.extend(built.keys.iter().map(|(_, layer)| layer.clone()));
        new_lock.steps.insert(decl.name.clone(), built.keys.into_iter().map(|(key, layer)| StepPin { key, layer }).collect());
    }
    if new_lock != old_lock {
        check_writable(&lock_path)?;
        // The lock file first: an apply that cannot write it changes nothing, and one interrupted
        // after it converges when run again (the pins are those of layers already in the store).
        write_atomic(&lock_path, format!("{}\n", serde_json::to_string_pretty(&new_lock)?).as_bytes())?;
    }
    if !new_lock.steps.is_empty() {
        // Built steps stay while this lock file pins them (gc), applied or not.
        store.remember_lock_file(&lock_path)?;
    }
    if let Some(to) = &cache_to {
        let steps: Vec<&StepPin> = plans.iter().filter_map(|(d, _)| new_lock.steps.get(&d.name)).flatten().collect();
        push_steps(store, to, &steps)?;
    }
    Ok((plans, ran))
}

/// `--cache-to`: each step's layer as a one-layer image tagged by its key (see `build::cache`),
/// unless the cache has that tag already.
#[cfg(feature = "registry")]
fn push_steps(store: &Store, cache: &str, steps: &[&StepPin]) -> Result<()> {
    let repo = crate::build::cache::repository(cache)?;
    let base = crate::registry::Reference::parse(&repo)?;
    let mut client = crate::registry::Client::new(&base, true)?;
    let (mut pushed, mut sent) = (0, 0);
    for s in steps {
        let tag = crate::build::cache::tag(&s.key);
        // A tag that names another image (not plyroot's, or a stale one) is pushed over.
        if crate::build::cache::holds(&mut client, &tag, &s.layer)? {
            continue;
        }
        let r = crate::registry::Reference { tag: Some(tag), digest: None, ..base.clone() };
        let (_, _, bytes, _) = super::push::push_image(store, &mut client, &r, "build step", std::slice::from_ref(&s.layer), &BTreeMap::new())?;
        pushed += 1;
        sent += bytes;
    }
    crate::diag::info!("step cache {cache}: {pushed} step(s) pushed ({}), {} there already", crate::text::human(sent), steps.len() - pushed);
    Ok(())
}

#[cfg(not(feature = "registry"))]
fn push_steps(_: &Store, _: &str, _: &[&StepPin]) -> Result<()> {
    bail!("this plyroot was built without registry support (cargo feature `registry`): no step cache")
}

/// `plyroot build`: the steps of the manifest's environments, built (or checked), no generation.
pub(crate) fn build(store: &Store, file: &Path, how: &How, only: &[String]) -> Result<i32> {
    let (abs, manifest) = load(file, only)?;
    let (plans, ran) = resolve_and_build(store, &abs, &manifest, how, only)?;
    if !how.check {
        let steps: usize = plans.iter().map(|(d, _)| d.steps.len()).sum();
        crate::diag::info!("{steps} step(s) of {} environment(s) built ({ran} run, {} cached); `plyroot apply` makes their generations", plans.len(), steps - ran);
        return Ok(0);
    }
    let mut differ = 0;
    for (decl, layers) in &plans {
        let first_step = layers.len() - decl.steps.len();
        for (i, step) in decl.steps.iter().enumerate() {
            let (below, built) = (&layers[..first_step + i], &layers[first_step + i]);
            let place = format!("[{}/{}] {}", i + 1, decl.steps.len(), decl.name);
            let files = crate::build::check::rerun(store, &decl.name, below, step, built, &place)?;
            if files.is_empty() {
                crate::diag::info!("{place}: {}: reproducible", crate::text::field(&step.title()));
            } else {
                differ += 1;
                let mut s = String::new();
                for f in &files {
                    s.push_str(&format!("{}: /{f}\n", decl.name));
                }
                out(&s)?;
                crate::diag::warn!("{place}: {}: {} file(s) differ from layer {} (listed above)", crate::text::field(&step.title()), files.len(), short_id(built));
            }
        }
    }
    Ok(if differ > 0 { 1 } else { 0 })
}

pub(crate) fn apply(store: &Store, file: &Path, how: &How, only: &[String]) -> Result<i32> {
    let (abs, manifest) = load(file, only)?;
    let (plans, _) = resolve_and_build(store, &abs, &manifest, how, only)?;
    if how.update {
        show_package_changes(store, &plans);
    }
    let changes = decide(store, plans)?;
    let changed = changes.len();
    for change in changes {
        match change {
            Change::Update { decl, layers, env, cur, _lock } => {
                // Checked before the switch (which does not touch the upper): the next run would
                // refuse such an upper, so say it now, with the way out.
                let stale = !env.upper_is_empty() && env.upper_base()? != layers;
                let g = env.next_generation(layers, decl.raw_sources.clone(), decl.settings.clone(), "apply", cur.commits.clone())?;
                let n = env.add_generation(cur.number, g, "apply")?;
                crate::diag::info!("{}: generation {n} is current", decl.name);
                if stale {
                    warn_stale(&decl.name, n);
                }
                drop(_lock);
                apply_exports(store, decl, &cur.settings.exports);
            }
            Change::Create { decl, layers } => {
                store.create_env(&decl.name, layers, decl.raw_sources.clone(), decl.settings.clone(), "apply")?;
                crate::diag::info!("{}: created, generation 1 is current", decl.name);
                apply_exports(store, decl, &[]);
            }
        }
    }
    if changed == 0 {
        crate::diag::info!("nothing to do: every environment is as the manifest declares");
    }
    Ok(0)
}

/// Installs the launchers `decl` exports that are missing, and removes those the generation
/// before exported (`before`) and `decl` no longer does; launchers exported by hand stay. A
/// launcher that cannot be made is a warning: the generation is made already.
fn apply_exports(store: &Store, decl: &EnvDecl, before: &[String]) {
    let name = &decl.name;
    let want = &decl.settings.exports;
    let result = (|| -> Result<()> {
        let receipts = crate::launcher::receipts(store, Some(name))?;
        for r in receipts.iter().filter(|r| before.contains(&r.program) && !want.contains(&r.program)) {
            crate::launcher::remove(store, r)?;
            crate::diag::info!("{name}: removed launcher {} (no longer in `exports`)", r.link.display());
        }
        let missing: Vec<String> = want.iter().filter(|p| !receipts.iter().any(|r| &r.program == *p)).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        super::launchers::check_free(store, name, &missing, None)?;
        super::launchers::check_present(store, &store.env(name)?, &missing)?;
        for r in crate::launcher::export(store, name, &missing, None, false)? {
            crate::diag::info!("{name}: exported {} as {}", r.program, r.link.display());
        }
        Ok(())
    })();
    if let Err(e) = result {
        crate::diag::warn!("{name}: the launchers in `exports` were not all installed: {}", crate::text::chain(&e));
    }
}

/// `apply --update`: what the packages of each environment that changed became, from the root's
/// package database (dpkg or apk), current generation against new layers.
fn show_package_changes(store: &Store, plans: &Plans<'_>) {
    for (decl, layers) in plans {
        let Ok(cur) = store.env(&decl.name).and_then(|e| e.current()) else { continue };
        let declared_before: Vec<String> = cur.layers.iter().filter(|l| !cur.commits.contains(l)).cloned().collect();
        if declared_before == *layers {
            continue;
        }
        let (old, new) = (store.layer_roots(&declared_before), store.layer_roots(layers));
        let (Some(a), Some(b)) = (crate::build::packages::installed(&old), crate::build::packages::installed(&new)) else { continue };
        let changes = crate::build::packages::changes(&a, &b);
        if changes.is_empty() {
            crate::diag::info!("{}: no package changed", decl.name);
        } else {
            crate::diag::info!("{}: packages changed:", decl.name);
            for c in &changes {
                crate::diag::info!("  {c}");
            }
        }
    }
}

/// Resolves the sources of the environments to apply (each source once) to layer ids, checking
/// each stack against the limit. Returns the new lock (with the pins of environments not applied
/// this time as they were) and each environment's declared layers.
fn resolve_all<'m>(store: &Store, wanted: impl Iterator<Item = &'m EnvDecl>, old_lock: &LockFile, update: bool, lock_path: &Path) -> Result<(LockFile, Plans<'m>)> {
    // Step pins of environments not applied this time stay as they were.
    let mut new_lock = LockFile { version: 1, sources: BTreeMap::new(), steps: old_lock.steps.clone() };
    let mut plans = Vec::new();
    for decl in wanted {
        let mut layers = Vec::new();
        for (raw, resolved) in decl.raw_sources.iter().zip(&decl.sources) {
            let ids = match new_lock.sources.get(raw) {
                Some(ids) => ids.clone(),
                None => resolve(store, raw, resolved, old_lock.sources.get(raw), update, lock_path)?,
            };
            new_lock.sources.insert(raw.clone(), ids.clone());
            layers.extend(ids);
        }
        // Before the lock file is written: a stack over the limit changes nothing. Checked again
        // with the commits under the environment's lock below.
        let commits = store.env(&decl.name).and_then(|e| e.current()).map(|g| g.commits).unwrap_or_default();
        check_limit(&decl.name, &layers, &commits)?;
        plans.push((decl, layers));
    }
    // Pins of environments not applied this time stay as they were.
    for (k, v) in &old_lock.sources {
        new_lock.sources.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Ok((new_lock, plans))
}

/// What to do to each environment: create it, or a new generation of it (holding its lock, after
/// recovering it); nothing where it already is as declared, with the layers committed since kept
/// on top.
fn decide<'m>(store: &Store, mut plans: Plans<'m>) -> Result<Vec<Change<'m>>> {
    // By name: two applies lock the environments they share in the same order.
    plans.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut changes = Vec::new();
    for (decl, layers) in plans {
        if std::fs::symlink_metadata(store.envs_dir().join(&decl.name)).is_err() {
            changes.push(Change::Create { decl, layers });
            continue;
        }
        let env = store.env(&decl.name)?;
        let lock = env.lock()?;
        env.recover()?;
        let cur = env.current()?;
        // Layers committed since are the user's: they stay on top of the declared ones.
        check_limit(&decl.name, &layers, &cur.commits)?;
        let mut layers = layers;
        layers.extend(cur.commits.iter().filter(|c| !layers.contains(c)).cloned().collect::<Vec<_>>());
        if cur.layers == layers && cur.settings == decl.settings {
            continue;
        }
        // A new generation is numbered after every record there: read them all now.
        env.generations()?;
        changes.push(Change::Update { decl, layers, env, cur: Box::new(cur), _lock: lock });
    }
    Ok(changes)
}

/// Refuses a declared stack that, with the layers committed on top of it, is over the limit.
fn check_limit(name: &str, declared: &[String], commits: &[String]) -> Result<()> {
    let n = declared.len() + commits.iter().filter(|c| !declared.contains(c)).count();
    let commits = match commits.len() {
        0 => String::new(),
        c => format!(" ({} declared, {c} committed)", n - c),
    };
    crate::store::limits::check(
        name,
        n,
        &format!(
            "nothing was applied{commits}: declare fewer layers, e.g. `plyroot squash` an environment made of some of these sources and name its one layer (`layer:sha256:…`) in `from` instead"
        ),
    )
}

/// Whether the lock file can be written where it lives (beside the manifest), by creating and
/// removing a file there, as writing it will (a new file renamed over the old).
fn check_writable(lock_path: &Path) -> Result<()> {
    let dir = lock_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let probe = dir.join(format!(".plyroot.lock.probe-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot write {} (apply records there the layers each source resolved to), so nothing was applied: make {} writable, or apply a copy of the manifest from a directory you can write",
                lock_path.display(),
                dir.display()
            )
        }),
    }
}

#[derive(Serialize)]
struct GenRow {
    number: u32,
    created: u64,
    current: bool,
    layers: usize,
    added: Vec<String>,
    removed: Vec<String>,
    reason: String,
}

fn ago(secs: u64) -> String {
    let d = now_secs().saturating_sub(secs);
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        7200..=172_799 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub(crate) fn generations(store: &Store, name: &str, json: bool) -> Result<i32> {
    let env = store.env(name)?;
    let cur = env.current()?.number;
    let mut prev: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for g in env.generations()? {
        let added = g.layers.iter().filter(|l| !prev.contains(l)).cloned().collect();
        let removed = prev.iter().filter(|l| !g.layers.contains(l)).cloned().collect();
        prev = g.layers.clone();
        rows.push(GenRow { number: g.number, created: g.created, current: g.number == cur, layers: g.layers.len(), added, removed, reason: g.reason });
    }
    for r in store.all_remains() {
        crate::diag::warn!("'{r}' is what is left of an environment whose files were deleted by hand: `plyroot rm {r}` removes the rest");
    }
    if json {
        return out_json(&rows).map(|_| 0);
    }
    let mut s = format!("  {:>4}  {:<10} {:>6}  {:<24} {}\n", "GEN", "CREATED", "LAYERS", "CHANGE", "WHY");
    for r in &rows {
        let short = |v: &Vec<String>, sign: char| v.iter().map(|l| format!("{sign}{}", short_id(l).trim_start_matches("sha256:"))).collect::<Vec<_>>().join(" ");
        let change = [short(&r.added, '+'), short(&r.removed, '-')].into_iter().filter(|x| !x.is_empty()).collect::<Vec<_>>().join(" ");
        s.push_str(&format!("{} {:>4}  {:<10} {:>6}  {:<24} {}\n", if r.current { '*' } else { ' ' }, r.number, ago(r.created), r.layers, change, crate::text::field(&r.reason)));
    }
    out(&s).map(|_| 0)
}

pub(crate) fn switch(store: &Store, name: &str, n: u32) -> Result<i32> {
    let env = store.env(name)?;
    let _lock = env.lock()?;
    env.recover()?;
    // Everything read before the switch: a damaged record or a missing layer leaves the
    // current generation as it was.
    let target = env.generation(n)?;
    if let Some(missing) = target.layers.iter().find(|l| !store.layer_dir(l).join("layer.json").is_file()) {
        bail!("generation {n} of '{name}' uses layer {missing}, which is not in the store (see `plyroot verify`); '{name}' stays on its current generation");
    }
    let stale = !env.upper_is_empty() && env.upper_base()? != target.layers;
    env.switch(n)?;
    crate::diag::info!("{name}: generation {n} is current");
    if stale {
        warn_stale(name, n);
    }
    Ok(0)
}

/// Says that `name`'s upper was written on other layers than generation `n`'s, now current, so
/// that the next run's refusal is no surprise.
fn warn_stale(name: &str, n: u32) {
    crate::diag::warn!("the upper of '{name}' holds changes made on other layers than generation {n} (now current); before the next run {}", crate::store::upper::stale_choices(name));
}

pub(crate) fn rollback(store: &Store, name: &str) -> Result<i32> {
    let env = store.env(name)?;
    let cur = env.current()?.number;
    let Some(prev) = env.generations()?.into_iter().map(|g| g.number).filter(|&n| n < cur).max() else {
        bail!("'{name}' is at its oldest generation ({cur}): nothing to roll back to");
    };
    switch(store, name, prev)
}
