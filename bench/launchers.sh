#!/usr/bin/env bash
# Launcher cost, in one hyperfine run: a program started directly; through its launcher from the
# host; through launchers nested 1, 2, 4 and 8 deep (each level a different environment sharing a
# base layer, the innermost running the program); and bwrap on the same root for reference.
# Prints each mean, the launcher hop's ratio to bwrap (target <= 1.3x) and the cost of one hop at
# depth 8 against one hop at depth 1 (target < 2x).
#
#   bench/launchers.sh            RUNS=100 WARMUP=10 tune hyperfine
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine bubblewrap busybox-static" hyperfine bwrap busybox awk
runs=${RUNS:-100}
warmup=${WARMUP:-10}
build_plyroot
make_work
export PLYROOT_HOME="$work/store"

root="$work/root"
mkdir -p "$root/bin" "$root/etc" "$root/proc" "$root/dev" "$root/tmp"
cp "$(command -v busybox)" "$root/bin/busybox"
for a in sh true ls cat; do ln -s busybox "$root/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
base=$("$plyroot" import "dir:$root" 2>/dev/null)
for i in 1 2 3 4 5 6 7 8; do
    mkdir -p "$work/l$i/opt"
    echo "$i" >"$work/l$i/opt/level$i"
    "$plyroot" create "e$i" --from "layer:$base" --from "dir:$work/l$i" >/dev/null 2>&1
    "$plyroot" export "e$i" sh true --to "$work/bin/e$i" >/dev/null 2>&1
done
# chain.sh N MAX: launcher e<N> runs chain.sh N+1 MAX; past MAX, run true.
cat >"$work/chain.sh" <<CHAIN
n=\$1; max=\$2
if [ "\$n" -ge "\$max" ]; then exec $work/bin/e\$n/true; fi
exec $work/bin/e\$n/sh $work/chain.sh \$((n+1)) \$max
CHAIN

json="$work/launchers.json"
hyperfine -N --warmup "$warmup" --runs "$runs" --export-json "$json" \
    -n direct "$root/bin/busybox true" \
    -n bwrap "bwrap --bind $root / --proc /proc --dev /dev /bin/true" \
    -n launcher "$work/bin/e1/true" \
    -n depth1 "$root/bin/busybox sh $work/chain.sh 1 1" \
    -n depth2 "$root/bin/busybox sh $work/chain.sh 1 2" \
    -n depth4 "$root/bin/busybox sh $work/chain.sh 1 4" \
    -n depth8 "$root/bin/busybox sh $work/chain.sh 1 8" >&2

# name → mean seconds, from hyperfine's JSON without jq.
means=$(tr -d '\n' <"$json" | grep -o '"command": *"[^"]*", *"mean": *[0-9.e-]*' | sed 's/"command": *"\([^"]*\)", *"mean": *\(.*\)/\1 \2/')
mean() { awk -v n="$1" '$1 == n { print $2 }' <<<"$means"; }
echo
awk -v d="$(mean direct)" -v b="$(mean bwrap)" -v l="$(mean launcher)" -v d1="$(mean depth1)" -v d2="$(mean depth2)" -v d4="$(mean depth4)" -v d8="$(mean depth8)" 'BEGIN {
    printf "%-30s %9.2f ms\n", "direct", d * 1000
    printf "%-30s %9.2f ms\n", "bwrap (reference)", b * 1000
    printf "%-30s %9.2f ms   %.2fx bwrap (target <= 1.3x)\n", "launcher from the host", l * 1000, l / b
    printf "%-30s %9.2f ms\n", "nested 1 deep", d1 * 1000
    printf "%-30s %9.2f ms\n", "nested 2 deep", d2 * 1000
    printf "%-30s %9.2f ms\n", "nested 4 deep", d4 * 1000
    printf "%-30s %9.2f ms\n", "nested 8 deep", d8 * 1000
    hop1 = d1; hop8 = (d8 - d4) / 4
    printf "one hop at depth 1: %.2f ms; one hop at depths 5-8: %.2f ms; ratio %.2fx (target < 2x)\n", hop1 * 1000, hop8 * 1000, hop8 / hop1
}'
