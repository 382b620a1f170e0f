"""The training objective: the forward noising process, the prediction target and the loss weighting."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def noise_scheduler_for(obj, model_scheduler_config: dict):
    """The DDPMScheduler that defines the forward process q(z_t | z_0) for training."""
    from diffusers import DDPMScheduler

    from .noise_schedules import noise_schedule_config

    if obj.noise_schedule:
        settings = noise_schedule_config(obj.noise_schedule, obj.num_train_timesteps, obj.zero_terminal_snr)
    else:  # the model's own betas
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        settings = {k: model_scheduler_config[k] for k in keys if k in model_scheduler_config}
        settings["rescale_betas_zero_snr"] = obj.zero_terminal_snr or model_scheduler_config.get("rescale_betas_zero_snr", False)
    settings.pop("_class_name", None)
    settings["prediction_type"] = obj.prediction_type or model_scheduler_config.get("prediction_type", "epsilon")
    return DDPMScheduler(**settings)

def inference_scheduler_config(model_scheduler_config: dict, noise_scheduler) -> dict:
    """The model's scheduler config updated to what it was trained with (saved with the model)."""
    c = noise_scheduler.config
    out = dict(model_scheduler_config)
    out.update(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        prediction_type=c.prediction_type,
    )
    if c.rescale_betas_zero_snr:
        # A zero-terminal-SNR model must start sampling at the last timestep (Lin et al. 2024, Sec. 3.3).
        out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out

def diffusion_loss(
    model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler, snr_gamma: float
) -> torch.Tensor:
    """Per-sample loss (B,): MSE against the target of the prediction type, min-SNR-gamma weighted if asked."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)  # v = a_t * eps - s_t * x0 (Salimans & Ho 2022)
    else:
        target = latents
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()  # SNR(t) = alpha_bar / (1 - alpha_bar)
        clipped = torch.clamp(snr, max=snr_gamma)
        # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", Sec. 3.4: the
        # weight min(SNR, gamma) on the x0 loss, expressed for the other targets.
        if kind == "epsilon":
            weight = clipped / snr.clamp(min=1e-8)
        elif kind == "v_prediction":
            weight = clipped / (snr + 1)
        else:
            weight = clipped
        per_sample = per_sample * weight
    return per_sample

def x0_and_noise(output: torch.Tensor, z_t: torch.Tensor, timesteps: torch.Tensor, noise_scheduler):
    """(x_0, eps) predicted by a model ``output`` at ``z_t`` (B, C, h, w) and ``timesteps`` (B,), from
    z_t = a_t x_0 + s_t eps (a_t^2 = alpha_bar_t, s_t^2 = 1 - a_t^2) and the prediction type: eps,
    x_0, or v = a_t eps - s_t x_0 (Salimans & Ho 2022), so x_0 = a_t z_t - s_t v and eps = a_t v + s_t z_t."""
    abar = noise_scheduler.alphas_cumprod.to(z_t.device, torch.float32)[timesteps].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return (z_t - s * output) / a, output
    if kind == "v_prediction":
        return a * z_t - s * output, a * output + s * z_t
    return output, (z_t - a * output) / s


def step_seed(seed: int, micro_step: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{micro_step}/{what}".encode()).digest()[:7], "little")

def draw_global(shape, generator_seed: int, device, rank: int, per_rank: int, kind: str = "normal") -> torch.Tensor:
    """Draw for the whole global batch (dim 0 = every process's samples) and keep this rank's slice."""
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    if kind == "normal":
        full = torch.randn(shape, generator=generator, device=device)
    elif kind == "uniform":
        full = torch.rand(shape, generator=generator, device=device)
    else:
        full = torch.randint(0, kind, shape, generator=generator, device=device)
    return full[rank * per_rank : (rank + 1) * per_rank]
