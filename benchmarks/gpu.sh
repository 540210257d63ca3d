#!/usr/bin/env bash
# The default federation on a CUDA GPU with bf16 autocast: site-round time, peak GPU memory and
# throughput, one JSON line each (sized to finish in under 5 minutes on one GPU).
#
#     benchmarks/gpu.sh [hydra overrides]        # e.g. simulation.client_num_gpus=0.25
#
# Where no CUDA GPU exists it prints why and exits 0 (nothing is measured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo '{"figure": "gpu", "skipped": "no CUDA GPU here (torch.cuda.is_available() is False)"}'
  echo "benchmarks/gpu.sh: no CUDA GPU on this machine; skipped" >&2
  exit 0
fi
out=runs/bench-gpu-$(date +%Y%m%d-%H%M%S)
mem=$(mktemp)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" &
smi=$!
trap 'kill $smi 2>/dev/null || true; rm -f "$mem"' EXIT
start=$(date +%s)
# 2 sites share the GPU at once (0.5 each); device=cuda trains and evaluates under bf16 autocast
"$PY" -m simulations.run device=cuda simulation.client_num_gpus=0.5 output_dir="$out" "$@" >/dev/null
wall=$(( $(date +%s) - start ))
kill $smi 2>/dev/null || true
"$PY" - "$out" "$mem" "$wall" <<'PYEOF'
import json, sys
out, mem, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
summary = json.load(open(f"{out}/summary.json"))
used = [int(x) for x in open(mem).read().split() if x.strip().isdigit()]
rounds_s = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]  # rounds 1..R, start-up excluded
rows = rows[1:]
updates = sum(r["replied"] for r in rows)
train = [r["site_train_s"] for r in rows if r.get("site_train_s") is not None]
print(json.dumps({"figure": "gpu site-round", "site_train_s_first": train[0] if train else None,
                  "site_train_s_steady": sum(train[1:]) / max(len(train) - 1, 1)}))
print(json.dumps({"figure": "gpu peak memory", "peak_gpu_memory_mib": max(used, default=None)}))
print(json.dumps({"figure": "gpu throughput", "wall_s": wall, "rounds_s": rounds_s,
                  "site_updates_per_minute": round(60 * updates / rounds_s, 1),
                  "test_accuracy": summary["test_accuracy"]}))
PYEOF
