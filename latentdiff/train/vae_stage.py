"""The VAE stage of a from-scratch run: an ``AutoencoderKL`` trained on the run's own images.

Loss: mean squared reconstruction error plus ``kl_weight`` * KL(q(z|x) || N(0, I)) (the VAE of
Kingma & Welling 2014 with a small KL weight, as latent diffusion uses it, Rombach et al. 2022,
Sec. 3 — without the perceptual and adversarial terms, which need pretrained networks we cannot
download). A few images are held out and the stage reports their reconstruction PSNR. Afterwards
the latent scale is set from data, ``scaling_factor = 1 / std(z)`` (Rombach et al. 2022, Sec. 4.3.2),
so the U-Net sees unit-variance latents whatever this VAE learned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..data.buckets import BucketBatches, choose_view, render_view
from ..data.dataset import TrainDataset
from ..distributed import on_main
from ..fileio import atomic_dir
from ..models.architectures import downscale_factor
from ..tomlconfig import to_toml
from . import checkpoints
from .objective import draw_global, step_seed

SCALE_SAMPLES = 256  # training images used to measure the latent standard deviation


def split_holdout(digests: list[str], holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of records with image hashes ``digests``.

    A seeded choice of ``holdout`` distinct images, so every rank and every resume agrees; an image
    that appears several times (``data.repeats``) is held out with all its copies, never half.
    """
    unique = sorted(set(digests))
    random.Random(f"{seed}/vae-holdout").shuffle(unique)
    chosen = set(unique[: min(holdout, max(len(unique) - 1, 0))])
    held, seen = [], set()
    for i, d in enumerate(digests):
        if d in chosen and d not in seen:  # one copy of each held-out image is scored
            held.append(i)
            seen.add(d)
    kept = [i for i, d in enumerate(digests) if d not in chosen]
    return kept, held


def stage_lr(stage, step: int) -> float:
    """The LR of optimizer step ``step`` (0-based): ``stage.lr``, then down linearly to 0 over the last
    ``stage.decay_steps`` (Hu et al. 2024, MiniCPM's warmup-stable-decay schedule, without warm-up)."""
    left = stage.steps - step
    return stage.lr * min(1.0, left / stage.decay_steps) if stage.decay_steps else stage.lr


def start_nearly_deterministic(vae, log_variance: float = -8.0) -> None:
    """Shift the initial posterior log-variance to ``log_variance`` (std ~ 0.02 for -8).

    A freshly initialised encoder outputs log-variance ~ 0, so the decoder first sees latents
    drowned in unit noise and can only learn the mean image; with the KL weight as small as latent
    diffusion uses it, it takes thousands of steps to shrink that noise. Starting from a small
    posterior variance (the encoder may still grow it) makes the stage learn from the first step.
    """
    quant = getattr(vae, "quant_conv", None)
    layer = quant if quant is not None else vae.encoder.conv_out  # the layer that outputs (mean, logvar)
    with torch.no_grad():
        layer.bias[vae.config.latent_channels :] += log_variance


def psnr(reference: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1], shape (B, 3, H, W) (``evaluate.psnr`` on the [0, 1] scale)."""
    from ..evaluate import psnr as psnr01

    def unit(x: torch.Tensor):
        return ((x.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()

    return torch.from_numpy(psnr01(unit(reference), unit(image))).float()


def train_vae(session, pipe, data) -> Path:
    """Train ``pipe.vae`` on the run's images (``data``, a ``TrainingData``); returns
    ``<output_dir>/vae`` (skipped if it exists)."""
    config, acc = session.config, session.accelerator
    stage = config.vae
    target = session.out / "vae"
    if (target / "config.json").is_file():
        session.say(f"VAE stage already done: using {target}")
        report = target / "psnr.json"
        if report.is_file():  # so the model card still tells how the VAE was made
            _record(session.result, json.loads(report.read_text()))
        return target
    folder = session.out / "vae-stage"
    vae = pipe.vae
    vae.requires_grad_(True).train()
    torch.nn.Module.to(vae, session.device, dtype=torch.float32)
    if not config.model.vae_path and not (folder.is_dir() and checkpoints.complete(folder)):
        start_nearly_deterministic(vae)
    records = data.source.records
    kept, held = split_holdout([r.digest for r in records], stage.holdout, config.train.seed)
    size = (config.data.resolution, config.data.resolution)
    dataset = TrainDataset(data.source, [size], [0] * len(records), config.data, config.train.seed)
    batches = BucketBatches([0] * len(kept), stage.batch_size, config.train.seed, session.world, session.rank)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    model, optimizer = acc.prepare(_Autoencode(vae), optimizer)  # forward through DDP, so gradients sync

    on_main(checkpoints.remove_stale, folder)
    state = None
    resume = checkpoints.resolve("latest" if config.checkpoint.resume else "", folder)
    if resume is not None:
        state = checkpoints.load(acc, resume)
        session.say(f"VAE stage resumed from {resume.name}: step {state['step']}")
        session.forget_log_after(state["step"], "vae_")
    steps = session.steps(stage.steps, "VAE stage", state)
    per_rank = stage.batch_size
    for batch_keys in steps.batches(batches):
        pixels = torch.stack([dataset[(e, kept[i])]["pixels"] for e, i in batch_keys]).to(session.device)  # (B, 3, H, W)
        with acc.accumulate(model):
            shape = (per_rank * session.world, vae.config.latent_channels, *_latent_size(vae, pixels))
            eps = draw_global(shape, step_seed(config.train.seed, steps.micro, "vae"), session.device, session.rank, per_rank)
            for group in optimizer.param_groups:  # a pure function of the step: nothing to checkpoint
                group["lr"] = stage_lr(stage, steps.step)
            recon, kl = model(pixels, eps)
            # KL per latent element is summed over the latent by diffusers; normalise by pixels like the MSE
            loss = torch.nn.functional.mse_loss(recon.float(), pixels) + stage.kl_weight * kl.mean() / pixels[0].numel()
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not steps.advance(acc.sync_gradients):
            continue
        if steps.every(config.train.log_every):
            session.log({"vae_loss": acc.reduce(loss.detach(), reduction="mean").item()}, steps.step)
        if steps.due(stage.eval_every):
            value = _held_out_psnr(session, data, vae, held)
            session.log({"vae_psnr": value}, steps.step)
            session.say(f"VAE step {steps.step}: held-out PSNR {value:.2f} dB")
        if steps.due(config.checkpoint.every):
            _save(session, folder, steps.state())
    steps.close()

    vae.requires_grad_(False).eval()
    value = _held_out_psnr(session, data, vae, held)
    vae.register_to_config(scaling_factor=_latent_scale(session, vae, kept, dataset))
    session.say(f"VAE stage done: held-out PSNR {value:.2f} dB on {len(held)} images; "
                f"scaling_factor {vae.config.scaling_factor:.5f}")  # fmt: skip
    report = {"held_out_psnr_db": value, "held_out_images": len(held), "steps": steps.step, "seconds": steps.seconds()}
    on_main(_write_vae, vae, target, report)
    acc.free_memory()  # forget the VAE and its optimizer: the U-Net stage registers its own
    _record(session.result, report)
    return target


def _record(result, report: dict) -> None:
    result.vae_psnr = report.get("held_out_psnr_db")
    result.vae_seconds = report.get("seconds")
    result.vae_steps = report.get("steps")


def _write_vae(vae, target: Path, report: dict) -> None:
    with atomic_dir(target) as tmp:
        vae.save_pretrained(tmp)
        (tmp / "psnr.json").write_text(json.dumps(report))


@torch.no_grad()
def _held_out_psnr(session, data, vae, held: list[int]) -> float:
    """Mean PSNR of centre-cropped held-out images after encode (posterior mean) and decode; every rank computes it."""
    if not held:
        return float("nan")
    was_training = vae.training
    vae.eval()
    values = []
    size = (session.config.data.resolution,) * 2
    for start in range(0, len(held), 8):
        images = []
        for i in held[start : start + 8]:
            record = data.source.records[i]
            view = choose_view(record.size, size, _centre(session.config.data), random.Random(0))
            images.append(render_view(data.source.image(record), view))
        pixels = torch.stack(images).to(session.device)
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        values.append(psnr(pixels, recon))
    vae.train(was_training)
    return float(torch.cat(values).mean())


@torch.no_grad()
def _latent_scale(session, vae, kept: list[int], dataset) -> float:
    chosen = kept[:SCALE_SAMPLES]
    latents = []
    for start in range(0, len(chosen), 16):
        pixels = torch.stack([dataset[(0, i)]["pixels"] for i in chosen[start : start + 16]]).to(session.device)
        latents.append(vae.encode(pixels).latent_dist.mean.float())
    return float(1.0 / torch.cat(latents).std().clamp(min=1e-6))


def _centre(data_config):
    from dataclasses import replace

    return replace(data_config, center_crop=True, random_flip=False)


def _save(session, folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {**state, "stage": "vae", "seed": session.config.train.seed}
    checkpoints.save(session.accelerator, folder, state["step"], state, to_toml(session.config), session.config.checkpoint.keep)


class _Autoencode(torch.nn.Module):
    """encode -> reparameterised sample -> decode as one forward, so DDP sees (and syncs) the whole step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor):
        dist = self.vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * eps  # z ~ q(z | x), (B, C, H/f, W/f)
        return self.vae.decode(z).sample, dist.kl()


def _latent_size(vae, pixels: torch.Tensor) -> tuple[int, int]:
    factor = downscale_factor(vae)
    return pixels.shape[-2] // factor, pixels.shape[-1] // factor

