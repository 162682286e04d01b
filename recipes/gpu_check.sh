#!/usr/bin/env bash
# The GPU check, one command that fits a 15-minute device lease (about 9 minutes on one H100/H200):
#   bash recipes/gpu_check.sh [OUT]          (default OUT: runs/gpu_check)
# 1. the suite on CUDA, slow-marked tests left out;
# 2. one TRPO and one PPO update on the same batch (recipes/configs/benchmark.yaml): their ratio;
# 3. whole steps of TRPO, our PPO and TRL's PPO (recipes/configs/benchmark_whole_step.yaml);
# 4. the Llama-3-8B-shaped bfloat16 update (recipes/configs/benchmark_8b.yaml): time and peak memory;
# 5. a short exact-task comparison: TRPO at its defaults and our PPO at 1e-3, 3 seeds of 30 steps.
# Each part runs under its own time limit and writes OUT/<part>.log (and its results); a part that
# fails or runs out of time is recorded and the next one runs. OUT/summary.json holds each part's
# exit status and seconds. GPU_CHECK_TINY=1 runs every part at toy sizes on any machine (the test
# suite runs it so on the CPU). PYTHON picks the interpreter (default python3).
set -u
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python3}
TINY=${GPU_CHECK_TINY:-0}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
SUMMARY="$OUT/summary.tsv"
: >"$SUMMARY"

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$SUMMARY"
  echo "$name: exit $status in $((SECONDS - start)) s (log: $OUT/$name.log)"
}

if [ "$TINY" = 1 ]; then
  part suite 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_advantages.py
  part update 300 "$PY" recipes/benchmark.py --model tiny --batch_size 4 --max_new_tokens 4 --repeats 1 \
    --output "$OUT/update.jsonl"
  part whole_step 300 "$PY" recipes/benchmark.py --model tiny --whole_step --steps 1 --rounds 1 \
    --algorithms trpo ppo --batch_size 4 --max_new_tokens 4 --output "$OUT/whole_step.jsonl"
  part memory_8b 300 "$PY" recipes/benchmark.py --model tiny --model_dtype bfloat16 --batch_size 4 \
    --max_new_tokens 4 --repeats 1 --output "$OUT/memory_8b.jsonl"
  part exact 300 "$PY" recipes/compare_trpo_ppo.py --task exact --steps 2 --seeds 1 --batch_size 4 --parallel 2 \
    --algorithms trpo ppo --output_dir "$OUT/exact"
else
  part suite 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -x
  part update 60 "$PY" recipes/benchmark.py --config recipes/configs/benchmark.yaml --output "$OUT/update.jsonl"
  part whole_step 90 "$PY" recipes/benchmark.py --config recipes/configs/benchmark_whole_step.yaml \
    --output "$OUT/whole_step.jsonl"
  part memory_8b 120 "$PY" recipes/benchmark.py --config recipes/configs/benchmark_8b.yaml \
    --output "$OUT/memory_8b.jsonl"
  part exact 90 "$PY" recipes/compare_trpo_ppo.py --task exact --steps 30 --seeds 3 --batch_size 32 \
    --algorithms trpo ppo --learning_rate 1e-3 --parallel 6 --output_dir "$OUT/exact"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {}
for line in (out / "summary.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    parts[name] = {"exit": int(status), "seconds": int(seconds)}
try:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except Exception as error:  # the summary is written whatever the environment lacks
    device = f"unknown ({error})"
(out / "summary.json").write_text(json.dumps({"device": device, "parts": parts}, indent=2) + "\n")
print(f"{out / 'summary.json'}: " + ", ".join(f"{k} {v['exit']}" for k, v in parts.items()))
EOF
