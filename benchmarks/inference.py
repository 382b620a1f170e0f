"""End-to-end text-to-image latency: latentdiff against diffusers' StableDiffusionPipeline.

Both run in one process on the *same* module objects (identical random weights of a preset),
same scheduler, seeds, size and steps. Prints a table naming the device and writes JSON.

    python benchmarks/inference.py --preset tiny                      # CPU, seconds
    python benchmarks/inference.py --preset sd15 --device cuda --dtype float16 --steps 50
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, runs: int, warmup: int, device: str) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from latentdiff import LatentDiffusion
    from latentdiff.schedulers import make_scheduler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--size", type=int, default=None, help="square image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="benchmarks/results/inference.json")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    pipe = LatentDiffusion.from_preset(args.preset).to(args.device, dtype)
    size = args.size or pipe.default_size
    reference = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=make_scheduler(args.scheduler, pipe.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    prompt, seeds = "a photograph of an astronaut riding a horse", list(range(args.batch))
    common = dict(num_inference_steps=args.steps, height=size, width=size, output_type="np")

    def run_diffusers():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return reference([prompt] * args.batch, generator=gens, **common).images

    def run_latentdiff():
        return pipe(prompt, num_images_per_prompt=args.batch, seed=seeds, scheduler=args.scheduler,
                    progress=False, **common).images  # fmt: skip

    rows = {}
    images = {}
    for name, fn in (("diffusers StableDiffusionPipeline", run_diffusers), ("latentdiff", run_latentdiff)):
        times, images[name] = timed(fn, args.runs, args.warmup, args.device)
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
        rows[name]["images_per_s"] = args.batch / rows[name]["median_s"]
    base = rows["diffusers StableDiffusionPipeline"]["median_s"]
    agreement = psnr(*images.values())

    print(f"device: {device_name(args.device)}; torch {torch.__version__}; preset {args.preset}, "
          f"{size}x{size}, {args.steps} {args.scheduler} steps, batch {args.batch}, {args.dtype}")  # fmt: skip
    print(f"{'pipeline':<36}{'median s':>10}{'images/s':>10}{'speed-up':>10}")
    for name, r in rows.items():
        print(f"{name:<36}{r['median_s']:>10.4f}{r['images_per_s']:>10.2f}{base / r['median_s']:>9.2f}x")
    print(f"agreement of the two images: PSNR {agreement:.1f} dB")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": device_name(args.device), "torch": torch.__version__, "args": vars(args), "size": size,
        "results": rows, "psnr_db": agreement,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
