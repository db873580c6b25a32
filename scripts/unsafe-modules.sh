#!/usr/bin/env bash
# Lists every place that may hold `unsafe` code (CONTRIBUTING.md, "`unsafe` code"):
#
#   1. crate roots (src/lib.rs, src/main.rs, src/bin/*.rs of crates/* and
#      fuzz/) without `#![forbid(unsafe_code)]`: the crates allowed unsafe
#      code at all, with the lint level they set instead;
#   2. every module, item or file marked `#[allow(unsafe_code)]`,
#      `#![allow(unsafe_code)]` (or `expect`): in a crate that denies unsafe
#      code, the modules allowed it;
#   3. every .rs file (sources, tests, benches, fuzz targets) with an
#      `unsafe` block, fn, impl or trait, or an `extern` block of FFI
#      declarations, grouped by crate, with counts.
#
# Usage: scripts/unsafe-modules.sh   (from anywhere; reads the tree, builds nothing)
# Comments are skipped (a `// SAFETY:` line or a doc comment that says
# "unsafe" is not counted); string literals are not, which is good enough
# for this tree.
set -euo pipefail
cd "$(dirname "$0")/.."

rs_files() {  # the .rs files under the given dirs that exist, build output left out
    local d dirs=()
    for d in "$@"; do [[ -d $d ]] && dirs+=("$d"); done
    ((${#dirs[@]})) || return 0
    find "${dirs[@]}" -name target -prune -o -name '*.rs' -type f -print | LC_ALL=C sort
}
crate_dirs() { for d in crates/*/ fuzz/; do [[ -f $d/Cargo.toml ]] && echo "${d%/}"; done; }
crate_of() {  # the crate directory a file belongs to
    local f=$1 d
    for d in $(crate_dirs); do [[ $f == "$d"/* ]] && { echo "$d"; return; }; done
    echo "(no crate)"
}

echo "== crate roots without #![forbid(unsafe_code)]"
n=0
for d in $(crate_dirs); do
    for root in "$d"/src/lib.rs "$d"/src/main.rs "$d"/src/bin/*.rs; do
        [[ -f $root ]] || continue
        grep -Eq '^[[:space:]]*#!\[forbid\([^]]*unsafe_code' "$root" && continue
        level=$(grep -Eo '^[[:space:]]*#!\[(deny|warn|allow)\([^]]*unsafe_code' "$root" | grep -Eo 'deny|warn|allow' | head -n1 || true)
        if [[ -n $level ]]; then level="#![$level(unsafe_code)]"; else level="no unsafe_code lint: unsafe allowed everywhere"; fi
        printf '  %s  (%s)\n' "$root" "$level"
        n=$((n + 1))
    done
done
((n)) || echo "  (none)"

echo "== modules and items marked allow(unsafe_code)"
while IFS= read -r f; do
    # prints FILE:LINE: the attribute and the item it applies to (the next
    # line that is not an attribute or a comment)
    perl -ne '
        if (/^\s*#!\[(allow|expect)\([^]]*\bunsafe_code\b/) { print "  $ARGV:$.: the whole file (#![$1(unsafe_code)])\n"; next }
        if (/^\s*#\[(allow|expect)\([^]]*\bunsafe_code\b/) { $pending = "$ARGV:$."; next }
        if (defined $pending && !/^\s*(#\[|\/\/)/) { s/^\s+|\s+$//g; print "  $pending: $_\n"; undef $pending }
    ' "$f"
done < <(rs_files crates fuzz) | { grep . || echo "  (none)"; }

echo "== files with unsafe code, by crate (blocks, fns, impls, traits, extern blocks)"
declare -A BYCRATE=()
while IFS= read -r f; do
    counts=$(perl -ne '
        s{//.*$}{};   # comments, doc comments and SAFETY lines
        $b += () = /\bunsafe\s*\{/g;
        $f += () = /\bunsafe\s+(?:extern\s+"[^"]*"\s+)?fn\b/g;
        $i += () = /\bunsafe\s+impl\b/g;
        $t += () = /\bunsafe\s+trait\b/g;
        $e += () = /\b(?:unsafe\s+)?extern\s+(?:"[^"]*"\s*)?\{/g;   # FFI declarations
        END {
            my @p;
            push @p, "$b block" . ($b == 1 ? "" : "s") if $b;
            push @p, "$f fn" . ($f == 1 ? "" : "s") if $f;
            push @p, "$i impl" . ($i == 1 ? "" : "s") if $i;
            push @p, "$t trait" . ($t == 1 ? "" : "s") if $t;
            push @p, "$e extern block" . ($e == 1 ? "" : "s") if $e;
            print join(", ", @p);
        }' "$f")
    [[ -n $counts ]] || continue
    c=$(crate_of "$f")
    BYCRATE[$c]+="    $f: $counts"$'\n'
done < <(rs_files crates fuzz)
if ((${#BYCRATE[@]} == 0)); then
    echo "  (none)"
else
    for c in $(printf '%s\n' "${!BYCRATE[@]}" | LC_ALL=C sort); do
        echo "  $c"
        printf '%s' "${BYCRATE[$c]}"
    done
fi
