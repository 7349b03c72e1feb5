//! `packages` steps: the root's own package manager, found in its layers, run non-interactively,
//! with its download caches and package lists removed in the same step so they never weigh down
//! the layer; and the installed packages of a root, read from the package database, for what
//! `apply --update` changed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::store::upper::file_inside;

/// A package manager plyroot knows how to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Manager {
    Apt,
    Dnf,
    Yum,
    Apk,
    Pacman,
    Zypper,
}

impl Manager {
    /// The program whose presence marks the manager, in the order they are looked for (dnf
    /// before yum: a root with both wants dnf).
    const ALL: [(Manager, &'static str); 6] = [
        (Manager::Apt, "/usr/bin/apt-get"),
        (Manager::Dnf, "/usr/bin/dnf"),
        (Manager::Yum, "/usr/bin/yum"),
        (Manager::Apk, "/sbin/apk"),
        (Manager::Pacman, "/usr/bin/pacman"),
        (Manager::Zypper, "/usr/bin/zypper"),
    ];
}

/// The package manager of the root made of `lowers` (top first).
pub(crate) fn detect(lowers: &[PathBuf]) -> Option<Manager> {
    Manager::ALL.iter().find(|(_, p)| file_inside(lowers, Path::new(p))).map(|(m, _)| *m)
}

/// `s` as one word for `/bin/sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The `/bin/sh` script that installs `names` with `m` and leaves no download cache behind.
pub(crate) fn script(m: Manager, names: &[String]) -> String {
    let p: Vec<String> = names.iter().map(|n| quote(n)).collect();
    let p = p.join(" ");
    match m {
        // What is listed and what it depends on, not what it recommends: a declared environment
        // gets what it declares (recommended packages can be listed). The lists go too: the
        // next `packages` step fetches them again, as a fresh root would.
        Manager::Apt => format!("set -e\nexport DEBIAN_FRONTEND=noninteractive\napt-get update\napt-get install -y --no-install-recommends {p}\napt-get clean\nrm -rf /var/lib/apt/lists/*\n"),
        Manager::Dnf => format!("set -e\ndnf install -y {p}\ndnf clean all\n"),
        Manager::Yum => format!("set -e\nyum install -y {p}\nyum clean all\n"),
        Manager::Apk => format!("set -e\napk add --no-cache {p}\n"),
        Manager::Pacman => format!("set -e\npacman -Sy --noconfirm --needed {p}\nrm -rf /var/cache/pacman/pkg/*\n"),
        Manager::Zypper => format!("set -e\nzypper --non-interactive install {p}\nzypper clean --all\n"),
    }
}

/// The command of a `packages` step on `lowers`, or why there is none.
pub(crate) fn command(lowers: &[PathBuf], names: &[String]) -> Result<String> {
    match detect(lowers) {
        Some(m) => Ok(script(m, names)),
        None => bail!(
            "no package manager plyroot knows is in the layers below this step (it looks for {}): install the packages with a `run` step, or build on a root that has one",
            Manager::ALL.iter().map(|(_, p)| *p).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The installed packages (name → version) of the root made of `lowers`, from dpkg's or apk's
/// database; None for other roots (rpm keeps a SQLite database plyroot does not read).
pub(crate) fn installed(lowers: &[PathBuf]) -> Option<BTreeMap<String, String>> {
    let read = |rel: &str| crate::store::upper::lookup(lowers, rel).and_then(|(p, m)| m.is_file().then_some(p)).and_then(|p| fs::read_to_string(p).ok());
    if let Some(status) = read("var/lib/dpkg/status") {
        return Some(dpkg(&status));
    }
    read("lib/apk/db/installed").map(|db| apk(&db))
}

fn dpkg(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in status.split("\n\n") {
        let field = |k: &str| para.lines().find_map(|l| l.strip_prefix(k).map(str::trim));
        let (Some(name), Some(version)) = (field("Package:"), field("Version:")) else { continue };
        if field("Status:").is_some_and(|s| s.ends_with(" installed")) {
            let name = match field("Architecture:") {
                // Multi-Arch packages of a foreign architecture are separate packages.
                Some(a) if field("Multi-Arch:") == Some("same") && out.contains_key(name) => format!("{name}:{a}"),
                _ => name.to_owned(),
            };
            out.insert(name, version.to_owned());
        }
    }
    out
}

fn apk(db: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in db.split("\n\n") {
        let field = |k: &str| para.lines().find_map(|l| l.strip_prefix(k));
        if let (Some(n), Some(v)) = (field("P:"), field("V:")) {
            out.insert(n.to_owned(), v.to_owned());
        }
    }
    out
}

/// What changed from `old` to `new`: `+name version`, `-name version`, `~name a -> b`, by name.
pub(crate) fn changes(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (n, v) in new {
        match old.get(n) {
            None => out.push(format!("+{n} {v}")),
            Some(o) if o != v => out.push(format!("~{n} {o} -> {v}")),
            _ => {}
        }
    }
    out.extend(old.iter().filter(|(n, _)| !new.contains_key(*n)).map(|(n, v)| format!("-{n} {v}")));
    out.sort_by(|a, b| a[1..].cmp(&b[1..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_is_found_through_a_merged_usr_and_scripts_quote_names() {
        let t = tempfile::tempdir().unwrap();
        let l = t.path().join("l");
        fs::create_dir_all(l.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", l.join("bin")).unwrap();
        assert_eq!(detect(std::slice::from_ref(&l)), None);
        assert!(command(std::slice::from_ref(&l), &["x".into()]).unwrap_err().to_string().contains("/usr/bin/apt-get"));
        fs::write(l.join("usr/bin/apt-get"), "").unwrap();
        assert_eq!(detect(std::slice::from_ref(&l)), Some(Manager::Apt));
        let s = script(Manager::Apt, &["make".into(), "it's".into()]);
        assert!(s.contains("apt-get install -y --no-install-recommends 'make' 'it'\\''s'\n"), "{s}");
        assert!(s.contains("rm -rf /var/lib/apt/lists/*"));
        assert!(script(Manager::Apk, &["make".into()]).contains("apk add --no-cache 'make'"));
    }

    #[test]
    fn installed_packages_and_their_changes() {
        let status = "Package: make\nStatus: install ok installed\nVersion: 4.3-4.1\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: hello\nStatus: install ok installed\nVersion: 2.10-3\n";
        let old = dpkg(status);
        assert_eq!(old.len(), 2);
        let new = dpkg("Package: make\nStatus: install ok installed\nVersion: 4.4\n\nPackage: git\nStatus: install ok installed\nVersion: 1:2.39\n");
        assert_eq!(changes(&old, &new), ["+git 1:2.39", "-hello 2.10-3", "~make 4.3-4.1 -> 4.4"]);
        assert_eq!(apk("C:x\nP:musl\nV:1.2.4-r2\n\nP:busybox\nV:1.36\n").len(), 2);
    }
}
