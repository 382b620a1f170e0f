"""How batch throughput grows with Ray workers: ``latentdiff batch --engine ray`` with 1, 2, ...
workers on the same prompts (fresh folders), each a command of its own, as a user runs it.

Reports, per worker count: the command's wall time (Ray's start, the model loads, the images,
the merge) and images/s in the steady state, from when a tenth of the images had landed to the
last one (the PNGs' modification times), which leaves out the start-up each run pays once.
Writes ``benchmarks/results/ray_batch.json`` (not committed).

    python benchmarks/ray_batch.py --preset tiny --images 48 --workers 1 2          # CPU, this machine
    python benchmarks/ray_batch.py --model path/to/sd15 --images 2000 --steps 30 --size 512x512 \\
        --batch-size 8 --workers 1 2 4 8 --address auto                              # a GPU cluster
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steady_rate(out: Path) -> float:
    """Images per second from the tenth of the images to the last (PNG modification times)."""
    stamps = sorted(p.stat().st_mtime for p in out.glob("*.png"))
    first = len(stamps) // 10
    span = stamps[-1] - stamps[first]
    return (len(stamps) - 1 - first) / span if span > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", default=None)
    which.add_argument("--model", default=None)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus-per-worker", default=None)
    parser.add_argument("--address", default=None, help="a running cluster (default: a local one per run)")
    args = parser.parse_args()

    prompts_dir = Path(tempfile.mkdtemp(prefix="ray-batch-bench-"))
    prompts = prompts_dir / "prompts.txt"
    prompts.write_text("".join(f"picture number {i}\n" for i in range(args.images)))
    model = ["--model", args.model] if args.model else ["--preset", args.preset or "tiny"]
    results = []
    for workers in args.workers:
        out = prompts_dir / f"out-{workers}"
        command = [sys.executable, "-m", "latentdiff", "batch", str(prompts), "--out", str(out), *model,
                   "--steps", str(args.steps), "--size", args.size, "--batch-size", str(args.batch_size),
                   "--engine", "ray", "--workers", str(workers), "--no-progress"]  # fmt: skip
        if args.gpus_per_worker is not None:
            command += ["--gpus-per-worker", args.gpus_per_worker]
        if args.address:
            command += ["--address", args.address]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - start
        made = len(list(out.glob("*.png")))
        results.append({"workers": workers, "images": made, "wall_s": round(wall, 2),
                        "images_per_s_overall": round(made / wall, 3), "images_per_s_steady": round(steady_rate(out), 3)})  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["images_per_s_steady"]
    print(f"\n{'workers':>7} {'wall s':>8} {'img/s overall':>14} {'img/s steady':>13} {'x steady':>9}")
    for r in results:
        print(f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['images_per_s_overall']:>14.3f} {r['images_per_s_steady']:>13.3f} "
              f"{r['images_per_s_steady'] / base:>9.2f}")  # fmt: skip
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "args": vars(args), "results": results}  # fmt: skip
    target = ROOT / "benchmarks" / "results" / "ray_batch.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
