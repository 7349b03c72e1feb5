//! Layers: their records, listing, resolving ids, and removal. Import (unpack into staging,
//! digest, publish by rename) is `source::import`'s: the store knows nothing of sources.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::meta::Overrides;
use super::Store;

/// What `layer.json` records about a layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LayerInfo {
    /// `sha256:<hex>` of the canonical tar.
    pub id: String,
    /// Bytes of regular file content.
    pub size: u64,
    pub entries: u64,
    /// Where the content first came from.
    pub source: String,
    /// Seconds since the epoch.
    pub created: u64,
}

/// Whether `id` is a layer id as the store writes it: `sha256:` and 64 lowercase hex digits.
/// Ids read back from records become path names under `layers/`, so nothing else may pass.
pub(crate) fn is_layer_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Checks the layer ids a record read from `file` holds; an error names the file, shows the
/// first bad value, and ends with `fix` (what the user can do about it).
pub(crate) fn check_ids<'a>(ids: impl IntoIterator<Item = &'a String>, file: &Path, fix: &str) -> Result<()> {
    match ids.into_iter().find(|id| !is_layer_id(id)) {
        None => Ok(()),
        Some(bad) => bail!("{} is damaged: {} is not a layer id (sha256: and 64 lowercase hex digits); {fix}", file.display(), shown(bad)),
    }
}

/// A value from a damaged record as it can be shown on one line: quoted, escaped, cut short.
fn shown(v: &str) -> String {
    let cut: String = v.chars().take(80).collect();
    if cut.len() < v.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The first 12 hex digits of an id, for tables (`sha256:` + 12 = 19 characters); never panics,
/// whatever the string.
pub(crate) fn short_id(id: &str) -> &str {
    id.get(..19).unwrap_or(id)
}

impl Store {
    /// The directory of layer `id` (`sha256:<hex>`).
    pub(crate) fn layer_dir(&self, id: &str) -> PathBuf {
        self.layers_dir().join(id.trim_start_matches("sha256:"))
    }

    /// The tree of layer `id`, as used for an overlay lower.
    /// The trees of `layers` (bottom first), top first: the order overlayfs takes lowers in.
    pub(crate) fn layer_roots(&self, layers: &[String]) -> Vec<PathBuf> {
        layers.iter().rev().map(|l| self.layer_root(l)).collect()
    }

    /// Whether `id` is a layer id and the store has that layer, published whole.
    pub(crate) fn has_layer(&self, id: &str) -> bool {
        is_layer_id(id) && self.layer_dir(id).join("layer.json").is_file()
    }

    pub(crate) fn layer_root(&self, id: &str) -> PathBuf {
        self.layer_dir(id).join("root")
    }

    pub(crate) fn layer_info(&self, id: &str) -> Result<LayerInfo> {
        let p = self.layer_dir(id).join("layer.json");
        let data = fs::read(&p).with_context(|| format!("layer {id} is not in the store ({})", p.display()))?;
        let fix = format!("restore it, or remove the directory {} and import its source again", self.layer_dir(id).display());
        let info: LayerInfo = serde_json::from_slice(&data).with_context(|| format!("{} is damaged (not a layer record); {fix}", p.display()))?;
        // The directory's name is the id the rest of the store refers to; a record that says
        // otherwise would make gc and `layer rm` act on another path.
        if info.id != id {
            check_ids([&info.id], &p, &fix)?;
            bail!("{} is damaged: it names layer {} but lies in the directory of {id}; {fix}", p.display(), info.id);
        }
        Ok(info)
    }

    pub(crate) fn layer_overrides(&self, id: &str) -> Result<Overrides> {
        let p = self.layer_dir(id).join("overrides.json");
        match fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d).with_context(|| format!("{} is corrupt", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Every layer in the store, sorted by id.
    pub(crate) fn layers(&self) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.layers_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.layers_dir().display())),
        };
        for e in rd.flatten() {
            let id = format!("sha256:{}", e.file_name().to_string_lossy());
            if !is_layer_id(&id) {
                continue;
            }
            if !e.path().join("layer.json").exists() && e.path().is_dir() {
                crate::diag::warn!("{} is what is left of a layer deleted by hand (it has no layer.json): `plyroot gc` removes the rest", e.path().display());
                continue;
            }
            out.push(self.layer_info(&id)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Layer directories without a record: what a deletion by hand (of files of subordinate ids,
    /// which the user cannot delete directly) left.
    pub(crate) fn layer_remains(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.layers_dir()) else { return Vec::new() };
        rd.flatten()
            .map(|e| (format!("sha256:{}", e.file_name().to_string_lossy()), e.path()))
            .filter(|(id, p)| is_layer_id(id) && p.is_dir() && !p.join("layer.json").exists())
            .map(|(id, _)| id)
            .collect()
    }

    /// Resolves a full id or an unambiguous prefix (with or without `sha256:`), in any case: ids
    /// are copied from tools that print hex in capitals, and `SHA256:` is the same algorithm.
    pub(crate) fn resolve_layer(&self, id: &str) -> Result<String> {
        let hex = match id.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &id[7..],
            _ => id,
        };
        let hex = hex.to_ascii_lowercase();
        let hex = hex.as_str();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{id}' is not a layer id: expected sha256:<hex> or a prefix of one (see `plyroot layers`)");
        }
        if hex.len() == 64 && self.layer_dir(hex).join("layer.json").exists() {
            return Ok(format!("sha256:{hex}"));
        }
        let hits: Vec<_> = self.layers()?.into_iter().filter(|l| l.id.trim_start_matches("sha256:").starts_with(hex)).collect();
        match hits.len() {
            0 => bail!("no layer {id} in the store (see `plyroot layers`)"),
            1 => Ok(hits[0].id.clone()),
            n => bail!("layer id prefix {id} is ambiguous: {n} layers match; give more digits"),
        }
    }

    /// Removes a layer no environment uses.
    pub(crate) fn remove_layer(&self, id: &str) -> Result<()> {
        let users = self.layer_users(id)?;
        if !users.is_empty() {
            bail!("layer {id} is used by environment(s) {}: remove them first (`plyroot rm NAME`)", users.join(", "));
        }
        let st = self.staging()?;
        let grave = st.path.join("layer");
        fs::rename(self.layer_dir(id), &grave).with_context(|| format!("cannot remove layer {id}"))?;
        drop(st);
        Ok(())
    }

    /// Environments whose generations reference `id`.
    pub(crate) fn layer_users(&self, id: &str) -> Result<Vec<String>> {
        let mut users = Vec::new();
        for env in self.envs()? {
            if env.generations()?.iter().any(|g| g.layers.iter().any(|l| l == id)) {
                users.push(env.name.clone());
            }
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_checked_and_shortened_without_panics() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert!(is_layer_id(&good));
        for bad in ["", "sha256:", "sha256:abc", &good[7..], &good.to_uppercase(), &format!("{good}0"), "sha256:../../../../../../../../../../../../../../../../../../etc", &good.replace('0', "é")] {
            assert!(!is_layer_id(bad), "{bad:?}");
        }
        let file = Path::new("/s/envs/t/generations/1.json");
        let e = check_ids(&[good.clone(), "sha256:ab\ncd".to_owned()], file, "restore it").unwrap_err().to_string();
        assert!(e.starts_with("/s/envs/t/generations/1.json is damaged: \"sha256:ab\\ncd\" is not a layer id") && e.ends_with("restore it") && !e.contains('\n'), "{e}");
        let long = "x".repeat(500);
        assert!(check_ids(&[long], file, "fix").unwrap_err().to_string().len() < 250, "a huge value is cut short");
        assert_eq!(short_id(&good), &good[..19]);
        for s in ["", "sha256:ab", "ééééééééééé"] {
            assert_eq!(short_id(s), s);
        }
    }
}
