"""What a training run writes besides its checkpoints: validation grids, the final model folder,
LoRA file or ControlNet folder, and the model card.

The main process writes; the others wait for it through ``distributed.on_main``, so a failed
write (a full disk) ends every process with an error instead of a hang.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from ..distributed import on_main
from ..fileio import atomic_dir, atomic_write
from ..generation.images import grid
from ..tomlconfig import to_toml
from .config import TrainConfig
from .objective import inference_scheduler_config
from .setup import Run, TrainResult


def inference_pipe(run: Run):
    """A pipeline over the modules being trained (no copies), with the trained noise schedule; in a ControlNet
    run, with the ControlNet being trained loaded (as it is: its precision is the training's)."""
    from ..generation.pipeline import LatentDiffusion

    acc, pipe = run.session.accelerator, run.pipe
    scheduler_config = inference_scheduler_config(pipe.scheduler_config, run.noise_scheduler)
    if run.distill is not None and not run.session.config.lora.enabled:  # an LCM U-Net samples with LCMScheduler
        from .distill import lcm_scheduler_config

        scheduler_config = lcm_scheduler_config(pipe.scheduler_config, run.noise_scheduler)
    pipe = LatentDiffusion(
        unet=acc.unwrap_model(run.unet),
        vae=pipe.vae,
        text_encoder=None if run.text_encoder is None else acc.unwrap_model(run.text_encoder),
        tokenizer=pipe.tokenizer,
        text_encoder_2=None if run.text_encoder_2 is None else acc.unwrap_model(run.text_encoder_2),
        tokenizer_2=pipe.tokenizer_2,
        force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt,
        scheduler_config=scheduler_config,
        source={"training": str(run.session.out)},
    )
    if run.controlnet is not None:
        from ..generation.control import Control

        net = acc.unwrap_model(run.controlnet)
        if next(net.parameters()).dtype != pipe.dtype:  # mixed precision: a float32 ControlNet, a half-precision U-Net
            from .controlnet import InDtype

            net = InDtype(net, pipe.dtype)
        pipe.controls.items.append(Control("controlnet", "controlnet", net, None))
    return pipe


def validate(run: Run, step: int) -> None:
    """Images of the validation prompts (EMA weights), split across ranks, as one grid per step."""
    from accelerate.utils import gather_object

    session = run.session
    val = session.config.validation
    if not val.prompts:
        return
    jobs = [(p, s) for p in val.prompts for s in val.seeds]
    # prompts split across ranks; sharded weights need every rank in every forward, so all run all
    mine = list(range(len(jobs)))[0 if session.sharded else session.rank :: 1 if session.sharded else session.world]
    pipe = inference_pipe(run)
    moved = [m for name, m in pipe.networks() if name != "unet" and next(m.parameters()).device != session.device]
    for module in moved:
        module.to(session.device)
    if run.ema is not None:
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
    for module in run.modules:
        module.eval()
    size = session.config.data.resolution
    made = []
    try:
        with torch.no_grad(), session.accelerator.autocast():
            for i in mine:
                prompt, seed = jobs[i]
                control = {}
                if run.controlnet is not None:  # the prompt's conditioning image
                    control["control_image"] = val.control_images[i // len(val.seeds)]
                image = pipe(prompt, seed=seed, num_inference_steps=val.steps, guidance_scale=val.guidance,
                             scheduler=val.scheduler, height=size, width=size, output_type="np",
                             progress=False, **control).images[0]  # fmt: skip
                made.append((i, (image * 255).round().astype("uint8")))
    finally:
        for module in run.modules:
            module.train()
        if run.ema is not None:
            run.ema.restore(run.params)
        for module in moved:
            module.to("cpu")
    gathered = made if session.sharded else sorted(gather_object(made), key=lambda item: item[0])
    on_main(_write_grid, run, [image for _, image in gathered], step)


def _write_grid(run: Run, images: list, step: int) -> None:
    """One row per validation prompt, one column per seed, labelled with both and the step; the PNG
    also carries them as JSON (text chunk ``validation``)."""
    from PIL import PngImagePlugin

    session = run.session
    val = session.config.validation
    sheet = grid(images, columns=len(val.seeds), row_labels=val.prompts, column_labels=[f"seed {s}" for s in val.seeds],
                 title=f"step {step}", scale=max(1, 128 // images[0].shape[0]))  # small images enlarged
    folder = session.out / "validation"
    folder.mkdir(exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("validation", json.dumps({"step": step, "prompts": val.prompts, "seeds": val.seeds,
                                            "steps": val.steps, "guidance": val.guidance, "scheduler": val.scheduler}))  # fmt: skip
    with atomic_write(folder / f"step-{step:08d}.png") as f:
        sheet.save(f, format="PNG", pnginfo=info)
    if session.tensorboard:
        import numpy as np

        session.accelerator.get_tracker("tensorboard", unwrap=True).add_image(
            "validation", np.asarray(sheet), step, dataformats="HWC"
        )


def save_outputs(run: Run, step: int) -> None:
    """The final model folder (or LoRA file, or ControlNet folder) with a model card; main process only writes."""
    session, acc = run.session, run.session.accelerator
    acc.wait_for_everyone()
    if run.ema is not None:
        run.ema.copy_to(run.params)  # the final weights are the averaged ones
    full = [acc.get_state_dict(m) for m in run.modules] if session.sharded else None  # collective
    session.result.steps = step
    on_main(_write_final, run, step, full)
    lora = session.config.lora.enabled  # every rank reports the same places
    controlnet = run.controlnet is not None
    session.result.model_dir = None if lora or controlnet else session.out / "model"
    session.result.lora_file = session.out / "lora.safetensors" if lora else None
    session.result.controlnet_dir = session.out / "controlnet" if controlnet else None


def _write_final(run: Run, step: int, full) -> None:
    session, acc, config = run.session, run.session.accelerator, run.session.config
    pipe = inference_pipe(run)
    if full is not None:  # whole weights gathered from the shards, into plain copies of the modules
        pipe.unet, pipe.text_encoder, pipe.text_encoder_2 = (
            None if m is None else _gathered(acc, m, full, run.modules) for m in (run.unet, run.text_encoder, run.text_encoder_2))
    card = model_card(config, session.result, run.steps.seconds(), len(run.data.source.records), session.world)
    if run.controlnet is not None:
        net = acc.unwrap_model(run.controlnet) if full is None else _gathered(acc, run.controlnet, full, run.modules)
        folder = session.out / "controlnet"
        with atomic_dir(folder) as tmp:  # complete or absent: diffusers' ControlNetModel folder, our card beside it
            net.save_pretrained(tmp, safe_serialization=True)
            if plot_training_log(session.out / "log.jsonl", tmp / "loss.png"):
                card += "\n## Loss\n\n![training loss](loss.png)\n"
            with atomic_write(tmp / "README.md", "w") as f:
                f.write(card)
        print(f"ControlNet written to {folder}")
    elif config.lora.enabled:
        from peft.utils import get_peft_model_state_dict

        from ..models.lora import save_lora

        lora = config.lora
        path = save_lora(
            session.out / "lora.safetensors",
            unet_state=get_peft_model_state_dict(pipe.unet),
            text_encoder_state=get_peft_model_state_dict(pipe.text_encoder)
            if run.train_text_encoder and pipe.text_encoder is not None else None,
            text_encoder_2_state=get_peft_model_state_dict(pipe.text_encoder_2)
            if run.train_text_encoder and pipe.text_encoder_2 is not None else None,
            sdxl=pipe.sdxl,
            rank=lora.rank,
            alpha=lora.alpha,
            metadata={"latentdiff_config": to_toml(config), "ss_steps": str(step)},
            layout=lora.layout,
        )
        with atomic_write(session.out / "README.md", "w") as f:
            f.write(card)
        print(f"LoRA written to {path}")
    else:
        folder = pipe.save_pretrained(session.out / "model")
        if plot_training_log(session.out / "log.jsonl", folder / "loss.png"):
            card += "\n## Loss\n\n![training loss](loss.png)\n"
        with atomic_write(folder / "README.md", "w") as f:
            f.write(card)
        print(f"model written to {folder}")


def plot_training_log(log: Path, target: Path) -> bool:
    """Plot the losses of ``log.jsonl`` (U-Net stage; VAE stage and held-out PSNR where the run had
    one) to ``target``; False, writing nothing, without matplotlib or without logged losses.

    A step logged twice (a session resumed before its next checkpoint redoes some steps) keeps its
    last value. Uses a bare ``Figure``, so the caller's pyplot state is untouched.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    series: dict[str, dict[int, float]] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("loss", "vae_loss", "vae_psnr"):
                if key in row:
                    series.setdefault(key, {})[row["step"]] = row[key]
    if "loss" not in series and "vae_loss" not in series:
        return False
    panels = [k for k in ("vae_loss", "loss") if k in series]
    fig = Figure(figsize=(5.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = {"vae_loss": "VAE stage: reconstruction MSE + KL", "loss": "U-Net stage: diffusion loss"}
    for ax, key in zip(axes, panels):
        steps = sorted(series[key])
        ax.plot(steps, [series[key][s] for s in steps], color="C0")
        ax.set(xlabel="optimizer step", ylabel="loss", title=titles[key], yscale="log")
        ax.grid(alpha=0.3)
        if key == "vae_loss" and "vae_psnr" in series:
            twin = ax.twinx()
            at = sorted(series["vae_psnr"])
            twin.plot(at, [series["vae_psnr"][s] for s in at], "o-", color="C1")
            twin.set_ylabel("held-out PSNR (dB)", color="C1")
    fig.tight_layout()
    with atomic_write(target) as f:
        fig.savefig(f, format="png", dpi=100)
    return True


def model_card(config: TrainConfig, result: TrainResult, seconds: float, images: int, processes: int) -> str:
    """The model folder's README.md: what it was trained from, on what, how long, with what settings."""
    from .._version import __version__

    kind = "LoRA adapter" if config.lora.enabled else ("fine-tuned" if config.model.path else "trained from scratch")
    if config.distill.enabled:  # Luo et al. 2023: sample with the lcm sampler, 1-8 steps
        kind = "LCM-LoRA" if config.lora.enabled else "LCM-distilled"
    if config.controlnet.enabled:
        kind = "ControlNet"
    base = config.model.path or f"random weights of preset '{config.model.preset}' (seed {config.model.init_seed})"
    rows = [
        ("base", base),
        *([("ControlNet", (f"started from {config.controlnet.path or 'the base U-Net (ControlNetModel.from_unet)'}; "
                           f"conditioning images from column '{config.controlnet.conditioning_column}'; "
                           "load with pipe.load_controlnet(this folder) or diffusers' ControlNetModel.from_pretrained"))]
          if config.controlnet.enabled else []),
        ("data", f"{config.data.path}: {images} images used, {len(result.skipped)} skipped"),
        ("steps", f"{result.steps} optimizer steps, global batch {config.train.batch_size * processes * config.train.gradient_accumulation}"),
        ("training time", f"{seconds / 60:.1f} min (all sessions of the run)" + _stage_times(result, seconds)),
        ("hardware", f"{hardware()}, {processes} process(es), mixed precision {config.train.mixed_precision}"),
        ("library", f"latentdiff {__version__}, torch {torch.__version__}"),
    ]  # fmt: skip
    if result.losses:
        rows.append(("last logged loss", f"{result.losses[-1]:.4f}"))
    if result.vae_psnr is not None:
        rows.append(("VAE held-out PSNR", f"{result.vae_psnr:.2f} dB"))
    lines = [f"# latentdiff model ({kind})", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    licences = _data_licences(config.data.path)
    if licences:
        lines += ["## Data and licences", "", *licences, ""]
    command = " ".join(["latentdiff train", *sys.argv[1:]]) if sys.argv[0].endswith("latentdiff") else " ".join(sys.argv)
    lines += ["## How it was made", "", f"`{command}` with this resolved configuration:", "", "```toml", to_toml(config) + "```", ""]
    return "\n".join(lines)


def _stage_times(result: TrainResult, unet_seconds: float) -> str:
    """'': one stage; else how the whole run's wall time splits between its stages."""
    if result.vae_seconds is None:
        return ""
    total = result.vae_seconds + result.cache_seconds + unet_seconds
    return (f" for the U-Net stage; VAE stage {result.vae_seconds / 60:.1f} min ({result.vae_steps} steps), "
            f"latent cache {result.cache_seconds / 60:.1f} min (last session); {total / 60:.1f} min in all")  # fmt: skip


def _data_licences(paths) -> list[str]:
    """One line per data source that says where it came from and its licence (from a builder's dataset.json)."""
    lines = []
    for path in paths if isinstance(paths, list) else [paths]:
        for folder in (Path(path), Path(path).parent):
            info = folder / "dataset.json"
            if info.is_file():
                meta = json.loads(info.read_text())
                lines.append(f"- `{path}`: {meta.get('source', '?')} Licence: {meta.get('licence', 'unknown')}.")
                break
        else:
            lines.append(f"- `{path}`: no dataset.json; source and licence not recorded")
    return lines


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}"
    return f"CPU ({platform.machine()})"


def _gathered(acc, module, states, prepared):
    """``module`` as a plain unsharded copy holding the gathered full weights (or itself if not trained)."""
    for candidate, state in zip(prepared, states):
        if candidate is module:
            inner = acc.unwrap_model(module)
            # a fresh instance of the same architecture: copying the sharded module would copy its shards
            plain = type(inner).from_config(inner.config) if hasattr(type(inner), "from_config") else type(inner)(inner.config)
            plain.load_state_dict(state)
            return plain.eval()
    return acc.unwrap_model(module)
