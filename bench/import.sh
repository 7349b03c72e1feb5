#!/usr/bin/env bash
# Import throughput: `plyroot import tar:X.tar.zst` against the floor of doing the least the same
# job needs — decompress, unpack into a directory, and hash every file:
#
#   floor      zstd -dc X | tar -x -C DIR && find DIR -type f -print0 | xargs -0 sha256sum >/dev/null
#   plyroot    plyroot import tar:X            (into an empty store each time)
#
# in one hyperfine run (a --prepare step empties the store and the directory before every run),
# then prints the ratio (the issue's target: <= 1.5x the floor) and plyroot's peak memory
# (/usr/bin/time -v, target < 64 MiB).
#
#   bench/import.sh [TARBALL]   default: /var/tmp/plyroot-debian.tar.zst, made with
#                               `mmdebstrap --variant=minbase bookworm` when missing
# Env: RUNS (default 5). Needs hyperfine, zstd, tar, GNU time (apt-get install time).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need "hyperfine zstd" hyperfine zstd tar sha256sum
[ -x /usr/bin/time ] || { echo "bench/import.sh: needs GNU time (apt-get install time)" >&2; exit 1; }

tarball=${1:-/var/tmp/plyroot-debian.tar.zst}
if [ ! -f "$tarball" ]; then
    command -v mmdebstrap >/dev/null || { echo "bench/import.sh: no $tarball and no mmdebstrap to make it" >&2; exit 1; }
    echo "==> mmdebstrap --variant=minbase bookworm $tarball (a few minutes)" >&2
    mmdebstrap --variant=minbase bookworm "$tarball"
fi
tarball=$(cd "$(dirname "$tarball")" && pwd)/$(basename "$tarball")

build_plyroot
make_work
store="$work/store"
floor="$work/floor"
# As an unprivileged user tar cannot make the tarball's device nodes or chown; plyroot skips and
# records those too, so the floor is told to skip them the same way.
untar="tar -x --no-same-owner --exclude=./dev/*"
[ "$(id -u)" = 0 ] && untar="tar -x"

printf '==> %s: %s compressed, %s unpacked\n' "$(basename "$tarball")" \
    "$(du -h "$tarball" | cut -f1)" "$(zstd -dc "$tarball" | wc -c | numfmt --to=iec)" >&2

csv="$work/import.csv"
hyperfine --runs "${RUNS:-5}" --warmup 1 --export-csv "$csv" \
    --prepare "chmod -R u+rwX $work/store $floor 2>/dev/null; rm -rf $store $floor; mkdir -p $floor" \
    -n floor "zstd -dc $tarball | $untar -C $floor && find $floor -type f -print0 | xargs -0 sha256sum >/dev/null" \
    -n "plyroot import" "PLYROOT_HOME=$store $plyroot -q import tar:$tarball >/dev/null"

chmod -R u+rwX "$store" 2>/dev/null || true
rm -rf "$store"
rss=$(PLYROOT_HOME=$store /usr/bin/time -v "$plyroot" -q import "tar:$tarball" 2>&1 >/dev/null |
    awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }')

echo
echo "import: mean per import, and the ratio to the floor (plyroot target: <= 1.50)"
awk -F, 'NR > 1 { name[NR] = $1; mean[NR] = $2; if ($1 == "floor") f = $2 }
    END {
        for (i = 2; i <= NR; i++) printf "  %-16s %8.3f s %8.2fx\n", name[i], mean[i], mean[i] / f
    }' "$csv"
printf '  plyroot peak memory (max RSS): %.1f MiB (target < 64 MiB)\n' "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')"
