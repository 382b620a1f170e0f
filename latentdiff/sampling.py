"""The denoising loop: per-image noise, classifier-free guidance, one scheduler step per timestep.

Everything the loop needs is passed in; nothing is kept between calls. The scheduler must be a
fresh instance whose ``set_timesteps`` has been called (see ``schedulers.make_scheduler``).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

StepCallback = Callable[[int, int, torch.Tensor], None]


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """Image i's private random stream: a CPU generator seeded with ``seeds[i]`` (seed contract)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_latents(
    generators: list[torch.Generator],
    shape: tuple[int, int, int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """z_T before scaling by the scheduler's ``init_noise_sigma``: (B, C, H/8, W/8).

    Row i is the *first* draw of generator i, made on the CPU in float32 and only then moved
    and cast, so it is the same on every device, at every batch size and in every position.
    """
    rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)


def rescale_guidance(eps_cfg: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Sec. 3.4, eqs. 15-16): match the per-image std of the guided prediction to the
    conditional one, then blend with weight ``phi`` to avoid over-flat images."""
    dims = tuple(range(1, eps_cfg.ndim))
    rescaled = eps_cfg * (eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * eps_cfg


def step_kwargs(scheduler, generators: list[torch.Generator], eta: float) -> dict:
    """Keyword arguments ``scheduler.step`` accepts: the per-image generators and, for DDIM, eta."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


@torch.no_grad()
def denoise(
    unet,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    *,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    generators: list[torch.Generator],
    eta: float = 0.0,
    callback: Optional[StepCallback] = None,
    progress: bool = False,
    timesteps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run the scheduler's timesteps over ``latents`` (B, C, h, w) and return z_0.

    ``cond`` / ``uncond`` are (B, L, D). With ``uncond`` given, the conditional and
    unconditional predictions come from one batched U-Net call on 2B latents (Ho & Salimans
    2022): eps = eps_u + s * (eps_c - eps_u). With ``uncond`` None there is one pass on B.
    ``timesteps`` defaults to all of the scheduler's (image-to-image runs only the last ones).
    """
    embeds = cond if uncond is None else torch.cat([uncond, cond])  # (B or 2B, L, D)
    extra = step_kwargs(scheduler, generators, eta)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    for i, t in enumerate(tqdm(timesteps, desc="denoising", unit="step", disable=not progress, leave=False)):
        model_in = latents if uncond is None else torch.cat([latents, latents])
        model_in = scheduler.scale_model_input(model_in, t)
        eps = unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if uncond is not None:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            if guidance_rescale > 0:
                eps = rescale_guidance(eps, eps_c, guidance_rescale)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if callback is not None:
            callback(i, int(t), latents)
    return latents
