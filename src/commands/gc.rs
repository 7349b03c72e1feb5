//! gc and verify: options in, the store's answer printed (the rules are in `store::gc`).

use std::path::Path;

use anyhow::{bail, Result};
use serde::Serialize;

use super::{out, out_json};
use crate::store::gc::Policy;
use crate::store::{canonical, now_secs, Store};
use crate::text::human;

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
    let store = Store::open_exclusive(store_root)?;
    let found = store.gc_roots(Policy { keep, cutoff, end_keepers: !dry_run })?;
    let (pruned, deleted) = if dry_run { ("would prune", "would delete") } else { ("pruned", "deleted") };
    let mut s = String::new();
    for p in &found.pruned {
        s.push_str(&format!("{pruned} generation {}/{}\n", p.env, p.number));
    }
    for l in &found.dead {
        s.push_str(&format!("{deleted} layer {} ({}, {})\n", l.id, human(l.size), l.source));
    }
    if !dry_run {
        store.collect(&found)?;
    }
    let freed = if dry_run { "would free" } else { "freed" };
    s.push_str(&format!("{pruned} {} generation(s) and {} layer(s), {freed} {}\n", found.pruned.len(), found.dead.len(), human(found.freed())));
    out(&s)?;
    drop(found);
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
    let verdicts: Vec<Verdict> = crate::sandbox::in_image_view(move || {
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
