#!/usr/bin/env bash
# plyroot's one test command, for developers and CI alike.
#
#   tests/run.sh [TEST-HARNESS ARGS...]      e.g.  tests/run.sh identity    (a name filter)
#
# 1. builds plyroot and every test target (cargo build; cargo test --no-run);
# 2. runs `cargo test` (unit tiers in src/ and the integration tests in tests/) as the current user;
# 3. when run as root, runs the integration test binaries again as each CI test user that exists
#    (default `plyci-sub`, with /etc/subuid ranges, and `plyci-nosub`, without), from a
#    world-readable copy, with a HOME and TMPDIR that user owns.
#
# Environment:
#   PLYROOT_TEST_REQUIRE_NS=1   a test that would skip (no user namespaces, a missing tool) fails
#   PLYROOT_TEST_USERS="a b"    the unprivileged users for step 3 (default "plyci-sub plyci-nosub")
#   PLYROOT_TEST_KEEP=1         keep step 3's temp dir (binaries, homes, stores) for debugging
#
# Exits non-zero when anything failed; the summary at the end says what.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'tests/run.sh: %s\n' "$*" >&2; exit 1; }
failed=()

# The executables a cargo JSON message stream names, filtered by a grep pattern on the line.
executables() { grep -e "$1" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4; }

say "cargo build"
build_json=$(cargo build --message-format=json-render-diagnostics) || die "cargo build failed"
bin=$(printf '%s\n' "$build_json" | executables '"name":"plyroot"' | head -n1)
[ -x "$bin" ] || die "cargo build did not report the plyroot binary"

say "cargo test --no-run"
tests_json=$(cargo test --no-run --message-format=json-render-diagnostics) || die "building the tests failed"
mapfile -t test_bins < <(printf '%s\n' "$tests_json" | executables '"kind":\["test"\]')
((${#test_bins[@]})) || die "cargo test --no-run reported no integration test binaries"

say "plyroot doctor (as $(id -un))"
"$bin" doctor || true

say "cargo test (as $(id -un), uid $(id -u))"
cargo test --no-fail-fast -- "$@" || failed+=("cargo test as $(id -un)")

# --- step 3: the integration tests again, as each unprivileged CI user ---------------------------
users=()
if [ "$(id -u)" = 0 ]; then
    for u in ${PLYROOT_TEST_USERS-plyci-sub plyci-nosub}; do
        if id -u "$u" >/dev/null 2>&1; then users+=("$u"); else say "no user $u: skipping its run"; fi
    done
fi

if ((${#users[@]})); then
    # /root and the checkout may be unreadable to these users: copy what they run.
    work=$(mktemp -d /tmp/plyroot-tests.XXXXXX) || die "mktemp failed"
    chmod 755 "$work"
    if [ "${PLYROOT_TEST_KEEP:-}" = 1 ]; then
        say "keeping $work"
    else
        trap 'rm -rf "$work"' EXIT
    fi
    mkdir -m 755 "$work/bin"
    install -m 755 "$bin" "$work/bin/plyroot"
    names=()
    for t in "${test_bins[@]}"; do
        name=$(basename "$t")
        name=${name%-*} # drop cargo's hash
        install -m 755 "$t" "$work/bin/test-$name"
        names+=("$name")
    done
    for u in "${users[@]}"; do
        g=$(id -gn "$u")
        home="$work/home-$u"
        tmp="$work/tmp-$u"
        install -d -m 700 -o "$u" -g "$g" "$home" "$tmp"
        sub="none"
        grep -q "^$u:" /etc/subuid 2>/dev/null && sub=$(grep "^$u:" /etc/subuid | head -n1 | cut -d: -f2-)
        as_user=(runuser -u "$u" -- env -i
            PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin
            HOME="$home" USER="$u" LOGNAME="$u" TMPDIR="$tmp" LANG=C.UTF-8
            PLYROOT_BIN="$work/bin/plyroot"
            PLYROOT_TEST_REQUIRE_NS="${PLYROOT_TEST_REQUIRE_NS:-}"
            RUST_BACKTRACE=1)
        say "plyroot doctor (as $u, subuid range: $sub)"
        (cd "$work" && "${as_user[@]}" "$work/bin/plyroot" doctor) || true
        for name in "${names[@]}"; do
            say "tests/$name.rs as $u (uid $(id -u "$u"), subuid range: $sub)"
            (cd "$work" && "${as_user[@]}" "$work/bin/test-$name" "$@") || failed+=("tests/$name.rs as $u")
        done
    done
fi

echo
if ((${#failed[@]})); then
    printf 'tests/run.sh: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
ran="as $(id -un)"
((${#users[@]})) && ran+=" and as ${users[*]}"
echo "tests/run.sh: all tests passed ($ran)"
