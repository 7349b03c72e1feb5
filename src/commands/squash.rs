//! squash: merges an environment's layers (from the N-th to the top) into one layer, in a new
//! generation, so that an environment can always get back under the layer limit
//! (`store::limits`).
//!
//! The layer is the canonical tar of the merged layers, written by the export merge
//! (`export::merge`) and imported like any tar: a squash of every layer has the id `export -o`
//! gives the same layers. A squash of the upper part of the stack keeps what those layers delete
//! of the ones below ([`merge::write_squashed`]); so does a squash of an environment on the host's
//! root (`base = "host"`), whose whiteouts hide host files.
//!
//! The upper is not touched: the new generation shows the same tree, so an upper written on the
//! old layers is written on the new ones too, and its recorded base moves with the switch (in the
//! same journaled step, `Journal::Squash`). An upper that was already stale stays stale, for the
//! user to rebase as before. The layer is published and made durable before the journal names it;
//! an interruption before that leaves an unused layer for gc, after it the next command finishes
//! the switch.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::out;
use crate::export::merge::{self, Tier};
use crate::progress::Progress;
use crate::sandbox::in_image_view;
use crate::source::Source;
use crate::store::canonical::Writer;
use crate::store::journal::Journal;
use crate::store::layer::short_id;
use crate::store::{Staging, Store};
use crate::text::human;

pub(crate) fn squash(store: &Store, name: &str, from: usize) -> Result<i32> {
    let env = store.env(name)?;
    // Held to the end: no commit, reset, rebase or apply changes the stack or the upper between
    // reading the layers and switching.
    let _lock = env.lock()?;
    env.recover()?;
    let cur = env.current()?;
    let n = cur.layers.len();
    if from == 0 || from > n {
        bail!("'{name}' has {n} layer(s) in generation {}: --from takes 1 (the bottom) to {n}", cur.number);
    }
    if from == n {
        crate::diag::info!("nothing to squash: --from {from} names only the top layer of '{name}'");
        return Ok(0);
    }
    let range = &cur.layers[from - 1..];
    // Deletions matter where something lies below the merged layers: lower layers, or the host.
    let below = from > 1 || cur.settings.base.as_deref() == Some("host");
    let tiers = tiers_of(store, name, range)?;

    // 1. The merged layers as one canonical tar, in a staging directory (removed when dropped).
    let st = store.staging()?;
    let tar = st.path.join("squash.tar");
    let file = File::create(&tar).with_context(|| format!("cannot create {}", tar.display()))?;
    let (id, size, entries) = merge_into(file, tiers, below).with_context(|| format!("cannot squash '{name}': merging its layers failed; nothing was changed"))?;

    // 2. Imported as a layer like any tar, durably.
    let source = format!("squash of {name} generation {}, layers {from}-{n}", cur.number);
    import_merged(store, name, st, &tar, entries, &id, &source)?;

    // 3. The new generation: the layers below, then the merged one. A merge of committed layers
    //    is itself a commit (apply keeps it on top of the declared layers).
    let mut layers = cur.layers[..from - 1].to_vec();
    layers.push(id.clone());
    let commits = if cur.commits.iter().any(|c| range.contains(c)) {
        cur.commits.iter().filter(|c| !range.contains(c)).cloned().chain([id.clone()]).collect()
    } else {
        cur.commits.clone()
    };
    let stale = !env.upper_is_empty() && env.upper_base()? != cur.layers;
    let reason = format!("squash of layers {from}-{n} into {}", short_id(&id));
    let generation = env.next_generation(layers, cur.sources.clone(), cur.settings.clone(), &reason, commits)?;
    let j = Journal::Squash { from: cur.number, before: cur.layers.clone(), generation };
    env.journaled(&j, "squash", || env.roll(&j).map(|_| ()))?;
    let now = env.current()?;
    crate::diag::info!(
        "{name}: squashed layers {from}-{n} into {} ({entries} entries, {}); generation {} has {} layer(s); the upper is untouched",
        short_id(&id),
        human(size),
        now.number,
        now.layers.len()
    );
    if stale {
        crate::diag::warn!("the upper of '{name}' was already written on other layers than generation {}'s; before the next run {}", cur.number, crate::store::upper::stale_choices(name));
    }
    out(&format!("{id}\n"))?;
    Ok(0)
}

/// The layers `range` of `name` as tiers of a merge, each checked to be in the store.
fn tiers_of(store: &Store, name: &str, range: &[String]) -> Result<Vec<Tier>> {
    let mut tiers = Vec::with_capacity(range.len());
    for id in range {
        let root = store.layer_root(id);
        if !root.is_dir() {
            bail!("layer {id} of '{name}' is missing from the store ({}): see `plyroot verify`; nothing was changed", root.display());
        }
        tiers.push(Tier { root, overrides: store.layer_overrides(id)? });
    }
    Ok(tiers)
}

/// Writes `tiers` merged (keeping what they delete of what lies below them when `below`) as one
/// canonical tar into `file`. Returns its id, size and number of entries.
fn merge_into(file: File, tiers: Vec<Tier>, below: bool) -> Result<(String, u64, u64)> {
    // Read where owners read as they do inside (a layer may hold files of mode 000).
    in_image_view(move || {
        let mut buf = crate::export::buffered(file);
        let mut w = Writer::new(&mut buf);
        if below {
            merge::write_squashed(&tiers, &mut w)?;
        } else {
            merge::write_merged(&tiers, &mut w)?;
        }
        let s = w.finish()?;
        buf.into_inner().map_err(|e| e.into_error()).context("cannot write the merged layer")?;
        Ok((s.id, s.size, s.entries))
    })
}

/// Imports the merged tar (or, with nothing in it, an empty directory: an archive without
/// entries is not one) as layer `id`, recorded as from `source`, and makes its files durable
/// before any record names it. The staging directory `st` holding the tar goes once it is read.
fn import_merged(store: &Store, name: &str, st: Staging, tar: &Path, entries: u64, id: &str, source: &str) -> Result<()> {
    let src = if entries == 0 {
        let empty = st.path.join("empty");
        std::fs::create_dir(&empty).with_context(|| format!("cannot create {}", empty.display()))?;
        Source::Dir(empty)
    } else {
        Source::Tar(tar.to_owned())
    };
    let enabled = crate::diag::level() >= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let total = std::fs::metadata(tar).ok().map(|m| m.len());
    let mut progress = Progress::new(&format!("squash {name}"), total, enabled);
    let imported = store.import_as(&src, Some(source), &mut progress).with_context(|| format!("cannot squash '{name}'; nothing was changed"))?;
    drop(st);
    let layer = match imported.as_slice() {
        [one] => one.clone(),
        _ => bail!("cannot squash '{name}': the merged layers imported as {} layers, not one; nothing was changed", imported.len()),
    };
    if layer.id != id {
        bail!(
            "cannot squash '{name}': its merged layers serialize to {id}, but imported they are {}: this content does not survive a round trip through a tar (please report it); nothing was changed, and `plyroot gc` removes the unused layer",
            layer.id
        );
    }
    let d = File::open(store.layer_dir(id)).with_context(|| format!("cannot open {}", store.layer_dir(id).display()))?;
    rustix::fs::syncfs(&d).with_context(|| format!("cannot sync the file system of {}", store.layer_dir(id).display()))?;
    Ok(())
}
