//! Command-line types only: what the user can say. Behaviour lives in `commands/`.

use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

use crate::names::{HostShare, NixStore};

#[derive(Debug, Parser)]
#[command(
    name = "plyroot",
    version,
    about = "Rootless, layered distribution roots with rollback, on any Linux base",
    long_about = "plyroot stacks read-only, content-addressed layers (rootfs tarballs, OCI images, \
directories) with kernel overlayfs under a persistent writable upper, and runs programs inside \
that root through user and mount namespaces. No daemon, no root, no VM.",
    after_help = "Examples:\n  plyroot import tar:debian.tar.zst\n  plyroot create dev --from tar:debian.tar.zst\n  plyroot run dev -- apt-get install -y gcc\n  plyroot enter dev\n  plyroot doctor"
)]
pub(crate) struct Cli {
    /// The store directory [default: $XDG_DATA_HOME/plyroot]
    #[arg(long, global = true, env = "PLYROOT_HOME", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more about what plyroot does (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Import sources into the store as layers and print their ids
    #[command(after_help = "Sources:\n  dir:PATH             a directory tree\n  tar:FILE             a tar archive, plain or gzip/xz/zstd (by content); tar:- reads stdin\n  oci:DIR              an OCI image layout: one layer per image layer, bottom first\n  docker-archive:FILE  the output of `docker save` / `podman save`\n  docker://REF         an image in a registry: debian:bookworm (Docker Hub), ghcr.io/o/i:tag,\n                       host:port/x/y@sha256:…; credentials from podman/docker login files\n  debootstrap:SUITE    a Debian root built by the host's mmdebstrap (or debootstrap, as root);\n                       options: ?mirror=URL&variant=minbase&include=PKG,PKG&components=C,C&arch=A\n  layer:sha256:ID      a layer already in the store\n\nRegistry settings also come from the environment, for manifests and scripts:\n  PLYROOT_INSECURE_REGISTRIES=host:port,…   registries spoken to over plain HTTP\n  PLYROOT_PLATFORM=os/arch[/variant]        the platform chosen from multi-platform images\n  PLYROOT_MAX_LAYER_SIZE=SIZE               the most one layer may unpack to (0: no bound)\n  PLYROOT_{CONNECT,IDLE,HEAD}_TIMEOUT=S     deadlines: connect 30, no progress 120, answer 300\n  PLYROOT_RATE_WINDOW=S                     a body brings 1 KiB/s per window of S (60) seconds\n\nExamples:\n  plyroot import docker://debian:bookworm\n  plyroot import --insecure docker://127.0.0.1:5000/team/dev:latest\n  plyroot import 'debootstrap:bookworm?variant=minbase'\n  plyroot import tar:debian-rootfs.tar.zst\n  mmdebstrap --variant=minbase bookworm - | plyroot import tar:-\n  plyroot import oci:./image-layout")]
    Import {
        /// One or more sources (see below)
        #[arg(required = true, value_name = "SOURCE")]
        sources: Vec<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Pull an image from a registry (`import docker://REF`)
    #[command(after_help = "Examples:\n  plyroot pull debian:bookworm\n  plyroot pull --platform linux/arm64 ghcr.io/owner/image:tag\n  plyroot pull --insecure 127.0.0.1:5000/team/dev")]
    Pull {
        /// The image: REF or docker://REF
        #[arg(value_name = "REF")]
        reference: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Push an environment's current generation to a registry as an image
    #[command(after_help = "Each layer is uploaded as the gzip of its canonical tar, so the image's diff_ids are the\nplyroot layer ids and `plyroot pull` elsewhere gives the same layers. Layers the registry\nalready has are not uploaded again. Uncommitted changes (the upper) are not pushed:\n`plyroot commit ENV` first. Credentials come from `podman login` / `docker login`.\nPrints the manifest's digest.\n\nExamples:\n  plyroot push dev docker://ghcr.io/me/dev:latest\n  plyroot push --insecure dev docker://127.0.0.1:5000/team/dev:v1")]
    Push {
        /// The environment
        name: String,
        /// Where to: docker://REF
        #[arg(value_name = "docker://REF")]
        target: String,
        /// Talk plain HTTP to the registry (e.g. one on loopback)
        #[arg(long)]
        insecure: bool,
    },
    /// List the layers in the store
    #[command(after_help = "Examples:\n  plyroot layers\n  plyroot layers --json | jq '.[].id'")]
    Layers {
        #[arg(long)]
        json: bool,
    },
    /// Manage single layers
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Create an environment from sources, bottom to top
    #[command(after_help = "Examples:\n  plyroot create dev --from tar:debian.tar.zst\n  plyroot create dev --from tar:debian.tar.zst --from dir:./extra")]
    Create {
        /// The environment's name (letters, digits, '.', '_', '-')
        name: String,
        /// A source, bottom first; repeat to stack more
        #[arg(long = "from", required = true, value_name = "SOURCE")]
        from: Vec<String>,
        /// Put the host's root under the layers: host programs stay visible where layers don't shadow them
        #[arg(long, value_name = "host", value_parser = ["host"])]
        base: Option<String>,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Run a program inside an environment
    #[command(after_help = "Examples:\n  plyroot run dev -- gcc --version\n  plyroot run --root dev -- apt-get install -y make\n  plyroot run --ephemeral --bind ./src:/src dev -- make -C /src\n  plyroot run --no-host home,x11 dev -- sh")]
    Run {
        #[command(flatten)]
        opts: RunOpts,
        /// The environment
        name: String,
        /// The program and its arguments [default: the login shell]
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Start an interactive login shell inside an environment
    #[command(after_help = "Examples:\n  plyroot enter dev\n  plyroot enter --root dev")]
    Enter {
        #[command(flatten)]
        opts: RunOpts,
        /// The environment
        name: String,
    },
    /// List environments
    List {
        #[arg(long, conflicts_with = "names")]
        json: bool,
        /// Print only the names, one a line (for scripts and shell completion)
        #[arg(long)]
        names: bool,
    },
    /// Remove environments, with their writable upper
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Build a manifest's environments into new generations
    #[command(after_help = "The manifest (plyroot.toml):\n  [env.dev]\n  from = [\"tar:debian.tar.zst\", \"dir:./extra\"]   # bottom first\n  root = false          # run as uid 0 inside by default\n  persist = true        # keep the upper between runs\n  binds = [\"./src:/src\"]\n  env = { EDITOR = \"vi\" }\n  no_host = [\"x11\"]\n  init = \"/sbin/init\"\n  exports = [\"gcc\"]\n  nix = \"layers\"       # which /nix: host, layers or overlay [default: the layers' if they have one]\n  packages = [\"make\"]   # build steps, on top of `from`: the root's package manager installs these,\n  run = [               # then each command runs as root, without the network unless it asks\n    \"useradd -m builder\",\n    { run = \"make -C /src install\", inputs = [\"./src:/src\"], env = { CC = \"gcc\" } },\n    { run = \"curl -fsSLO https://example.org/x\", network = true },\n  ]\n\nEach step makes one layer, cached by its key (the layers below, the step, its env, network flag\nand the content of its inputs): only a changed step and those above it run again.\n\nA lock file (plyroot.lock) beside the manifest pins each source to its layer ids and each step's\nkey to its layer, so apply later or elsewhere resolves the same layers; --update re-resolves the\nsources and reruns the steps that use the network (new package versions), saying what changed.\n\nExamples:\n  plyroot apply\n  plyroot apply -f envs/plyroot.toml dev\n  plyroot apply --update")]
    Apply {
        /// The manifest
        #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "plyroot.toml")]
        file: PathBuf,
        /// Re-resolve sources instead of using the lock file's pins, and rerun the steps that use the network
        #[arg(long)]
        update: bool,
        /// Run every build step, whatever is cached
        #[arg(long)]
        no_cache: bool,
        #[command(flatten)]
        cache: CacheOpts,
        /// Only these environments [default: all in the manifest]
        envs: Vec<String>,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Build a manifest's steps into layers, without making generations
    #[command(after_help = "Runs what `apply` would run for the environments' build steps (see `plyroot apply --help`) and\nupdates the lock file, but makes no generation.\n\nA step that fails keeps the state it left until the next build: --shell opens a shell in it, as\nthe step ran (root, its inputs, its network).\n\n--check reruns each step with SOURCE_DATE_EPOCH set and compares what it writes with the layer\nbuilt before, naming the files that differ (not their mtimes); the exit status is 1 if any do.\n\nExamples:\n  plyroot build\n  plyroot build dev --no-cache\n  plyroot build --check dev\n  plyroot build --shell dev")]
    Build {
        /// The manifest
        #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "plyroot.toml")]
        file: PathBuf,
        /// Run every step, whatever is cached
        #[arg(long, conflicts_with_all = ["check", "shell"])]
        no_cache: bool,
        /// Rerun each step and name the files that differ from the layer it built before
        #[arg(long, conflicts_with = "shell")]
        check: bool,
        /// Open a shell in the state the environment's last failed step left
        #[arg(long, value_name = "ENV")]
        shell: Option<String>,
        #[command(flatten)]
        cache: CacheOpts,
        /// Only these environments [default: all in the manifest]
        envs: Vec<String>,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// (internal) Run one build step in its throwaway environment
    #[command(name = "__step", hide = true)]
    Step {
        dir: PathBuf,
        name: String,
        #[arg(long)]
        network: bool,
        #[arg(long)]
        parent: Option<i32>,
        #[arg(last = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// List an environment's generations
    #[command(after_help = "Examples:\n  plyroot generations dev\n  plyroot generations dev --json")]
    Generations {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Make generation N current (atomically)
    #[command(after_help = "Examples:\n  plyroot switch dev 3")]
    Switch { name: String, generation: u32 },
    /// Make the previous generation current
    Rollback { name: String },
    /// Show what the upper adds, changes and deletes
    #[command(after_help = "Examples:\n  plyroot diff dev\n  plyroot diff dev /etc\n  plyroot diff dev --json")]
    Diff {
        name: String,
        /// Only paths under these (inside paths)
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Turn the upper into a new layer and generation
    #[command(after_help = "Examples:\n  plyroot commit dev -m 'gcc and make installed'")]
    Commit {
        name: String,
        /// What the change is
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Merge an environment's layers into one, in a new generation (the upper is kept)
    #[command(after_help = "overlayfs mounts at most 500 lower layers, so an environment may have at most 435 (one lower\nis the skeleton every launch adds, 64 are kept for launchers composing over it). create, apply\nand commit refuse to go past that; squash gets back under it. The merged layer is the canonical\ntar of the merged layers (whiteouts applied): squashing every layer gives the id\n`plyroot export -o` gives them. Squashing the upper layers only keeps what they delete of the\nones below. The root the environment shows does not change, so the upper stays as it is.\n\nExamples:\n  plyroot squash dev             # every layer into one\n  plyroot squash dev --from 3    # the 3rd layer (bottom = 1) up to the top")]
    Squash {
        name: String,
        /// The first layer to merge, counting from the bottom (1) [default: 1, every layer]
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        from: u32,
    },
    /// Set the upper aside (kept unless --force)
    Reset {
        name: String,
        /// Delete the upper instead of keeping it
        #[arg(long)]
        force: bool,
    },
    /// Replay the upper onto the current generation's layers
    #[command(after_help = "A path the upper changed whose lower content also changed between the upper's\nlayers and the current ones is a conflict: rebase lists them and changes nothing, unless\n--ours (keep the upper's version) or --theirs (take the new layers' version) decides.\n\nExamples:\n  plyroot rebase dev\n  plyroot rebase dev --theirs")]
    Rebase {
        name: String,
        /// Resolve conflicts by keeping the upper's version
        #[arg(long, conflicts_with = "theirs")]
        ours: bool,
        /// Resolve conflicts by taking the new layers' version
        #[arg(long)]
        theirs: bool,
    },
    /// Prune old generations and delete layers nothing uses
    #[command(after_help = "Roots: every kept generation of every environment, each upper's base layers, and what\nrunning programs use. The current generation is always kept.\n\nExamples:\n  plyroot gc --dry-run\n  plyroot gc --keep 3\n  plyroot gc --older-than 30d")]
    Gc {
        /// Say what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Keep the newest N generations of each environment
        #[arg(long, value_name = "N", conflicts_with = "older_than")]
        keep: Option<usize>,
        /// Prune generations older than this (e.g. 12h, 30d, 2w)
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
    },
    /// Check every layer against its id
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Export programs as launchers, or the whole root as a tarball or OCI image
    #[command(after_help = "A launcher is a host command (a link to plyroot, no script) that runs the program in the\nenvironment. Started inside another environment it composes: the program sees its own\nenvironment's layers on top of the current root's layers and upper; its writes to the root go\nto a throwaway upper (your home, /tmp and binds are shared as always).\n\nExamples:\n  plyroot export dev gcc make                      # ~/.local/bin/gcc, ~/.local/bin/make\n  plyroot export web node --to ~/bin --desktop\n  plyroot export dev -o dev-rootfs.tar.zst          # the merged root, reproducible\n  SOURCE_DATE_EPOCH=0 plyroot export dev -o dev.tar  # mtimes clamped\n  plyroot export dev --oci ./dev-image               # one OCI layer per plyroot layer, plus the upper")]
    Export {
        /// The environment
        name: String,
        /// Programs to export as launchers (names looked up in PATH inside, or absolute paths)
        #[arg(value_name = "PROGRAM", conflicts_with_all = ["output", "oci"])]
        programs: Vec<String>,
        /// Where launchers go [default: ~/.local/bin]
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// Also install the programs' .desktop entries and icons, launching through plyroot
        #[arg(long)]
        desktop: bool,
        /// Write the merged root (layers, upper, whiteouts applied) as a tarball: .tar, .tar.gz, .tar.xz or .tar.zst (compressed as named); - for stdout (plain tar)
        #[arg(short = 'o', long = "output", value_name = "FILE", conflicts_with = "oci")]
        output: Option<PathBuf>,
        /// Write an OCI image layout into DIR
        #[arg(long, value_name = "DIR")]
        oci: Option<PathBuf>,
    },
    /// Start the environment's init as PID 1 in the background, and wait until it is ready
    #[command(after_help = "The init is the manifest's `init` (default /sbin/init). It runs as root inside, in new pid,\nmount, UTS and IPC namespaces (its hostname is the environment's name), detached; its output goes to the\nenvironment's boot.log. While it is up, `run` and `enter` join it, so systemctl, journalctl\nand services work. Ready means: for systemd, `systemctl is-system-running --wait` says running\nor degraded; for another init, --ready CMD succeeds inside (or at once without it).\n\nExamples:\n  plyroot boot deb\n  plyroot boot svc --ready 'test -S /run/svc.sock' --timeout 30\n  plyroot status\n  plyroot stop deb")]
    Boot {
        name: String,
        /// Seconds to wait for readiness
        #[arg(long, default_value_t = 90)]
        timeout: u64,
        /// A command that succeeds inside once the environment is ready (non-systemd inits)
        #[arg(long, value_name = "CMD")]
        ready: Option<String>,
    },
    /// List booted environments
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Shut a booted environment down (SIGRTMIN+3 for systemd, SIGTERM otherwise), then kill
    Stop {
        name: String,
        /// Seconds to wait before killing
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Boot when needed, then start a login shell inside
    Login { name: String },
    /// List exported launchers
    Exports {
        #[arg(long)]
        json: bool,
    },
    /// Remove launchers (and their desktop entries)
    #[command(after_help = "Examples:\n  plyroot unexport gcc make\n  plyroot unexport --env dev --all")]
    Unexport {
        /// Launcher names
        names: Vec<String>,
        /// Only launchers of this environment
        #[arg(long)]
        env: Option<String>,
        /// Every launcher (of --env, or of all environments)
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Say which layer provides a path inside an environment, and what it shadows
    #[command(after_help = "Examples:\n  plyroot which dev /usr/bin/gcc")]
    Which {
        name: String,
        /// A path inside the environment
        path: PathBuf,
    },
    /// List paths that several layers provide with different content (the higher one wins)
    #[command(after_help = "Given several environments, they are stacked as a launcher composes them: the first on top.\n\nExamples:\n  plyroot conflicts dev\n  plyroot conflicts tools dev")]
    Conflicts {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check what this kernel and user allow, and say how to fix it
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Run a host command where your environments' files have the owners they have inside
    #[command(after_help = "With subordinate ids, the command runs as root of a user namespace that maps ids as every environment does (you are you, id k is your k-th subordinate id, so root is the first): it can read, change, chown and delete what `run --root` or a package's user wrote into your home, /tmp or a bind, and anything in the store. Without subordinate ids, root there is you. Like `podman unshare`.\n\nExamples:\n  plyroot unshare -- ls -ln ~/build\n  plyroot unshare -- chown -R \"$(id -u):$(id -g)\" ~/build\n  plyroot unshare -- rm -rf ~/.local/share/plyroot")]
    Unshare {
        /// The command and its arguments (default: your shell)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Print a shell completion script (bash, zsh and fish also complete environment names)
    #[command(after_help = "Where a command takes an environment, bash, zsh and fish complete the names `plyroot list --names`\nprints, from the store `--store` names on the command line, else the default one.\n\nExamples:\n  plyroot completions bash > ~/.local/share/bash-completion/completions/plyroot")]
    Completions { shell: clap_complete::Shell },
    /// Write man pages into a directory
    Manpages {
        /// Target directory
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// How `docker://` sources are fetched.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct RegistryOpts {
    /// Talk plain HTTP to the registries of docker:// sources (e.g. one on 127.0.0.1:5000); also PLYROOT_INSECURE_REGISTRIES=host:port,…
    #[arg(long)]
    pub insecure: bool,
    /// The platform to take from multi-platform images [default: this machine's; also PLYROOT_PLATFORM]
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
}

/// Where `apply` and `build` share step layers (see `build::cache`).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct CacheOpts {
    /// Look for step layers in this registry repository before running a step [default: the manifest's `cache`]
    #[arg(long, value_name = "docker://REPOSITORY")]
    pub cache_from: Option<String>,
    /// Push the steps' layers to this registry repository [with no value: the manifest's `cache`]
    #[arg(long, value_name = "docker://REPOSITORY", num_args = 0..=1, default_missing_value = "")]
    pub cache_to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LayerCommand {
    /// Remove layers that no environment uses
    Rm {
        /// Layer ids (sha256:…, or an unambiguous prefix)
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `--no-host` values: the domain's [`HostShare`] names, with their help.
fn host_share() -> impl TypedValueParser<Value = HostShare> {
    let values = HostShare::ALL.map(|h| clap::builder::PossibleValue::new(h.as_str()).help(h.about()));
    // The parser only lets the listed names through, and each is a share.
    clap::builder::PossibleValuesParser::new(values).map(|n| n.parse::<HostShare>().expect("a listed host share"))
}

/// `--nix` values: the domain's [`NixStore`] names, with their help.
fn nix_store() -> impl TypedValueParser<Value = NixStore> {
    let values = NixStore::ALL.map(|n| clap::builder::PossibleValue::new(n.as_str()).help(n.about()));
    clap::builder::PossibleValuesParser::new(values).map(|n| n.parse::<NixStore>().expect("a listed /nix choice"))
}

impl RunOpts {
    /// The launch request these options make (`login`: a login shell; `compose`: a launcher).
    pub(crate) fn request(&self, command: Vec<std::ffi::OsString>, login: bool, compose: bool) -> crate::sandbox::prepare::Request {
        crate::sandbox::prepare::Request {
            root: self.root,
            ephemeral: self.ephemeral,
            read_only: self.read_only,
            pid: self.pid,
            binds: self.binds.clone(),
            no_host: self.no_host.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            keep_upper: self.keep_upper,
            nix: self.nix,
            command,
            login,
            compose,
            boot: None,
            home_start: false,
            launcher_dirs: Vec::new(),
            pure: false,
            isolate_net: false,
            tied_to: None,
        }
    }
}

#[derive(Debug, Args, Clone, Default)]
pub(crate) struct RunOpts {
    /// Be uid 0 inside. With subordinate ids, what it writes into shared host paths (home, /tmp, binds) is owned on the host by your first subordinate id: `plyroot unshare` manages it; without them, root inside is you
    #[arg(long)]
    pub root: bool,
    /// Throw writes away when the program ends (a fresh tmpfs upper)
    #[arg(long, conflicts_with = "read_only")]
    pub ephemeral: bool,
    /// Mount the root read-only (no upper)
    #[arg(long)]
    pub read_only: bool,
    /// Give the environment its own pid namespace, with a reaping PID 1
    #[arg(long)]
    pub pid: bool,
    /// Bind a host path inside: SRC:DST[:ro]; repeatable
    #[arg(long = "bind", value_name = "SRC:DST[:ro]")]
    pub binds: Vec<String>,
    /// Do not share these host resources (comma-separated, repeatable)
    #[arg(long = "no-host", value_name = "WHAT", value_delimiter = ',', value_parser = host_share())]
    pub no_host: Vec<HostShare>,
    /// Set an environment variable inside: KEY=VALUE; repeatable
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside [default: the current one; bound when no share shows it]
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Use the upper although it was written on other layers than the current generation's
    #[arg(long)]
    pub keep_upper: bool,
    /// Which /nix to see [default: the environment's `nix` setting, else the layers' /nix when they have one, else the host's]
    #[arg(long, value_name = "WHICH", value_parser = nix_store())]
    pub nix: Option<NixStore>,
    /// Only in the booted environment: fail when it is not booted (boot's readiness checks)
    #[arg(long, hide = true)]
    pub booted: bool,
}
