"""The denoising loop: per-image noise, classifier-free guidance, one scheduler step per timestep.

Everything the loop needs is passed in; nothing is kept between calls. The scheduler must be a
fresh instance whose ``set_timesteps`` has been called (see ``schedulers.make_scheduler``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Inpaint:
    """What the loop needs to inpaint. ``mask`` is (B, 1, h, w), 1 where the image is repainted.

    A 9-channel inpainting U-Net reads the mask and the masked image's latents as extra input
    channels; a standard 4-channel U-Net is steered instead by putting the known region back,
    noised to the next step's level, after every step (as diffusers' inpainting pipeline does).
    """

    mask: torch.Tensor
    masked_latents: Optional[torch.Tensor]  # (B, C, h, w): 9-channel U-Net input, else None
    image_latents: Optional[torch.Tensor]  # (B, C, h, w): z_0 of the input, for 4-channel blending
    noise: torch.Tensor  # (B, C, h, w): the noise the start was made with


@dataclass
class Conditioning:
    """The text conditioning of a group of prompts (``indices``: their positions in the call).

    ``cond`` / ``uncond`` (P, L, D), ``uncond`` None without guidance; SDXL adds the pooled
    embeddings ``pooled`` / ``uncond_pooled`` (P, D'), which the U-Net reads with the micro-conditioning.
    """

    indices: list[int]
    cond: torch.Tensor
    uncond: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor] = None
    uncond_pooled: Optional[torch.Tensor] = None


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


def guidance_embedding(guidance_scales, embedding_dim: int) -> torch.Tensor:
    """The guidance-scale embedding an LCM-distilled U-Net takes as ``timestep_cond``: (B, embedding_dim)
    for ``guidance_scales`` (B,) (a sequence or tensor of the pipeline's scales, 1 = no guidance).

    Luo et al. 2023 ("Latent Consistency Models", Sec. 4.2) condition the student on the guidance
    scale w through a sinusoidal embedding of w, added to its timestep embedding. diffusers' LCM
    pipelines embed w = guidance_scale - 1 (their CFG formula is eps_u + s (eps_c - eps_u), the
    paper's eps_c + w (eps_c - eps_u)); this calls the very function they use, so the embedding is
    theirs to the bit. The trainer's distillation embeds its sampled scales with it too.
    """
    from diffusers import LatentConsistencyModelPipeline

    w = (torch.as_tensor(guidance_scales, dtype=torch.float64).cpu().reshape(-1) - 1).float()  # (B,), as diffusers rounds it
    # (an instance method that reads nothing from the instance)
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=embedding_dim)


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
    progress: Optional[bool] = False,
    timesteps: Optional[torch.Tensor] = None,
    inpaint: Optional[Inpaint] = None,
    added: Optional[dict[str, torch.Tensor]] = None,
    timestep_cond: Optional[torch.Tensor] = None,
    control: Optional[Callable[..., dict]] = None,
) -> torch.Tensor:
    """Run the scheduler's timesteps over ``latents`` (B, C, h, w) and return z_0.

    ``cond`` / ``uncond`` are (B, L, D). With ``uncond`` given, the conditional and
    unconditional predictions come from one batched U-Net call on 2B latents (Ho & Salimans
    2022): eps = eps_u + s * (eps_c - eps_u). With ``uncond`` None there is one pass on B.
    ``timesteps`` defaults to all of the scheduler's (image-to-image runs only the last ones).
    ``added``: SDXL's added conditioning for the U-Net (``text_embeds`` (B or 2B, D'), ``time_ids``
    (B or 2B, 5 or 6)), unconditional rows first as in ``cond`` / ``uncond``.
    ``timestep_cond`` (B, D): the guidance embedding of an LCM-distilled U-Net (:func:`guidance_embedding`),
    which then has no unconditional pass.
    ``control`` (a ``control.ControlStep``) gives the U-Net's extra inputs at each step: ControlNet
    residuals, T2I-Adapter features, IP-Adapter image embeddings.
    """
    embeds = cond if uncond is None else torch.cat([uncond, cond])  # (B or 2B, L, D)
    channels = None  # 9-channel inpainting input: mask and masked-image latents, for each pass
    if inpaint is not None and inpaint.masked_latents is not None:
        channels = torch.cat([inpaint.mask, inpaint.masked_latents], dim=1)  # (B, 5, h, w)
        channels = channels if uncond is None else torch.cat([channels, channels])
    extra = step_kwargs(scheduler, generators, eta)
    unet_extra = {} if added is None else {"added_cond_kwargs": added}
    if timestep_cond is not None:
        unet_extra["timestep_cond"] = timestep_cond.to(latents.device, latents.dtype)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    # No host-device sync inside the loop: the scheduler and the callback read the timesteps from
    # one host copy made here (its tables are on the host, so indexing them with a device tensor,
    # or `t >= 0` on one, would wait for the GPU every step); the U-Net gets them on its device.
    # The values are the same, so this changes no result.
    host_timesteps = timesteps.cpu()
    device_timesteps = timesteps.to(latents.device)
    _set_begin_index(scheduler, host_timesteps)
    # progress None: tqdm's own default (shown; TQDM_DISABLE=1 hides every bar), as tqdm users expect
    shown = {} if progress is None else {"disable": not progress}
    loop = tqdm(range(len(host_timesteps)), desc="denoising", unit="step", leave=False, **shown)
    for i in loop:
        t, t_host = device_timesteps[i], host_timesteps[i]
        model_in = latents if uncond is None else torch.cat([latents, latents])
        model_in = scheduler.scale_model_input(model_in, t_host)
        inputs = {} if control is None else control(i, len(host_timesteps), t, model_in, embeds)  # (latents only)
        if channels is not None:
            model_in = torch.cat([model_in, channels], dim=1)
        eps = unet(model_in, t, encoder_hidden_states=embeds, return_dict=False, **unet_extra, **inputs)[0]
        if uncond is not None:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            if guidance_rescale > 0:
                eps = rescale_guidance(eps, eps_c, guidance_rescale)
        latents = scheduler.step(eps, t_host, latents, **extra, return_dict=False)[0]
        if inpaint is not None and inpaint.masked_latents is None:  # 4-channel: known region back
            known = inpaint.image_latents
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(known, inpaint.noise, timesteps[i + 1 : i + 2])
            latents = (1 - inpaint.mask) * known + inpaint.mask * latents
        if callback is not None:
            callback(i, int(t_host), latents)
    return latents


def _set_begin_index(scheduler, host_timesteps: torch.Tensor) -> None:
    """Tell an index-tracking scheduler where the run starts, so its first ``step`` does not search
    its (device) timestep table with ``nonzero().item()``, a sync.

    Set only where the search has one answer (the first timestep occurs once in the schedule),
    which is then exactly the index diffusers would find; image-to-image sets it beforehand.
    """
    if not hasattr(scheduler, "set_begin_index") or getattr(scheduler, "begin_index", 0) is not None:
        return
    if len(host_timesteps) == 0:
        return
    whole = len(host_timesteps) == len(scheduler.timesteps)  # the run is the whole schedule: no second copy
    schedule = host_timesteps if whole else scheduler.timesteps.cpu()
    matches = (schedule == host_timesteps[0]).nonzero().flatten()
    if len(matches) == 1:
        scheduler.set_begin_index(int(matches[0]))
