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

# Sets $work to a fresh scratch dir, removed on exit (stores hold read-only dirs: chmod first).
make_work() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/plyroot-bench.XXXXXX")
    cleanup() { chmod -R u+rwX "$work" 2>/dev/null; rm -rf "$work"; }
    trap cleanup EXIT
}
