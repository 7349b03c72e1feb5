//! gc and verify.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{human, out, out_json};
use crate::store::runs::Usage;
use crate::store::{canonical, now_secs, Store};

/// `90s`, `45m`, `12h`, `30d`, `2w` → seconds.
pub(crate) fn parse_duration(s: &str) -> Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    if num.is_empty() {
        bail!("'{s}' is not a duration: use a number and a unit, like 90s, 45m, 12h, 30d or 2w");
    }
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "w" => 7 * 86400,
        _ => bail!("'{s}' is not a duration: the unit must be s, m, h, d or w"),
    };
    // A number of any length is digits; one that does not fit (or whose seconds do not) is not
    // "forever": it is refused, rather than wrapped round to some short age that prunes generations.
    let too_long = || anyhow::anyhow!("'{s}' is too long a duration (at most {} days): to keep every generation, leave --older-than out", u64::MAX / 86400);
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(too_long)
}

pub(crate) fn gc(store_root: &Path, dry_run: bool, keep: Option<usize>, older_than: Option<&str>) -> Result<i32> {
    let cutoff = older_than.map(parse_duration).transpose()?.map(|d| now_secs().saturating_sub(d));
    // Exclusive: waits for launches and imports in progress (they hold the lock shared until
    // their program starts); running programs are seen through their pins instead.
    let mut store = Store::open_exclusive(store_root)?;
    store.remover = crate::sandbox::remove_tree_mapped;
    let mut roots: BTreeSet<String> = BTreeSet::new();
    let mut pruned = Vec::new();
    let mut locks = Vec::new();
    let envs = store.envs()?;
    for env in &envs {
        locks.push(env.lock()?);
        // A keeper only caches a mount: it does not keep what it holds from collection.
        env.dismiss_keeper()?;
    }
    // What live mounts are made of, in every namespace we can see (runs, programs they left
    // behind, launchers composing inside environments): none of it is collected.
    let usage = Usage::scan();
    let in_use: BTreeSet<PathBuf> = usage.dirs().cloned().collect();
    for l in store.layers()? {
        if in_use.contains(&store.layer_root(&l.id)) {
            roots.insert(l.id);
        }
    }
    for env in envs {
        let cur = env.current()?.number;
        let live_gens: BTreeSet<u32> = env.live().iter().map(|r| r.record.generation).collect();
        let mut gens = env.generations()?;
        gens.sort_by(|a, b| b.number.cmp(&a.number));
        for (i, g) in gens.iter().enumerate() {
            // A generation a run uses is kept, record and all, until the run ends.
            let prune = g.number != cur && !live_gens.contains(&g.number) && (keep.is_some_and(|k| i >= k) || cutoff.is_some_and(|c| g.created < c));
            if prune {
                pruned.push((env.name.clone(), env.dir.clone(), g.number));
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
        // An interrupted change finishes with these layers.
        roots.extend(env.pending_layers()?);
    }
    let dead: Vec<_> = store.layers()?.into_iter().filter(|l| !roots.contains(&l.id)).collect();
    let freed: u64 = dead.iter().map(|l| l.size).sum();
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut s = String::new();
    for (name, _, n) in &pruned {
        s.push_str(&format!("{} generation {name}/{n}\n", if dry_run { "would prune" } else { "pruned" }));
    }
    for l in &dead {
        s.push_str(&format!("{verb} layer {} ({}, {})\n", l.id, human(l.size), l.source));
    }
    if !dry_run {
        for (_, dir, n) in &pruned {
            fs::remove_file(dir.join("generations").join(format!("{n}.json"))).with_context(|| format!("cannot prune generation {n}"))?;
            if let Ok(rd) = fs::read_dir(dir.join("skel")) {
                for e in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{n}-")) && !in_use.contains(&e.path())) {
                    (store.remover)(&e.path())?;
                }
            }
        }
        for l in &dead {
            // Disappears at once (rename), then is deleted.
            let st = store.staging()?;
            fs::rename(store.layer_dir(&l.id), st.path.join("layer")).with_context(|| format!("cannot delete layer {}", l.id))?;
            (store.remover)(&st.path.join("layer"))?;
        }
        store.clean_leftovers()?;
    }
    s.push_str(&format!("{} {} generation(s) and {} layer(s), {} {}\n", if dry_run { "would prune" } else { "pruned" }, pruned.len(), dead.len(), if dry_run { "would free" } else { "freed" }, human(freed)));
    out(&s)?;
    drop(locks);
    Ok(0)
}

#[derive(Serialize, serde::Deserialize)]
struct Verdict {
    id: String,
    ok: bool,
    actual: Option<String>,
    error: Option<String>,
}

pub(crate) fn verify(store: &Store, json: bool) -> Result<i32> {
    let layers: Vec<String> = store.layers()?.into_iter().map(|l| l.id).collect();
    let mut work = Vec::new();
    for id in &layers {
        work.push((id.clone(), store.layer_root(id), store.layer_overrides(id)?));
    }
    // Owners read as they do inside, where every id a run wrote is mapped.
    let verdicts: Vec<Verdict> = crate::sandbox::as_root_inside(move || {
        Ok(work
            .into_iter()
            .map(|(id, root, ov)| match canonical::digest(&root, &ov) {
                Ok(s) => Verdict { ok: s.id == id, actual: Some(s.id), id, error: None },
                Err(e) => Verdict { id, ok: false, actual: None, error: Some(e.to_string()) },
            })
            .collect())
    })?;
    let bad = verdicts.iter().filter(|v| !v.ok).count();
    if json {
        out_json(&verdicts)?;
    } else {
        let mut s = String::new();
        for v in &verdicts {
            match (v.ok, &v.actual, &v.error) {
                (true, _, _) => s.push_str(&format!("ok       {}\n", v.id)),
                (false, Some(a), _) => s.push_str(&format!("CORRUPT  {} (its content now digests to {a})\n", v.id)),
                (false, _, Some(e)) => s.push_str(&format!("CORRUPT  {} ({e})\n", v.id)),
                _ => {}
            }
        }
        s.push_str(&format!("{} layer(s) checked, {bad} corrupt\n", verdicts.len()));
        out(&s)?;
    }
    if bad > 0 {
        crate::diag::warn!("corrupt layers no longer hold what their id says: re-import their source (`plyroot apply --update` or `plyroot import`) after removing them");
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("90s").unwrap(), 90);
        assert_eq!(super::parse_duration("12h").unwrap(), 43200);
        assert_eq!(super::parse_duration("2w").unwrap(), 1_209_600);
        assert_eq!(super::parse_duration("3").unwrap(), 3 * 86400);
        for bad in ["", "h", "12y", "-1d"] {
            assert!(super::parse_duration(bad).is_err(), "{bad}");
        }
        // Overflowing values are refused, not wrapped to a short age (or a panic).
        for huge in ["30500000000000000w", "213503982334602d", "18446744073709551616s", "99999999999999999999999d"] {
            let e = super::parse_duration(huge).unwrap_err().to_string();
            assert!(e.contains("too long") && e.contains(huge), "{huge}: {e}");
        }
        assert_eq!(super::parse_duration("18446744073709551615s").unwrap(), u64::MAX);
    }
}
