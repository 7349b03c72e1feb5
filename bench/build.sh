#!/usr/bin/env bash
# Build steps (manifest `run`), in one hyperfine run per user:
#
#   apply-cached   plyroot apply of a 10-step manifest whose steps are all built (nothing runs,
#                  no generation is made): target < 100 ms (median)
#   step           plyroot build --no-cache of a 1-step manifest (the step runs, its upper becomes
#                  a layer, the step is recorded)
#   by-hand        the same work by hand: plyroot run --root ENV -- sh -c STEP, then plyroot commit
#                  ENV (from a fresh environment each time, made outside the timing)
#
# and prints, per user (root; as root also plyci-sub, with subordinate ids, and plyci-nosub,
# without: see BENCH_USERS in lib.sh), the medians and the step's ratio to by-hand.
# Target: step <= 1.2x by-hand (median) for every user.
#
#   bench/build.sh
# Env: RUNS (default 30), WARMUP (default 3), BENCH_USERS. Needs hyperfine, busybox-static, and
# runuser (util-linux) to measure as other users.
set -euo pipefail

# --measure WORK ROOT: one user's measurement (run through as_user); prints "name median mean".
if [ "${1:-}" = --measure ]; then
    work=$2 root=$3
    . "$work/bin/lib.sh"
    plyroot=$work/bin/plyroot
    export PLYROOT_HOME="$HOME/store"
    mkdir -p "$HOME/ten" "$HOME/one"
    {
        printf '[env.ten]\nfrom = ["dir:%s"]\nrun = [\n' "$root"
        for i in $(seq 1 10); do printf '  "echo %s > /step-%s",\n' "$i" "$i"; done
        printf ']\n'
    } >"$HOME/ten/plyroot.toml"
    printf '[env.one]\nfrom = ["dir:%s"]\nrun = ["echo built > /step"]\n' "$root" >"$HOME/one/plyroot.toml"
    "$plyroot" -q apply -f "$HOME/ten/plyroot.toml"
    "$plyroot" -q build -f "$HOME/one/plyroot.toml"
    base=$("$plyroot" -q import "dir:$root")
    "$plyroot" -q create byhand --from "layer:$base"
    cd "$HOME"
    # One --prepare per command, in order: only by-hand needs a fresh environment.
    hyperfine -N --warmup "${WARMUP:-3}" --runs "${RUNS:-30}" --export-csv "$HOME/build.csv" \
        --prepare true --prepare true \
        --prepare "sh -c '$plyroot -q rm byhand && $plyroot -q create byhand --from layer:$base'" \
        -n apply-cached "$plyroot -q apply -f $HOME/ten/plyroot.toml" \
        -n step "$plyroot -q build --no-cache -f $HOME/one/plyroot.toml" \
        -n by-hand "sh -c '$plyroot -q run --root byhand -- sh -c \"echo built > /step\" && $plyroot -q commit byhand >/dev/null'" >&2
    medians "$HOME/build.csv"
    exit 0
fi

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine busybox-static util-linux" hyperfine busybox runuser awk

build_plyroot
make_work
share_tools

root="$work/root"
busybox_root "$root"
chmod -R a+rX "$root"

results=()
for u in $(bench_users); do
    echo "==> as $u" >&2
    if out=$(as_user "$u" bash "$work/bin/build.sh" --measure "$work" "$root"); then
        results+=("$u $(awk '$1 == "apply-cached" { a = $2 } $1 == "step" { s = $2 } $1 == "by-hand" { h = $2 } END { print a, s, h }' <<<"$out")")
    else
        echo "bench/build.sh: the measurement as $u failed" >&2
        results+=("$u failed")
    fi
done

echo
printf '%-12s %16s %12s %12s %10s\n' user apply-cached step by-hand step/hand
for r in "${results[@]}"; do
    read -r u a s h <<<"$r"
    if [ "$a" = failed ]; then
        printf '%-12s %s\n' "$u" "measurement failed"
        continue
    fi
    awk -v u="$u" -v a="$a" -v s="$s" -v h="$h" 'BEGIN { printf "%-12s %13.1f ms %9.1f ms %9.1f ms %9.2fx\n", u, a * 1000, s * 1000, h * 1000, s / h }'
done
echo "targets: apply-cached < 100 ms; step <= 1.2x by-hand"
