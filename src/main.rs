//! plyroot: parse, dispatch, and map the result to an exit status.
//!
//! Exit statuses: 0 success; for `run`/`enter`, the program's own status (128+N when killed by
//! signal N, 127 not found, 126 not executable); 125 for plyroot's own errors, printed once as a
//! one-line cause chain, each cause once, escaped ([`text::chain`], [`text::escape`]).

mod build;
mod cli;
mod commands;
mod diag;
mod export;
mod launcher;
mod manifest;
mod names;
mod oci;
mod progress;
#[cfg(feature = "registry")]
mod registry;
mod sandbox;
mod source;
mod store;
mod sys;
mod text;
mod userns;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};

use cli::{Cli, Command, LayerCommand};
use store::Store;

/// The status for plyroot's own failures, as podman uses it, apart from a program's statuses.
const EXIT_ERROR: u8 = 125;

fn main() -> ExitCode {
    // Started through a launcher (`gcc` → … → plyroot): run that program, nothing else.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match launcher::invocation(&argv) {
        Ok(Some(inv)) => return finish(launch_program(inv)),
        Ok(None) => {}
        Err(e) => return finish(Err(e)),
    }
    // Usage errors take plyroot's own status too: clap's 2 would be indistinguishable from a
    // program's exit 2 under `run`.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => e.exit(),
        Err(e) => {
            eprintln!("plyroot: error: {}", text::escape(&usage_error(&e, &argv)));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    diag::set_level(if cli.quiet { 0 } else { 1 + cli.verbose });
    finish(dispatch(cli))
}

/// A usage error as one line, as every other error: clap's sentence, where to find the usage,
/// and for the commonest mistake, a command after `run ENV` or `enter ENV` without `--`, how to
/// write it.
fn usage_error(e: &clap::Error, argv: &[std::ffi::OsString]) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    // clap's first paragraph (the sentence, and the values or arguments it lists under it).
    let rendered = e.to_string();
    let sentence = rendered.trim_start().split("\n\n").next().unwrap_or("invalid arguments").lines().map(str::trim).collect::<Vec<_>>().join(" ");
    let sentence = sentence.trim_start_matches("error: ").to_owned();
    let args: Vec<String> = argv.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    let sub = args.iter().find(|a| !a.starts_with('-')).cloned();
    let help = match &sub {
        Some(s) if Cli::command().find_subcommand(s).is_some() => format!("`plyroot {s} --help` shows its usage"),
        _ => "`plyroot --help` shows the usage".to_owned(),
    };
    let unexpected = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => Some(a.clone()),
        _ => None,
    };
    // A word after the environment's name, not an option: a command without `--`.
    if let (ErrorKind::UnknownArgument, Some(s), Some(arg)) = (e.kind(), sub.as_deref(), unexpected) {
        let at = args.iter().position(|a| *a == arg);
        let named_env = at.is_some_and(|i| args[..i].iter().filter(|a| !a.starts_with('-')).count() >= 2);
        if matches!(s, "run" | "enter") && !arg.starts_with('-') && named_env {
            let (before, after) = args.split_at(at.unwrap_or(0));
            let before = before.iter().map(|a| if a == "enter" { "run" } else { a.as_str() }).collect::<Vec<_>>().join(" ");
            return format!("{sentence}; a command to run goes after `--`: `plyroot {before} -- {}`", after.join(" "));
        }
    }
    format!("{sentence} ({help})")
}

fn launch_program(inv: launcher::Invocation) -> Result<i32> {
    let store = Store::open(&inv.store)?;
    if store.env(&inv.env).is_err() {
        anyhow::bail!(
            "this launcher runs '{}' of environment '{}', which is not in {} any more: create it again, or remove the launcher with `plyroot unexport {}`",
            inv.program,
            inv.env,
            inv.store.display(),
            std::path::Path::new(&inv.program).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
    }
    let mut command = vec![std::ffi::OsString::from(&inv.program)];
    command.extend(inv.args);
    commands::run::run(store, &inv.env, cli::RunOpts::default().request(command, false, true), false)
}

fn finish(r: Result<i32>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // A reader of our stdout that went away (`plyroot list | head -1`) ends us quietly. Any
            // other broken pipe (a registry that closed the connection of an upload it refused) is
            // an error like any other.
            if stdout_closed() && e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
                return ExitCode::SUCCESS;
            }
            eprintln!("plyroot: error: {}", text::escape(&text::chain(&e)));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Whether our stdout's reader is gone: poll reports an error (a pipe without reader) or a
/// hang-up (a closed socket) on it.
fn stdout_closed() -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    poll(&mut fds, Some(&now)).is_ok() && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
}

/// Hands the command's registry flags to the registry module, which reads them where a
/// `docker://` source is finally fetched.
fn set_registry_options(command: &Command) -> Result<()> {
    let opts = match command {
        Command::Import { registry, .. } | Command::Pull { registry, .. } | Command::Create { registry, .. } | Command::Apply { registry, .. } | Command::Build { registry, .. } => registry.clone(),
        Command::Push { insecure, .. } => cli::RegistryOpts { insecure: *insecure, platform: None },
        _ => return Ok(()),
    };
    #[cfg(feature = "registry")]
    {
        let platform = opts.platform.as_deref().map(registry::Platform::parse).transpose().map_err(|e| anyhow::anyhow!("--platform: {e}"))?;
        registry::set_options(registry::Options { insecure: opts.insecure, platform });
    }
    #[cfg(not(feature = "registry"))]
    let _ = opts;
    Ok(())
}

fn dispatch(cli: Cli) -> Result<i32> {
    let store_root = || -> Result<std::path::PathBuf> {
        match &cli.store {
            Some(p) if p.is_absolute() => Ok(p.clone()),
            Some(p) => Ok(std::env::current_dir()
                .with_context(|| format!("cannot resolve the store directory {}: the current directory is gone or unreadable (give an absolute path)", p.display()))?
                .join(p)),
            None => store::default_root(),
        }
    };
    let open = || -> Result<Store> { Store::open(&store_root()?) };
    set_registry_options(&cli.command)?;
    match cli.command {
        Command::Import { ref sources, json, .. } => commands::layers::import(&open()?, sources, json),
        Command::Pull { ref reference, json, .. } => {
            let source = if reference.starts_with("docker://") { reference.clone() } else { format!("docker://{reference}") };
            commands::layers::import(&open()?, &[source], json)
        }
        #[cfg(feature = "registry")]
        Command::Push { ref name, ref target, .. } => commands::push::push(&open()?, name, target),
        #[cfg(not(feature = "registry"))]
        Command::Push { .. } => anyhow::bail!("this plyroot was built without registry support (cargo feature `registry`)"),
        Command::Layers { json } => commands::layers::layers(&open()?, json),
        Command::Layer(LayerCommand::Rm { ref ids }) => commands::layers::layer_rm(&open()?, ids),
        Command::Create { ref name, ref from, ref base, .. } => commands::envs::create(&open()?, name, from, base.as_deref()),
        Command::Run { ref opts, ref name, ref command } => commands::run::run(open()?, name, opts.request(command.clone(), false, false), opts.booted),
        Command::Enter { ref opts, ref name } => commands::run::run(open()?, name, opts.request(Vec::new(), true, false), opts.booted),
        Command::List { json, names } => commands::envs::list(&open()?, json, names),
        Command::Rm { ref names } => commands::envs::rm(&open()?, names),
        Command::Apply { ref file, update, no_cache, ref cache, ref envs, .. } => {
            commands::envs::apply(&open()?, file, &commands::envs::How { update, no_cache, cache_from: cache.cache_from.clone(), cache_to: cache.cache_to.clone(), ..Default::default() }, envs)
        }
        Command::Build { ref shell, .. } if shell.is_some() => build::step::shell(open()?, shell.as_deref().unwrap_or_default()),
        Command::Build { ref file, no_cache, check, ref cache, ref envs, .. } => {
            commands::envs::build(&open()?, file, &commands::envs::How { no_cache, check, cache_from: cache.cache_from.clone(), cache_to: cache.cache_to.clone(), ..Default::default() }, envs)
        }
        Command::Step { ref dir, ref name, network, parent, ref command } => build::step::child(open()?, dir, name, network, parent, command.clone()),
        Command::Generations { ref name, json } => commands::envs::generations(&open()?, name, json),
        Command::Switch { ref name, generation } => commands::envs::switch(&open()?, name, generation),
        Command::Rollback { ref name } => commands::envs::rollback(&open()?, name),
        Command::Diff { ref name, ref paths, json } => commands::upper::diff(&open()?, name, paths, json),
        Command::Commit { ref name, ref message } => commands::upper::commit(&open()?, name, message.as_deref()),
        Command::Squash { ref name, from } => commands::squash::squash(&open()?, name, from as usize),
        Command::Reset { ref name, force } => commands::upper::reset(&open()?, name, force),
        Command::Rebase { ref name, ours, theirs } => commands::upper::rebase(&open()?, name, ours, theirs),
        Command::Gc { dry_run, keep, ref older_than } => commands::gc::gc(&store_root()?, dry_run, keep, older_than.as_deref()),
        Command::Verify { json } => commands::gc::verify(&open()?, json),
        Command::Export { ref name, ref programs, ref to, desktop, ref output, ref oci } => {
            if programs.is_empty() && output.is_none() && oci.is_none() {
                anyhow::bail!("plyroot export {name}: say what: PROGRAM… for launchers, -o FILE for a rootfs tarball, or --oci DIR for an OCI image layout");
            }
            if programs.is_empty() {
                commands::export::export(&open()?, name, output.as_deref(), oci.as_deref())
            } else {
                commands::launchers::export(&open()?, name, programs, to.as_deref(), desktop)
            }
        }
        Command::Boot { ref name, timeout, ref ready } => commands::boot::boot(open()?, name, timeout, ready.as_deref()),
        Command::Status { json } => commands::boot::status(&open()?, json),
        Command::Stop { ref name, timeout } => commands::boot::stop(&open()?, name, timeout),
        Command::Login { ref name } => commands::boot::login(open()?, name),
        Command::Exports { json } => commands::launchers::exports(&open()?, json),
        Command::Unexport { ref names, ref env, all } => commands::launchers::unexport(&open()?, names, env.as_deref(), all),
        Command::Which { ref name, ref path } => commands::launchers::which(&open()?, name, path),
        Command::Conflicts { ref names, json } => commands::launchers::conflicts(&open()?, names, json),
        Command::Doctor { json } => commands::doctor::doctor(&open()?, json),
        Command::Unshare { ref command } => commands::run::unshare(command),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "plyroot", &mut script);
            commands::out(&commands::completions::with_env_names(&shell.to_string(), &String::from_utf8_lossy(&script))?)?;
            Ok(0)
        }
        Command::Manpages { ref dir } => {
            use anyhow::Context;
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let cmd = Cli::command();
            clap_mangen::generate_to(cmd, dir).with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            diag::info!("wrote man pages to {}", dir.display());
            Ok(0)
        }
    }
}
