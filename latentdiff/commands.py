"""What each ``latentdiff`` subcommand does, given its parsed arguments (``cli.py`` parses and
dispatches). Heavy libraries are imported inside the commands, so that parsing stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from .checks import DTYPE_NAMES as DTYPES
from .checks import MAX_SEED, Limits, whole_number
from .errors import InvalidInputError

# Libraries whose chatter (loading bars, log lines, warnings) the command line hides without --verbose.
_NOT_OURS = ("transformers", "diffusers", "accelerate", "huggingface_hub", "datasets", "peft", "torch", "torchvision",
             "safetensors", "tokenizers", "PIL", "numpy", "matplotlib")  # fmt: skip


def quiet_libraries() -> None:
    """Silence what other libraries print: their progress bars (``HF_HUB_DISABLE_PROGRESS_BARS``, read
    by transformers' "Loading weights" bar and datasets), log messages below errors, and warnings
    raised in their code. Settings the user made in the environment are kept."""
    import logging
    import os
    import warnings

    for variable, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                            ("DIFFUSERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                            ("ACCELERATE_LOG_LEVEL", "ERROR"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):  # fmt: skip
        os.environ.setdefault(variable, value)
    for name in _NOT_OURS:  # (libraries imported already have read the environment)
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("transformers", "diffusers"):
        module = sys.modules.get(f"{name}.utils.logging")
        if module is not None:  # their own switch for bars made with their tqdm wrapper
            module.disable_progress_bar()
    warnings.filterwarnings("ignore", module=rf"({'|'.join(_NOT_OURS)})(\.|$)")


def generate(args) -> int:
    from .generation.recipe import call_kwargs, read_png, remake_differences
    from .generation.result import prepare_output
    from .models.architectures import VARIANTS

    request: dict = {}
    recipe: dict = {}
    model, preset, preset_seed, variant = args.model, args.preset, args.preset_seed, None
    if args.from_png:
        recipe, infotext = read_png(args.from_png)
        if recipe is None:  # another tool's PNG: its A1111 infotext, or nothing to remake
            request = _from_infotext(args.from_png, infotext, args.scheduler)
            recipe = {}
        else:
            request = call_kwargs(recipe)
        if recipe and model is None and preset is None:  # the recipe's own model unless one is named
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
        "prompt_2": args.prompt_2,
        "negative_prompt_2": args.negative_2,
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
        "cache_interval": args.cache_interval,
        "cache_branch": args.cache_branch,
    }
    if args.lcm:  # the default model's LCM-LoRA: its sampler, steps and guidance unless given
        from .generation.pipeline import LCM_CALL, check_default_lcm_lora

        if model is not None or preset is not None or args.from_png:
            raise InvalidInputError("--lcm uses the default model's LCM-LoRA; for another model pass its LCM-LoRA "
                                    "with --lora FILE --scheduler lcm --steps 4 --cfg 1")  # fmt: skip
        check_default_lcm_lora()
        overrides = {**{k: overrides[k] if overrides[k] is not None else v for k, v in LCM_CALL.items()},
                     **{k: v for k, v in overrides.items() if k not in LCM_CALL}}  # fmt: skip
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    controls = _control_specs(args.controlnet)
    if controls or args.control_image:
        overrides.update(_control_overrides(controls, args.control_image))
    if args.control_start is not None or args.control_end is not None:
        overrides.update(control_start=args.control_start, control_end=args.control_end)
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
    limits = Limits.parse(args.limit)
    recorded_controls = recipe.get("controls") if (args.from_png and not controls) else None
    count = len(controls) if controls else len(recorded_controls or [])
    _check_before_loading(request, limits, model, preset, preset_seed, controls=count)  # seconds, not after a long load
    prepare_output(args.output)
    set_threads(args.threads, device)
    pipe = _load(model, preset, preset_seed, variant).to(device, getattr(torch, dtype))
    pipe.limits = limits
    if args.lcm:
        from .generation.pipeline import DEFAULT_LCM_LORA

        pipe.load_lora(DEFAULT_LCM_LORA, name="lcm")
    _apply_loras(pipe, args.lora, recipe.get("loras") if args.from_png else None)
    for path, _ in controls:
        pipe.load_controlnet(path)
    if args.from_png and not controls:  # the recipe's own ControlNets and IP-Adapter, or why it cannot be remade
        from .generation.recipe import reapply_controls

        reapply_controls(pipe, recipe)
    if args.fast:  # after the LoRAs; half precision on CUDA unless a dtype was asked for (or the recipe names one)
        pipe.optimize(dtype=dtype if (args.dtype or recipe.get("dtype")) else None)
    if recipe and (reasons := remake_differences(recipe, pipe)):
        print(f"latentdiff: warning: the image may not match: {'; '.join(reasons)}", file=sys.stderr)
    result = pipe(**request, progress=not args.no_progress)
    for record in pipe.compile_report:  # what the first call of each shape cost
        print(f"latentdiff: {record}", file=sys.stderr)
    for path in result.save(args.output):
        print(path)
    return 0


def _control_specs(specs) -> list[tuple[str, float]]:
    """--controlnet PATH[:SCALE] options -> (path, scale) pairs."""
    from .models.lora import parse_lora_spec

    specs = [parse_lora_spec(s) for s in specs or []]
    if any(path == "default" for path, _ in specs):  # (load_controlnet reads "default"; here: is it shipped)
        from .generation.control import default_controlnet

        default_controlnet()
    return specs


def _control_overrides(controls: list[tuple[str, float]], images: Optional[list[str]]) -> dict:
    """The call arguments of --controlnet and --control-image: one control image per ControlNet, in order."""
    images = images or []
    if not controls:
        raise InvalidInputError("--control-image needs --controlnet PATH (the ControlNet that reads it)")
    if len(images) != len(controls):
        raise InvalidInputError(f"give one --control-image per --controlnet: {len(controls)} ControlNet(s), "
                                f"{len(images)} control image(s)")  # fmt: skip
    return {"control_image": images[0] if len(images) == 1 else images, "control_scale": [scale for _, scale in controls]}


def _from_infotext(path, infotext, scheduler) -> dict:
    """Pipeline arguments from a PNG's A1111 infotext; prints what could not be mapped."""
    from .generation.infotext import infotext_call, parse_infotext

    if infotext is None:
        raise InvalidInputError(f"{path} has no latentdiff recipe and no A1111 infotext (a 'parameters' "
                                "text chunk); there is nothing to remake it from")  # fmt: skip
    request, notes, problem = infotext_call(parse_infotext(infotext))
    if problem and scheduler is None:
        raise InvalidInputError(f"{path}: {problem}; pass --scheduler NAME to choose one")
    print(f"latentdiff: {path} holds A1111 infotext, not a latentdiff recipe: the image is made again from "
          "its settings, not guaranteed pixel for pixel", file=sys.stderr)  # fmt: skip
    for note in notes:
        print(f"latentdiff: note: {note}", file=sys.stderr)
    return request


def batch(args) -> int:
    from .batch.local import BatchConfig, run_batch
    from .batch.rows import Defaults

    width, height = args.size if args.size is not None else (None, None)
    config = BatchConfig(
        prompts=Path(args.prompts),
        out=args.out if "://" in args.out else Path(args.out),  # a URL: any file system fsspec can write
        model=args.model,
        preset=args.preset,
        preset_seed=args.preset_seed,
        batch_size=args.batch_size,
        base_seed=args.seed,
        device=None if args.device is None else args.device if args.engine == "ray" else _device(args.device),
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        loras=tuple(_lora_specs(args.lora)),
        controlnets=tuple(_control_specs(args.controlnet)),
        fast=args.fast,
        limits=Limits.parse(args.limit),
        defaults=Defaults(
            negative_prompt=args.negative, n=args.num_images, steps=args.steps, guidance=args.cfg,
            width=width, height=height, scheduler=args.scheduler,
            control_image=tuple(str(Path(f).expanduser().resolve()) for f in args.control_image or []),
        ),
    )  # fmt: skip
    if args.engine == "ray":
        return _ray_batch(config, args)
    given = [flag for flag, value in (("--address", args.address), ("--workers", args.workers),
                                      ("--gpus-per-worker", args.gpus_per_worker)) if value is not None]  # fmt: skip
    if given:
        raise InvalidInputError(f"{given[0]} is for --engine ray")
    set_threads(args.threads, config.device or "")
    return run_batch(config)


def _ray_batch(config, args) -> int:
    """``latentdiff batch --engine ray``: the same run on the workers of a Ray cluster."""
    from .batch.ray_engine import RayOptions, parse_workers, require_ray, run_ray_batch

    require_ray()  # one line saying how to install it, before anything else
    if args.threads is not None and (whole_number(args.threads) is None or args.threads < 1):
        raise InvalidInputError(f"--threads must be at least 1, got {args.threads}")
    options = RayOptions(
        address=args.address,
        workers=parse_workers(args.workers) if args.workers is not None else (1, None),
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.threads or 1,
        verbose=args.verbose,
    )
    return run_ray_batch(config, options)


def train(args) -> int:
    from .train.config import TrainConfig
    from .train.loop import train as run

    if args.threads is not None:  # else torch's default: fixed, unlike the load-dependent default of the
        set_threads(args.threads, "")  # other commands, so that a resumed run keeps its thread count
    result = run(TrainConfig.load(args.config, args.set))
    if result.main_process:
        where = result.lora_file or result.controlnet_dir or result.model_dir or result.output_dir
        print(f"done: {result.steps} steps; result in {where}")
    return 0


def convert(args) -> int:
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


def info(args) -> int:
    described = _load(args.model, args.preset).describe()  # no model named: the embedded default model, as generate
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    print(f"source: {json.dumps(described['source'])}")
    print(f"weight hash: {described['weight_hash']}")
    print(f"family: {described['family']}, default size: {described['default_size'][0]}x{described['default_size'][1]}, "
          f"prediction: {described['prediction_type']}")  # fmt: skip
    total = 0
    for name, part in described["components"].items():
        if "parameters" in part:
            total += part["parameters"]
            print(f"  {name:<14} {part['class']:<27} {part['parameters']:>14,} params  {part['dtype']}")
        else:
            print(f"  {name:<14} {part['class']:<27} vocabulary {part['vocab_size']:,}")
    print(f"  {'total':<14} {'':<27} {total:>14,} params")
    print("scheduler config:")
    for key, value in sorted(described["scheduler"].items()):
        print(f"  {key} = {json.dumps(value)}")
    return 0


def schedules(args) -> int:
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


def data(args) -> int:
    from .data.builders import build

    options = {"size": args.size, "count": args.count, "seed": args.seed, "source": args.source,
               "font": args.font, "skin_tones": args.skin_tones, "control": args.control}  # fmt: skip
    allowed = {"shapes": {"size", "count", "seed", "control"}, "emoji": {"size", "source", "font", "skin_tones"}}[args.name]
    for key, value in options.items():
        if value is not None and key not in allowed:
            raise InvalidInputError(f"--{key.replace('_', '-')} does not apply to the {args.name} data set")
    counts = build(args.name, args.out_dir, overwrite=args.overwrite, **options)
    print(f"{args.out_dir}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


def evaluate(args) -> int:
    from .evaluate import EvalConfig, format_table, write_report
    from .evaluate import evaluate as run

    steps, scheduler = args.steps, args.scheduler
    if args.lcm:  # the default model's LCM-LoRA: its sampler and steps unless given
        from .generation.pipeline import LCM_CALL, check_default_lcm_lora

        check_default_lcm_lora()
        steps, scheduler = steps or LCM_CALL["num_inference_steps"], scheduler or LCM_CALL["scheduler"]
    if args.controlnet is not None:
        _control_specs([args.controlnet])  # "default": is it shipped
    config = EvalConfig(
        data=[Path(d) for d in args.data], model=args.model, guidance=tuple(args.guidance), steps=steps or 25,
        scheduler=scheduler, prompts=args.prompts, captions=args.captions, top=args.top, space=args.space,
        psnr_images=args.psnr_images, seed=args.seed, batch_size=args.batch_size,
        device=_device(args.device), progress=not args.no_progress, lcm=args.lcm, controlnet=args.controlnet,
        control_scale=args.control_scale,
    )  # fmt: skip
    set_threads(args.threads, config.device)
    if args.json and not Path(args.json).parent.is_dir():  # before minutes of work, not after
        raise InvalidInputError(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    report = run(config)
    print(format_table(report))
    if args.json:
        print(write_report(report, args.json))
    return 0


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
    if device.type == "meta":
        raise InvalidInputError(f"--device {name}: the meta device holds shapes, not values, so it cannot make images; "
                                "use cpu or cuda")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidInputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: usable if a tensor can be made there
        try:
            torch.zeros(1, device=device)
        except Exception as e:  # noqa: BLE001 - each backend fails its own way
            raise InvalidInputError(f"--device {name} is not usable here ({type(e).__name__}); use cpu or cuda") from None
    return name


def set_threads(threads: Optional[int], device) -> None:
    """torch's CPU threads for a command: ``--threads``, else ``OMP_NUM_THREADS`` if set, else the cores
    that other work leaves free (at least 1). Torch's own default, one thread per core, slows
    down many times over when other processes are busy on those cores (see the README)."""
    import os

    import torch

    if threads is not None:
        if whole_number(threads) is None or threads < 1:
            raise InvalidInputError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        return
    if os.environ.get("OMP_NUM_THREADS") or str(device).startswith("cuda"):
        return  # the user's setting (torch honours it); on a GPU the CPU threads hardly matter
    torch.set_num_threads(free_cores())


def free_cores() -> int:
    """Cores this process may use that are not busy: usable cores minus the 1-minute load average."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def _check_before_loading(request: dict, limits: Limits, model, preset, preset_seed, controls: int = 0) -> None:
    """The pipeline's checks that need no weights (``request.check_arguments``), with the model's size
    rules read from its configs: a bad argument fails in a second instead of after the model load.
    Warnings wait for the real call, which gives them once."""
    import warnings

    from .generation.pipeline import DEFAULT_MODEL_DIR
    from .generation.request import check_arguments
    from .models.architectures import PRESETS, size_rules
    from .models.folder import read_size_rules

    if preset is not None and (whole_number(preset_seed) is None or not 0 <= preset_seed <= MAX_SEED):
        raise InvalidInputError(f"--preset-seed must be a whole number from 0 to 2**64-1, got {preset_seed!r}")
    rules = None
    if preset in PRESETS:
        rules = size_rules(PRESETS[preset].vae, PRESETS[preset].unet)
    elif preset is None and (model is None or Path(model).is_dir()):
        rules = read_size_rules(DEFAULT_MODEL_DIR if model is None else model)
    factor, native = rules or (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_arguments(request, limits, factor=factor, default_size=native, controls=controls)


def _lora_specs(specs) -> list[tuple[str, float]]:
    from .models.lora import parse_lora_spec

    return [parse_lora_spec(s) for s in specs or []]


def _apply_loras(pipe, specs, recorded) -> None:
    """Apply --lora files; with --from-png and no --lora, the recipe's LoRAs if their files are unchanged."""
    if specs or not recorded:
        for path, scale in _lora_specs(specs):
            pipe.load_lora(path, scale=scale)
        return
    from .generation.recipe import reapply_loras

    for problem in reapply_loras(pipe, recorded):
        print(f"latentdiff: warning: {problem}", file=sys.stderr)


def serve(args) -> int:
    import os
    from dataclasses import replace

    from .serve.config import Limits, ServeConfig

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InvalidInputError('latentdiff serve needs FastAPI and uvicorn: pip install "latentdiff[serve]"') from None
    limits = replace(Limits(), **{k: v for k, v in (("max_side", args.max_side), ("max_steps", args.max_steps),
                                                    ("max_images", args.max_images), ("max_body", args.max_body))
                                if v is not None})  # fmt: skip
    device = _device(args.device)
    config = ServeConfig(
        data=Path(args.data).resolve(), model=args.model, preset=args.preset, preset_seed=args.preset_seed,
        host=args.host, port=args.port, token=args.token or os.environ.get("LATENTDIFF_TOKEN") or None,
        batch_size=args.batch_size or (4 if device.startswith("cuda") else 1), device=device, dtype=args.dtype,
        keep_hours=args.keep_hours, limits=limits,
    ).check()  # fmt: skip
    from .serve.app import create_app

    print(f"latentdiff serve: http://{config.host}:{config.port}/ (API docs at /docs), data in {config.data}",
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
    return 0


def control(args) -> int:
    from .fileio import atomic_write
    from .generation.control_images import make_control_image

    target = Path(args.output)
    if target.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InvalidInputError(f"-o {target}: give an image file name (.png, .jpg or .webp)")
    options = {"low": args.low, "high": args.high}
    image = make_control_image(args.kind, args.image, **{k: v for k, v in options.items() if v is not None})
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as f:
        image.save(f, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(target.suffix.lower(), "PNG"))
    print(target)
    return 0


# subcommand -> what runs it
COMMANDS = {"generate": generate, "batch": batch, "info": info, "schedules": schedules, "convert": convert,
            "data": data, "eval": evaluate, "train": train, "serve": serve, "control": control}  # fmt: skip
