"""U-Net feature caching (``cache_interval`` / ``cache_branch``): speed and quality against no cache.

For each setting, the same prompts and seeds are generated with and without the cache, interleaved
run by run (``interleaved`` from inference.py), and the cached images are compared with the
uncached ones (PSNR over the batch; 8-bit images in [0, 1]). Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py --model default --intervals 2 3 5 --steps 25
    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py --model "" --preset sd15 --size 256 --steps 25 --runs 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402
from inference import interleaved, psnr  # noqa: E402  (one interleaving and one PSNR for every benchmark)

PROMPTS = ["a red circle at the top on an orange background", "a white triangle in the bottom left on a black background",
           "red apple", "blue heart"]  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder, 'default', or '' for --preset's random weights")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=None, help="square image side (default: the model's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/feature_cache.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentdiff import LatentDiffusion

    if args.model:
        pipe = LatentDiffusion.from_pretrained(None if args.model == "default" else args.model)
    else:
        pipe = LatentDiffusion.from_preset(args.preset, seed=0)
    size = args.size or pipe.default_size
    common = {"num_inference_steps": args.steps, "height": size, "width": size, "seed": list(range(len(PROMPTS))),
              "output_type": "np", "progress": False}  # fmt: skip

    def run(interval):
        extra = {} if interval is None else {"cache_interval": interval, "cache_branch": args.branch}
        return lambda: pipe(PROMPTS, **common, **extra).images

    variants = {"no cache": run(None), **{f"interval {n}": run(n) for n in args.intervals}}
    timed = interleaved(variants, args.runs, 1, "cpu")
    base_s = statistics.median(timed["no cache"][0])
    reference = np.asarray(timed["no cache"][1])
    rows = {}
    for name, (times, images) in timed.items():
        median = statistics.median(times)
        rows[name] = {"median_s": median, "speedup": base_s / median,
                      "psnr_vs_uncached_db": psnr(np.asarray(images), reference)}  # fmt: skip
    result = {"command": "python benchmarks/feature_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "size": size, "steps": args.steps,
              "branch": args.branch, "images_per_call": len(PROMPTS), "results": rows}  # fmt: skip
    print(f"{len(PROMPTS)} images per call, {args.steps} steps, {size}x{size}, branch {args.branch}, "
          f"{args.threads} thread(s), median of {args.runs} interleaved runs:")  # fmt: skip
    print(f"  {'setting':14} {'median s':>9} {'speed-up':>9} {'PSNR vs uncached':>17}")
    for name, r in rows.items():
        print(f"  {name:14} {r['median_s']:9.3f} {r['speedup']:8.2f}x {r['psnr_vs_uncached_db']:14.1f} dB")
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
