//! export (root): the merged root of an environment's current generation as one reproducible
//! rootfs tarball, or its layers as an OCI image layout. The formats live in `crate::export`;
//! this is the glue: which tiers, where the output goes, and reading where owners read as they
//! do inside (runs may have written files only subordinate ids can read).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::out;
use crate::export::merge::{self, Tier};
use crate::export::{self as exp, oci, Compression, Encoder, PendingDir};
use crate::sandbox::in_image_view;
use crate::store::canonical::{self, Writer};
use crate::store::env::{Env, Generation};
use crate::store::meta::Overrides;
use crate::store::Store;
use crate::text::human;

/// What the helper that wrote a tarball reports back.
#[derive(Serialize, Deserialize)]
struct Written {
    /// sha256 of the uncompressed tar: the layer id `plyroot import` gives it.
    id: String,
    entries: u64,
    size: u64,
    /// The reader of stdout went away (`| head`): not an error worth a word.
    broken_pipe: bool,
}

pub(crate) fn export(store: &Store, name: &str, output: Option<&Path>, oci: Option<&Path>) -> Result<i32> {
    if output.is_none() && oci.is_none() {
        bail!("plyroot export {name}: say where: -o FILE for a rootfs tarball, or --oci DIR for an OCI image layout");
    }
    let env = store.env(name)?;
    // Commit, reset and rebase replace the upper; hold them off while it is read.
    let _lock = env.lock()?;
    let generation = env.current()?;
    if generation.settings.base.as_deref() == Some("host") {
        crate::diag::warn!("'{name}' runs on the host's root (base = \"host\"): the export holds its layers and upper, not the host's files");
    }
    let upper = upper_to_export(&env, &generation)?;
    let epoch = exp::source_date_epoch()?;
    let mut tiers = Vec::with_capacity(generation.layers.len() + 1);
    for id in &generation.layers {
        let root = store.layer_root(id);
        if !root.is_dir() {
            bail!("layer {id} of '{name}' is missing from the store ({}): see `plyroot verify`", root.display());
        }
        tiers.push(Tier { root, overrides: store.layer_overrides(id)? });
    }
    match (output, oci) {
        (Some(file), _) => export_tar(&env, &generation, tiers, upper, file, epoch),
        (None, Some(dir)) => export_oci(&env, &generation, tiers, upper, dir, epoch),
        (None, None) => unreachable!(),
    }
}

/// The upper, when it holds anything; refused when it was written on other layers (the merge
/// would mix two stacks), as `run` refuses it.
fn upper_to_export(env: &Env, generation: &Generation) -> Result<Option<PathBuf>> {
    if env.upper_is_empty() {
        return Ok(None);
    }
    let name = &env.name;
    if env.upper_base()? != generation.layers {
        bail!(
            "the upper of '{name}' holds changes made on other layers than generation {} (current): `plyroot rebase {name}` to replay them onto it, or `plyroot reset {name}` to set them aside, then export",
            generation.number
        );
    }
    // A keeper holds the mount but writes nothing.
    let live = env.live().iter().filter(|r| !r.record.keeper).count();
    if live > 0 {
        crate::diag::warn!("{live} program(s) run in '{name}': the export reads its upper as it is now, while they may change it");
    }
    Ok(Some(env.upper()))
}

fn export_tar(env: &Env, generation: &Generation, mut tiers: Vec<Tier>, upper: Option<PathBuf>, file: &Path, epoch: Option<u64>) -> Result<i32> {
    let name = &env.name;
    if let Some(upper) = upper {
        // The upper holds real owners on disk (as they read inside), nothing recorded beside.
        tiers.push(Tier { root: upper, overrides: Overrides::default() });
    }
    let write = move |sink: &mut dyn Write| -> Result<Written> {
        let mut w = Writer::new(sink);
        if let Some(e) = epoch {
            w.clamp_mtimes(e);
        }
        merge::write_merged(&tiers, &mut w)?;
        let s = w.finish()?;
        Ok(Written { id: s.id, entries: s.entries, size: s.size, broken_pipe: false })
    };
    let compression = Compression::for_path(file)?;
    let shown = file.display().to_string();
    // Where the bytes go; a regular file is put in place only once it is complete.
    let (sink, pending, id_to_stdout) = match exp::Output::open(file)? {
        exp::Output::Stdout => {
            if rustix::termios::isatty(std::io::stdout()) {
                bail!("refusing to write a tarball to a terminal: redirect stdout, or give -o FILE");
            }
            (File::from(rustix::io::dup(std::io::stdout()).context("cannot write to stdout")?), None, false)
        }
        exp::Output::Stream(sink) => {
            // The id goes to stdout, unless the tarball does (`-o /dev/stdout`).
            let is_stdout = sink.metadata().is_ok_and(|m| exp::is_stdout(&m));
            (sink, None, !is_stdout)
        }
        exp::Output::File(pending) => (pending.handle()?, Some(pending), true),
    };
    let w = in_image_view(move || {
        let r = (|| -> Result<Written> {
            let mut enc = Encoder::new(compression, exp::buffered(sink))?;
            let w = write(&mut enc)?;
            let buf = enc.finish().context("cannot write the tarball")?;
            buf.into_inner().map_err(|e| e.into_error()).context("cannot write the tarball")?;
            Ok(w)
        })();
        match r {
            // The reader of a stream went away (`| head`): not an error worth a word.
            Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) => {
                Ok(Written { id: String::new(), entries: 0, size: 0, broken_pipe: true })
            }
            r => r,
        }
    })
    .with_context(|| match (&pending, file == Path::new("-")) {
        (Some(_), _) => format!("cannot export '{name}' to {shown}; nothing was written"),
        (None, true) => format!("cannot export '{name}' to stdout; what was written is incomplete"),
        (None, false) => format!("cannot export '{name}' to {shown}; what was written there is incomplete"),
    })?;
    if w.broken_pipe {
        return Ok(0);
    }
    let written = match pending {
        Some(p) => format!(", {} written", human(p.commit()?)),
        None => String::new(),
    };
    let to = if file == Path::new("-") { String::new() } else { format!(" to {shown}") };
    crate::diag::info!("exported '{name}' generation {}{to} ({} entries, {} of files{written}); as a layer: {}", generation.number, w.entries, human(w.size), w.id);
    if id_to_stdout {
        // The data of this command: the id `plyroot import` gives the tarball.
        out(&format!("{}\n", w.id))?;
    }
    Ok(0)
}

fn export_oci(env: &Env, generation: &Generation, tiers: Vec<Tier>, upper: Option<PathBuf>, dir: &Path, epoch: Option<u64>) -> Result<i32> {
    let name = &env.name;
    let pending = PendingDir::create(dir)?;
    let layout = pending.tmp.clone();
    let blobs = oci::blobs_dir(&layout);
    std::fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    let ids = generation.layers.clone();
    let has_upper = upper.is_some();
    let layers: Vec<(String, u64)> = in_image_view(move || {
        let mut done: Vec<(String, u64)> = Vec::new();
        for (id, tier) in ids.iter().zip(&tiers) {
            if let Some(l) = done.iter().find(|l| &l.0 == id).cloned() {
                done.push(l);
                continue;
            }
            // A layer's blob is its canonical tar, never clamped: its digest must stay its id.
            let (digest, size) = oci::write_layer_blob(&layout, |out| canonical::write_tar(&tier.root, &tier.overrides, out))?;
            if &digest != id {
                let _ = std::fs::remove_file(oci::blobs_dir(&layout).join(digest.trim_start_matches("sha256:")));
                bail!("layer {id} no longer matches its id (its tree serializes to {digest}): it was changed in the store; see `plyroot verify`");
            }
            done.push((digest, size));
        }
        if let Some(upper) = upper {
            // The upper as one more layer, whiteouts and opaque directories as `.wh.` entries:
            // the layer `plyroot commit` would make of it (with mtimes clamped when asked).
            done.push(oci::write_layer_blob(&layout, |out| {
                let mut w = Writer::new(out);
                if let Some(e) = epoch {
                    w.clamp_mtimes(e);
                }
                w.tree(&upper, &Overrides::default())?;
                w.finish()
            })?);
        }
        Ok(done)
    })
    .with_context(|| format!("cannot export '{name}' to {}; nothing was written", dir.display()))?;
    let mut vars: Vec<String> = Vec::new();
    if !generation.settings.env.contains_key("PATH") {
        vars.push(format!("PATH={}", crate::sandbox::PATH));
    }
    vars.extend(generation.settings.env.iter().map(|(k, v)| format!("{k}={v}")));
    let tag = "latest";
    let image = oci::Image { layers, env: vars, cmd: vec!["/bin/sh".to_owned()], created: epoch.unwrap_or(0), tag: tag.to_owned() };
    let digest = oci::write_layout(&pending.tmp, &image)?;
    pending.commit()?;
    crate::diag::info!(
        "exported '{name}' generation {} as an OCI image in {} ({} layer(s){}), tag {tag}: e.g. `skopeo inspect oci:{}:{tag}`",
        generation.number,
        dir.display(),
        generation.layers.len(),
        if has_upper { " plus the upper" } else { "" },
        dir.display()
    );
    out(&format!("{digest}\n"))?;
    Ok(0)
}
