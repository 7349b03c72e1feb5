#!/usr/bin/env bash
# Launch latency, plyroot against bwrap, in one hyperfine run per user:
#
#   bwrap      bwrap --unshare-pid --bind ROOT / --proc /proc --dev /dev --ro-bind /sys /sys
#                    --bind /home /home --bind /tmp /tmp /bin/true
#   plyroot    plyroot run of a 3-layer environment (ROOT + two small layers) with a persistent,
#              non-empty upper, /bin/true: overlay, upper and the default host integration
#
# and prints, per user (root; as root also plyci-sub, with subordinate ids, and plyci-nosub,
# without: see BENCH_USERS in lib.sh), the medians and means and plyroot's ratio to bwrap.
# Target: plyroot run <= 1.0x bwrap (median) for every user.
#
#   bench/startup.sh [ROOT]     ROOT: a root directory or a rootfs tarball (.tar[.gz|.xz|.zst]);
#                               default: a busybox-static root built on the fly
# Env: RUNS (default 300), WARMUP (default 30), BENCH_USERS. Needs hyperfine, bwrap, busybox-static
# for the default root, and runuser (util-linux) to measure as other users.
set -euo pipefail

# --measure WORK ROOT: one user's measurement (run through as_user); prints "name median mean".
if [ "${1:-}" = --measure ]; then
    work=$2 root=$3
    . "$work/bin/lib.sh"
    plyroot=$work/bin/plyroot
    export PLYROOT_HOME="$HOME/store"
    mkdir -p "$HOME/l2/etc" "$HOME/l3/opt/bench"
    echo layer2 >"$HOME/l2/etc/bench-layer2"
    echo layer3 >"$HOME/l3/opt/bench/layer3"
    "$plyroot" -q create bench --from "dir:$root" --from "dir:$HOME/l2" --from "dir:$HOME/l3"
    # A persistent upper with something in it (as root: the image's files are root's).
    "$plyroot" -q run --root bench -- /bin/sh -c 'echo upper >/etc/bench-upper && mkdir -p /var/bench && echo x >/var/bench/x'
    cd "$HOME"
    hyperfine -N --warmup "${WARMUP:-30}" --runs "${RUNS:-300}" --export-csv "$HOME/startup.csv" \
        -n bwrap "bwrap --unshare-pid --bind $root / --proc /proc --dev /dev --ro-bind /sys /sys --bind /home /home --bind /tmp /tmp /bin/true" \
        -n plyroot "$plyroot run bench -- /bin/true" >&2
    medians "$HOME/startup.csv"
    exit 0
fi

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine bubblewrap util-linux" hyperfine bwrap runuser awk

build_plyroot
make_work
share_tools

root=${1:-}
if [ -z "$root" ]; then
    root="$work/root"
    busybox_root "$root"
elif [ -f "$root" ]; then
    echo "==> unpacking $root" >&2
    mkdir -p "$work/root"
    # Device nodes cannot be made unprivileged, and none of the runners needs them (each brings /dev).
    tar -xaf "$root" -C "$work/root" --exclude='./dev/*' --no-same-owner 2>/dev/null ||
        tar -xf "$root" -C "$work/root" --exclude='./dev/*' --no-same-owner
    root="$work/root"
fi
root=$(cd "$root" && pwd)
[ -x "$root/bin/true" ] || { echo "bench/startup.sh: $root/bin/true is missing" >&2; exit 1; }
chmod -R a+rX "$root" 2>/dev/null || true

results=()
for u in $(bench_users); do
    echo "==> as $u" >&2
    if out=$(as_user "$u" bash "$work/bin/startup.sh" --measure "$work" "$root"); then
        results+=("$u $(awk '$1 == "bwrap" { b = $2; bm = $3 } $1 == "plyroot" { p = $2; pm = $3 } END { print b, p, bm, pm }' <<<"$out")")
    else
        echo "bench/startup.sh: the measurement as $u failed" >&2
        results+=("$u failed")
    fi
done

echo
echo "startup: plyroot run against bwrap, per user (target: median ratio <= 1.00)"
printf '  %-14s %12s %12s %8s   %12s %12s %8s\n' user "bwrap med" "plyroot med" ratio "bwrap mean" "plyroot mean" ratio
for r in "${results[@]}"; do
    awk '$2 == "failed" { printf "  %-14s failed\n", $1; next }
        { printf "  %-14s %9.3f ms %9.3f ms %7.2fx   %9.3f ms %9.3f ms %7.2fx\n", $1, $2 * 1000, $3 * 1000, $3 / $2, $4 * 1000, $5 * 1000, $5 / $4 }' <<<"$r"
done
