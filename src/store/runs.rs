//! Run slots, and what is alive in an environment.
//!
//! Every launch that mounts or joins an environment's root records itself in a run slot,
//! `runs/<n>.json`: the pid that launched, the mount namespace it made, the environment's base user
//! namespace, the generation, and — when it uses the persistent upper — the slot whose workdir the
//! shared overlay mount uses. Slot files are reused, never deleted, so a launch creates nothing.
//!
//! A record says nothing about liveness by itself. A run is alive while any process is in its
//! mount namespace, whatever that process did with its fds (a daemon that closed them all and left
//! its session is still there): first the recorded pid is checked, then every process in `/proc`.
//! What the commands that change an environment need is stronger still — nothing may hold its
//! upper at all, also through a namespace a program made inside — so they ask the kernel which
//! overlay mounts exist in every namespace we can see ([`Usage`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::env::Env;
use crate::sys::procs;

/// One run slot's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// The process that launched (it became the program, or supervises it).
    pub pid: i32,
    /// Its mount namespace (inode): the run lives while the namespace does.
    pub mnt_ns: u64,
    /// The mount namespace's id, which the kernel never reuses (0: not known).
    #[serde(default)]
    pub mnt_ns_id: u64,
    /// The environment's base user namespace, which every run of the shared mount is in or under
    /// (0 for real root, which needs none).
    pub user_ns: u64,
    /// Its id, never reused (0: none, or not known): whatever the run started lives under it.
    #[serde(default)]
    pub user_ns_id: u64,
    pub generation: u32,
    /// The generation's layer ids, bottom first.
    pub layers: Vec<String>,
    /// The skeleton directory the run's root has as its top lower.
    #[serde(default)]
    pub skel: Option<PathBuf>,
    /// Set when the run uses the persistent upper: the slot whose workdir the environment's one
    /// shared overlay mount uses (its own slot when this run mounted it).
    #[serde(default)]
    pub shared: Option<u32>,
    /// The environment's booted init (pid is init's).
    #[serde(default)]
    pub boot: bool,
    /// A booted init's supervisor (it drains the console and ends after init).
    #[serde(default)]
    pub supervisor: Option<i32>,
    /// Seconds since the epoch.
    #[serde(default)]
    pub started: u64,
    /// A keeper of the shared overlay (`sandbox::keeper`), not a program's run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keeper: bool,
    /// A keeper's identity user namespaces, nested in the base, ready for runs to join.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nested: Vec<NestedNs>,
    /// What the shared mount is made of (`sandbox::prepare::mount_key`).
    #[serde(default)]
    pub key: String,
}

/// A user namespace nested in an environment's base with the id maps of one identity, held open
/// by a keeper as its fd `fd`: a run with the same maps enters it (`setns`) instead of making its
/// own, which needs a helper process to write the maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NestedNs {
    pub fd: i32,
    pub uids: Vec<crate::sys::ns::IdRange>,
    pub gids: Vec<crate::sys::ns::IdRange>,
}

/// What is alive of an environment's runs (see [`Env::survey`]).
pub(crate) struct Survey {
    pub live: Vec<LiveRun>,
    /// A process a run of the shared mount started that lives outside every recorded mount
    /// namespace.
    pub escaped: Option<i32>,
}

/// The run records as one launch reads them, once: those alive by their recorded pid, and the
/// rest. A launch looks for a booted init in it, then decides from it whether to join.
pub(crate) struct Census {
    live: Vec<LiveRun>,
    gone: Vec<(u32, RunRecord)>,
}

impl Census {
    /// The booted init, when there is one.
    pub(crate) fn booted(&self) -> Option<&LiveRun> {
        self.live.iter().find(|r| r.record.boot)
    }
}

/// A record whose run is alive, with a pid that is in its mount namespace now.
#[derive(Clone, Debug)]
pub(crate) struct LiveRun {
    pub slot: u32,
    pub record: RunRecord,
    pub pid: i32,
}

impl Env {
    fn runs_dir(&self) -> PathBuf {
        self.dir.join("runs")
    }

    pub(crate) fn slot_path(&self, slot: u32) -> PathBuf {
        self.runs_dir().join(format!("{slot}.json"))
    }

    /// Every record in the run slots, alive or not.
    pub(crate) fn records(&self) -> Vec<(u32, RunRecord)> {
        let Ok(rd) = fs::read_dir(self.runs_dir()) else { return Vec::new() };
        let mut out: Vec<(u32, RunRecord)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let slot = name.to_str()?.strip_suffix(".json")?.parse().ok()?;
                // An empty or half-written record is a slot nobody uses.
                let rec = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                Some((slot, rec))
            })
            .collect();
        out.sort_by_key(|(n, _)| *n);
        out
    }

    /// The records whose runs are alive now, each with a process in its mount namespace.
    pub(crate) fn live(&self) -> Vec<LiveRun> {
        self.survey().live
    }

    /// What is alive of the runs recorded here: the live runs, and a process that a run of the
    /// shared mount started and that lives on outside every recorded namespace (it made its own,
    /// or left its run's: it may still hold the overlay, where no launch can join it).
    pub(crate) fn survey(&self) -> Survey {
        let (live, gone) = self.by_pid();
        self.survey_rest(live, gone)
    }

    /// The run records read once, each checked by its recorded pid (see [`Census`]).
    pub(crate) fn census(&self) -> Census {
        let (live, gone) = self.by_pid();
        Census { live, gone }
    }

    /// The runs whose recorded process is still in their mount namespace (no look through
    /// `/proc`), and the other records.
    fn by_pid(&self) -> (Vec<LiveRun>, Vec<(u32, RunRecord)>) {
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for (slot, record) in self.records() {
            let id = record.mnt_ns_id;
            if id != 0 && procs::mnt_ns_id(record.pid) == Some(id) {
                live.push(LiveRun { slot, pid: record.pid, record });
            } else {
                gone.push((slot, record));
            }
        }
        (live, gone)
    }

    /// What a launch needs: like [`Env::survey`], but when a run of the shared mount is alive by
    /// its recorded pid the launch joins it, and nothing else can change that: `/proc` is not
    /// read (it costs a readlink per process on the machine). Then `escaped` is None and `live`
    /// may miss runs whose launching process ended.
    pub(crate) fn survey_for_launch(&self, census: Census) -> Survey {
        let Census { live, gone } = census;
        if live.iter().any(|l| l.record.shared.is_some()) {
            return Survey { live, escaped: None };
        }
        self.survey_rest(live, gone)
    }

    fn survey_rest(&self, mut live: Vec<LiveRun>, mut gone: Vec<(u32, RunRecord)>) -> Survey {
        // The launching process is gone; what it started may still be there, under its base user
        // namespace: one look through /proc finds it.
        let bases: Vec<u64> = gone.iter().map(|(_, r)| r.user_ns_id).filter(|&b| b != 0).collect();
        let mut escaped = None;
        let shared_bases: Vec<u64> = gone.iter().filter(|(_, r)| r.shared.is_some()).map(|(_, r)| r.user_ns_id).collect();
        for (pid, base) in procs::in_user_ns_trees(&bases) {
            // A zombie (nobody reaped it yet) holds nothing: it has no namespaces left.
            let Some(ns) = procs::mnt_ns_id(pid) else { continue };
            let ns = Some(ns);
            if let Some(i) = gone.iter().position(|(_, r)| r.user_ns_id == base && ns == Some(r.mnt_ns_id)) {
                let (slot, record) = gone.remove(i);
                live.push(LiveRun { slot, record, pid });
                continue;
            }
            if live.iter().any(|l| ns == Some(l.record.mnt_ns_id)) {
                continue; // another process of a run found alive
            }
            // Under a shared mount's base, but in no recorded mount namespace.
            if escaped.is_none() && shared_bases.contains(&base) {
                escaped = Some(pid);
            }
        }
        // Records without a base user namespace (real root): by mount namespace, through /proc.
        let mut namespaces: Option<BTreeMap<u64, i32>> = None;
        let upper = self.upper();
        for (slot, record) in gone.into_iter().filter(|(_, r)| r.user_ns_id == 0) {
            let Some(&pid) = namespaces.get_or_insert_with(procs::mount_namespaces).get(&record.mnt_ns) else { continue };
            // The kernel hands a freed namespace's inode number to the next namespace made: the
            // one found must be this run's, by its id, or, for a record without one, by the
            // overlay it holds.
            let ours = if record.mnt_ns_id != 0 {
                procs::mnt_ns_id(pid) == Some(record.mnt_ns_id)
            } else {
                procs::overlays(pid).iter().any(|o| o.dirs().any(|d| record.skel.as_ref() == Some(d) || (record.shared.is_some() && *d == upper)))
            };
            if ours {
                live.push(LiveRun { slot, record, pid });
            }
        }
        live.sort_by_key(|l| l.slot);
        Survey { live, escaped }
    }

    /// The booted init, when there is one (alive by its recorded pid).
    pub(crate) fn booted(&self) -> Option<LiveRun> {
        self.census().booted().cloned()
    }

    /// A slot for a new run: not alive, not the workdir of a shared mount that is, and not one of
    /// `taken`.
    pub(crate) fn free_slot(&self, live: &[LiveRun], taken: &[u32]) -> u32 {
        let used: Vec<u32> = live.iter().flat_map(|r| [Some(r.slot), r.record.shared]).flatten().chain(taken.iter().copied()).collect();
        (0..).find(|n| !used.contains(n)).unwrap_or(0)
    }

    /// Ends the keeper of the shared overlay (`sandbox::keeper`) if nothing else uses the mount:
    /// no other process is in its base user namespace's tree, and no other mount namespace holds
    /// an overlay of the upper. True when one was ended. Called under the environment's lock by
    /// whoever needs the upper unmounted.
    pub(crate) fn dismiss_keeper(&self) -> Result<bool> {
        let (live, _) = self.by_pid();
        let Some(k) = live.iter().find(|r| r.record.keeper) else { return Ok(false) };
        let base = k.record.user_ns_id;
        // (A zombie, which has no mount namespace left, holds nothing.)
        if let Some((pid, _)) = if base != 0 { procs::in_user_ns_trees(&[base]) } else { Vec::new() }.into_iter().find(|(pid, _)| *pid != k.pid && procs::mnt_ns_id(*pid).is_some()) {
            crate::diag::debug!("the keeper of '{}' stays: pid {pid} (`{}`) is in its user namespace", self.name, procs::cmdline(pid));
            return Ok(false);
        }
        let (upper, work) = (self.upper(), self.dir.join("work"));
        let others = Usage::scan().mounts.into_iter().any(|(pid, o)| o.dirs().any(|d| d.starts_with(&upper) || d.starts_with(&work)) && procs::mnt_ns_id(pid) != Some(k.record.mnt_ns_id));
        if others {
            crate::diag::debug!("the keeper of '{}' stays: another mount namespace holds an overlay of its upper", self.name);
            return Ok(false);
        }
        let pidfd = crate::sys::ns::pidfd(k.pid)?;
        // The pid is the keeper's still (not reused) only while it is in the keeper's namespace.
        if procs::mnt_ns_id(k.pid) != Some(k.record.mnt_ns_id) {
            return Ok(false);
        }
        crate::sys::process::pidfd_signal(&pidfd, libc::SIGKILL)?;
        if !crate::sys::process::pidfd_wait(&pidfd, std::time::Duration::from_secs(10)) {
            bail!("the keeper of '{}' (pid {}) did not end", self.name, k.pid);
        }
        Ok(true)
    }

    /// Opens slot `n`'s record file for the launch that takes it (written once the run's
    /// namespaces exist, with [`write_record`]).
    pub(crate) fn open_slot(&self, slot: u32) -> Result<fs::File> {
        let p = self.slot_path(slot);
        fs::create_dir_all(self.runs_dir()).with_context(|| format!("cannot create {}", self.runs_dir().display()))?;
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).with_context(|| format!("cannot open {}", p.display()))
    }

    /// Where the shared overlay of slot `n` keeps its workdir.
    pub(crate) fn workdir(&self, slot: u32) -> PathBuf {
        self.dir.join("work").join(slot.to_string())
    }

    /// Refuses while anything uses the environment's upper: a run, a program it left behind, or a
    /// composed launch that reads it. Names one process and says how to end it.
    pub(crate) fn ensure_idle(&self, what: &str) -> Result<()> {
        self.dismiss_keeper()?;
        let (upper, work) = (self.upper(), self.dir.join("work"));
        let (user, keeper) = self.mount_user(|d| d.starts_with(&upper) || d.starts_with(&work));
        if let Some(pid) = user.or_else(|| self.survey().escaped).or(keeper) {
            bail!("{}", busy_message(&self.name, what, pid));
        }
        Ok(())
    }

    /// Refuses while anything uses the environment at all (its upper, its skeletons).
    pub(crate) fn ensure_unused(&self, what: &str) -> Result<()> {
        self.dismiss_keeper()?;
        let (user, keeper) = self.mount_user(|d| d.starts_with(&self.dir));
        let survey = self.survey();
        let run = survey.live.iter().find(|l| !l.record.keeper).or(survey.live.first()).map(|l| l.pid);
        if let Some(pid) = user.or(survey.escaped).or(run).or(keeper) {
            bail!("{}", busy_message(&self.name, what, pid));
        }
        Ok(())
    }

    /// A process whose mount namespace holds an overlay made of a directory `is` accepts: one of a
    /// run, and the keeper (named only when nothing else is there: ending it would not help).
    fn mount_user(&self, is: impl Fn(&Path) -> bool) -> (Option<i32>, Option<i32>) {
        let keepers: Vec<u64> = self.by_pid().0.iter().filter(|r| r.record.keeper).map(|r| r.record.mnt_ns_id).collect();
        let users: Vec<i32> = Usage::scan().mounts.into_iter().filter(|(_, o)| o.dirs().any(|d| is(d))).map(|(pid, _)| pid).collect();
        let is_keeper = |pid: &i32| procs::mnt_ns_id(*pid).is_some_and(|id| keepers.contains(&id));
        (users.iter().copied().find(|p| !is_keeper(p)), users.iter().copied().find(is_keeper))
    }
}

fn busy_message(name: &str, what: &str, pid: i32) -> String {
    format!(
        "cannot {what} '{name}' while it is in use: pid {pid} (`{}`) runs in it; end it first (exit it, or `kill {pid}`; `plyroot stop {name}` if it is booted) — an overlay's upper must not change under a live mount",
        procs::cmdline(pid)
    )
}

/// Writes a run's record into its slot file, replacing what a finished run left there: over it in
/// place, then cut to length. Emptying the file first would free its block and allocate another
/// on every launch (with online discard, a synchronous TRIM each time); a reader that meets a
/// half-written record takes the slot for free, as it would an empty one.
pub(crate) fn write_record(file: &mut fs::File, record: &RunRecord, shown: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let data = serde_json::to_vec(record)?;
    file.write_all_at(&data, 0).and_then(|_| file.set_len(data.len() as u64)).with_context(|| format!("cannot write {}", shown.display()))
}

/// Every overlay mount in every mount namespace we can see, with one pid in each namespace.
pub(crate) struct Usage {
    mounts: Vec<(i32, procs::Overlay)>,
}

impl Usage {
    pub(crate) fn scan() -> Usage {
        let mut mounts = Vec::new();
        for (_, pid) in procs::mount_namespaces() {
            mounts.extend(procs::overlays(pid).into_iter().map(|o| (pid, o)));
        }
        Usage { mounts }
    }

    /// Every directory a live overlay mount is made of.
    pub(crate) fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.mounts.iter().flat_map(|(_, o)| o.dirs())
    }
}
