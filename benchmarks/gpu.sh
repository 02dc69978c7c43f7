#!/usr/bin/env bash
# Issue 13, point 6: the real peak memory (device memory_stats) of galorax train's step next to
# XLA's analysis, and tokens/s, for 1b and the 7b per-layer configuration. One process per
# configuration (each starts with an empty device, so each peak is its own). Budget: 8 minutes.
# Usage (on the GPU machine, from the repository root): benchmarks/gpu.sh [OUT.jsonl]
set -uo pipefail
out=${1:-benchmarks/results/gpu.jsonl}
mkdir -p "$(dirname "$out")"
py=${PYTHON:-python}
if ! $py -c "import jax; assert jax.devices()[0].platform != 'cpu'" 2>/dev/null; then
  echo "no accelerator: smoke run on micro" >&2
  exec $py benchmarks/gpu_step.py --config micro:galore+pl --steps 2 --vocab-size 256
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# Within 8 minutes: 80 s for each 1b run, 150 s for the 7b one (4 x 80 + 150 = 470 s).
for spec in 1b:optax.adamw 1b:adamw 1b:galore8bit 1b:galore8bit+pl 7b:galore8bit+pl+int8P; do
  limit=80
  [[ $spec == 7b:* ]] && limit=150
  timeout $limit $py benchmarks/gpu_step.py --config "$spec" --steps 5 | tee -a "$out" \
    || echo "{\"config\": \"$spec\", \"error\": \"failed or over $limit s\"}" | tee -a "$out"
done
