"""Image-to-image, inpainting and the hires pass: where denoising starts from an input picture.

Each function takes the pipeline (for its VAE, U-Net and device) and returns the start latents
and the timesteps still to run. The generator draws are made in the order diffusers' own
img2img / inpainting pipelines make them, so the results can be checked against those.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .sampling import Inpaint, initial_latents
from .vae import decode_unscaled
from .vae import encode as vae_encode


def img2img_start(pipe, images, size: tuple[int, int], generators, sched, steps: int, strength: float,
                  denoising_start: Optional[float] = None):  # fmt: skip
    """z_t of each input image and the timesteps left to run (SDEdit, Meng et al. 2022).

    PIL images are encoded (posterior sample from the image's generator: its next draw) and
    scaled; a latent batch is used as it is. Then each is noised, with the next draw of its
    generator, to the timestep at which the last ``strength`` part of the schedule begins.
    With ``denoising_start`` (a hand-off: the input is already as noisy as the schedule is after
    that fraction) no noise is added and the run starts there, as diffusers' SDXL img2img does.
    """
    if isinstance(images, torch.Tensor):
        z0 = images
    else:
        pixels = pixel_processor(pipe.vae_scale_factor).preprocess(images, height=size[0], width=size[1])
        z0 = encode_sample(pipe, pixels, generators)
    if denoising_start is not None:
        return z0.to(pipe.unet.dtype), start_timesteps(sched, denoising_start)
    noise = initial_latents(generators, tuple(z0.shape[1:]), device=pipe.device, dtype=pipe.unet.dtype)
    timesteps = strength_timesteps(sched, steps, strength)
    if len(timesteps) == 0:  # strength 0, or too small for one step: the encoded image itself
        return z0.to(pipe.unet.dtype), timesteps
    z = sched.add_noise(z0.to(pipe.unet.dtype), noise, timesteps[:1].repeat(len(z0)))
    return z, timesteps


def encode_sample(pipe, pixels: torch.Tensor, generators) -> torch.Tensor:
    """Scaled latents of (B, 3, H, W) pixels in [-1, 1]: a posterior sample, eps from each
    image's generator (its next draw), as diffusers' pipelines encode with generators."""
    posterior = vae_encode(pipe.vae, pixels, getattr(pipe, "vae_options", None))  # (B, C, h, w); tiled when large
    eps = initial_latents(generators, tuple(posterior.mean.shape[1:]), device=pipe.device, dtype=posterior.mean.dtype)
    return ((posterior.mean + posterior.std * eps) * pipe.vae.config.scaling_factor).to(pipe.unet.dtype)


def inpaint_start(pipe, images, masks, size, generators, sched, steps: int, strength: float):
    """Start latents, timesteps and loop state for inpainting.

    The generator draws follow diffusers' inpainting pipeline, so its 9-channel results can be
    compared: [input image's latent sample], noise, masked image's latent sample (drawn, and
    for a 4-channel U-Net not needed, so that the later draws line up all the same).
    """
    f = pipe.vae_scale_factor
    pixels = pixel_processor(f).preprocess(images, height=size[0], width=size[1])
    mask_px = mask_processor(f).preprocess(masks, height=size[0], width=size[1])  # (B, 1, H, W) in {0, 1}
    nine = pipe.unet.config.in_channels != pipe.vae.config.latent_channels
    timesteps = strength_timesteps(sched, steps, strength)
    full = strength == 1.0  # start from pure noise
    image_latents = None if (nine and full) else encode_sample(pipe, pixels, generators)
    shape = (pipe.vae.config.latent_channels, size[0] // f, size[1] // f)
    noise = initial_latents(generators, shape, device=pipe.device, dtype=pipe.unet.dtype)
    masked = pixels * (mask_px < 0.5)
    masked_latents = encode_sample(pipe, masked, generators) if nine else None
    if not nine:
        initial_latents(generators, shape)  # the draw diffusers spends on the masked image
    if full:
        latents = noise * sched.init_noise_sigma
    elif len(timesteps) == 0:
        latents = image_latents
    else:
        latents = sched.add_noise(image_latents, noise, timesteps[:1].repeat(len(images)))
    mask = torch.nn.functional.interpolate(mask_px, size=shape[1:]).to(pipe.device, pipe.unet.dtype)  # nearest
    return latents, timesteps, Inpaint(mask=mask, masked_latents=masked_latents, image_latents=image_latents, noise=noise)


def known_pixels(pipe, images, masks, size):
    """(mask (B, 1, H, W), the inputs after a VAE round trip (B, 3, H, W) in [-1, 1]): what the
    unmasked region of an inpainted image is set to. The round trip uses the posterior mean."""
    f = pipe.vae_scale_factor
    pixels = pixel_processor(f).preprocess(images, height=size[0], width=size[1])
    mask_px = mask_processor(f).preprocess(masks, height=size[0], width=size[1])
    options = getattr(pipe, "vae_options", None)
    mean = vae_encode(pipe.vae, pixels, options).mean
    return mask_px.to(pipe.device), decode_unscaled(pipe.vae, mean, options)


def strength_timesteps(sched, steps: int, strength: float) -> torch.Tensor:
    """The last ``strength`` part of the schedule (SDEdit); marks where the scheduler begins."""
    kept = min(int(steps * strength), steps)  # steps actually run
    if kept == 0:
        return sched.timesteps[:0]
    start = (steps - kept) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched.timesteps[start:]


def _cutoff(sched, fraction: float) -> int:
    """The training timestep at which ``fraction`` of the schedule is done (diffusers' rounding)."""
    total = sched.config.num_train_timesteps
    return int(round(total - (fraction * total)))


def end_timesteps(sched, timesteps: torch.Tensor, denoising_end: float) -> torch.Tensor:
    """The first part of ``timesteps``, up to where ``denoising_end`` of the schedule is done (the base
    model's share of a base -> refiner hand-off)."""
    return timesteps[: int((timesteps >= _cutoff(sched, denoising_end)).sum())]


def start_timesteps(sched, denoising_start: float) -> torch.Tensor:
    """The rest of the schedule after ``denoising_start`` of it (the refiner's share); marks where the
    scheduler begins. A second-order scheduler starts on the first half of a step, never mid-step."""
    count = int((sched.timesteps < _cutoff(sched, denoising_start)).sum())
    if sched.order == 2 and count % 2 == 0:
        count += 1
    begin = len(sched.timesteps) - count
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    return sched.timesteps[begin:]


@lru_cache(maxsize=8)
def pixel_processor(vae_scale_factor: int):
    """diffusers' image preprocessing and postprocessing: resize, [0, 255] <-> [-1, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor)


@lru_cache(maxsize=8)
def mask_processor(vae_scale_factor: int):
    """diffusers' mask preprocessing: greyscale, resized, in [0, 1], binarized at 0.5."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
