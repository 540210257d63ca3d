#!/usr/bin/env bash
# The wheelhouse the images install from (`pip install --no-index`): the fedmm wheel and every
# wheel it needs, for one Python. Made once on a machine with PyPI; copy docker/wheelhouse/ to
# an air-gapped site and the images build there without any network.
#
#   docker/wheelhouse.sh                     # Python of `python3` (3.11: python:3.11-slim and
#   PYTHON=python3.12 docker/wheelhouse.sh   #   Debian bookworm bases; 3.12: Ubuntu 24.04)
#
# Layout (docker/wheelhouse/, git-ignored):
#   fedmm/fedmm-*.whl                the project (rebuilt on every call)
#   deps/cpXY/*.whl                  third-party wheels, kept and reused by later calls
#   deps/cpXY/requirements.txt       the exact versions the fedmm wheel resolves to
# The images install deps/ and fedmm/ in separate layers: a code change rebuilds only the last.
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${WHEELHOUSE:-$ROOT/docker/wheelhouse}
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
deps=$OUT/deps/$tag
mkdir -p "$OUT/fedmm" "$deps"

echo "[wheelhouse] fedmm wheel -> $OUT/fedmm"
rm -f "$OUT"/fedmm/fedmm-*.whl
src=$(mktemp -d)  # the files git tracks or would track, so no stale build/ reaches the wheel
trap 'rm -rf "$src"' EXIT
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | tar -c -C "$ROOT" --null -T - --ignore-failed-read 2>/dev/null | tar -x -C "$src"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT/fedmm" "$src"
wheel=$(ls "$OUT"/fedmm/fedmm-*.whl)

# Dependencies come from pyproject.toml alone: while it is unchanged, keep the resolved set.
stamp=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [[ -s $deps/requirements.txt && $(cat "$deps/.pyproject.sha256" 2>/dev/null) == "$stamp" ]]; then
    echo "[wheelhouse] dependencies ($tag): unchanged since pyproject.toml last changed"
    exit 0
fi
echo "[wheelhouse] dependencies ($tag) -> $deps"
"$PYTHON" -m pip wheel --quiet --find-links "$deps" --wheel-dir "$deps" "$wheel"
rm -f "$deps"/fedmm-*.whl

# Pin what resolves from the wheelhouse alone (what an offline build will install).
report=$src/report.json
"$PYTHON" -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$deps" \
    --report "$report" "$wheel"
"$PYTHON" - "$report" >"$deps/requirements.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if meta["name"] != "fedmm":
        print(f"{meta['name']}=={meta['version']}")
EOF
echo "$stamp" >"$deps/.pyproject.sha256"
torch=$(grep -i '^torch==' "$deps/requirements.txt")
echo "[wheelhouse] $(wc -l <"$deps/requirements.txt") pinned wheels ($torch), $(du -sh "$OUT" | cut -f1)"
