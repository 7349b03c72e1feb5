//! import, layers, layer rm: the store's layers.

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

pub(super) fn parse_sources(specs: &[String]) -> Result<Vec<Source>> {
    specs.iter().map(|s| s.parse::<Source>().map_err(anyhow::Error::from)).collect()
}

/// Imports sources, returning each source's layers, bottom first.
pub(super) fn import_all(store: &Store, sources: &[Source]) -> Result<Vec<LayerInfo>> {
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
