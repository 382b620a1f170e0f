"""Text-to-image speed: latentdiff (default and fast path) against diffusers' StableDiffusionPipeline.

All four run in one process on identical random weights of a preset (``from_preset(name, seed=0)``
built once per variant, so compiling or fusing one never touches another), with the same
scheduler, prompt, seeds, size and steps:

- diffusers eager: ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL presets) as its
  docs set it up;
- diffusers compiled: the same with the U-Net in channels_last and ``torch.compile`` (default mode);
- latentdiff default: ``LatentDiffusion`` as loaded (exact, not tuned);
- latentdiff fast: ``pipe.optimize()`` (half precision on CUDA, channels_last, fused QKV,
  compiled U-Net with CUDA graphs and compiled VAE decoder).

Every figure is taken interleaved (round r times each variant once before round r + 1), so a change
of load on a shared machine falls on all variants alike; ``--threads`` sets torch's threads (1 is
the honest setting on a busy CPU). Measured: end-to-end latency at batch 1 (median of ``--runs``
after ``--warmup``), images/s at
``--batch``, one U-Net call with classifier-free guidance (batch 2) in ms and its MFU (FLOPs
counted by ``torch.utils.flop_counter`` on the eager U-Net; peak from ``--peak-tflops`` or the
device table below), peak memory (CUDA only), compile time, and the PSNR of latentdiff's fast
image against diffusers' eager image for the same seed. Prints a table and writes JSON.

    python benchmarks/inference.py --preset tiny                                   # CPU
    python benchmarks/inference.py --preset sd15 --device cuda --dtype float16     # GPU, SD 1.5 shapes
    python benchmarks/inference.py --preset sdxl --device cuda --dtype float16     # GPU, SDXL base shapes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402  (loaded by path too, from tests and the other scripts)

# Dense half-precision tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}

DIFFUSERS_EAGER = "diffusers eager"
DIFFUSERS_COMPILED = "diffusers compiled U-Net"
OURS_DEFAULT = "latentdiff default"
OURS_FAST = "latentdiff fast"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, runs: int, warmup: int, device: str) -> dict:
    """{name: (seconds of each run, last output)}: ``warmup`` untimed calls of each, then ``runs``
    rounds that time every function once, in turn."""
    out = {name: None for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            out[name] = fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            out[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], out[name]) for name in fns}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def unet_flops(unet, sample: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, extra: dict) -> int:
    """FLOPs of one U-Net forward (2 per multiply-add), counted on the eager module."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, t, encoder_hidden_states=embeds, return_dict=False, **extra)
    return counter.get_total_flops()


def unet_inputs(pipe, batch: int, size: int, device, dtype) -> tuple[torch.Tensor, dict]:
    """Random text conditioning (batch, 77, D) for the U-Net, and for SDXL its added inputs: pooled
    text embeddings and micro-conditioning (``added_cond_kwargs``)."""
    embeds = torch.randn(batch, 77, pipe.conditioning_width).to(device, dtype)
    if not pipe.sdxl:
        return embeds, {}
    values = [size, size, 0, 0, size, size][: pipe.time_id_count]
    return embeds, {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pipe.pooled_width).to(device, dtype),
                                          "time_ids": torch.tensor([values] * batch).to(device, dtype)}}  # fmt: skip


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny",
                   help="random-weight architecture: tiny / tiny-sdxl (CPU) or sd15 / sd21 / sdxl")  # fmt: skip
    p.add_argument("--model", default=None,
                   help="a model folder instead of --preset ('default': the embedded default model)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own; on a shared CPU, 1 avoids thrashing)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--size", type=int, default=None, help="square image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=16, help="batch size of the throughput measurement")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--unet-runs", type=int, default=20, help="U-Net calls timed for the step figure")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: capture only)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (diffusers compiled is left out)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--json", default="benchmarks/results/inference.json")
    return p.parse_args(argv)


def build(args, dtype):
    """The four variants, each on its own copy of the same weights."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from latentdiff import LatentDiffusion
    from latentdiff.generation.samplers import make_scheduler

    def ours():
        if args.model:
            return LatentDiffusion.from_pretrained(None if args.model == "default" else args.model).to(args.device, dtype)
        return LatentDiffusion.from_preset(args.preset, seed=0).to(args.device, dtype)

    def theirs(pipe):
        common = {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "unet": pipe.unet,
                  "scheduler": make_scheduler(args.scheduler, pipe.scheduler_config)}  # fmt: skip
        if pipe.sdxl:
            if pipe.text_encoder is None:
                raise SystemExit("the refiner refines images: benchmark a base model (sdxl, tiny-sdxl)")
            ref = StableDiffusionXLPipeline(**common, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
        else:
            ref = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        return ref

    default = ours()
    eager = theirs(default)  # the default path changes nothing, so the two can share modules
    variants = {DIFFUSERS_EAGER: eager, OURS_DEFAULT: default}
    if not args.no_compile:
        compiled = theirs(ours())
        compiled.unet.to(memory_format=torch.channels_last)
        compiled.unet = torch.compile(compiled.unet, backend=args.backend)  # diffusers' documented recipe
        variants[DIFFUSERS_COMPILED] = compiled
    variants[OURS_FAST] = ours().optimize(compile=not args.no_compile, backend=args.backend)
    return variants


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    variants = build(args, dtype)
    default = variants[OURS_DEFAULT]
    size = args.size or default.default_size
    prompt = "a photograph of an astronaut riding a horse"
    # (guidance given: diffusers' SDXL default is 5, ours and SD's 7.5)
    common = {"num_inference_steps": args.steps, "height": size, "width": size, "output_type": "np", "guidance_scale": 7.5}
    cuda = args.device.startswith("cuda")

    def call(name, pipe, batch):
        seeds = list(range(batch))
        if name.startswith("diffusers"):  # fresh generators every call: the same noise every run
            return lambda: pipe([prompt] * batch, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                                **common).images  # fmt: skip
        return lambda: pipe(prompt, num_images_per_prompt=batch, seed=seeds, scheduler=args.scheduler,
                            progress=False, **common).images  # fmt: skip

    # one U-Net call with CFG: latents (2, 4, h, w), text (2, 77, D)
    f = default.vae_scale_factor
    sample = torch.randn(2, default.unet.config.in_channels, size // f, size // f).to(args.device, dtype)
    embeds, extra = unet_inputs(default, 2, size, args.device, dtype)
    t = torch.tensor(500, device=args.device)
    flops = unet_flops(default.unet, sample, t, embeds, extra)
    peak = peak_tflops(args.device, args.peak_tflops)

    # Every measurement is interleaved: round r times each variant once before round r + 1 starts, so
    # a change of machine load (other jobs on a shared CPU) falls on every variant alike.
    rows = {name: {} for name in variants}
    images = {}
    for name, pipe in variants.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        images[name] = call(name, pipe, 1)()  # first call: compiles where there is something to compile
        rows[name]["first_call_s"] = time.perf_counter() - start
        rows[name]["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None

    def unet_call(pipe):
        def run():
            with torch.no_grad():
                return pipe.unet(sample, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]

        return run

    single = interleaved({n: call(n, p, 1) for n, p in variants.items()}, args.runs, args.warmup, args.device)
    batched = interleaved({n: call(n, p, args.batch) for n, p in variants.items()}, max(1, args.runs // 3), 1, args.device)
    steps = interleaved({n: unet_call(p) for n, p in variants.items()}, args.unet_runs, 3, args.device)
    for name, pipe in variants.items():
        row = rows[name]
        times, images[name] = single[name]
        row["median_s"], row["min_s"], row["runs"] = statistics.median(times), min(times), len(times)
        row["batch_images_per_s"] = args.batch / statistics.median(batched[name][0])
        row["unet_step_ms"] = 1000 * statistics.median(steps[name][0])
        row["mfu"] = flops / (row["unet_step_ms"] / 1000) / (peak * 1e12) if peak else None
        if name == OURS_FAST:
            row["compile_report"] = [str(r) for r in pipe.compile_report]

    eager_s = rows[DIFFUSERS_EAGER]["median_s"]
    compiled_s = rows.get(DIFFUSERS_COMPILED, {}).get("median_s")
    for row in rows.values():
        row["speedup_vs_diffusers_eager"] = eager_s / row["median_s"]
        row["speedup_vs_diffusers_compiled"] = compiled_s / row["median_s"] if compiled_s else None
    agreement = psnr(images[OURS_FAST], images[DIFFUSERS_EAGER])
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "latentdiff": _version("latentdiff"),
        "command": "python benchmarks/inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "unet_tflop_per_cfg_step": flops / 1e12,
        "peak_tflops": peak,
        "results": rows,
        "psnr_fast_vs_diffusers_eager_db": agreement,
    }
    print_table(result, args)
    return write_json(args.json, result)


def print_table(result: dict, args) -> None:
    weights = f"model {args.model}" if args.model else f"preset {args.preset}"
    print(f"device: {result['device']}; torch {result['torch']}, diffusers {result['diffusers']}; {weights}, "
          f"{result['size']}x{result['size']}, {args.steps} {args.scheduler} steps, {result['dtype']}")  # fmt: skip
    mfu_note = "" if result["peak_tflops"] else " (MFU: no peak known for this device; pass --peak-tflops)"
    print(f"U-Net with CFG: {result['unet_tflop_per_cfg_step'] * 1e3:.3f} GFLOP per step{mfu_note}")
    head = f"{'pipeline':<27}{'bs1 median s':>13}{'vs eager':>9}{'vs comp.':>9}{f'bs{args.batch} img/s':>12}"
    print(head + f"{'U-Net ms':>10}{'MFU':>7}{'peak GB':>9}{'1st call s':>11}")
    for name, r in result["results"].items():
        vs_compiled = f"{r['speedup_vs_diffusers_compiled']:.2f}x" if r["speedup_vs_diffusers_compiled"] else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{name:<27}{r['median_s']:>13.4f}{r['speedup_vs_diffusers_eager']:>8.2f}x{vs_compiled:>9}"
              f"{r['batch_images_per_s']:>12.2f}{r['unet_step_ms']:>10.2f}{mfu:>7}{mem:>9}{r['first_call_s']:>11.1f}")  # fmt: skip
    print(f"PSNR of latentdiff fast vs diffusers eager, same seed: {result['psnr_fast_vs_diffusers_eager_db']:.1f} dB")
    for line in result["results"][OURS_FAST].get("compile_report", []):
        print(f"  {line}")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    main()
