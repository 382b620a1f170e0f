"""One pipeline call, checked and completed in one place.

:meth:`Request.resolve` takes the arguments of ``LatentDiffusion.__call__`` and returns them in the
form the steps of the call use (one prompt list, one seed per image, the size, the scheduler's
name and class, the loaded input pictures), or raises the ``InvalidInputError`` that says what to
change; it also gives the warnings a doubtful argument deserves. Nothing in the steps that follow
checks an argument again. Its first half, :func:`check_arguments`, needs no weights: the command
line runs it before loading a model, so a bad argument fails in a second, not after the load.
Every call is bounded by ``pipe.limits`` (``checks.Limits``).

The rules for the arguments that a batch file's rows carry too (images per prompt, steps,
guidance, width and height, scheduler, seed) are the functions below the class: ``batch`` applies
them to every row, under the row's column names, before any model is loaded.
"""

from __future__ import annotations

import functools
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..checks import MAX_SEED, Limits, check_float, check_size, check_text, positive_int, whole_number
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
    progress: Optional[bool]  # None: tqdm's own default (a bar, unless TQDM_DISABLE=1)
    # SDXL (all None / empty for SD 1.x / 2.x models)
    prompts_2: Optional[list] = None  # the second encoder's text, one per prompt (None: as prompts)
    negatives_2: Optional[list] = None
    pooled_prompt_embeds: Any = None  # (P, D2)
    negative_pooled_prompt_embeds: Any = None
    zero_negative: bool = False  # no negative prompt given: zeros instead of an encoded "" (diffusers' default)
    micro: Optional[dict] = None  # micro-conditioning arguments as given (None values: the defaults)
    denoising_start: Optional[float] = None  # fraction of the schedule already done in the input (hand-off)
    denoising_end: Optional[float] = None  # fraction of the schedule after which to stop
    # an LCM-distilled U-Net takes the guidance scale as an embedding (its time_cond_proj_dim), not as a second pass
    guidance_embedding_dim: Optional[int] = None
    cache_interval: Optional[int] = None  # U-Net feature caching (feature_cache.py): a full U-Net call every N
    cache_branch: Optional[int] = None
    # ControlNets / T2I-Adapters, one entry per loaded control (in load order): its pictures (one for all
    # prompts, or one per prompt), their files, scale, and the fractions of the steps it acts on
    control_images: Optional[list] = None
    control_image_names: Optional[list] = None
    control_scales: list = None
    control_starts: list = None
    control_ends: list = None
    ip_images: Optional[list] = None  # IP-Adapter image prompts: one for all prompts, or one per prompt
    ip_image_names: Optional[list] = None
    ip_scale: float = 1.0

    @property
    def total(self) -> int:
        """Images in the call."""
        return len(self.prompts) * self.n

    @property
    def guided(self) -> bool:
        """Whether there is an unconditional pass (classifier-free guidance); an LCM-distilled U-Net
        takes the guidance scale as an embedding instead."""
        return self.guidance_scale > 1.0 and self.guidance_embedding_dim is None

    def per_image(self, inputs: Optional[list]) -> Optional[list]:
        """One entry per image from ``inputs`` given once for all prompts or once per prompt (latents
        given as ``image=`` have one row per image already)."""
        if inputs is None or _is_tensor(inputs):
            return inputs
        return [inputs[i // self.n if len(inputs) > 1 else 0] for i in range(self.total)]

    @classmethod
    def resolve(cls, pipe, **arguments) -> "Request":
        """Check the arguments of ``pipe(...)`` (same names, same meaning) and complete them.

        Raises ``InvalidInputError`` with what to change; warns where an argument has no effect.
        First the checks that need no weights (:func:`check_arguments`, which the CLI also runs
        before loading a model), then those that need the model's parts. The scheduler is built
        and its timesteps set once here, so that a step count it cannot run fails before any work.
        """
        a = check_arguments(arguments, pipe.limits, factor=pipe.vae_scale_factor, default_size=pipe.default_size,
                            controls=len(pipe.controls))  # fmt: skip
        _check_control_fit(pipe, a)
        prompt_embeds, negative_prompt_embeds = arguments.get("prompt_embeds"), arguments.get("negative_prompt_embeds")
        if prompt_embeds is not None:
            _check_embeds(prompt_embeds, "prompt_embeds", pipe.conditioning_width)
        if negative_prompt_embeds is not None:
            _check_embeds(negative_prompt_embeds, "negative_prompt_embeds", pipe.conditioning_width)
        images, masks, strength, hires_scale = a["images"], a["masks"], a["strength"], a["hires_scale"]
        if masks is None and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            raise InvalidInputError(
                f"this U-Net takes {pipe.unet.config.in_channels} input channels (an inpainting model); "
                "give image= and mask_image="
            )

        # scheduler
        from .sampling import step_kwargs

        scheduler, steps, eta = a["scheduler"], a["steps"], a["eta"]
        sched = fresh_scheduler(pipe, scheduler)
        sched_name = scheduler or type(sched).__name__
        embedding_dim = pipe.unet.config.time_cond_proj_dim
        if embedding_dim is not None and type(sched).__name__ != "LCMScheduler":
            raise InvalidInputError(
                f"this U-Net is LCM-distilled (it takes the guidance scale as an embedding), so it samples with "
                f"scheduler='lcm' (--scheduler lcm) in 1-8 steps, not {sched_name}"
            )
        cache_branch = None
        if a["cache_interval"] is not None:
            from .feature_cache import branch_count

            cache_branch, count = a["cache_branch"] or 0, branch_count(pipe.unet)
            if cache_branch >= count:
                raise InvalidInputError(f"cache_branch must be from 0 to {count - 1} for this U-Net, got {cache_branch}")
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
        if (a["guidance_scale"] <= 1.0 or embedding_dim is not None) and (any(a["negatives"]) or negative_prompt_embeds is not None):
            why = "an LCM-distilled U-Net embeds the guidance scale" if embedding_dim is not None else "guidance_scale <= 1"
            warnings.warn(f"negative_prompt has no effect: {why} (no unconditional pass)", stacklevel=_CALLER)
        _warn_far_from_native(pipe, a["height"], a["width"])
        try:
            sched.set_timesteps(steps, device=pipe.device)
        except ValueError as e:  # e.g. more steps than the schedule has timesteps
            raise InvalidInputError(f"scheduler {sched_name} cannot run {steps} steps: {e}") from None
        _check_timesteps(sched, sched_name, steps)

        sdxl = _sdxl_arguments(pipe, a, arguments)
        request = cls(
            **sdxl,
            prompts=a["prompts"], negatives=a["negatives"], prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, n=a["n"], seeds=a["seeds"], steps=steps,
            guidance_scale=a["guidance_scale"], guidance_rescale=a["guidance_rescale"], eta=eta, height=a["height"],
            width=a["width"], scheduler=scheduler, scheduler_class=type(sched).__name__, clip_skip=a["clip_skip"],
            images=images, image_names=a["image_names"], masks=masks, mask_names=a["mask_names"], strength=strength,
            hires_scale=hires_scale, hires_strength=a["hires_strength"], hires_upscale=a["hires_upscale"],
            output_type=a["output_type"], callback=a["callback"], progress=a["progress"],
            guidance_embedding_dim=embedding_dim, cache_interval=a["cache_interval"], cache_branch=cache_branch,
            **{k: a[k] for k in _CONTROL_FIELDS},
        )  # fmt: skip
        if request.zero_negative:  # recorded as no negative prompt, so that a remake zeros it too
            request.negatives = [None] * len(request.prompts)
        if pipe.unet.config.in_channels == pipe.vae.config.latent_channels and _is_tensor(images) and (
                images.shape[1] != pipe.vae.config.latent_channels):  # fmt: skip
            raise InvalidInputError(f"latents given as image= have {images.shape[1]} channels, this model's "
                                    f"{pipe.vae.config.latent_channels}")  # fmt: skip
        if masks is not None and any(m.size != im.size for m, im in zip(request.per_image(masks), request.per_image(images))):
            warnings.warn("mask_image and image differ in size; the mask is resized to the image", stacklevel=_CALLER)
        return request


def check_arguments(arguments: dict[str, Any], limits: Limits, *, factor: Optional[int] = None,
                    default_size: Optional[int] = None, controls: int = 0) -> dict[str, Any]:  # fmt: skip
    """The checks of a call that need no weights: types, ranges and ``limits``, input pictures read.

    ``arguments`` are those of ``LatentDiffusion.__call__`` (missing ones take its defaults);
    ``factor`` (the VAE's downscale factor) and ``default_size`` (the model's native side) come
    from the model's config and may be None when unknown, which skips the checks that need them;
    ``controls`` is the number of ControlNets and T2I-Adapters that will be loaded.
    Returns the values completed: one prompt and negative per prompt, seeds, size, loaded inputs.
    """
    defaults = _call_defaults()
    unknown = sorted(set(arguments) - set(defaults))
    if unknown:
        raise InvalidInputError(f"unknown argument {unknown[0]!r}; the pipeline takes: {', '.join(defaults)}")
    a = {**defaults, **arguments}
    prompt, prompt_embeds = a["prompt"], a["prompt_embeds"]
    callback = a["callback"]
    if callback is not None and not callable(callback):
        raise InvalidInputError(f"callback must be a function callback(step, timestep, latents) or None, got {callback!r}")
    if a["progress"] is not None and not isinstance(a["progress"], bool):
        raise InvalidInputError(f"progress must be True, False or None (a bar where tqdm shows one), got {a['progress']!r}")
    if a["output_type"] not in OUTPUT_TYPES:
        raise InvalidInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {a['output_type']!r}")

    # prompts and negative prompts: one of each per prompt
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidInputError("give prompt or prompt_embeds (one of the two)")
    if prompt_embeds is not None:
        prompts = [None] * _check_embeds(prompt_embeds, "prompt_embeds").shape[0]
    else:
        prompts = _as_prompt_list(prompt, "prompt", limits)
    negative_prompt, negative_prompt_embeds = a["negative_prompt"], a["negative_prompt_embeds"]
    if negative_prompt_embeds is not None:
        if negative_prompt is not None or prompt_embeds is None:
            raise InvalidInputError("negative_prompt_embeds goes with prompt_embeds, and replaces negative_prompt")
        if _check_embeds(negative_prompt_embeds, "negative_prompt_embeds").shape != prompt_embeds.shape:
            raise InvalidInputError(
                f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, prompt_embeds "
                f"{tuple(prompt_embeds.shape)}; they must match"
            )
        negatives = [None] * len(prompts)
    elif negative_prompt is None or isinstance(negative_prompt, str):  # one for all prompts
        negatives = [_as_prompt_list(negative_prompt or "", "negative_prompt", limits)[0]] * len(prompts)
    else:
        negatives = _as_prompt_list(negative_prompt, "negative_prompt", limits)
    if len(negatives) != len(prompts):
        raise InvalidInputError(
            f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one negative "
            "prompt per prompt, or a single string for all"
        )
    n = check_count(a["num_images_per_prompt"])
    if len(prompts) * n > limits.images:
        raise limits.exceeded("images", f"{len(prompts)} prompts x {n} images per prompt = {len(prompts) * n} images in one call",
                              "make them in several calls, or use latentdiff batch")  # fmt: skip
    steps = check_steps(a["num_inference_steps"], limits=limits)
    clip_skip = a["clip_skip"]
    if whole_number(clip_skip) is None or clip_skip < 0:
        raise InvalidInputError(f"clip_skip must be a whole number of at least 0, got {clip_skip!r}")

    # input pictures: image-to-image, inpainting
    if _is_tensor(a["image"]):  # latents (B, C, h, w) from an earlier call (output_type="latent"): a hand-off
        images, image_names = _check_latents(a["image"], len(prompts) * n, factor), None
    else:
        images, image_names = load_inputs(a["image"], len(prompts), max_pixels=limits.input_pixels)
    masks, mask_names = load_inputs(a["mask_image"], len(prompts), what="mask_image", max_pixels=limits.input_pixels)
    if masks is not None:
        import numpy as np

        if any(np.asarray(m.convert("L")).max() < 128 for m in masks):
            warnings.warn("a mask_image has no white at all, so nothing is repainted", stacklevel=_CALLER + 1)
    if masks is not None and images is None:
        raise InvalidInputError("mask_image needs image= (the picture to inpaint)")
    strength = a["strength"]
    if masks is not None and strength is None:
        strength = 1.0
    if images is None and strength is not None:
        raise InvalidInputError("strength applies to image-to-image only; give image= too, or drop strength")
    height, width = a["height"], a["width"]
    from_input = images is not None and (height is None or width is None)
    if images is not None:
        strength = check_float(0.6 if strength is None else strength, "strength", 0.0, 1.0,
                               "0 keeps the image, 1 replaces it")  # fmt: skip
        if _is_tensor(images):
            if masks is not None:
                raise InvalidInputError("inpainting takes a picture as image=, not latents")
            latent_h, latent_w = images.shape[-2] * (factor or 1), images.shape[-1] * (factor or 1)
            if (height or latent_h, width or latent_w) != (latent_h, latent_w):
                raise InvalidInputError(f"latents given as image= make {latent_w}x{latent_h} images; "
                                        "leave height and width out")  # fmt: skip
            height, width = latent_h, latent_w
        elif factor is not None:
            height = images[0].height // factor * factor if height is None else height
            width = images[0].width // factor * factor if width is None else width

    # resolution enhancement
    hires_scale, hires_strength, hires_upscale = a["hires_scale"], a["hires_strength"], a["hires_upscale"]
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

    # size: a multiple of the VAE's factor, and not more pixels than the limit (also after hires)
    height = default_size if height is None else height
    width = default_size if width is None else width
    if height is not None:
        height = check_side(height, "height", factor or 1)
    if width is not None:
        width = check_side(width, "width", factor or 1)
    if height is not None and width is not None:
        final = (height, width) if hires_scale is None else hires_size((height, width), hires_scale, factor or 1)
        if final[0] * final[1] > limits.pixels:
            what = f"{'the hires result ' if hires_scale is not None else ''}{final[1]}x{final[0]} ({final[0] * final[1]:,} pixels)"
            hint = ("the output takes the input image's size unless height and width (--size) are given"
                    if from_input else "make it smaller and enlarge it with an upscaler")  # fmt: skip
            raise limits.exceeded("pixels", what, hint)

    # guidance, noise
    guidance_scale = check_guidance(a["guidance_scale"])
    guidance_rescale = check_float(a["guidance_rescale"], "guidance_rescale", 0.0, 1.0, "0.7 is usual for v-prediction")
    eta = check_float(a["eta"], "eta", 0.0, 1.0, "eta is DDIM's noise level: 0 = deterministic, 1 = DDPM's")
    scheduler = a["scheduler"]
    if scheduler is not None:
        if not isinstance(scheduler, str):
            raise InvalidInputError(f"scheduler must be a name such as 'ddim', got {scheduler!r}")
        check_scheduler(scheduler)
    seeds = expand_seeds(a["seed"], len(prompts) * n)
    progress = a["progress"]
    control = _check_controls(a, controls, len(prompts), limits)
    sdxl = _check_sdxl(a, prompts, limits)
    if a["denoising_start"] is not None and images is None:
        raise InvalidInputError("denoising_start needs image= (the latents or picture to continue from)")
    cache_interval, cache_branch = a["cache_interval"], a["cache_branch"]
    if cache_interval is not None:
        cache_interval = positive_int(cache_interval, "cache_interval")
    if cache_branch is not None:
        if cache_interval is None:
            raise InvalidInputError("cache_branch needs cache_interval (a full U-Net call every N steps)")
        if whole_number(cache_branch) is None or cache_branch < 0:
            raise InvalidInputError(f"cache_branch must be a whole number of at least 0, got {cache_branch!r}")
    return {**control,
        **{k: a[k] for k in MICRO_KEYS}, "denoising_start": a["denoising_start"], "denoising_end": a["denoising_end"],
        "prompt_embeds": prompt_embeds, **sdxl,
        "prompts": prompts, "negatives": negatives, "n": n, "seeds": seeds, "steps": steps, "clip_skip": clip_skip,
        "images": images, "image_names": image_names, "masks": masks, "mask_names": mask_names, "strength": strength,
        "hires_scale": hires_scale, "hires_strength": hires_strength, "hires_upscale": hires_upscale,
        "height": height, "width": width, "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
        "eta": eta, "scheduler": scheduler, "output_type": a["output_type"], "callback": callback, "progress": progress,
        "cache_interval": cache_interval, "cache_branch": cache_branch,
    }  # fmt: skip


_CONTROL_FIELDS = ("control_images", "control_image_names", "control_scales", "control_starts", "control_ends",
                   "ip_images", "ip_image_names", "ip_scale")  # fmt: skip


def _check_controls(a: dict[str, Any], count: int, num_prompts: int, limits: Limits) -> dict[str, Any]:
    """Control pictures (one entry per loaded control: a picture, or one per prompt) and their weights;
    the IP-Adapter's image prompt."""
    image = a["control_image"]
    defaults = _call_defaults()
    weights = ("control_scale", "control_start", "control_end")
    out: dict[str, Any] = {"control_images": None, "control_image_names": None, "control_scales": [],
                           "control_starts": [], "control_ends": []}  # fmt: skip
    if image is None:
        if count:
            raise InvalidInputError(f"{count} ControlNet{'s' if count > 1 else ''} / T2I-Adapter{'s' if count > 1 else ''} "
                                    "loaded: give control_image= (one per control, in load order), or unload them")  # fmt: skip
        if any(a[k] != defaults[k] for k in weights):
            raise InvalidInputError("control_scale, control_start and control_end need control_image= (and a loaded ControlNet)")
    else:
        if not count:
            raise InvalidInputError("control_image needs a ControlNet or T2I-Adapter: load one first "
                                    "(pipe.load_controlnet(PATH), --controlnet PATH)")  # fmt: skip
        if count == 1:
            entries = [image]
        elif not isinstance(image, (list, tuple)) or len(image) != count:
            got = f"a list of {len(image)}" if isinstance(image, (list, tuple)) else "one image"
            raise InvalidInputError(f"{count} controls are loaded: give control_image as a list with one entry per "
                                    f"control, in load order (got {got})")  # fmt: skip
        else:
            entries = list(image)
        loaded = [load_inputs(e, num_prompts, what="control_image", max_pixels=limits.input_pixels) for e in entries]
        out["control_images"], out["control_image_names"] = [im for im, _ in loaded], [names for _, names in loaded]
        out["control_scales"] = _per_control(a["control_scale"], "control_scale", count, 0.0, 10.0, "1 is usual")
        out["control_starts"] = _per_control(a["control_start"], "control_start", count, 0.0, 1.0, "0 = from the first step")
        out["control_ends"] = _per_control(a["control_end"], "control_end", count, 0.0, 1.0, "1 = to the last step")
        for start, end in zip(out["control_starts"], out["control_ends"]):
            if start >= end:
                raise InvalidInputError(f"control_start ({start}) must be below control_end ({end}): the control acts "
                                        "on the steps between them")  # fmt: skip
    out["ip_images"], out["ip_image_names"] = load_inputs(a["ip_image"], num_prompts, what="ip_image",
                                                          max_pixels=limits.input_pixels)  # fmt: skip
    out["ip_scale"] = check_float(a["ip_scale"], "ip_scale", 0.0, 10.0, "1 is usual; lower mixes it with the prompt")
    if out["ip_images"] is None and out["ip_scale"] != defaults["ip_scale"]:
        raise InvalidInputError("ip_scale needs ip_image= (and a loaded IP-Adapter)")
    return out


def _per_control(value, name: str, count: int, low: float, high: float, hint: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InvalidInputError(f"got {len(values)} {name} values for {count} controls; give one for all, or one per control")
    return [check_float(v, name, low, high, hint) for v in values]


def _check_control_fit(pipe, a: dict[str, Any]) -> None:
    """What the loaded controls ask of the call: an IP image with an IP-Adapter, T2I-Adapter sizes."""
    if a["ip_images"] is not None and pipe.controls.ip is None:
        raise InvalidInputError("ip_image needs an IP-Adapter: load one first (pipe.load_ip_adapter(PATH, image_encoder=DIR))")
    if a["ip_images"] is None and pipe.controls.ip is not None:
        raise InvalidInputError("an IP-Adapter is loaded: give ip_image= (the image prompt), or pipe.unload_ip_adapter()")
    sizes = [(a["height"], a["width"])]
    if a["hires_scale"] is not None:
        sizes.append(hires_size(sizes[0], a["hires_scale"], pipe.vae_scale_factor))
    for control in pipe.controls.items:
        multiple = getattr(control.model, "total_downscale_factor", None)
        if control.kind == "t2i_adapter" and multiple and any(h % multiple or w % multiple for h, w in sizes):
            raise InvalidInputError(f"T2I-Adapter {control.name!r} needs a width and height that are multiples of "
                                    f"{multiple}; got {sizes[-1][1]}x{sizes[-1][0]}")  # fmt: skip


def _is_tensor(value) -> bool:
    return type(value).__module__.startswith("torch") and type(value).__name__ == "Tensor"


def _check_latents(latents, total: int, factor: Optional[int]):
    """Latents given as image=: (B, C, h, w) with one row per image of the call, or one for all."""
    import torch

    if latents.ndim != 4 or latents.shape[0] not in (1, total):
        raise InvalidInputError(f"latents given as image= must be (images, channels, height/8, width/8) with "
                                f"1 or {total} rows (one per image of this call), got {tuple(latents.shape)}")  # fmt: skip
    if not bool(torch.isfinite(latents).all()):
        raise InvalidInputError("the latents given as image= hold NaN or infinite values")
    return latents.expand(total, *latents.shape[1:]) if latents.shape[0] == 1 else latents


def _check_timesteps(sched, name: str, steps: int) -> None:
    """Refuse a schedule that some schedulers build without complaint but cannot run: PNDM spaces its
    steps num_train_timesteps // steps apart, so at 1000 steps one leaves the table (an IndexError
    later) and beyond it every step is the same timestep (garbage)."""
    trained = int(getattr(sched.config, "num_train_timesteps", 1000))
    t = sched.timesteps.detach().cpu().double()
    distinct = len(set(t.tolist()))
    collapsed = type(sched).__name__ == "PNDMScheduler" and distinct < steps - 1  # (sigma samplers may repeat)
    if len(t) and (t.max() >= trained or t.min() < 0 or collapsed):
        raise InvalidInputError(
            f"scheduler {name} cannot run {steps} steps on a model trained with {trained} timesteps "
            f"(its schedule would repeat or leave them); use fewer steps, e.g. {min(steps // 2, trained // 2)}"
        )


def hires_size(size: tuple[int, int], factor_of_size: float, multiple: int) -> tuple[int, int]:
    """The (height, width) a hires pass makes from ``size``: scaled and rounded to the VAE's multiple."""
    return tuple(round(side * factor_of_size / multiple) * multiple for side in size)


# Far from the native size a U-Net repeats its content (tiles) or loses it: warned once per pipeline and size.
_FAR = 2.0


def _warn_far_from_native(pipe, height: int, width: int) -> None:
    native = pipe.default_size
    if max(height, width) < _FAR * native and min(height, width) >= native / _FAR:
        return
    seen = pipe.__dict__.setdefault("_warned_sizes", set())
    if (height, width) in seen:
        return
    seen.add((height, width))
    warnings.warn(
        f"{width}x{height} is far from this model's native {native}x{native}: expect repeated, tiled or "
        f"broken-up content; make the image near {native}x{native} and enlarge it (hires_scale, --hires)",
        stacklevel=_CALLER + 1,
    )


# -- the rules for single arguments (batch files check their rows with them) ------------------------


def check_count(value, name: str = "num_images_per_prompt") -> int:
    return positive_int(value, name)


def check_steps(value, name: str = "num_inference_steps", limits: Optional[Limits] = None) -> int:
    steps = positive_int(value, name)
    limits = limits or Limits()
    if steps > limits.steps:
        raise limits.exceeded("steps", f"{name} {steps}", "50 is usual, few samplers gain beyond 150")
    return steps


# Guidance far above ~30 only saturates the image; by 1e30 the arithmetic overflows to NaN.
MAX_GUIDANCE = 100.0


def check_guidance(value, name: str = "guidance_scale") -> float:
    return check_float(value, name, 0.0, MAX_GUIDANCE, "use 1 for no guidance, 7.5 is usual")


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


def _check_embeds(embeds, name: str, width: Optional[int] = None, ndim: int = 3):
    import torch

    if not isinstance(embeds, torch.Tensor) or embeds.ndim != ndim or embeds.shape[0] < 1:
        raise InvalidInputError(f"{name} must be a {'(batch, tokens, dim)' if ndim == 3 else '(batch, dim)'} tensor")
    if not bool(torch.isfinite(embeds).all()):
        raise InvalidInputError(f"{name} holds NaN or infinite values")
    if width is not None and embeds.shape[-1] != width:
        raise InvalidInputError(f"{name} has dimension {embeds.shape[-1]}, this model's text conditioning {width}")
    return embeds


# SDXL's arguments: the second prompts, the pooled embeddings, micro-conditioning (Podell et al. 2023,
# Sec. 2.2) and the base -> refiner hand-off. They are refused for models that cannot use them.
_SIZES = ("original_size", "target_size", "negative_original_size", "negative_target_size")
_CROPS = ("crops_coords_top_left", "negative_crops_coords_top_left")
_SCORES = ("aesthetic_score", "negative_aesthetic_score")
MICRO_KEYS = _SIZES + _CROPS + _SCORES
SDXL_KEYS = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds") + MICRO_KEYS


def _check_sdxl(a: dict[str, Any], prompts: list, limits: Limits) -> dict[str, Any]:
    """The model-free checks of the SDXL arguments; returns them completed (prompts_2 / negatives_2 as lists)."""
    out: dict[str, Any] = {}
    for key, first in (("prompt_2", prompts), ("negative_prompt_2", None)):
        value = a[key]
        if value is None:
            out[key] = None
        elif isinstance(value, str) and (key == "negative_prompt_2" or len(prompts) == 1):
            out[key] = _as_prompt_list(value, key, limits) * len(prompts)
        else:
            out[key] = _as_prompt_list(value, key, limits)
            if len(out[key]) != len(prompts):
                raise InvalidInputError(f"got {len(prompts)} prompts but {len(out[key])} in {key}; give one per prompt")
    if a["prompt_embeds"] is not None and (a["prompt_2"] is not None or a["negative_prompt_2"] is not None):
        raise InvalidInputError("prompt_2 / negative_prompt_2 go with prompt, not with prompt_embeds")
    for key in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
        if a[key] is not None:
            _check_embeds(a[key], key, ndim=2)
            if a[key.replace("pooled_", "")] is None:
                raise InvalidInputError(f"{key} goes with {key.replace('pooled_', '')}")
            if a[key].shape[0] != len(prompts):
                raise InvalidInputError(f"{key} has {a[key].shape[0]} rows for {len(prompts)} prompts")
    for key in _SIZES:
        if a[key] is not None:
            value = a[key]
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or any(whole_number(v) is None or v < 1 for v in value)):  # fmt: skip
                raise InvalidInputError(f"{key} must be (height, width) in pixels, two whole numbers >= 1, got {value!r}")
    for key in _CROPS:
        if a[key] is not None:
            value = a[key]
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or any(whole_number(v) is None or v < 0 for v in value)):  # fmt: skip
                raise InvalidInputError(f"{key} must be (top, left) in pixels, two whole numbers >= 0, got {value!r}")
    for key in _SCORES:
        if a[key] is not None:
            check_float(a[key], key, 0.0, 10.0, "the refiner was trained on LAION aesthetic scores; 6 is its default")
    for key in ("denoising_start", "denoising_end"):
        if a[key] is not None:
            check_float(a[key], key, 0.0, 1.0, "0.8 hands the last fifth of the schedule to a refiner")
            if not 0.0 < a[key] < 1.0:
                raise InvalidInputError(f"{key} must lie strictly between 0 and 1, got {a[key]!r}")
    if a["denoising_start"] is not None and a["denoising_end"] is not None and a["denoising_start"] >= a["denoising_end"]:
        raise InvalidInputError("denoising_start must be smaller than denoising_end")
    return out


def _sdxl_arguments(pipe, a: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The Request fields of the SDXL arguments, checked against the model (``a``: check_arguments' result)."""
    from ..models.architectures import is_sdxl

    given = sorted(k for k in SDXL_KEYS if arguments.get(k) is not None)
    sdxl = is_sdxl(pipe.unet)
    if given and not sdxl:
        raise InvalidInputError(f"{given[0]} applies to SDXL models only; this model has one text encoder and no "
                                "micro-conditioning")  # fmt: skip
    aesthetic = sdxl and pipe.time_id_count == 5
    if given and aesthetic and any(k in given for k in ("target_size", "negative_target_size")):
        raise InvalidInputError("target_size applies to SDXL base models; the refiner conditions on aesthetic_score")
    if given and sdxl and not aesthetic and any(k in given for k in _SCORES):
        raise InvalidInputError("aesthetic_score applies to the SDXL refiner; base models condition on target_size")
    if sdxl and a["prompt_embeds"] is not None and arguments.get("pooled_prompt_embeds") is None:
        raise InvalidInputError("an SDXL model needs pooled_prompt_embeds (P, D) with prompt_embeds")
    if sdxl and arguments.get("negative_prompt_embeds") is not None and arguments.get("negative_pooled_prompt_embeds") is None:
        raise InvalidInputError("an SDXL model needs negative_pooled_prompt_embeds with negative_prompt_embeds")
    for key in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
        if arguments.get(key) is not None and arguments[key].shape[-1] != pipe.pooled_width:
            raise InvalidInputError(f"{key} has dimension {arguments[key].shape[-1]}, this model's pooled embedding "
                                    f"{pipe.pooled_width}")  # fmt: skip
    start, end = a["denoising_start"], a["denoising_end"]
    if start is not None and a["images"] is None:
        raise InvalidInputError("denoising_start needs image= (the latents or picture to continue from)")
    if start is not None and a["masks"] is not None:
        raise InvalidInputError("denoising_start does not combine with inpainting yet; refine the inpainted image")
    if (start is not None or end is not None) and a["hires_scale"] is not None:
        raise InvalidInputError("denoising_start / denoising_end do not combine with hires; refine, then upscale")
    zero = (sdxl and pipe.force_zeros_for_empty_prompt and arguments.get("negative_prompt") is None
            and a["negative_prompt_2"] is None and arguments.get("negative_prompt_embeds") is None)  # fmt: skip
    return {
        "prompts_2": a["prompt_2"], "negatives_2": a["negative_prompt_2"],
        "pooled_prompt_embeds": arguments.get("pooled_prompt_embeds"),
        "negative_pooled_prompt_embeds": arguments.get("negative_pooled_prompt_embeds"),
        "zero_negative": zero, "micro": {k: a[k] for k in MICRO_KEYS} if sdxl else None,
        "denoising_start": start, "denoising_end": end,
    }  # fmt: skip


def micro_conditioning(request, size: tuple[int, int], aesthetic: bool) -> tuple[list[float], list[float]]:
    """SDXL's micro-conditioning of one pass at ``size`` (height, width): (positive, negative) values.

    Base: original size + crop corner + target size (6 values); refiner: original size + crop
    corner + aesthetic score (5). Defaults as diffusers': sizes = the pass's size, crop (0, 0),
    aesthetic 6.0 / negative 2.5; each negative value defaults to its positive one.
    """
    m = request.micro or {}
    original = tuple(m.get("original_size") or size)
    crops = tuple(m.get("crops_coords_top_left") or (0, 0))
    neg_original = tuple(m.get("negative_original_size") or original)
    neg_crops = tuple(m.get("negative_crops_coords_top_left") or crops)
    if aesthetic:
        score = 6.0 if m.get("aesthetic_score") is None else m["aesthetic_score"]
        neg_score = 2.5 if m.get("negative_aesthetic_score") is None else m["negative_aesthetic_score"]
        return [*original, *crops, score], [*neg_original, *neg_crops, neg_score]
    target = tuple(m.get("target_size") or size)
    neg_target = tuple(m.get("negative_target_size") or target)
    return [*original, *crops, *target], [*neg_original, *neg_crops, *neg_target]


def _as_prompt_list(value, name: str, limits: Limits) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise InvalidInputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise InvalidInputError(f"{name} is an empty list; give at least one prompt (\"\" is an unconditional image)")
    for text in items:
        check_prompt_text(text, name, limits)
    return list(items)


def check_prompt_text(text, name: str, limits: Limits) -> str:
    """A prompt: valid text, and not longer than ``limits.prompt_chars`` (batch rows are read with it too)."""
    check_text(text, name)
    if len(text) > limits.prompt_chars:
        raise limits.exceeded("prompt_chars", f"a {name} of {len(text):,} characters",
                              "prompts are encoded in chunks of 75 tokens, a few hundred characters each")  # fmt: skip
    return text


@functools.lru_cache(maxsize=1)
def _call_defaults() -> dict[str, Any]:
    """The arguments of ``LatentDiffusion.__call__`` with their defaults (read from its signature)."""
    import inspect

    from .pipeline import LatentDiffusion

    parameters = list(inspect.signature(LatentDiffusion.__call__).parameters.values())[1:]  # without self
    return {p.name: p.default for p in parameters}

