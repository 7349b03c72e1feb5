//! Building an environment from its declaration: each manifest step (`packages`, `run`) makes one
//! layer from the layers below it, cached by its key.
//!
//! A step's **key** is the sha256 of what decides its output: the ids of the layers below, the
//! step as written, its variables and network flag, and the content digests of its inputs (never
//! their host paths, so two machines agree). A key the store has built is reused without running
//! anything; a pin in the lock file names the layer another machine built for it. A changed step
//! changes its key and, through its layer id, the keys of every step above it.
//!
//! A step runs through the one launch path (`sandbox::prepare`) in a throwaway environment
//! (`store::steps`), as root inside, pure (nothing of the host's but /proc and /dev, nothing of
//! the caller's), without the network unless it asks; its upper becomes the layer, as `commit`
//! makes one.

pub(crate) mod cache;
pub(crate) mod check;
pub(crate) mod inputs;
pub(crate) mod packages;
pub(crate) mod step;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::manifest::{EnvDecl, Step, StepKind};
use crate::store::Store;

/// How to build.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    /// Run every step, whatever is cached.
    pub no_cache: bool,
    /// Run again the steps that use the network (new package versions), whatever is cached.
    pub update: bool,
    /// The lock file's pins: step key → layer id.
    pub pins: BTreeMap<String, String>,
    /// `docker://REPOSITORY`: where to look for a step's layer before running it.
    pub cache_from: Option<String>,
}

/// What building an environment's steps gave.
#[derive(Clone, Debug, Default)]
pub(crate) struct Built {
    /// Each step's key and layer, bottom first: the layers stack on the sources' layers, and the
    /// lock file pins both.
    pub keys: Vec<(String, String)>,
    /// How many steps ran (the rest were cached).
    pub ran: usize,
}

/// The key of `step` on the layers `below`, whose inputs have the digests `inputs` (in order).
pub(crate) fn key(below: &[String], step: &Step, inputs: &[String]) -> String {
    #[derive(Serialize)]
    struct Keyed<'a> {
        // The version of what a key covers: a change to how steps run changes it.
        v: u32,
        below: &'a [String],
        step: &'a StepKind,
        env: &'a BTreeMap<String, String>,
        network: bool,
        inputs: Vec<(String, &'a String)>,
    }
    let k = Keyed {
        v: 1,
        below,
        step: &step.what,
        env: &step.env,
        network: step.network,
        inputs: step.inputs.iter().map(|i| i.dst.to_string_lossy().into_owned()).zip(inputs).collect(),
    };
    let json = serde_json::to_vec(&k).expect("a key serialises");
    format!("sha256:{}", hex::encode(Sha256::digest(&json)))
}

/// Builds the steps of `decl` on the layers `below` (its sources'), each from the cache where it
/// can: the store's records, then the lock file's pins.
pub(crate) fn build(store: &Store, decl: &EnvDecl, below: &[String], opts: &Options) -> Result<Built> {
    let mut built = Built::default();
    if decl.steps.is_empty() {
        return Ok(built);
    }
    let _lock = store.lock_build(&decl.name)?;
    // The state a failed step left is kept until this build, whether a step runs or not.
    store.remove_build_env(&decl.name)?;
    let n = decl.steps.len();
    let mut stack: Vec<String> = below.to_vec();
    for (i, s) in decl.steps.iter().enumerate() {
        let digests = s.inputs.iter().map(|inp| input_digest(store, &inp.src).map_err(|e| e.context(format!("step {}/{n} of '{}' (`{}`)", i + 1, decl.name, s.title())))).collect::<Result<Vec<_>>>()?;
        let k = key(&stack, s, &digests);
        let rerun = opts.no_cache || (opts.update && s.network);
        let place = format!("[{}/{n}] {}", i + 1, decl.name);
        let mut cached = if rerun { None } else { store.step_layer(&k).or_else(|| pinned(store, opts, &k)) };
        if let (None, false, Some(cache)) = (&cached, rerun, &opts.cache_from) {
            cached = from_cache(store, cache, &k, opts.pins.get(&k), &place);
            if let Some(layer) = &cached {
                store.record_step(&k, layer)?;
            }
        }
        let layer = match cached {
            Some(layer) => {
                crate::diag::info!("{place}: {} (cached)", crate::text::field(&s.title()));
                layer
            }
            None => {
                crate::diag::info!("{place}: {}", crate::text::field(&s.title()));
                let layer = step::run(store, &decl.name, &stack, s, &place)?;
                store.record_step(&k, &layer)?;
                if let Some(pin) = opts.pins.get(&k).filter(|p| **p != layer && !rerun) {
                    crate::diag::warn!("{place}: the step made {} where the lock file pins {} (not bit-for-bit reproducible: see `plyroot build --check`); the lock file now pins the new one", crate::store::layer::short_id(&layer), crate::store::layer::short_id(pin));
                }
                built.ran += 1;
                layer
            }
        };
        stack.push(layer.clone());
        built.keys.push((k, layer));
    }
    Ok(built)
}

/// The layer the step cache holds for `key`, unless it differs from the lock file's pin; a
/// cache that cannot be reached is a warning (the step runs here instead).
fn from_cache(store: &Store, cache: &str, key: &str, pin: Option<&String>, place: &str) -> Option<String> {
    match cache::fetch(store, cache, key) {
        Ok(Some(layer)) if pin.is_some_and(|p| *p != layer) => {
            crate::diag::warn!("{place}: the step cache {cache} gives layer {} where the lock file pins {}: not used, the step runs here", crate::store::layer::short_id(&layer), crate::store::layer::short_id(pin.map(String::as_str).unwrap_or_default()));
            None
        }
        Ok(found) => found,
        Err(e) => {
            crate::diag::warn!("{place}: the step cache {cache} could not be read ({}); the step runs here", crate::text::chain(&e));
            None
        }
    }
}

/// The digest of the input at `src`, reading only what changed since the last one (the store
/// keeps each input's file digests in `blobs/inputs/`; losing them costs only a full read).
fn input_digest(store: &Store, src: &std::path::Path) -> Result<String> {
    let path = inputs::known_path(&store.root.join("blobs"), src);
    let mut known = inputs::Known::load(&path);
    let d = inputs::digest_with(src, &mut known)?;
    if let Some(new) = known.updated() {
        let written = path.parent().map(std::fs::create_dir_all).transpose().map_err(anyhow::Error::from).and_then(|_| crate::store::write_atomic(&path, &new));
        if let Err(e) = written {
            crate::diag::debug!("the digests of {} were not kept: {e:#}", src.display());
        }
    }
    Ok(d)
}

/// The layer the lock file pins for `key`, when the store has it.
fn pinned(store: &Store, opts: &Options, key: &str) -> Option<String> {
    let layer = opts.pins.get(key)?;
    store.has_layer(layer).then(|| layer.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Input;

    fn run(cmd: &str) -> Step {
        Step { what: StepKind::Run(cmd.into()), inputs: Vec::new(), network: false, env: BTreeMap::new() }
    }

    #[test]
    fn a_key_changes_with_each_of_its_inputs_and_not_with_host_paths() {
        let below = vec!["sha256:aa".to_owned()];
        let base = key(&below, &run("make"), &[]);
        assert_eq!(base, key(&below, &run("make"), &[]));
        assert_ne!(base, key(&["sha256:bb".to_owned()], &run("make"), &[]));
        assert_ne!(base, key(&below, &run("make install"), &[]));
        let mut net = run("make");
        net.network = true;
        assert_ne!(base, key(&below, &net, &[]));
        let mut env = run("make");
        env.env.insert("CC".into(), "clang".into());
        assert_ne!(base, key(&below, &env, &[]));
        let pk = Step { what: StepKind::Packages(vec!["make".into()]), ..run("") };
        assert_ne!(key(&below, &pk, &[]), key(&below, &run("make"), &[]));
        // Inputs: their content digest and place inside count, not where they are on the host.
        let with = |src: &str, dst: &str| Step { inputs: vec![Input { src: src.into(), dst: dst.into() }], ..run("make") };
        let d = vec!["sha256:11".to_owned()];
        assert_eq!(key(&below, &with("/a/src", "/src"), &d), key(&below, &with("/b/src", "/src"), &d));
        assert_ne!(key(&below, &with("/a/src", "/src"), &d), key(&below, &with("/a/src", "/src2"), &d));
        assert_ne!(key(&below, &with("/a/src", "/src"), &d), key(&below, &with("/a/src", "/src"), &["sha256:22".to_owned()]));
    }
}
