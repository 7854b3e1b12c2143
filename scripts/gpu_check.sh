#!/usr/bin/env bash
# One command for a GPU machine (<= 8 minutes on one H100/H200): the figures README "Measured" quotes, in one JSON.
#
#     scripts/gpu_check.sh                 # writes runs/gpu_check/gpu_check.json (+ one JSON and log per part)
#     scripts/gpu_check.sh /tmp/out        # another output folder
#     DRY_RUN=1 scripts/gpu_check.sh       # CPU: the same scripts at mid shape and a few steps (checks the wiring)
#
# Parts (each under its own time limit; a part that fails is recorded and the rest still run):
#   steps      7B-shaped stage 1/2/3 bf16 steps through deepspeed.initialize (dev/bench/bench_gpu_steps.py):
#              tokens/s, samples/s, MFU (4N), peak memory per GPU
#   equality   with 2+ GPUs: the stage-2 steps on 2 ranks (deepspeed --num_gpus 2) leave bit-identical weights
#   imagebind  ImageBind-huge features/s per modality, random weights (dev/bench/bench_encoder.py)
#   clip       CLIP ViT-L/14 text-encoder caption embeddings/s through process_embeddings (bench_embeddings.py)
# Nothing is downloaded: every model is built at its real shape with random weights.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
mkdir -p "$OUT"
START=$(date +%s)
declare -A STATUS

part() {   # part NAME SECONDS command...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=INT "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    STATUS[$name]=$rc
    echo "=== $name: exit $rc after $(( $(date +%s) - START ))s in total"
}

if [ -n "${DRY_RUN:-}" ]; then
    DEVICE=(--device cpu --shape mid --batch-size 2 --warmup 1 --steps 2)
    ENCODER=(--device cpu --preset tiny --count 2 --skip-memory)
    CLIP=(--device cpu --quick)
    GPUS=0
else
    DEVICE=(--device cuda --shape 7b --batch-size 8 --warmup 3 --steps 10)
    ENCODER=(--device cuda --preset huge --count 8 --skip-memory)
    CLIP=(--device cuda --encoder clip-l --count 2048 --batch-size 128)
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$GPUS" -lt 1 ]; then echo "error: no CUDA device (DRY_RUN=1 runs the CPU wiring check)" >&2; exit 2; fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
fi

part steps 240 "$PY" dev/bench/bench_gpu_steps.py "${DEVICE[@]}" --json "$OUT/steps.json"
if [ "$GPUS" -ge 2 ]; then
    part equality 90 "$PY" -m deepspeed.launcher.runner --num_gpus 2 dev/bench/bench_gpu_steps.py "${DEVICE[@]}" \
        --stages 2 --steps 3 --equality --json "$OUT/equality.json"
fi
part imagebind 60 "$PY" dev/bench/bench_encoder.py "${ENCODER[@]}" --json "$OUT/imagebind.json"
part clip 90 "$PY" dev/bench/bench_embeddings.py "${CLIP[@]}" --json "$OUT/clip.json"

# One JSON: every part's own JSON (or its exit code and the tail of its log).
STATUS_LINE=""
for name in "${!STATUS[@]}"; do STATUS_LINE+="$name=${STATUS[$name]} "; done
"$PY" - "$OUT" "$(( $(date +%s) - START ))" "$STATUS_LINE" <<'EOF'
import json, sys
from pathlib import Path

out, seconds, status = Path(sys.argv[1]), int(sys.argv[2]), dict(s.split("=") for s in sys.argv[3].split())
result = {"seconds": seconds, "dry_run": (out / "nvidia-smi.csv").exists() is False, "parts": {}}
if (out / "nvidia-smi.csv").exists():
    result["nvidia_smi"] = (out / "nvidia-smi.csv").read_text()
for name, rc in status.items():
    path = out / f"{name}.json"
    entry = {"exit": int(rc)}
    if int(rc) == 0 and path.is_file():
        entry["result"] = json.loads(path.read_text())
    else:
        entry["log_tail"] = (out / f"{name}.log").read_text()[-2000:]
    result["parts"][name] = entry
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'} ({seconds} s; " + ", ".join(f"{k} exit {v}" for k, v in status.items()) + ")")
sys.exit(0 if all(int(v) == 0 for v in status.values()) else 1)
EOF
