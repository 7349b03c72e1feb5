//! Garbage collection: the roots (what must stay), then pruning generations and deleting layers
//! nothing roots. Run with the store's lock exclusive ([`Store::open_exclusive`]): launches and
//! imports in progress hold it shared until their program starts; programs running after that are
//! seen through their pins (run slots and the live mounts of every namespace we can see).
//!
//! A layer is a root when a generation that stays uses it, when an upper with changes was
//! written on it (rebase compares against it), when a live run or mount uses it, or when an
//! interrupted change (the environment's journal) still needs it. A generation stays when it is
//! current, when a live run uses it, or when the policy (`--keep`, `--older-than`) keeps it.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::layer::LayerInfo;
use super::runs::Usage;
use super::{remove_tree_mapped, Store};

/// Which generations gc may prune (the current one and those in use never are).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Policy {
    /// Keep this many newest generations of each environment.
    pub keep: Option<usize>,
    /// Keep generations created at or after this time (seconds since the epoch).
    pub cutoff: Option<u64>,
    /// End idle keepers first (a keeper only caches a mount: what it holds is not kept for it).
    /// Off for a dry run, which changes nothing: it counts what keepers hold as in use.
    pub end_keepers: bool,
}

/// A generation record gc prunes.
pub(crate) struct Pruned {
    pub env: String,
    env_dir: PathBuf,
    pub number: u32,
}

/// What gc found, holding every environment's lock until it is dropped: no generation, upper or
/// journal changes between finding the roots and collecting.
pub(crate) struct Collection {
    pub pruned: Vec<Pruned>,
    /// Layers no root needs.
    pub dead: Vec<LayerInfo>,
    /// Directories live mounts are made of.
    in_use: BTreeSet<PathBuf>,
    /// Layer directories without a record (deleted by hand, in part) that no root needs.
    remains: Vec<String>,
    _locks: Vec<fs::File>,
}

impl Collection {
    /// Bytes of file content the dead layers hold.
    pub(crate) fn freed(&self) -> u64 {
        self.dead.iter().map(|l| l.size).sum()
    }
}

impl Store {
    /// Finds what gc would prune and delete, changing nothing but ending idle keepers (when the
    /// policy says so).
    pub(crate) fn gc_roots(&self, policy: Policy) -> Result<Collection> {
        let mut roots: BTreeSet<String> = BTreeSet::new();
        let mut pruned = Vec::new();
        let mut locks = Vec::new();
        let envs = self.envs()?;
        for env in &envs {
            locks.push(env.lock()?);
            if policy.end_keepers {
                env.dismiss_keeper()?;
            }
        }
        // What live mounts are made of, in every namespace we can see (runs, programs they left
        // behind, launchers composing inside environments): none of it is collected.
        let usage = Usage::scan();
        let in_use: BTreeSet<PathBuf> = usage.dirs().cloned().collect();
        for l in self.layers()? {
            if in_use.contains(&self.layer_root(&l.id)) {
                roots.insert(l.id);
            }
        }
        for env in envs {
            let cur = env.current()?.number;
            let live_gens: BTreeSet<u32> = env.live().iter().map(|r| r.record.generation).collect();
            let mut gens = env.generations()?;
            gens.sort_by_key(|g| std::cmp::Reverse(g.number));
            for (i, g) in gens.iter().enumerate() {
                // A generation a run uses is kept, record and all, until the run ends.
                let prune = g.number != cur && !live_gens.contains(&g.number) && (policy.keep.is_some_and(|k| i >= k) || policy.cutoff.is_some_and(|c| g.created < c));
                if prune {
                    pruned.push(Pruned { env: env.name.clone(), env_dir: env.dir.clone(), number: g.number });
                } else {
                    roots.extend(g.layers.iter().cloned());
                }
            }
            // An upper with changes needs the layers it was written on (rebase compares against
            // them); an empty one needs nothing.
            if !env.upper_is_empty() {
                roots.extend(env.upper_base()?);
            }
            for r in env.live() {
                roots.extend(r.record.layers);
            }
            // An interrupted change finishes with these layers (the typed journal, or the
            // commit record an older plyroot left).
            roots.extend(env.pending_layers()?);
        }
        // What the lock files of manifests built here pin (a `build` not applied yet).
        roots.extend(self.lock_file_layers());
        let dead = self.layers()?.into_iter().filter(|l| !roots.contains(&l.id)).collect();
        let remains = self.layer_remains().into_iter().filter(|id| !roots.contains(id)).collect();
        Ok(Collection { pruned, dead, in_use, remains, _locks: locks })
    }

    /// Prunes the generations and deletes the layers `c` found, then what crashed commands left.
    pub(crate) fn collect(&self, c: &Collection) -> Result<()> {
        for p in &c.pruned {
            let n = p.number;
            fs::remove_file(p.env_dir.join("generations").join(format!("{n}.json"))).with_context(|| format!("cannot prune generation {n}"))?;
            if let Ok(rd) = fs::read_dir(p.env_dir.join("skel")) {
                for e in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{n}-")) && !c.in_use.contains(&e.path())) {
                    remove_tree_mapped(&e.path())?;
                }
            }
        }
        for l in &c.dead {
            self.discard(&self.layer_dir(&l.id), &format!("layer {}", l.id))?;
        }
        for id in &c.remains {
            self.discard(&self.layer_dir(id), &format!("what is left of layer {id}"))?;
            crate::diag::info!("deleted what was left of layer {id}");
        }
        if !c.dead.is_empty() {
            self.prune_file_index();
        }
        self.clean_leftovers()?;
        let (builds, records) = self.collect_builds()?;
        if builds > 0 {
            crate::diag::info!("deleted what {builds} failed or interrupted build step(s) left");
        }
        crate::diag::debug!("removed {records} record(s) of build steps whose layer is gone");
        Ok(())
    }
}
