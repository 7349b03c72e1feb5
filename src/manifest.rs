//! The manifest (`plyroot.toml`): environments as code. `parse` is pure: text in, a checked
//! [`Manifest`] or an error with file, line and column out; nothing here touches the disk.
//!
//! ```toml
//! [env.dev]
//! from = ["tar:debian.tar.zst", "dir:./extra"]  # sources, bottom first; paths relative to this file
//! root = false             # be uid 0 inside by default (run --root)
//! persist = true           # keep the upper between runs (false: every run is ephemeral)
//! binds = ["./src:/src", "/data:/data:ro"]
//! env = { EDITOR = "vi" }
//! no_host = ["x11"]        # host shares to leave out (see `plyroot run --help`)
//! init = "/sbin/init"      # the init `boot` starts
//! exports = ["gcc"]        # programs to export as launchers
//! base = "host"            # the host's root under the layers
//! nix = "layers"           # which /nix: "host", "layers" or "overlay" [default: the layers' if they have one]
//! packages = ["make"]      # build steps (see below), run in order on top of `from`
//! run = ["useradd -m builder", { run = "make -C /src install", inputs = ["./src:/src"] }]
//! ```
//!
//! Build steps: `packages` is the first step (the root's package manager installs them), then each
//! entry of `run`: a string is a `/bin/sh -c` command, a table has one of `run` (a command) or
//! `packages`, and may add `inputs` (host paths bound read-only for that step only), `network`
//! (default false for commands; package steps always have it) and `env`. A top-level
//! `cache = "docker://…"` names a registry that shares step layers.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::names::HostShare;
use crate::store::env::Settings;

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EnvDecl {
    pub name: String,
    /// Sources as written in the manifest: the keys of the lock file.
    pub raw_sources: Vec<String>,
    /// Sources bottom first, with relative paths made absolute against the manifest's directory.
    pub sources: Vec<String>,
    pub settings: Settings,
    /// Build steps, in order, on top of the sources' layers.
    pub steps: Vec<Step>,
}

/// One build step as declared (see the module header). What of it goes into the step's key is
/// chosen by `build::key`: never a host path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub what: StepKind,
    pub inputs: Vec<Input>,
    pub network: bool,
    pub env: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StepKind {
    /// Installed with the root's own package manager.
    Packages(Vec<String>),
    /// A `/bin/sh -c` command, as root.
    Run(String),
}

/// A host path bound read-only into one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Input {
    /// Absolute, resolved against the manifest's directory.
    pub src: PathBuf,
    /// Where the step sees it.
    pub dst: PathBuf,
}

impl Step {
    /// One line for progress and errors: the command, or the package manager's install.
    pub(crate) fn title(&self) -> String {
        match &self.what {
            StepKind::Run(c) => c.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "),
            StepKind::Packages(p) => format!("install {}", p.join(" ")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub envs: Vec<EnvDecl>,
    /// `cache = "docker://…"`: where step layers are shared.
    pub cache: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}:{column}: {message}")]
pub(crate) struct ManifestError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<RawEnv>>,
    #[serde(default)]
    cache: Option<Spanned<String>>,
}

/// A `run` entry: a command, or a table.
enum RawStep {
    Command(String),
    Table(RawStepTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStepTable {
    #[serde(default)]
    run: Option<Spanned<String>>,
    #[serde(default)]
    packages: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    inputs: Vec<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<bool>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
}

// By hand rather than `#[serde(untagged)]`: an untagged enum reports "did not match any variant"
// for a misspelt key in a table; this passes the table's own error (and its place) through.
impl<'de> Deserialize<'de> for RawStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawStep;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a command (a string) or a table with `run` or `packages`")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawStep, E> {
                Ok(RawStep::Command(s.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<RawStep, A::Error> {
                RawStepTable::deserialize(serde::de::value::MapAccessDeserializer::new(m)).map(RawStep::Table)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    from: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    root: bool,
    #[serde(default = "yes")]
    persist: bool,
    #[serde(default)]
    binds: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    no_host: Vec<Spanned<String>>,
    #[serde(default)]
    init: Option<Spanned<String>>,
    #[serde(default)]
    exports: Vec<Spanned<String>>,
    #[serde(default)]
    base: Option<Spanned<String>>,
    #[serde(default)]
    nix: Option<Spanned<String>>,
    #[serde(default)]
    packages: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    run: Vec<Spanned<RawStep>>,
}

const KINDS: &str = "dir:, tar:, oci:, docker-archive:, layer:, env:";

fn locate(text: &str, file: &Path, span: Option<Range<usize>>, message: String) -> ManifestError {
    let at = span.map(|s| s.start.min(text.len())).unwrap_or(0);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    ManifestError { file: file.display().to_string(), line, column, message }
}

/// Makes `kind:relative/path` absolute against `dir`; other sources are returned as they are.
fn absolutize(source: &str, dir: &Path) -> String {
    for kind in ["dir:", "tar:", "oci:", "docker-archive:"] {
        if let Some(p) = source.strip_prefix(kind) {
            if p != "-" && !p.starts_with('/') {
                return format!("{kind}{}", dir.join(p).display());
            }
        }
    }
    source.to_owned()
}

/// Parses and checks a manifest. `file` is where it was read from (for messages and to resolve
/// relative paths); the text is all that is read.
pub(crate) fn parse(text: &str, file: &Path) -> Result<Manifest, ManifestError> {
    let raw: RawManifest = toml::from_str(text).map_err(|e| locate(text, file, e.span(), e.message().trim().to_owned()))?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let err = |span: Range<usize>, msg: String| locate(text, file, Some(span), msg);
    let cache = match raw.cache {
        Some(c) if !c.get_ref().starts_with("docker://") || c.get_ref().len() <= "docker://".len() => {
            return Err(err(c.span(), format!("cache '{}' is not a registry reference: write docker://HOST/REPOSITORY", c.get_ref())));
        }
        c => c.map(Spanned::into_inner),
    };
    let mut envs = Vec::new();
    // Per environment, the `env:` sources it names and where: checked for cycles at the end.
    let mut env_refs: EnvRefs = Vec::new();
    for (name, decl) in raw.env {
        if let Err(e) = crate::names::check_name(name.get_ref()) {
            return Err(err(name.span(), e.to_string()));
        }
        let (decl, refs) = env_decl(name.into_inner(), decl.into_inner(), &dir, &err)?;
        env_refs.push((decl.name.clone(), refs));
        envs.push(decl);
    }
    if let Some((cycle, span)) = env_cycle(&env_refs) {
        return Err(err(
            span,
            format!(
                "`env:` sources form a cycle: {}; each apply would stack these environments on each other again, without end: replace one of these sources with the other environment's own sources (or a `layer:`)",
                cycle.join(" → ")
            ),
        ));
    }
    Ok(Manifest { envs, cache })
}

/// Makes an error located at a span of the manifest's text.
type Locator<'a> = &'a dyn Fn(Range<usize>, String) -> ManifestError;

/// The `env:` sources an environment names, and where each is written.
type Refs = Vec<(String, Range<usize>)>;

/// One environment's declaration, checked, with the `env:` sources it names.
fn env_decl(name: String, decl: RawEnv, dir: &Path, err: Locator<'_>) -> Result<(EnvDecl, Refs), ManifestError> {
    if decl.from.get_ref().is_empty() {
        return Err(err(decl.from.span(), format!("environment '{name}' needs at least one source in `from` ({KINDS})")));
    }
    let (sources, raw_sources, refs) = sources_of(decl.from.into_inner(), dir, err)?;
    let mut binds = Vec::new();
    for b in decl.binds {
        let (src, dst, ro) = crate::sandbox::parse_bind(b.get_ref(), Some(dir)).map_err(|e| err(b.span(), e.to_string()))?;
        binds.push(format!("{}:{}{}", src.display(), dst.display(), if ro { ":ro" } else { "" }));
    }
    let mut no_host = Vec::new();
    for n in decl.no_host {
        if let Err(e) = n.get_ref().parse::<HostShare>() {
            return Err(err(n.span(), e.to_string()));
        }
        no_host.push(n.into_inner());
    }
    if let Some(i) = &decl.init {
        if !i.get_ref().starts_with('/') {
            return Err(err(i.span(), format!("init '{}' must be an absolute path inside the environment", i.get_ref())));
        }
    }
    if let Some(b) = &decl.base {
        if b.get_ref() != "host" {
            return Err(err(b.span(), format!("base '{}' is not known; accepted: host", b.get_ref())));
        }
    }
    if let Some(n) = &decl.nix {
        if let Err(e) = n.get_ref().parse::<crate::names::NixStore>() {
            return Err(err(n.span(), e.to_string()));
        }
    }
    let vars = vars_of(decl.env, err)?;
    let mut steps = Vec::new();
    if let Some(p) = decl.packages {
        steps.push(packages_step(p, BTreeMap::new(), err)?);
    }
    for s in decl.run {
        steps.push(step_of(s, dir, err)?);
    }
    for x in &decl.exports {
        if x.get_ref().is_empty() || x.get_ref().contains('\0') {
            return Err(err(x.span(), "an export must name a program".into()));
        }
    }
    let settings = Settings {
        root: decl.root,
        persist: decl.persist,
        binds,
        env: vars,
        no_host,
        init: decl.init.map(Spanned::into_inner),
        exports: decl.exports.into_iter().map(Spanned::into_inner).collect(),
        base: decl.base.map(Spanned::into_inner),
        nix: decl.nix.map(Spanned::into_inner),
    };
    Ok((EnvDecl { name, raw_sources, sources, settings, steps }, refs))
}

/// A `packages` list, checked: each name goes to the package manager as one argument.
fn packages_step(list: Spanned<Vec<Spanned<String>>>, env: BTreeMap<String, String>, err: Locator<'_>) -> Result<Step, ManifestError> {
    if list.get_ref().is_empty() {
        return Err(err(list.span(), "`packages` is empty: name at least one package, or leave the key out".into()));
    }
    let mut names = Vec::new();
    for p in list.into_inner() {
        let n = p.get_ref();
        if n.is_empty() || n.starts_with('-') || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(p.span(), format!("{n:?} is not a package name: one name (with a version where the package manager takes one, e.g. make=4.3-4.1), not starting with '-', without spaces")));
        }
        names.push(p.into_inner());
    }
    // Installing packages needs the package manager's mirrors.
    Ok(Step { what: StepKind::Packages(names), inputs: Vec::new(), network: true, env })
}

/// One `run` entry, checked, with its inputs resolved against `dir`.
fn step_of(s: Spanned<RawStep>, dir: &Path, err: Locator<'_>) -> Result<Step, ManifestError> {
    let span = s.span();
    let t = match s.into_inner() {
        RawStep::Command(c) => RawStepTable { run: Some(Spanned::new(span.clone(), c)), packages: None, inputs: Vec::new(), network: None, env: BTreeMap::new() },
        RawStep::Table(t) => t,
    };
    let env = vars_of(t.env, err)?;
    let mut step = match (t.run, t.packages) {
        (Some(_), Some(_)) | (None, None) => return Err(err(span, "a step has one of `run` (a command) or `packages` (a list)".into())),
        (None, Some(p)) => {
            if let Some(n) = t.network.as_ref().filter(|n| !*n.get_ref()) {
                return Err(err(n.span(), "a `packages` step always has the network (it downloads the packages): leave `network` out".into()));
            }
            packages_step(p, env, err)?
        }
        (Some(c), None) => {
            if c.get_ref().trim().is_empty() || c.get_ref().contains('\0') {
                return Err(err(c.span(), "a `run` step needs a command (without NUL bytes)".into()));
            }
            Step { what: StepKind::Run(c.into_inner()), inputs: Vec::new(), network: t.network.is_some_and(|n| n.into_inner()), env }
        }
    };
    for i in t.inputs {
        let (src, dst, _) = crate::sandbox::parse_bind(i.get_ref(), Some(dir)).map_err(|e| err(i.span(), e.to_string()))?;
        if dst == Path::new("/") {
            return Err(err(i.span(), format!("input '{}' would cover the whole root: give it a directory of its own, e.g. {}:/src", i.get_ref(), src.display())));
        }
        // The kernel's views a step gets from plyroot: an input there would cover them (and the
        // read-only parts of /proc).
        if let Some(api) = ["/proc", "/dev", "/sys"].iter().find(|a| dst.starts_with(a)) {
            return Err(err(i.span(), format!("input '{}' would go under {api}, which plyroot provides: give it a directory of its own, e.g. {}:/src", i.get_ref(), src.display())));
        }
        step.inputs.push(Input { src, dst });
    }
    Ok(step)
}

/// An environment's sources, checked: as resolved against `dir`, as written, and the `env:` ones.
fn sources_of(from: Vec<Spanned<String>>, dir: &Path, err: Locator<'_>) -> Result<(Vec<String>, Vec<String>, Refs), ManifestError> {
    let mut sources = Vec::new();
    let mut raw_sources = Vec::new();
    let mut refs = Vec::new();
    for s in from {
        match s.get_ref().parse::<crate::source::Source>() {
            Err(e) => return Err(err(s.span(), e.to_string())),
            Ok(crate::source::Source::Env(other)) => refs.push((other, s.span())),
            Ok(_) => {}
        }
        sources.push(absolutize(s.get_ref(), dir));
        raw_sources.push(s.into_inner());
    }
    Ok((sources, raw_sources, refs))
}

/// An environment's variables, checked: each must be passable to a program as `KEY=VALUE`.
fn vars_of(env: BTreeMap<Spanned<String>, Spanned<String>>, err: Locator<'_>) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut vars = BTreeMap::new();
    for (k, v) in env {
        // A key becomes `KEY=VALUE` in the program's environment: an empty key or one with
        // `=` would be read back as another variable, and a NUL cannot be passed at all.
        let key = k.get_ref();
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(err(k.span(), format!("{key:?} is not an environment variable name: it must be non-empty, without '=' or NUL")));
        }
        if v.get_ref().contains('\0') {
            return Err(err(v.span(), format!("the value of {key} contains a NUL byte, which no program's environment can hold")));
        }
        vars.insert(k.into_inner(), v.into_inner());
    }
    Ok(vars)
}

/// Each environment of a manifest with the `env:` sources it names, and where each is written.
type EnvRefs = Vec<(String, Vec<(String, Range<usize>)>)>;

/// The first cycle of `env:` references among the manifest's environments (names in order, the
/// first repeated at the end) and where the source that closes it is written. References to
/// environments the manifest does not declare cannot close a cycle: their layers are fixed.
fn env_cycle(refs: &EnvRefs) -> Option<(Vec<String>, Range<usize>)> {
    fn visit<'a>(name: &'a str, refs: &'a EnvRefs, path: &mut Vec<&'a str>, done: &mut Vec<&'a str>) -> Option<(Vec<String>, Range<usize>)> {
        let (_, out) = refs.iter().find(|(n, _)| n == name)?;
        path.push(name);
        for (next, span) in out {
            if let Some(i) = path.iter().position(|p| p == next) {
                let mut cycle: Vec<String> = path[i..].iter().map(|p| p.to_string()).collect();
                cycle.push(next.clone());
                return Some((cycle, span.clone()));
            }
            if !done.contains(&next.as_str()) {
                if let Some(c) = visit(next, refs, path, done) {
                    return Some(c);
                }
            }
        }
        path.pop();
        done.push(name);
        None
    }
    let mut done = Vec::new();
    for (name, _) in refs {
        if !done.contains(&name.as_str()) {
            if let Some(c) = visit(name, refs, &mut Vec::new(), &mut done) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Manifest, ManifestError> {
        parse(text, Path::new("/proj/plyroot.toml"))
    }

    #[test]
    fn a_full_environment_parses_with_paths_resolved() {
        let m = p(r#"
[env.dev]
from = ["tar:debian.tar.zst", "dir:/abs/extra", "layer:sha256:abcd"]
root = true
persist = false
binds = ["./src:/src", "/data:/data:ro"]
env = { EDITOR = "vi" }
no_host = ["x11", "home"]
init = "/sbin/init"
exports = ["gcc"]
nix = "layers"

[env.min]
from = ["tar:-"]
"#)
        .unwrap();
        assert_eq!(m.envs.len(), 2);
        let d = &m.envs[0];
        assert_eq!(d.name, "dev");
        assert_eq!(d.sources, ["tar:/proj/debian.tar.zst", "dir:/abs/extra", "layer:sha256:abcd"]);
        assert_eq!(d.settings.binds, ["/proj/src:/src", "/data:/data:ro"]);
        assert!(d.settings.root && !d.settings.persist);
        assert_eq!(d.settings.env["EDITOR"], "vi");
        assert_eq!(d.settings.nix.as_deref(), Some("layers"));
        assert_eq!(m.envs[1].settings, Settings::default());
        assert_eq!(m.envs[1].sources, ["tar:-"]);
    }

    #[test]
    fn steps_parse_in_order_with_inputs_resolved() {
        let m = p(r#"
cache = "docker://127.0.0.1:5000/team/cache"
[env.dev]
from = ["tar:base.tar"]
packages = ["build-essential", "make=4.3-4.1"]
run = [
  "useradd -m builder",
  { run = "make -C /src", inputs = ["./src:/src", "/abs:/abs"] },
  { packages = ["ripgrep"], env = { A = "b" } },
  { run = "curl x", network = true },
]
"#)
        .unwrap();
        assert_eq!(m.cache.as_deref(), Some("docker://127.0.0.1:5000/team/cache"));
        let s = &m.envs[0].steps;
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].what, StepKind::Packages(vec!["build-essential".into(), "make=4.3-4.1".into()]));
        assert!(s[0].network);
        assert_eq!(s[1], Step { what: StepKind::Run("useradd -m builder".into()), inputs: vec![], network: false, env: BTreeMap::new() });
        assert_eq!(s[2].inputs, [Input { src: "/proj/src".into(), dst: "/src".into() }, Input { src: "/abs".into(), dst: "/abs".into() }]);
        assert_eq!((&s[3].what, s[3].network, s[3].env["A"].as_str()), (&StepKind::Packages(vec!["ripgrep".into()]), true, "b"));
        assert!(s[4].network);
        assert_eq!(s[2].title(), "make -C /src");
        assert_eq!(s[3].title(), "install ripgrep");
    }

    #[test]
    fn env_sources_without_a_cycle_parse() {
        let m = p("[env.base]\nfrom = [\"tar:x\"]\n[env.a]\nfrom = [\"env:base\", \"env:outside\"]\n[env.b]\nfrom = [\"env:a\", \"env:base\"]\n").unwrap();
        assert_eq!(m.envs.len(), 3);
    }

    #[test]
    fn errors_name_file_line_column_and_the_accepted_values() {
        let cases: &[(&str, usize, usize, &str)] = &[
            ("[env.dev]\nfrom = [\"tar:a\"]\ncolour = 1\n", 3, 1, "unknown field `colour`"),
            ("[env.dev]\nfrom = [\"zip:a\"]\n", 2, 9, "dir:"),
            ("[env.dev]\nfrom = []\n", 2, 8, "at least one source"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nno_host = [\"x12\"]\n", 3, 12, "accepted: all, proc"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nbinds = [\"nocolon\"]\n", 3, 10, "SRC:DST"),
            ("[env.dev]\nfrom = [\"tar:a\"]\ninit = \"sbin/init\"\n", 3, 8, "absolute"),
            ("[env.\"bad name\"]\nfrom = [\"tar:a\"]\n", 1, 6, "not a valid environment name"),
            ("[env.dev]\nroot = \"yes\"\nfrom = [\"tar:a\"]\n", 2, 8, "bool"),
            ("[env.dev]\nfrom = [\"tar:a\"\n", 2, 16, ""),
            ("[envs.dev]\n", 1, 2, "unknown field `envs`"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nbase = \"nix\"\n", 3, 8, "accepted: host"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nnix = \"mine\"\n", 3, 7, "not a choice of /nix; accepted: host, layers, overlay"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nenv = { \"\" = \"x\" }\n", 3, 9, "not an environment variable name"),
            ("[env.dev]\nfrom = [\"tar:a\"]\nenv = { \"A=B\" = \"x\" }\n", 3, 9, "without '='"),
            ("[env.dev]\nfrom = [\"tar:a\"]\n[env.dev.env]\nOK = \"1\"\n\"X=Y\" = \"2\"\n", 5, 1, "\"X=Y\""),
            ("[env.dev]\nfrom = [\"tar:a\"]\nenv = { A = \"a\\u0000b\" }\n", 3, 13, "NUL"),
            ("[env.a]\nfrom = [\"env:b\"]\n[env.b]\nfrom = [\"tar:x\", \"env:a\"]\n", 4, 18, "cycle: a → b → a"),
            ("[env.a]\nfrom = [\"tar:x\", \"env:a\"]\n", 2, 18, "cycle: a → a"),
            ("[env.a]\nfrom = [\"env:b\"]\n[env.b]\nfrom = [\"env:c\"]\n[env.c]\nfrom = [\"env:a\"]\n", 6, 9, "a → b → c → a"),
            ("[env.a]\nfrom = [\"tar:x\"]\npackages = []\n", 3, 12, "`packages` is empty"),
            ("[env.a]\nfrom = [\"tar:x\"]\npackages = [\"-y\"]\n", 3, 13, "not a package name"),
            ("[env.a]\nfrom = [\"tar:x\"]\npackages = [\"a b\"]\n", 3, 13, "not a package name"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", colour = 1 }]\n", 3, 21, "unknown field `colour`"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", packages = [\"y\"] }]\n", 3, 8, "one of `run`"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ network = true }]\n", 3, 8, "one of `run`"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [\"  \"]\n", 3, 8, "needs a command"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [1]\n", 3, 8, "a command (a string) or a table"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", inputs = [\"src\"] }]\n", 3, 31, "SRC:DST"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", inputs = [\"./s:/\"] }]\n", 3, 31, "whole root"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", inputs = [\"./s:/proc/sys\"] }]\n", 3, 31, "under /proc"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ packages = [\"x\"], network = false }]\n", 3, 38, "always has the network"),
            ("[env.a]\nfrom = [\"tar:x\"]\nrun = [{ run = \"x\", env = { \"=\" = \"1\" } }]\n", 3, 29, "not an environment variable name"),
            ("cache = \"http://x\"\n[env.a]\nfrom = [\"tar:x\"]\n", 1, 9, "docker://HOST/REPOSITORY"),
        ];
        for (text, line, col, needle) in cases {
            let e = p(text).unwrap_err();
            assert_eq!((e.line, e.column), (*line, *col), "{text:?} → {e}");
            assert!(e.message.contains(needle), "{text:?} → {e}");
            assert!(e.to_string().starts_with(&format!("/proj/plyroot.toml:{line}:{col}: ")), "{e}");
        }
    }
}
