#!/usr/bin/env bash
# Launch latency, plyroot against its peers, in one hyperfine run:
#
#   host       /bin/true on the host
#   chroot     unshare -Urm + chroot into the root, /bin/true
#   bwrap      bwrap --bind ROOT / --proc /proc --dev /dev /bin/true
#   plyroot    plyroot run of a 3-layer environment (ROOT + two small layers) with a persistent,
#              non-empty upper, /bin/true — overlay, upper and the default host integration on top
#
# and prints each one's mean and its ratio to bwrap. The issue's target: plyroot <= 1.3x bwrap.
#
#   bench/startup.sh [ROOT]     ROOT: a root directory or a rootfs tarball (.tar[.gz|.xz|.zst]);
#                               default: a busybox-static root built on the fly
# Env: RUNS (default 300), WARMUP (default 30). Needs hyperfine, bwrap, unshare, and for the
# default root busybox-static.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine bubblewrap util-linux coreutils" hyperfine bwrap unshare chroot awk

build_plyroot
make_work

root=${1:-}
if [ -z "$root" ]; then
    bb=$(command -v busybox || true)
    [ -n "$bb" ] || { echo "bench/startup.sh: no ROOT given and no busybox (apt-get install busybox-static)" >&2; exit 1; }
    root="$work/root"
    mkdir -p "$root"/{bin,etc,dev,proc,sys,tmp,usr/bin,root,home,run,var}
    cp "$bb" "$root/bin/busybox"
    for a in $("$bb" --list); do [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    chmod 1777 "$root/tmp"
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

echo "==> a 3-layer plyroot environment over $root" >&2
export PLYROOT_HOME="$work/store"
mkdir -p "$work/l2/etc" "$work/l3/opt/bench"
echo layer2 >"$work/l2/etc/bench-layer2"
echo layer3 >"$work/l3/opt/bench/layer3"
"$plyroot" -q create bench --from "dir:$root" --from "dir:$work/l2" --from "dir:$work/l3"
# A persistent upper with something in it.
"$plyroot" run bench -- /bin/sh -c 'echo upper >/etc/bench-upper && mkdir -p /var/bench && echo x >/var/bench/x'
"$plyroot" run bench -- /bin/true

runs=${RUNS:-300}
warmup=${WARMUP:-30}
csv="$work/startup.csv"
cd "$work"
hyperfine -N --warmup "$warmup" --runs "$runs" --export-csv "$csv" \
    -n host "/bin/true" \
    -n "unshare+chroot" "unshare -Urm chroot $root /bin/true" \
    -n bwrap "bwrap --bind $root / --proc /proc --dev /dev /bin/true" \
    -n "plyroot run" "$plyroot run bench -- /bin/true"

echo
echo "startup: mean per launch, and the ratio to bwrap (plyroot target: <= 1.30)"
awk -F, 'NR > 1 { name[NR] = $1; mean[NR] = $2; if ($1 == "bwrap") b = $2 }
    END {
        printf "  %-16s %12s %10s\n", "command", "mean", "vs bwrap"
        for (i = 2; i <= NR; i++) printf "  %-16s %9.3f ms %9.2fx\n", name[i], mean[i] * 1000, mean[i] / b
    }' "$csv"
