//! Who the program is inside: the uid/gid maps and the passwd entry.
//!
//! - real root: no user namespace; root inside.
//! - a user with `/etc/subuid`+`/etc/subgid` ranges and `newuidmap`/`newgidmap`: every id inside
//!   is a host id of its own, the same in every run (you are you, subordinate id k is k, so root
//!   is the first subordinate id), and the files of layers are owned on disk by those host ids
//!   (`store::owners`): inside, they have the owners their image gives them. A run is you by
//!   default; `--root` is uid 0 in the same map, so what it writes is owned by that subordinate id.
//! - a user without ranges: one id can be mapped without a helper, and it is mapped to root.
//!
//! Every run of an environment's shared mount is in one *base* user namespace (the one the mount
//! belongs to), so runs with different identities can use the one overlay. With ranges the base
//! maps you to 0 and the subordinate range to 1…, and each run's identity is a user namespace
//! nested in it, whose maps a helper in the base writes (no setuid helper needed at that level):
//! the host sees exactly the owners it saw when each run mapped its own ids directly.

use crate::sys::ns::IdRange;
// Who the user is on the host and the ids they may map are the store's concern too (it removes
// what runs wrote): they live in `userns`, below both.
pub(crate) use crate::userns::{host_subids, image_view, in_initial_userns, HostUser, Mapping, SubIds};
use crate::userns::ranges_around;

/// The identity a launch will have inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Inside {
    /// The base user namespace's mapping: what the shared mount of an environment belongs to.
    pub mapping: Mapping,
    /// The run's own user namespace, nested in the base one (None: none, real root or a launch
    /// inside an environment). Mounts made in the base (the read-only store) are locked in it:
    /// root inside cannot take them away.
    pub nested: Option<Nested>,
    pub uid: u32,
    pub gid: u32,
    /// True when single-id mode forced root-inside although the user did not ask for it.
    pub forced_root: bool,
}

/// The maps of a run's nested user namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Nested {
    /// With ranges, who the run is, in the base's ids (you are the base's 0, subordinate id k is
    /// the base's k + 1); a helper left in the base writes them.
    Maps(Vec<IdRange>, Vec<IdRange>),
    /// One id, the same as in the base (0): the run maps itself (setgroups denied).
    Same,
}

/// Inside an environment already (a launcher or `run` started from a program in one): a nested
/// user namespace that keeps who we are. newuidmap is the host's and cannot be used from here,
/// and one id is all a nested launch needs.
pub(crate) fn keep_id(uid: u32, gid: u32) -> Inside {
    Inside { mapping: Mapping::Single { inside_uid: uid, inside_gid: gid, uid, gid }, nested: None, uid, gid, forced_root: false }
}


/// Decides the mapping. Pure: the caller passes what the host has.
pub(crate) fn choose(user: &HostUser, real_root: bool, subids: Option<SubIds>, want_root: bool) -> Inside {
    if real_root {
        return Inside { mapping: Mapping::Host, nested: None, uid: 0, gid: 0, forced_root: false };
    }
    match subids {
        Some(s) => {
            // In the base: 0 is you, k + 1 is subordinate id k. The nested map is the same for
            // every run (the image's view: you are you, k is k); `--root` only picks uid 0 in it.
            let base = |me_out: u32, (start, count): (u32, u32)| vec![IdRange { inside: 0, outside: me_out, count: 1 }, IdRange { inside: 1, outside: start, count }];
            let (uid, gid) = if want_root { (0, 0) } else { (user.uid, user.gid) };
            Inside {
                mapping: Mapping::Ranges { uids: base(user.uid, s.uid), gids: base(user.gid, s.gid) },
                nested: Some(Nested::Maps(ranges_around(user.uid, 0, (1, s.uid.1)), ranges_around(user.gid, 0, (1, s.gid.1)))),
                uid,
                gid,
                forced_root: false,
            }
        }
        None => Inside {
            mapping: Mapping::Single { inside_uid: 0, inside_gid: 0, uid: user.uid, gid: user.gid },
            nested: Some(Nested::Same),
            uid: 0,
            gid: 0,
            forced_root: !want_root,
        },
    }
}

/// Whether the invoking user exists inside as themselves (so the skeleton's passwd names them),
/// in at least some runs of an environment: with ranges, or nested inside another environment.
pub(crate) fn user_inside(inside: &Inside, user: &HostUser) -> bool {
    match &inside.mapping {
        Mapping::Host => false,
        Mapping::Ranges { .. } => true,
        Mapping::Single { inside_uid, .. } => *inside_uid == user.uid && user.uid != 0,
    }
}

/// The passwd and group text an environment sees: the layers' own files plus an entry for the
/// user when they exist inside as themselves (`add_user`). `shell` is a shell that exists in the
/// root.
pub(crate) fn passwd_with(base_passwd: &str, base_group: &str, user: &HostUser, add_user: bool, shell: &str) -> (String, String) {
    let mut passwd = base_passwd.to_owned();
    let mut group = base_group.to_owned();
    if add_user {
        let has = |text: &str, id: u32| text.lines().any(|l| l.split(':').nth(2).and_then(|f| f.parse().ok()) == Some(id));
        if !passwd.is_empty() && !passwd.ends_with('\n') {
            passwd.push('\n');
        }
        if !group.is_empty() && !group.ends_with('\n') {
            group.push('\n');
        }
        if !has(&passwd, user.uid) {
            // `*`: no password, and none in /etc/shadow (which the skeleton leaves as the image
            // has it), so PAM's account check (sudo's) passes, as for a system account.
            passwd.push_str(&format!("{}:*:{}:{}:{}:{}:{}\n", user.name, user.uid, user.gid, user.name, user.home.display(), shell));
        }
        if !has(&group, user.gid) {
            group.push_str(&format!("{}:x:{}:\n", user.name, user.gid));
        }
    }
    (passwd, group)
}

/// The login shell of `uid` in a passwd text, if any.
pub(crate) fn shell_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid) && !f[6].is_empty()).then(|| f[6].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> HostUser {
        HostUser { uid: 1000, gid: 1000, name: "alice".into(), home: "/home/alice".into() }
    }

    #[test]
    fn mapping_table() {
        let subs = Some(SubIds { uid: (165536, 65536), gid: (165536, 65536) });
        let cases = [
            (true, None, false, Mapping::Host, 0, false),
            (false, None, false, Mapping::Single { inside_uid: 0, inside_gid: 0, uid: 1000, gid: 1000 }, 0, true),
            (false, None, true, Mapping::Single { inside_uid: 0, inside_gid: 0, uid: 1000, gid: 1000 }, 0, false),
        ];
        for (root, sub, want, mapping, uid, forced) in cases {
            let i = choose(&alice(), root, sub, want);
            let nested = if root { None } else { Some(Nested::Same) };
            assert_eq!((i.mapping, i.nested, i.uid, i.forced_root), (mapping, nested, uid, forced));
        }
        // The base is the same whoever the run is: one mount serves both identities.
        let (def, root) = (choose(&alice(), false, subs, false), choose(&alice(), false, subs, true));
        assert_eq!(def.mapping, root.mapping);
        let Mapping::Ranges { uids: base, .. } = &def.mapping else { panic!() };
        assert_eq!(base, &vec![IdRange { inside: 0, outside: 1000, count: 1 }, IdRange { inside: 1, outside: 165536, count: 65536 }]);
        assert_eq!((def.uid, root.uid), (1000, 0));
        // Host id of inside id k: through the nested map into the base, then the base's map.
        let through = |r: &[IdRange], k: u32| r.iter().find(|x| k >= x.inside && k < x.inside + x.count).map(|x| x.outside + k - x.inside);
        let host = |i: &Inside, k: u32| {
            let Some(Nested::Maps(uids, _)) = &i.nested else { panic!("ranges nest their maps") };
            through(uids, k).and_then(|b| through(base, b))
        };
        assert_eq!(host(&def, 1000), Some(1000), "you are you");
        assert_eq!(host(&def, 0), Some(165536), "root is the first subordinate id");
        assert_eq!(def.nested, root.nested, "one map for every run: --root is uid 0 in it");
        // Every id maps to the same host id in both modes: k → start + k, you → you.
        for k in [0, 1, 42, 999, 1001, 65535] {
            assert_eq!(host(&root, k), Some(165536 + k), "inside id {k}");
        }
        // The one-level view helpers and the store's owners use is the same map.
        let Mapping::Ranges { uids, .. } = image_view(&alice(), subs) else { panic!() };
        for k in [0, 1, 42, 1000, 65535] {
            assert_eq!(through(&uids, k), host(&root, k), "image view of {k}");
        }
    }

    #[test]
    fn passwd_gets_an_entry_only_when_missing_and_the_user_is_inside() {
        let (p, g) = passwd_with("root:x:0:0:root:/root:/bin/sh", "root:x:0:", &alice(), true, "/bin/sh");
        assert_eq!(p, "root:x:0:0:root:/root:/bin/sh\nalice:*:1000:1000:alice:/home/alice:/bin/sh\n");
        assert_eq!(g, "root:x:0:\nalice:x:1000:\n");
        let (p2, _) = passwd_with(&p, &g, &alice(), true, "/bin/sh");
        assert_eq!(p2, p, "no duplicate");
        assert_eq!(passwd_with("root:x:0:0::/root:/bin/sh\n", "", &alice(), false, "/bin/sh").0, "root:x:0:0::/root:/bin/sh\n");
        let subs = Some(SubIds { uid: (1, 5000), gid: (1, 5000) });
        assert!(user_inside(&choose(&alice(), false, subs, true), &alice()), "--root runs share the skeleton of runs as you");
        assert!(!user_inside(&choose(&alice(), false, None, false), &alice()));
        assert!(user_inside(&keep_id(1000, 1000), &alice()));
    }
}
