//! run and enter: recover the environment, decide the launch, carry it out.

use anyhow::{bail, Result};

use crate::sandbox::launch;
use crate::sandbox::namespaces::JoinGone;
use crate::sandbox::prepare::{prepare, Prepared, Request};
use crate::store::env::Env;
use crate::store::Store;
use crate::sys::process;

/// Finishes or undoes what an interrupted commit, reset, rebase or apply left (cheap when there
/// is nothing: a few stats).
pub(crate) fn recover(env: &Env) -> Result<()> {
    if env.needs_recovery() {
        let _lock = env.lock()?;
        env.recover()?;
    }
    Ok(())
}

/// Runs `req` in environment `name`; `booted`: only when it is booted.
pub(crate) fn run(store: Store, name: &str, mut req: Request, booted: bool) -> Result<i32> {
    let env = store.env(name)?;
    req.launcher_dirs = crate::launcher::path_dirs(&store, std::env::var_os("PATH").as_deref());
    recover(&env)?;
    if booted && env.booted().is_none() {
        bail!("'{name}' is not booted (`plyroot boot {name}`)");
    }
    let root = store.root.clone();
    let mut store = Some(store);
    let mut tries = 0;
    let started = loop {
        let s = match store.take() {
            Some(s) => s,
            None => Store::open(&root)?,
        };
        let prepared = prepare(&s, &env, &req)?;
        // The locks the launch needs are in `prepared`; the store's own handle is not.
        drop(s);
        tries += 1;
        let started = match prepared {
            Prepared::Booted { pidfd, plan, inside, become_root, held } => {
                crate::diag::debug!("joining the booted environment");
                launch::start_in_booted(&pidfd, &plan, &inside, become_root, name, held)
            }
            Prepared::Launch { plan, inside, recording, held } => {
                crate::diag::debug!("plan: {plan:#?}");
                launch::launch(&plan, &inside, name, recording, held)
            }
        };
        match started {
            // The run it was to join ended in between, before anything changed: decide again
            // (its locks were released with the failed launch).
            Err(e) if e.downcast_ref::<JoinGone>().is_some() && tries < 5 => continue,
            r => break r?,
        }
    };
    match started {
        Ok(code) => process::exit_like(code),
        Err(failed) => {
            eprintln!("plyroot: error: {}", crate::text::escape(&failed.message));
            Ok(failed.code)
        }
    }
}

/// `plyroot unshare`: a host command run as root of the image view (see `sandbox::become_image_root`).
pub(crate) fn unshare(command: &[std::ffi::OsString]) -> Result<i32> {
    let argv = match command {
        [] => vec![std::env::var_os("SHELL").filter(|s| !s.is_empty()).unwrap_or_else(|| "/bin/sh".into())],
        c => c.to_vec(),
    };
    crate::sandbox::become_image_root()?;
    let env: Vec<_> = std::env::vars_os().collect();
    let e = process::exec(&argv, None, &env);
    let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
    eprintln!("plyroot: error: cannot run {}: {e}", crate::text::escape(&argv[0].to_string_lossy()));
    Ok(code)
}
