"""Training speed: the latentdiff trainer against a plain loop written the way diffusers' training
example writes it, on the same U-Net shapes, cached latents and batch.

- plain loop: the U-Net under bf16 autocast (fp32 on CPU), MSE on epsilon, ``torch.optim.AdamW``
  with its default implementation, the loss gathered and turned into a Python float every step
  (``.item()``), as the example logs it;
- latentdiff: ``latentdiff.train.loop.train`` on a synthetic captioned image folder with
  ``data.cache = true`` (latents and caption embeddings encoded once, read from disk by the data
  loader), timed from its own log once warm; with ``--compile`` also with ``train.compile`` and
  ``train.channels_last``;
- latentdiff LoRA rank 16 on the same data;
- a full fine-tune at batch 1 with gradient checkpointing and 8-bit Adam (peak memory; CUDA and
  bitsandbytes only).

Reported: images/s, MFU (3 x the forward FLOPs counted by ``torch.utils.flop_counter`` per image,
against the device peak), peak memory (CUDA). Prints a table and writes JSON.

    python benchmarks/training.py --preset tiny --size 64 --batch 4 --steps 6          # CPU smoke run
    python benchmarks/training.py --preset sd15 --size 512 --batch 32 --compile         # one GPU
    python benchmarks/training.py --preset sdxl --size 1024 --batch 8 --compile         # one GPU, SDXL base shapes
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import _version, device_name, peak_tflops, sync, unet_flops, unet_inputs  # noqa: E402  (the shared helpers)

from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.train.config import TrainConfig  # noqa: E402
from latentdiff.train.loop import train  # noqa: E402

PLAIN = "plain loop (diffusers example style)"
OURS = "latentdiff trainer"
OURS_COMPILED = "latentdiff trainer, compiled + channels_last"
OURS_LORA = "latentdiff trainer, LoRA rank 16"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="architecture (tiny, tiny-sdxl, small, sd15, sd21, sdxl)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (512 for sd15)")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="also time the trainer with train.compile")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA variant")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def make_images(folder: Path, count: int, size: int) -> None:
    """Random-colour captioned pictures (content does not matter for speed)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    lines = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))


def plain_loop(pipe, args, device: str) -> float:
    """Images/s of the reference loop on random latents and embeddings already on the device."""
    from diffusers import DDPMScheduler

    unet = pipe.unet.to(device).train().requires_grad_(True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler_config)
    factor = pipe.vae_scale_factor
    latents = torch.randn(args.batch, unet.config.in_channels, args.size // factor, args.size // factor, device=device)
    embeds, extra = unet_inputs(pipe, args.batch, args.size, device, torch.float32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), device=device)
        with autocast:
            pred = unet(scheduler.add_noise(latents, noise, t), t, embeds, **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()  # the example's per-step logging: a host sync every step

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    unet.requires_grad_(False).eval()
    return args.batch * args.steps / (time.perf_counter() - start)


def trainer_run(data: Path, model_dir: Path, out: Path, args, *overrides: str) -> float:
    """Images/s of ``train()``: the mean of the log intervals after the warm-up steps."""
    steps = args.warmup + args.steps
    config = TrainConfig.load(None, [
        f"model.path={model_dir}", f"data.path={data}", f"data.resolution={args.size}", "data.cache=true",
        "data.num_workers=2", "data.random_flip=false", "data.caption_dropout=0.1", f"train.output_dir={out}",
        f"train.batch_size={args.batch}", f"train.max_steps={steps}", "train.log_every=1", "train.progress=false",
        f"train.mixed_precision={'bf16' if torch.cuda.is_available() else 'no'}", "train.tensorboard=false",
        "checkpoint.every=0", "optim.lr=1e-5", *overrides,
    ])  # fmt: skip
    train(config)
    rates = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    timed = [r["images_per_s"] for r in rates if "images_per_s" in r and r["step"] > args.warmup]
    return float(np.mean(timed))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="latentdiff-train-bench-"))
    try:
        pipe = LatentDiffusion.from_preset(args.preset, seed=0)
        model_dir = pipe.save_pretrained(work / "model")
        data = work / "data"
        make_images(data, args.batch * (args.warmup + args.steps), args.size)
        factor = pipe.vae_scale_factor
        sample = torch.randn(args.batch, pipe.unet.config.in_channels, args.size // factor, args.size // factor)
        embeds, extra = unet_inputs(pipe, args.batch, args.size, "cpu", torch.float32)
        flops_per_image = 3 * unet_flops(pipe.unet, sample, torch.full((args.batch,), 500), embeds, extra) / args.batch
        peak = peak_tflops(device, args.peak_tflops)

        rows = []

        def measure(name, fn):
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rate = fn()
            rows.append({
                "variant": name, "images_per_s": rate,
                "mfu": rate * flops_per_image / (peak * 1e12) if peak else None,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
            })  # fmt: skip
            print(f"{name}: {rate:.2f} images/s", flush=True)

        measure(PLAIN, lambda: plain_loop(pipe, args, device))
        pipe.unet.to("cpu")
        measure(OURS, lambda: trainer_run(data, model_dir, work / "ours", args, "train.ema=false"))
        if args.compile:
            measure(OURS_COMPILED, lambda: trainer_run(data, model_dir, work / "compiled", args, "train.compile=true",
                                                       "train.channels_last=true", f"data.cache_dir={work / 'ours' / 'cache'}"))  # fmt: skip
        if not args.no_lora:
            measure(OURS_LORA, lambda: trainer_run(data, model_dir, work / "lora", args, "lora.enabled=true", "lora.rank=16",
                                                   "lora.alpha=16.0", f"data.cache_dir={work / 'ours' / 'cache'}"))  # fmt: skip
        memory = None
        if device == "cuda":
            try:
                import bitsandbytes  # noqa: F401

                torch.cuda.reset_peak_memory_stats()
                small = argparse.Namespace(**{**vars(args), "batch": 1})
                trainer_run(data, model_dir, work / "lowmem", small, "train.gradient_checkpointing=true",
                            "optim.use_8bit_adam=true", f"data.cache_dir={work / 'ours' / 'cache'}")  # fmt: skip
                memory = torch.cuda.max_memory_allocated() / 1e9
            except ImportError:
                print("bitsandbytes is not installed: skipping the 8-bit Adam memory figure")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]["images_per_s"]
    for row in rows:
        row["vs_plain"] = row["images_per_s"] / base
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": {p: _version(p) for p in ("torch", "diffusers", "accelerate", "latentdiff")},
        "command": "python benchmarks/training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": vars(args),
        "gflop_per_image": flops_per_image / 1e9,
        "peak_tflops": peak,
        "rows": rows,
        "full_finetune_bs1_checkpointing_8bit_adam_peak_gb": memory,
    }
    print(f"\n{result['device']}, {args.preset} at {args.size}px, batch {args.batch}, {args.steps} timed steps")
    print(f"{'variant':<48}{'images/s':>10}{'x plain':>9}{'MFU':>7}{'peak GB':>9}")
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['variant']:<48}{r['images_per_s']:>10.2f}{r['vs_plain']:>9.2f}{mfu:>7}{mem:>9}")
    if memory is not None:
        print(f"full fine-tune, batch 1, gradient checkpointing + 8-bit Adam: peak {memory:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
