#!/usr/bin/env bash
# Launcher cost, in one hyperfine run per user: a program started directly; bwrap on the same root
# (the issue's line); through its launcher from the host; through launchers nested 1, 2, 4 and 8
# deep (each level a different environment sharing a base layer, the innermost running the
# program).
#
# Prints, per user (root; as root also plyci-sub, with subordinate ids, and plyci-nosub, without:
# see BENCH_USERS in lib.sh), the launcher hop's median ratio to bwrap (target <= 1.3x) and the
# cost of one hop at depths 5-8 against one hop at depth 1 (target < 2x).
#
#   bench/launchers.sh            RUNS=100 WARMUP=10 tune hyperfine
set -euo pipefail

# --measure WORK: one user's measurement (run through as_user); prints "name median mean".
if [ "${1:-}" = --measure ]; then
    work=$2
    . "$work/bin/lib.sh"
    plyroot=$work/bin/plyroot
    export PLYROOT_HOME="$HOME/store"
    root="$HOME/root"
    mkdir -p "$root/bin" "$root/etc" "$root/proc" "$root/dev" "$root/tmp" "$root/sys" "$root/home"
    cp "$work/bin/busybox" "$root/bin/busybox"
    for a in sh true ls cat; do ln -s busybox "$root/bin/$a"; done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    base=$("$plyroot" import "dir:$root" 2>/dev/null)
    for i in 1 2 3 4 5 6 7 8; do
        mkdir -p "$HOME/l$i/opt"
        echo "$i" >"$HOME/l$i/opt/level$i"
        "$plyroot" -q create "e$i" --from "layer:$base" --from "dir:$HOME/l$i"
        "$plyroot" -q export "e$i" sh true --to "$HOME/bin/e$i" >/dev/null
    done
    # chain.sh N MAX: launcher e<N> runs chain.sh N+1 MAX; past MAX, run true.
    cat >"$HOME/chain.sh" <<CHAIN
n=\$1; max=\$2
if [ "\$n" -ge "\$max" ]; then exec $HOME/bin/e\$n/true; fi
exec $HOME/bin/e\$n/sh $HOME/chain.sh \$((n+1)) \$max
CHAIN
    cd "$HOME"
    hyperfine -N --warmup "${WARMUP:-10}" --runs "${RUNS:-100}" --export-csv "$HOME/launchers.csv" \
        -n direct "$root/bin/busybox true" \
        -n bwrap "bwrap --unshare-pid --bind $root / --proc /proc --dev /dev --ro-bind /sys /sys --bind /home /home --bind /tmp /tmp /bin/true" \
        -n launcher "$HOME/bin/e1/true" \
        -n depth1 "$root/bin/busybox sh $HOME/chain.sh 1 1" \
        -n depth2 "$root/bin/busybox sh $HOME/chain.sh 1 2" \
        -n depth4 "$root/bin/busybox sh $HOME/chain.sh 1 4" \
        -n depth8 "$root/bin/busybox sh $HOME/chain.sh 1 8" >&2
    medians "$HOME/launchers.csv"
    exit 0
fi

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine bubblewrap busybox-static util-linux" hyperfine bwrap busybox runuser awk
build_plyroot
make_work
share_tools
install -m 755 "$(command -v busybox)" "$work/bin/busybox"

results=()
for u in $(bench_users); do
    echo "==> as $u" >&2
    if out=$(as_user "$u" bash "$work/bin/launchers.sh" --measure "$work"); then
        results+=("$u $(tr '\n' ' ' <<<"$out")")
    else
        echo "bench/launchers.sh: the measurement as $u failed" >&2
        results+=("$u failed")
    fi
done

echo
echo "launchers: medians per user; a hop against bwrap (target <= 1.30x), one hop at depths 5-8 against one at depth 1 (target < 2x)"
printf '  %-14s %10s %10s %10s %8s %10s %10s %8s\n' user direct bwrap launcher "vs bwrap" depth1 depth8 "hop 5-8"
for r in "${results[@]}"; do
    awk '$2 == "failed" { printf "  %-14s failed\n", $1; next }
        { for (i = 2; i + 2 <= NF; i += 3) m[$i] = $(i + 1)
          h1 = m["depth1"]; h8 = (m["depth8"] - m["depth4"]) / 4
          printf "  %-14s %7.2f ms %7.2f ms %7.2f ms %7.2fx %7.2f ms %7.2f ms %7.2fx\n", $1, m["direct"] * 1000, m["bwrap"] * 1000, m["launcher"] * 1000, m["launcher"] / m["bwrap"], h1 * 1000, m["depth8"] * 1000, h8 / h1 }' <<<"$r"
done
