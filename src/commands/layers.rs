//! import, layers, layer rm, create, list, rm.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use serde::Serialize;

use super::{out, out_json};
use crate::progress::Progress;
use crate::source::Source;
use crate::store::layer::{short_id, LayerInfo};
use crate::store::Store;
use crate::text::{field, human};

fn progress_for(src: &Source) -> Progress {
    let enabled = crate::diag::level() >= 1 && std::io::stderr().is_terminal();
    let total = match src {
        Source::Tar(p) if p.as_os_str() != "-" => std::fs::metadata(p).ok().map(|m| m.len()),
        _ => None,
    };
    Progress::new(&src.to_string(), total, enabled)
}

fn parse_sources(specs: &[String]) -> Result<Vec<Source>> {
    specs.iter().map(|s| s.parse::<Source>().map_err(anyhow::Error::from)).collect()
}

/// Imports sources, returning each source's layers, bottom first.
fn import_all(store: &Store, sources: &[Source]) -> Result<Vec<LayerInfo>> {
    let mut all = Vec::new();
    for src in sources {
        let mut p = progress_for(src);
        all.extend(store.import(src, &mut p)?);
    }
    Ok(all)
}

pub(crate) fn import(store: &Store, specs: &[String], json: bool) -> Result<i32> {
    let sources = parse_sources(specs)?;
    let layers = import_all(store, &sources)?;
    if json {
        out_json(&layers)?;
    } else {
        out(&layers.iter().map(|l| format!("{}\n", l.id)).collect::<String>())?;
    }
    Ok(0)
}

#[derive(Serialize)]
struct LayerRow {
    #[serde(flatten)]
    info: LayerInfo,
    used_by: Vec<String>,
}

pub(crate) fn layers(store: &Store, json: bool) -> Result<i32> {
    let mut rows = Vec::new();
    for info in store.layers()? {
        let used_by = store.layer_users(&info.id)?;
        rows.push(LayerRow { info, used_by });
    }
    if json {
        return out_json(&rows).map(|_| 0);
    }
    let mut s = format!("{:<19} {:>10} {:>8}  {:<20} {}\n", "ID", "SIZE", "ENTRIES", "USED BY", "SOURCE");
    for r in &rows {
        let used = if r.used_by.is_empty() { "-".to_owned() } else { r.used_by.join(",") };
        s.push_str(&format!("{:<19} {:>10} {:>8}  {:<20} {}\n", short_id(&r.info.id), human(r.info.size), r.info.entries, used, field(&r.info.source)));
    }
    out(&s).map(|_| 0)
}

pub(crate) fn layer_rm(store: &Store, ids: &[String]) -> Result<i32> {
    // Every id is resolved and checked before the first removal: one that cannot go leaves all
    // of them in place.
    let mut resolved: Vec<String> = Vec::new();
    for given in ids {
        let id = store.resolve_layer(given)?;
        if resolved.contains(&id) {
            continue;
        }
        let users = store.layer_users(&id)?;
        if !users.is_empty() {
            bail!("layer {id} is used by environment(s) {}: remove them first (`plyroot rm NAME`); no layer was removed", users.join(", "));
        }
        resolved.push(id);
    }
    for id in resolved {
        store.remove_layer(&id)?;
        crate::diag::info!("removed layer {id}");
    }
    Ok(0)
}

pub(crate) fn create(store: &Store, name: &str, from: &[String], base: Option<&str>) -> Result<i32> {
    crate::store::env::check_name(name)?;
    if store.envs_dir().join(name).exists() {
        anyhow::bail!("environment '{name}' already exists: use another name, or remove it first with `plyroot rm {name}`");
    }
    let sources = parse_sources(from)?;
    let layers = import_all(store, &sources)?;
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
    let settings = crate::manifest::Settings { base: base.map(str::to_owned), ..Default::default() };
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

pub(crate) fn list(store: &Store, json: bool) -> Result<i32> {
    let mut rows = Vec::new();
    for env in store.envs()? {
        let g = env.current()?;
        rows.push(EnvRow { upper_bytes: env.upper_size(), name: env.name, generation: g.number, layers: g.layers, sources: g.sources });
    }
    if json {
        return out_json(&rows).map(|_| 0);
    }
    let mut s = format!("{:<20} {:>4} {:>7} {:>10}  {}\n", "NAME", "GEN", "LAYERS", "UPPER", "SOURCES");
    for r in &rows {
        let sources: Vec<_> = r.sources.iter().map(|s| field(s)).collect();
        s.push_str(&format!("{:<20} {:>4} {:>7} {:>10}  {}\n", r.name, r.generation, r.layers.len(), human(r.upper_bytes), sources.join(" ")));
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
        store.remove_env(n)?;
        crate::diag::info!("removed environment '{n}'");
    }
    Ok(0)
}
