//! How many layers an environment may have, stated before anything is built on it.
//!
//! overlayfs mounts at most 500 lower layers (the new mount API's `lowerdir+`; 501 is EINVAL).
//! Every launch puts one more on top of the environment's layers, the skeleton. A launcher
//! started inside another environment composes its own layers over that environment's upper and
//! layers in one overlay; for that to work over any environment, each environment leaves room:
//!
//! | lowers | what |
//! | --- | --- |
//! | 435 | the most layers an environment may have ([`MAX_LAYERS`]) |
//! | 1 | the skeleton |
//! | 64 | kept for composing ([`COMPOSE_RESERVE`]): an environment of up to 63 layers launches over any environment (63 + its upper, as a lower) |
//!
//! `create`, `apply` and `commit` refuse to make an environment of more than [`MAX_LAYERS`];
//! `plyroot squash` merges layers to get back under it. A launch checks the 500 itself (an
//! environment made before this limit, a composition of two large ones) and says which to squash.

use anyhow::{bail, Result};

/// The most lower layers one overlayfs mount takes.
pub(crate) const MAX_LOWERS: usize = 500;

/// Lowers every launch adds on top of the layers: the skeleton.
pub(crate) const SKELETON_LOWERS: usize = 1;

/// Lowers kept free for launchers composing over an environment (see the module header).
pub(crate) const COMPOSE_RESERVE: usize = 64;

/// The most layers an environment may have.
pub(crate) const MAX_LAYERS: usize = MAX_LOWERS - SKELETON_LOWERS - COMPOSE_RESERVE;

/// Why the limit is what it is, for messages.
fn why() -> String {
    format!("overlayfs mounts at most {MAX_LOWERS} lower layers, and plyroot keeps {SKELETON_LOWERS} for the skeleton every launch adds and {COMPOSE_RESERVE} for launchers that compose over the environment")
}

/// Refuses a stack of `n` layers for environment `name` when it is over [`MAX_LAYERS`]; `fix`
/// says what to do instead.
pub(crate) fn check(name: &str, n: usize, fix: &str) -> Result<()> {
    if n > MAX_LAYERS {
        bail!("environment '{name}' would have {n} layers, more than the {MAX_LAYERS} plyroot allows ({}): {fix}", why());
    }
    Ok(())
}

/// Refuses a launch whose overlay would need more lowers than the kernel takes: `own` layers of
/// environment `name`, `lowers` in all (with what it composes over), plus the skeleton.
pub(crate) fn check_launch(name: &str, own: usize, lowers: usize) -> Result<()> {
    let total = lowers + SKELETON_LOWERS;
    if total <= MAX_LOWERS {
        return Ok(());
    }
    if lowers > own {
        bail!(
            "cannot start '{name}' over the environment it was started in: its {own} layers, {} more from that environment (its layers and upper, less those both share) and the skeleton make {total} lower layers, and overlayfs mounts at most {MAX_LOWERS}: `plyroot squash` one of the two environments (an environment of at most {} layers composes over any other)",
            lowers - own,
            COMPOSE_RESERVE - 1
        );
    }
    bail!(
        "environment '{name}' has {own} layers: with the skeleton that is {total} lower layers, and overlayfs mounts at most {MAX_LOWERS}: `plyroot squash {name}` merges them (your changes in its upper are kept)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_leaves_room_for_the_skeleton_and_composition() {
        assert_eq!(MAX_LAYERS, 435);
        // The largest environment, composed over by one within the reserve, fits one mount.
        assert!(check_launch("big", MAX_LAYERS, MAX_LAYERS).is_ok());
        assert!(check_launch("tool", COMPOSE_RESERVE - 1, MAX_LAYERS + 1 + COMPOSE_RESERVE - 1).is_ok());
        assert!(check("e", MAX_LAYERS, "fix").is_ok());
        let e = check("e", MAX_LAYERS + 1, "squash it").unwrap_err().to_string();
        assert!(e.contains("436 layers") && e.contains("435") && e.contains("500") && e.ends_with("squash it"), "{e}");
    }

    #[test]
    fn a_launch_past_the_kernels_limit_names_what_to_squash() {
        assert!(check_launch("e", 499, 499).is_ok());
        let e = check_launch("e", 500, 500).unwrap_err().to_string();
        assert!(e.contains("501 lower layers") && e.contains("plyroot squash e"), "{e}");
        assert!(check_launch("tool", 100, 499).is_ok());
        let e = check_launch("tool", 100, 500).unwrap_err().to_string();
        assert!(e.contains("its 100 layers") && e.contains("400 more") && e.contains("501 lower layers") && e.contains("squash"), "{e}");
    }
}
