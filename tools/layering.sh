#!/usr/bin/env bash
# No import runs upward: checks every `crate::MODULE` path in src/ (outside tests) against the
# layering below, lowest first. A module may use any module below it, never one above it.
#
#   text < diag < progress < sys < userns < names < oci < store < registry < source < export
#        < sandbox < launcher < manifest < build < commands < cli < main
#
# - text: text for people; diag, progress: stderr; sys: syscalls (the only unsafe code);
#   userns: the host user's ids and one-level user namespaces (under both the store, which
#   removes what runs wrote, and the sandbox); names: names users write (env names, host shares);
#   oci: the image-spec types, read and written.
# - store: on-disk state; registry, source, export: moving layers in and out of it.
# - sandbox: launch policy and executors; launcher: composing launchers.
# - manifest: `plyroot.toml` parsed and checked against the sources and binds it names.
# - build: a manifest's steps, built into layers through the sandbox.
# - commands: glue; cli: clap types; main: dispatch.
#
# Files that are test code (tests.rs, testutil.rs, and `#[cfg(test)] mod tests` at the end of a
# file) may use anything. Known violations are listed in KNOWN with why; the check fails on any
# other, and on a KNOWN entry that no longer occurs (so the list only shrinks).
#
# Usage: tools/layering.sh [SRC_DIR]   (exit 0: no new upward import; 1: there are)
set -euo pipefail

src="${1:-$(dirname "${BASH_SOURCE[0]}")/../src}"
order=(text diag progress sys userns names oci store registry source export sandbox launcher manifest build commands cli main)

# "FILE -> MODULE": upward imports another change is removing.
KNOWN=(
)

declare -A rank
for i in "${!order[@]}"; do rank[${order[$i]}]=$i; done

found=()
while IFS= read -r file; do
    rel="${file#"$src"/}"
    case "$rel" in */tests.rs | */testutil.rs) continue ;; esac
    mod="${rel%%/*}"
    mod="${mod%.rs}"
    [ -n "${rank[$mod]+x}" ] || { echo "layering: $rel: module '$mod' is not in the layering (add it to tools/layering.sh)" >&2; exit 1; }
    # The file up to its test module, without comments.
    used=$(awk '/^#\[cfg\(test\)\]/ { getline nx; if (nx ~ /^mod tests/) exit; print nx; next } { print }' "$file" |
        sed -e 's://.*$::' | grep -o 'crate::[a-z_][a-z_0-9]*' | sed 's/^crate:://' | sort -u || true)
    for dep in $used; do
        [ "$dep" = "$mod" ] && continue
        [ -n "${rank[$dep]+x}" ] || { echo "layering: $rel uses crate::$dep, which is not in the layering" >&2; exit 1; }
        if [ "${rank[$dep]}" -gt "${rank[$mod]}" ]; then
            found+=("$rel -> $dep")
        fi
    done
done < <(find "$src" -name '*.rs' | sort)

status=0
for f in "${found[@]+"${found[@]}"}"; do
    known=no
    for k in "${KNOWN[@]}"; do [ "$k" = "$f" ] && known=yes; done
    if [ $known = yes ]; then
        echo "layering: known, being removed: $f"
    else
        echo "layering: UPWARD IMPORT: $f (${order[*]})" >&2
        status=1
    fi
done
for k in "${KNOWN[@]}"; do
    gone=yes
    for f in "${found[@]+"${found[@]}"}"; do [ "$k" = "$f" ] && gone=no; done
    if [ $gone = yes ]; then
        echo "layering: '$k' is gone: remove it from KNOWN in tools/layering.sh" >&2
        status=1
    fi
done
[ $status = 0 ] && echo "layering: no new upward import (${#found[@]} known)"
exit $status
