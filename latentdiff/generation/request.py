"""One pipeline call, checked and completed in one place.

:meth:`Request.resolve` takes the arguments of ``LatentDiffusion.__call__`` and returns them in the
form the steps of the call use (one prompt list, one seed per image, the size, the scheduler's
name and class, the loaded input pictures), or raises the ``InvalidInputError`` that says what to
change; it also gives the warnings a doubtful argument deserves. Nothing in the steps that follow
checks an argument again.

The rules for the arguments that a batch file's rows carry too (images per prompt, steps,
guidance, width and height, scheduler, seed) are the functions below the class: ``batch`` applies
them to every row, under the row's column names, before any model is loaded.
"""

from __future__ import annotations

import secrets
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..checks import MAX_SEED, check_float, check_size, positive_int, whole_number
from ..errors import InvalidInputError
from .images import load_inputs
from .samplers import check_sampler_name, fresh_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
HIRES_UPSCALERS = ("latent", "pixel")
# Multistep schedulers whose history or warm-up cannot begin mid-schedule (image-to-image).
_NO_MIDWAY_START = ("PNDMScheduler", "LMSDiscreteScheduler")
# warnings point at the code that called the pipeline: resolve <- __call__ <- torch.no_grad's wrapper <- caller
_CALLER = 4


@dataclass
class Request:
    """Every argument of one call, checked, defaulted and expanded; built by :meth:`resolve`."""

    prompts: list[Optional[str]]  # one per prompt (None each when prompt_embeds replace the text)
    negatives: list[Optional[str]]  # one per prompt (None each with negative_prompt_embeds)
    prompt_embeds: Any  # (P, L, D) tensor or None
    negative_prompt_embeds: Any
    n: int  # images per prompt; image i belongs to prompt i // n (prompt-major order)
    seeds: list[int]  # one per image
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int
    width: int
    scheduler: Optional[str]  # the sampler's name as asked; None = the model's own scheduler
    scheduler_class: str  # the diffusers class that runs (for the recipe)
    clip_skip: int
    images: Optional[list]  # image-to-image inputs as RGB PIL images: one for all prompts, or one per prompt
    image_names: Optional[list]  # their files (None for an image given as an object)
    masks: Optional[list]  # inpainting masks, the same way
    mask_names: Optional[list]
    strength: Optional[float]  # image-to-image only
    hires_scale: Optional[float]
    hires_strength: Optional[float]
    hires_upscale: Optional[str]
    output_type: str
    callback: Optional[Callable]
    progress: bool

    @property
    def total(self) -> int:
        """Images in the call."""
        return len(self.prompts) * self.n

    @property
    def guided(self) -> bool:
        """Whether there is an unconditional pass (classifier-free guidance)."""
        return self.guidance_scale > 1.0

    def per_image(self, inputs: Optional[list]) -> Optional[list]:
        """One entry per image from ``inputs`` given once for all prompts or once per prompt."""
        if inputs is None:
            return None
        return [inputs[i // self.n if len(inputs) > 1 else 0] for i in range(self.total)]

    @classmethod
    def resolve(
        cls, pipe, *, prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale,
        guidance_rescale, height, width, seed, scheduler, eta, output_type, callback, progress, clip_skip,
        prompt_embeds, negative_prompt_embeds, image, strength, mask_image, hires_scale, hires_strength,
        hires_upscale,
    ) -> "Request":  # fmt: skip
        """Check the arguments of ``pipe(...)`` (same names, same meaning) and complete them.

        Raises ``InvalidInputError`` with what to change; warns where an argument has no effect.
        The scheduler is built and its timesteps set once here, so that a step count it cannot run
        fails before any work is done.
        """
        # prompts and negative prompts: one of each per prompt
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidInputError("give prompt or prompt_embeds (one of the two)")
        if prompt_embeds is not None:
            prompts = [None] * _check_embeds(prompt_embeds, "prompt_embeds", pipe.text_encoder).shape[0]
        else:
            prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt_embeds is not None:
            if negative_prompt is not None or prompt_embeds is None:
                raise InvalidInputError("negative_prompt_embeds goes with prompt_embeds, and replaces negative_prompt")
            if _check_embeds(negative_prompt_embeds, "negative_prompt_embeds", pipe.text_encoder).shape != prompt_embeds.shape:
                raise InvalidInputError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, prompt_embeds "
                    f"{tuple(prompt_embeds.shape)}; they must match"
                )
            negatives = [None] * len(prompts)
        elif negative_prompt is None or isinstance(negative_prompt, str):  # one for all prompts
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) != len(prompts):
            raise InvalidInputError(
                f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one negative "
                "prompt per prompt, or a single string for all"
            )
        n = check_count(num_images_per_prompt)
        steps = check_steps(num_inference_steps)

        # input pictures: image-to-image, inpainting
        images, image_names = load_inputs(image, len(prompts))
        masks, mask_names = load_inputs(mask_image, len(prompts), what="mask_image")
        if masks is not None:
            import numpy as np

            if any(np.asarray(m.convert("L")).max() < 128 for m in masks):
                warnings.warn("a mask_image has no white at all, so nothing is repainted", stacklevel=_CALLER - 1)
        if masks is not None and images is None:
            raise InvalidInputError("mask_image needs image= (the picture to inpaint)")
        if masks is None and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            raise InvalidInputError(
                f"this U-Net takes {pipe.unet.config.in_channels} input channels (an inpainting model); "
                "give image= and mask_image="
            )
        if masks is not None and strength is None:
            strength = 1.0
        if images is None and strength is not None:
            raise InvalidInputError("strength applies to image-to-image only; give image= too, or drop strength")
        f = pipe.vae_scale_factor
        if images is not None:
            strength = check_float(0.6 if strength is None else strength, "strength", 0.0, 1.0,
                                   "0 keeps the image, 1 replaces it")  # fmt: skip
            height = images[0].height // f * f if height is None else height
            width = images[0].width // f * f if width is None else width

        # resolution enhancement
        if hires_scale is None and (hires_strength is not None or hires_upscale is not None):
            raise InvalidInputError("hires_strength and hires_upscale need hires_scale (the upscale factor)")
        if hires_scale is not None:
            if masks is not None:
                raise InvalidInputError("hires does not combine with inpainting yet; inpaint first, then upscale the result")
            hires_scale = check_float(hires_scale, "hires_scale", 1.0, 8.0, "2 doubles the width and height")
            hires_strength = check_float(0.5 if hires_strength is None else hires_strength, "hires_strength", 0.0, 1.0,
                                         "0.5 is usual")  # fmt: skip
            hires_upscale = "latent" if hires_upscale is None else hires_upscale
            if hires_upscale not in HIRES_UPSCALERS:
                raise InvalidInputError(f"hires_upscale must be one of {', '.join(HIRES_UPSCALERS)}, got {hires_upscale!r}")

        # size, guidance, output, model
        height = check_side(pipe.default_size if height is None else height, "height", f)
        width = check_side(pipe.default_size if width is None else width, "width", f)
        guidance_scale = check_guidance(guidance_scale)
        guidance_rescale = check_float(guidance_rescale, "guidance_rescale", 0.0, 1.0, "0.7 is usual for v-prediction")
        eta = check_float(eta, "eta", 0.0, None, "eta is DDIM's noise level, 0 = deterministic")
        if output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise InvalidInputError(
                "this U-Net takes a guidance embedding (an LCM-distilled model); latentdiff does not run such "
                "models yet: use a standard SD 1.x / 2.x U-Net"
            )

        # seeds and scheduler
        seeds = expand_seeds(seed, len(prompts) * n)
        from .sampling import step_kwargs

        sched = fresh_scheduler(pipe, scheduler)
        sched_name = scheduler or type(sched).__name__
        if eta > 0 and "eta" not in step_kwargs(sched, [], eta):
            warnings.warn(f"eta={eta} has no effect with scheduler {sched_name}; use 'ddim'", stacklevel=_CALLER)
        midway = (images is not None and strength < 1.0) or hires_scale is not None  # not from pure noise
        if midway and type(sched).__name__ in _NO_MIDWAY_START:
            warnings.warn(
                f"{type(sched).__name__} cannot start part-way through its schedule accurately (diffusers' "
                "pipelines have the same flaw), so image-to-image keeps some noise; ddim, euler, heun, "
                "dpmpp_2m or unipc start exactly",
                stacklevel=_CALLER,
            )
        if guidance_scale <= 1.0 and (any(negatives) or negative_prompt_embeds is not None):
            warnings.warn("negative_prompt has no effect when guidance_scale <= 1 (no unconditional pass)", stacklevel=_CALLER)
        try:
            sched.set_timesteps(steps, device=pipe.device)
        except ValueError as e:  # e.g. more steps than the schedule has timesteps
            raise InvalidInputError(f"scheduler {sched_name} cannot run {steps} steps: {e}") from None

        request = cls(
            prompts=prompts, negatives=negatives, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, n=n, seeds=seeds, steps=steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, height=height, width=width,
            scheduler=scheduler, scheduler_class=type(sched).__name__, clip_skip=clip_skip, images=images,
            image_names=image_names, masks=masks, mask_names=mask_names, strength=strength,
            hires_scale=hires_scale, hires_strength=hires_strength, hires_upscale=hires_upscale,
            output_type=output_type, callback=callback, progress=sys.stderr.isatty() if progress is None else progress,
        )  # fmt: skip
        if masks is not None and any(m.size != im.size for m, im in zip(request.per_image(masks), request.per_image(images))):
            warnings.warn("mask_image and image differ in size; the mask is resized to the image", stacklevel=_CALLER)
        return request


# -- the rules for single arguments (batch files check their rows with them) ------------------------


def check_count(value, name: str = "num_images_per_prompt") -> int:
    return positive_int(value, name)


def check_steps(value, name: str = "num_inference_steps") -> int:
    return positive_int(value, name)


def check_guidance(value, name: str = "guidance_scale") -> float:
    return check_float(value, name, 0.0, None, "use 1 for no guidance, 7.5 is usual")


def check_side(value, name: str, multiple: int) -> int:
    """A width or height: a positive multiple of the VAE's scale factor (8 for Stable Diffusion)."""
    return check_size(name, value, multiple)


def check_scheduler(name: str) -> str:
    """A sampler name from ``samplers.SAMPLERS``."""
    check_sampler_name(name)
    return name


def expand_seeds(seed, total: int) -> list[int]:
    """One seed per image: None -> fresh random seeds; an int s -> s, s+1, ...; a list as given."""
    if seed is None:
        return [secrets.randbelow(2**32) for _ in range(total)]
    if whole_number(seed) is not None:
        first = whole_number(seed)
        if not 0 <= first <= MAX_SEED - (total - 1):
            raise InvalidInputError(
                f"seed must be from 0 to 2**64-{total} so that all {total} images (seed, seed+1, ...) fit, got {seed!r}"
            )
        return [first + i for i in range(total)]
    if not isinstance(seed, (list, tuple)):
        raise InvalidInputError(f"seed must be an int or a list of ints, got {type(seed).__name__}")
    if len(seed) != total:
        raise InvalidInputError(f"got {len(seed)} seeds for {total} images; give one seed per image, or a single int")
    seeds = [whole_number(s) for s in seed]
    for s, given in zip(seeds, seed):
        if s is None or not 0 <= s <= MAX_SEED:
            raise InvalidInputError(f"seeds must be whole numbers from 0 to 2**64-1, got {given!r}")
    return seeds


def _check_embeds(embeds, name: str, text_encoder):
    import torch

    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] < 1:
        raise InvalidInputError(f"{name} must be a (batch, tokens, dim) tensor")
    if embeds.shape[-1] != text_encoder.config.hidden_size:
        raise InvalidInputError(
            f"{name} has dimension {embeds.shape[-1]}, this model's text encoder {text_encoder.config.hidden_size}"
        )
    return embeds


def _as_prompt_list(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise InvalidInputError(f"{name} is an empty list; give at least one prompt (\"\" is an unconditional image)")
    return list(items)

