"""U-Net feature caching (``cache_interval`` / ``cache_branch``): speed and quality against no cache.

For each setting, the same prompts and seeds are generated with and without the cache, interleaved
run by run (``interleaved`` from inference.py), and the cached images are compared with the
uncached ones (PSNR over the batch; 8-bit images in [0, 1]). Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py --model default --intervals 2 3 5 --steps 25
    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py --model "" --preset sd15 --size 256 --steps 25 --runs 2

``--deepcache`` also runs the ``deepcache`` package (``pip install DeepCache``; its
``DeepCacheSDHelper`` wraps a diffusers pipeline) on diffusers' ``StableDiffusionPipeline`` with the
same weights, prompts, seeds, steps and sampler, at the same intervals and branch, in the same
interleaved rounds: its speed-up is against that pipeline uncached, and its PSNR against that
pipeline's uncached images (which equal ours).
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
    p.add_argument("--deepcache", action="store_true", help="also the deepcache package on diffusers' pipeline")
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
    if args.deepcache:
        variants.update(deepcache_variants(pipe, args, common))
    timed = interleaved(variants, args.runs, 1, "cpu")
    rows = {}
    for name, (times, images) in timed.items():
        base = "diffusers no cache" if name.startswith(("diffusers", "deepcache")) else "no cache"
        median = statistics.median(times)
        rows[name] = {"median_s": median, "speedup": statistics.median(timed[base][0]) / median,
                      "psnr_vs_uncached_db": psnr(np.asarray(images), np.asarray(timed[base][1]))}  # fmt: skip
    if args.deepcache:  # diffusers' uncached images against ours: the two baselines are the same picture
        rows["diffusers no cache"]["psnr_vs_latentdiff_uncached_db"] = psnr(
            np.asarray(timed["diffusers no cache"][1]), np.asarray(timed["no cache"][1]))
    result = {"command": "python benchmarks/feature_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "size": size, "steps": args.steps,
              "branch": args.branch, "images_per_call": len(PROMPTS), "results": rows}  # fmt: skip
    print(f"{len(PROMPTS)} images per call, {args.steps} steps, {size}x{size}, branch {args.branch}, "
          f"{args.threads} thread(s), median of {args.runs} interleaved runs:")  # fmt: skip
    print(f"  {'setting':28} {'median s':>9} {'speed-up':>9} {'PSNR vs uncached':>17}")
    for name, r in rows.items():
        print(f"  {name:28} {r['median_s']:9.3f} {r['speedup']:8.2f}x {r['psnr_vs_uncached_db']:14.1f} dB")
    if args.deepcache:
        print(f"  (diffusers' uncached images against latentdiff's: "
              f"{rows['diffusers no cache']['psnr_vs_latentdiff_uncached_db']:.1f} dB)")  # fmt: skip
    return write_json(args.json, result)


def deepcache_variants(pipe, args, common) -> dict:
    """diffusers' StableDiffusionPipeline on ``pipe``'s modules, uncached and under the deepcache
    package at each interval, called like ``pipe`` (same prompts, per-image CPU generators, steps,
    sampler, guidance)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise SystemExit("--deepcache needs the deepcache package: pip install DeepCache") from None
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=ref)

    def run(interval):
        def call():
            generators = [torch.Generator("cpu").manual_seed(s) for s in common["seed"]]
            if interval is not None:
                helper.set_params(cache_interval=interval, cache_branch_id=args.branch)
                helper.enable()
            try:
                return ref(PROMPTS, num_inference_steps=common["num_inference_steps"], height=common["height"],
                           width=common["width"], generator=generators, output_type="np").images  # fmt: skip
            finally:
                if interval is not None:
                    helper.disable()

        return call

    return {"diffusers no cache": run(None), **{f"deepcache interval {n}": run(n) for n in args.intervals}}


if __name__ == "__main__":
    main()
