//! The shared step cache in an OCI registry: a step's layer is an ordinary one-layer image in the
//! cache repository, tagged `step-<key hex>`. The registry's own tags are the index from key to
//! layer, so two builds that push at once never rewrite a shared index (the last PUT of a tag
//! wins, and both name a layer built for that key). Any registry that takes an image takes
//! these; plyroot adds no server.
//!
//! A layer from the cache is imported like any pull: its blob's digest and its diff_id are
//! verified, so it is exactly the content the image names. Who can push to the cache decides
//! what a step's key yields: where the lock file pins a key to a layer, a cache that gives
//! another one is not used.

use anyhow::Result;

/// The tag of the step with `key` in a cache repository.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) fn tag(key: &str) -> String {
    format!("step-{}", key.trim_start_matches("sha256:"))
}

/// `docker://REF` of a cache, checked: a repository without tag or digest.
pub(crate) fn repository(cache: &str) -> Result<String> {
    let Some(r) = cache.strip_prefix("docker://") else { anyhow::bail!("the step cache '{cache}' is not a registry reference: write docker://HOST/REPOSITORY") };
    #[cfg(feature = "registry")]
    {
        let parsed = crate::registry::Reference::parse(r)?;
        if parsed.digest.is_some() || r.rsplit('/').next().is_some_and(|last| last.contains(':')) {
            anyhow::bail!("the step cache '{cache}' names a tag or digest: give the repository only (plyroot tags each step's image itself)");
        }
    }
    Ok(r.to_owned())
}

/// The layer the cache `cache` (docker://REPOSITORY) holds for step `key`, imported into the
/// store; None when it has none.
#[cfg(feature = "registry")]
pub(crate) fn fetch(store: &crate::store::Store, cache: &str, key: &str) -> Result<Option<String>> {
    let repo = repository(cache)?;
    let reference = crate::registry::Reference::parse(&format!("{repo}:{}", tag(key)))?;
    let mut client = crate::registry::Client::new(&reference, false)?;
    if !client.has_manifest(&tag(key))? {
        return Ok(None);
    }
    drop(client);
    let src: crate::source::Source = format!("docker://{reference}").parse()?;
    let enabled = crate::diag::level() >= 1 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut p = crate::progress::Progress::new(&format!("step cache {reference}"), None, enabled);
    let layers = store.import(&src, &mut p)?;
    match &layers[..] {
        [one] => Ok(Some(one.id.clone())),
        _ => anyhow::bail!("the step cache's image {reference} has {} layers, not one: it was not written by plyroot; push to another repository, or build with --no-cache", layers.len()),
    }
}

/// Whether the cache's tag `tag` is the one-layer image of `layer` (its config's only diff_id).
#[cfg(feature = "registry")]
pub(crate) fn holds(client: &mut crate::registry::Client, tag: &str, layer: &str) -> Result<bool> {
    if !client.has_manifest(tag)? {
        return Ok(false);
    }
    let (manifest, _) = client.manifest(tag)?;
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap_or_default();
    let (Some(config), Some(1)) = (m["config"]["digest"].as_str(), m["layers"].as_array().map(Vec::len)) else { return Ok(false) };
    let config: serde_json::Value = serde_json::from_slice(&client.blob_bytes(config)?).unwrap_or_default();
    Ok(config["rootfs"]["diff_ids"].as_array().is_some_and(|d| d.len() == 1 && d[0] == layer))
}

#[cfg(not(feature = "registry"))]
pub(crate) fn fetch(_: &crate::store::Store, _: &str, _: &str) -> Result<Option<String>> {
    anyhow::bail!("this plyroot was built without registry support (cargo feature `registry`): no step cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_is_a_repository_and_steps_are_tags_in_it() {
        assert_eq!(tag("sha256:abcd"), "step-abcd");
        assert_eq!(repository("docker://127.0.0.1:5000/team/cache").unwrap(), "127.0.0.1:5000/team/cache");
        assert!(repository("127.0.0.1:5000/x").is_err());
        #[cfg(feature = "registry")]
        {
            assert!(repository("docker://127.0.0.1:5000/team/cache:latest").unwrap_err().to_string().contains("repository only"));
            assert!(repository("docker://host/x@sha256:0000000000000000000000000000000000000000000000000000000000000000").is_err());
        }
    }
}
