# Shared by the bench scripts (sourced): the checkout, the tools, a release build, a scratch dir.

here=$(cd "$(dirname "${BASH_SOURCE[1]}")/.." && pwd)
cd "$here"
command -v cargo >/dev/null || PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# need PACKAGES TOOL… : exit with the apt packages to install when a tool is missing.
need() {
    local pkgs=$1
    shift
    for t in "$@"; do
        command -v "$t" >/dev/null || { echo "$(basename "$0"): needs $t (apt-get install $pkgs)" >&2; exit 1; }
    done
}

# Builds plyroot --release and sets $plyroot to the binary's path as cargo reports it (the build
# has an explicit target, so it is target/<triple>/release/plyroot).
build_plyroot() {
    echo "==> cargo build --release" >&2
    plyroot=$(cargo build --release --message-format=json-render-diagnostics 2>/dev/null |
        grep '"name":"plyroot"' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1)
    [ -x "$plyroot" ] || { echo "$(basename "$0"): cargo build --release failed" >&2; exit 1; }
}

# Sets $work to a fresh scratch dir, removed on exit (stores hold read-only dirs: chmod first;
# files the bench users' runs wrote are theirs, so root removes the lot).
make_work() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/plyroot-bench.XXXXXX")
    chmod 755 "$work"
    cleanup() {
        # A keeper (see src/sandbox/keeper.rs) of a bench store ends when its store is removed.
        chmod -R u+rwX "$work" 2>/dev/null
        rm -rf "$work" 2>/dev/null || true
    }
    trap cleanup EXIT
}

# busybox_root DIR: a minimal root in DIR: busybox-static and its applets, root in passwd/group.
busybox_root() {
    local root=$1 bb
    bb=$(command -v busybox) || { echo "$(basename "$0"): needs busybox (apt-get install busybox-static)" >&2; exit 1; }
    mkdir -p "$root"/{bin,etc,dev,proc,sys,tmp,usr/bin,root,home,run,var}
    cp "$bb" "$root/bin/busybox"
    for a in $("$bb" --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    chmod 1777 "$root/tmp"
}

# Every bench reports its figure per user: plyroot's modes differ (real root: no user namespace;
# subordinate ids: newuidmap/newgidmap and a nested identity; one id: a single self-mapping).
# Run as root, a bench measures as root and again as each of BENCH_USERS that exists (default the
# CI users: plyci-sub has subordinate ids, plyci-nosub none); run as anyone else, as that user.
bench_users() {
    id -un
    [ "$(id -u)" = 0 ] || return 0
    for u in ${BENCH_USERS-plyci-sub plyci-nosub}; do
        if id -u "$u" >/dev/null 2>&1; then echo "$u"; else echo "$(basename "$0"): no user $u, not measured" >&2; fi
    done
}

# Copies plyroot and the bench scripts where every bench user can run them ($work/bin).
share_tools() {
    mkdir -p "$work/bin"
    install -m 755 "$plyroot" "$work/bin/plyroot"
    install -m 644 "$here/bench/lib.sh" "$here/bench/$(basename "$0")" "$work/bin/"
    plyroot="$work/bin/plyroot"
}

# as_user USER CMD...: CMD as USER, in a clean environment with a HOME (and TMPDIR) of its own
# under $work, as a new login would have it.
as_user() {
    local u=$1 home="$work/home-$1"
    shift
    mkdir -p "$home"
    if [ "$u" != "$(id -un)" ]; then
        chown "$u:$(id -gn "$u")" "$home"
        chmod 700 "$home"
        runuser -u "$u" -- env -i HOME="$home" TMPDIR="$home" PATH=/usr/local/bin:/usr/bin:/bin \
            USER="$u" LOGNAME="$u" RUNS="${RUNS:-}" WARMUP="${WARMUP:-}" "$@"
    else
        HOME="$home" TMPDIR="$home" "$@"
    fi
}

# hyperfine's CSV (--export-csv) → "name median mean" lines, in seconds.
medians() {
    awk -F, 'NR > 1 { print $1, $4, $2 }' "$1"
}
