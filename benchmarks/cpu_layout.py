"""Which parts of the fast path pay on a CPU: channels_last and fused QKV, each alone and together.

One U-Net call with classifier-free guidance (the loop's unit of work) and one VAE decode, for four
copies of the same weights: as loaded, channels_last only, fused QKV only, both (what
``pipe.optimize(compile=False)`` did before this measurement). Interleaved run by run, with the
threads you give (1 is the honest setting on a shared machine), so a change of load falls on all
four alike. Prints times relative to "as loaded" and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/cpu_layout.py --model default --batch 1 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # noqa: E402
from inference import interleaved  # noqa: E402  (the same interleaving as the end-to-end benchmark)

VARIANTS = {"as loaded": (False, False), "channels_last": (True, False), "fused QKV": (False, True),
            "channels_last + fused QKV": (True, True)}  # fmt: skip


def build(model: str | None, preset: str, channels_last: bool, fuse: bool):
    from latentdiff import LatentDiffusion

    pipe = LatentDiffusion.from_pretrained(None if model == "default" else model) if model else LatentDiffusion.from_preset(preset, seed=0)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if fuse:
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    return pipe


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder, or 'default' (the embedded model)")
    p.add_argument("--preset", default="tiny", help="random weights of a preset when --model is ''")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="images per call (the U-Net sees twice as many)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", default="benchmarks/results/cpu_layout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipes = {name: build(args.model, args.preset, *flags) for name, flags in VARIANTS.items()}
    first = pipes["as loaded"]
    f, size = first.vae_scale_factor, first.default_size
    channels = first.unet.config.in_channels
    width = first.text_encoder.config.hidden_size
    result = {"command": "python benchmarks/cpu_layout.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "size": size, "batches": {}}  # fmt: skip
    for batch in args.batch:
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2 * batch, channels, size // f, size // f, generator=gen)
        embeds = torch.randn(2 * batch, first.tokenizer.model_max_length, width, generator=gen)
        t = torch.tensor(500)

        def unet(pipe):
            return lambda: pipe.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]

        def decode(pipe):
            z = latents[:batch] / pipe.vae.config.scaling_factor
            return lambda: pipe.vae.decode(z, return_dict=False)[0]

        with torch.no_grad():
            steps = interleaved({n: unet(pp) for n, pp in pipes.items()}, args.runs, 3, "cpu")
            decodes = interleaved({n: decode(pp) for n, pp in pipes.items()}, max(3, args.runs // 3), 1, "cpu")
        base_u = statistics.median(steps["as loaded"][0])
        base_d = statistics.median(decodes["as loaded"][0])
        rows = {}
        for name in pipes:
            u, d = statistics.median(steps[name][0]), statistics.median(decodes[name][0])
            diff = (steps[name][1] - steps["as loaded"][1]).abs().max().item()
            rows[name] = {"unet_cfg_step_ms": 1000 * u, "unet_vs_as_loaded": u / base_u,
                          "vae_decode_ms": 1000 * d, "decode_vs_as_loaded": d / base_d, "max_abs_diff": diff}  # fmt: skip
        result["batches"][batch] = rows
        print(f"batch {batch} ({2 * batch} U-Net rows), {args.threads} thread(s), median of {args.runs}:")
        print(f"  {'variant':28} {'U-Net ms':>9} {'ratio':>6} {'decode ms':>10} {'ratio':>6} {'max |diff|':>10}")
        for name, r in rows.items():
            print(f"  {name:28} {r['unet_cfg_step_ms']:9.1f} {r['unet_vs_as_loaded']:6.3f} "
                  f"{r['vae_decode_ms']:10.1f} {r['decode_vs_as_loaded']:6.3f} {r['max_abs_diff']:10.2e}")  # fmt: skip
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
