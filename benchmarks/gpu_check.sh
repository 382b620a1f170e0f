#!/usr/bin/env bash
# Every GPU figure the project claims, in one command of at most 8 minutes on one H100 / H200:
#   1. inference, SD 1.5 shapes at 512 px, fp16: batch 1 and 16, diffusers eager / compiled against
#      latentdiff default / fast (benchmarks/inference.py, interleaved), with peak memory and MFU;
#   2. training images/s and peak memory, SD 1.5 shapes at 512 px (benchmarks/training.py);
#   3. a 1-GPU FSDP smoke run of the trainer (training/accelerate/fsdp.yaml, tiny preset).
# Writes $OUT/gpu_check.json (everything) and $OUT/gpu_check.md (the table for benchmarks/RESULTS.md);
# OUT defaults to benchmarks/results. Each step has its own time limit, so a slow step costs its
# figure, not the others. Where diffusers / datasets are missing (the device machine), install the
# wheels first (see /work/.library/device/README.md): the script takes them from .whl/ if present.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  || { echo "gpu_check: no CUDA device here; nothing measured" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the exit status
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "{\"step\": \"$name\", \"status\": $status, \"seconds\": $((SECONDS - start))}" > "$OUT/$name.status.json"
  tail -n 25 "$OUT/$name.log"
}

step inference 270 python3 benchmarks/inference.py --preset sd15 --device cuda --dtype float16 --steps 30 \
  --batch 16 --runs 5 --warmup 1 --unet-runs 20 --json "$OUT/inference.json"
step training 120 python3 benchmarks/training.py --preset sd15 --size 512 --batch 16 --steps 10 --warmup 3 \
  --json "$OUT/training.json"

fsdp_data=$(mktemp -d)
python3 - "$fsdp_data" <<'PY'
import sys
from PIL import Image
folder = sys.argv[1]
for i in range(8):  # eight captioned squares: enough for a few FSDP steps
    Image.new("RGB", (64, 64), (30 * i, 100, 200 - 20 * i)).save(f"{folder}/{i}.png")
    open(f"{folder}/{i}.txt", "w").write(f"a square of shade {i}")
PY
step fsdp 90 accelerate launch --config_file training/accelerate/fsdp.yaml --num_processes 1 \
  training/train.py --config training/configs/tiny-test.toml --set "data.path=\"$fsdp_data\"" \
  --set "train.output_dir=\"$OUT/fsdp-run\"" --set train.max_steps=4 --set checkpoint.every=2 \
  --set 'train.mixed_precision="bf16"'

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
report = {
    "gpu": (out / "gpu.txt").read_text().strip(),
    "steps": {p.name.split(".")[0]: json.loads(p.read_text()) for p in sorted(out.glob("*.status.json"))},
    "inference": load("inference.json"),
    "training": load("training.json"),
    "fsdp_model_written": (out / "fsdp-run" / "model" / "model_index.json").is_file(),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
lines = [f"GPU: {report['gpu']}", "", "| figure | value |", "|---|---|"]
inf = report["inference"]
if inf:
    for name, row in inf["results"].items():
        mem = f", peak {row['peak_memory_gb']:.2f} GB" if row.get("peak_memory_gb") is not None else ""
        mfu = f", MFU {100 * row['mfu']:.0f} %" if row.get("mfu") is not None else ""
        lines.append(f"| {name}, 512 px, {inf['args']['steps']} steps | batch 1 {row['median_s']:.3f} s; "
                     f"batch {inf['args']['batch']} {row['batch_images_per_s']:.2f} images/s{mem}{mfu} |")
    lines.append(f"| PSNR fast vs diffusers eager | {inf['psnr_fast_vs_diffusers_eager_db']:.1f} dB |")
else:
    lines.append("| inference | not measured (see inference.log) |")
tr = report["training"]
if tr:
    for name, row in tr.get("results", {}).items():
        lines.append(f"| training: {name} | {json.dumps(row)} |")
else:
    lines.append("| training | not measured (see training.log) |")
lines.append(f"| FSDP smoke run (1 GPU, tiny) | {'model written' if report['fsdp_model_written'] else 'FAILED: see fsdp.log'} |")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
